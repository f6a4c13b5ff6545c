//! Small shared helpers: secrets that never print, durable file writes.

use std::fmt;
use std::io::Write;
use std::path::Path;

/// A secret string (password, token). `Debug` and `Display` print `***`, so a secret
/// that ends up in a log line, an error or a journal record shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself; call only where it goes on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Write `bytes` to `path` durably: temp file + fsync + rename + fsync of the directory.
/// Never truncates the file in place, so a crash leaves either the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Quote `s` for a POSIX shell as one word.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Fault injection for the fault-matrix tests: whether `STATESHIFT_FAULT` (a
/// comma-separated list) names `fault`. Each fault is documented where it is checked
/// and in RELIABILITY.md; none is active unless that variable is set.
pub fn fault_injected(fault: &str) -> bool {
    std::env::var("STATESHIFT_FAULT")
        .map(|v| v.split(',').any(|f| f.trim() == fault))
        .unwrap_or(false)
}

/// Fault injection: with `hold:<phase>` in `STATESHIFT_FAULT`, the engine waits 3 s
/// right after that phase starts (and is journaled), so a test can inject its fault
/// (kill a server, cut a connection) while the migration is in that phase.
pub async fn fault_hold(phase: &str) {
    if fault_injected(&format!("hold:{phase}")) {
        tracing::warn!(phase, "STATESHIFT_FAULT=hold:{phase}: holding 3 s");
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn shell_quote_keeps_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("/var/tmp/x.tar"), "/var/tmp/x.tar");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b;rm"), "'a b;rm'");
    }

    #[test]
    fn write_atomic_replaces_content_whole() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
    }
}

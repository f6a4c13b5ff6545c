//! Small shared helpers: secrets that never print, durable file writes, HTTP bodies read
//! with a size cap.

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

/// Serialized as `***` too: whatever is written out never holds the secret.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
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

/// Why [`read_body_capped`] gave up.
#[derive(Debug)]
pub enum CappedReadError {
    /// The body is longer than the limit (by its `Content-Length` or as it streamed in).
    TooLarge,
    /// The connection failed while reading.
    Transport(reqwest::Error),
}

/// Read an HTTP response body of at most `limit` bytes. A longer one is refused from its
/// `Content-Length` before anything is read, or as soon as the streamed bytes pass the
/// limit, so a wrong URL or a broken server cannot make a client buffer hundreds of
/// megabytes.
pub async fn read_body_capped(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, CappedReadError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(CappedReadError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(CappedReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(CappedReadError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
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

/// `s` as a literal in an extended regular expression (`pkill -f`).
pub fn regex_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A shell command that stops every process whose command line contains `text` (TERM,
/// then KILL after 5 s), never itself: the pattern's first character is in a group, so
/// the pattern does not match its own text in the shell's and `pkill`'s command lines.
/// Run it on its own: a command line that names `text` elsewhere would be stopped too.
pub fn stop_processes_naming(text: &str) -> String {
    let mut chars = text.chars();
    let Some(first) = chars.next() else {
        return "true".into();
    };
    let pattern = format!(
        "({}){}",
        regex_quote(&first.to_string()),
        regex_quote(chars.as_str())
    );
    format!(
        "p={}; pkill -f -- \"$p\"; for i in $(seq 50); do pgrep -f -- \"$p\" >/dev/null || exit 0; sleep 0.1; done; pkill -KILL -f -- \"$p\"; exit 0",
        shell_quote(&pattern)
    )
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

/// The crate's one retry schedule for transient failures: steps doubling from `first`
/// up to `max`, each waited for a random 50–100 % of its length (jitter: clients that
/// failed together, say every SO of a cloud when Keystone restarts, do not come back
/// together), within a time budget counted from the first failure (or from
/// [`Retry::counting_from`]). Never waits past the budget. [`Retry::unbounded`] has no
/// budget (the load poller retries as long as it runs).
#[derive(Debug, Clone)]
pub struct Retry {
    first: std::time::Duration,
    step: std::time::Duration,
    max: std::time::Duration,
    budget: Option<std::time::Duration>,
    deadline: Option<tokio::time::Instant>,
}

impl Retry {
    /// A schedule of `budget` in all, from `first` doubling to `max`.
    pub fn new(
        first: std::time::Duration,
        max: std::time::Duration,
        budget: std::time::Duration,
    ) -> Retry {
        Retry {
            first: first.min(max),
            step: first.min(max),
            max,
            budget: Some(budget),
            deadline: None,
        }
    }

    /// A schedule without a budget: it never ends.
    pub fn unbounded(first: std::time::Duration, max: std::time::Duration) -> Retry {
        Retry {
            budget: None,
            ..Retry::new(first, max, std::time::Duration::ZERO)
        }
    }

    /// Count the budget from `start` (the first attempt) rather than the first failure.
    pub fn counting_from(mut self, start: tokio::time::Instant) -> Retry {
        self.deadline = self.budget.map(|b| start + b);
        self
    }

    /// A success: the next failure starts the schedule (and its budget) again.
    pub fn reset(&mut self) {
        self.step = self.first;
        self.deadline = None;
    }
}

/// The waits before each next attempt; ends once the budget is spent.
impl Iterator for Retry {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let now = tokio::time::Instant::now();
        let left = match self.budget {
            Some(budget) => {
                let deadline = *self.deadline.get_or_insert(now + budget);
                deadline.checked_duration_since(now)?
            }
            None => std::time::Duration::MAX,
        };
        if left.is_zero() {
            return None;
        }
        let wait = self.step.mul_f64(0.5 + fastrand::f64() * 0.5).min(left);
        self.step = (self.step * 2).min(self.max);
        Some(wait)
    }
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

/// Run `f` on a thread of its own whose nice value is `nice` (Linux keeps one per
/// thread): work of this process that the machine's other processes must not wait for,
/// such as digesting a whole database read back from a server while the writers' server
/// shares the CPUs. Nice 0 leaves the thread as it is. The answer comes through the
/// receiver; `Err` if no thread could be started.
pub fn spawn_niced<T: Send + 'static>(
    nice: u8,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<tokio::sync::oneshot::Receiver<T>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("stateshift-niced".into())
        .spawn(move || {
            if nice > 0 {
                // SAFETY: plain system calls on this thread's own id; they touch no memory.
                // Raising one's own nice value needs no privilege; a failure leaves the
                // thread at its priority, which is only slower for the others.
                unsafe {
                    let tid = libc::gettid();
                    libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, i32::from(nice));
                }
            }
            let _ = tx.send(f());
        })?;
    Ok(rx)
}

/// Wall-clock milliseconds since the Unix epoch (0 should the clock be before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The full chain of an error's causes on one line, each cause once (an SSH client's
/// stderr and a TLS library's reason are deep in the chain).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(m.trim());
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    /// The thread runs at the nice value asked for, and this one keeps its own.
    #[tokio::test]
    async fn a_niced_thread_runs_at_its_nice_value_and_leaves_the_caller_as_it_was() {
        fn own_nice() -> i32 {
            // SAFETY: reads this thread's priority; errno is reset first as the man page says.
            unsafe {
                *libc::__errno_location() = 0;
                libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t)
            }
        }
        let before = own_nice();
        let seen = super::spawn_niced(19, own_nice).unwrap().await.unwrap();
        assert_eq!(seen, 19);
        let untouched = super::spawn_niced(0, own_nice).unwrap().await.unwrap();
        assert_eq!(untouched, before, "nice 0 changes nothing");
        assert_eq!(own_nice(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_double_with_jitter_and_never_wait_past_the_budget() {
        use std::time::Duration;
        let ms = |d: Duration| d.as_millis();
        let mut r = super::Retry::new(
            Duration::from_millis(250),
            Duration::from_secs(4),
            Duration::from_secs(10),
        );
        let mut waited = Duration::ZERO;
        let mut steps = Vec::new();
        for d in r.by_ref() {
            steps.push(ms(d));
            tokio::time::sleep(d).await;
            waited += d;
        }
        assert!(waited <= Duration::from_secs(10), "{waited:?}");
        let want = [250u128, 500, 1000, 2000, 4000];
        for (got, step) in steps.iter().zip(want) {
            assert!(
                (step / 2..=step).contains(got),
                "{got} ms for a {step} ms step: {steps:?}"
            );
        }
        assert!(
            steps.len() > want.len(),
            "goes on at the cap until the budget: {steps:?}"
        );
        assert_eq!(
            super::Retry::new(
                Duration::from_millis(1),
                Duration::from_millis(1),
                Duration::ZERO
            )
            .next(),
            None
        );
        // Counted from the first attempt: time already spent is gone from the budget.
        let start = tokio::time::Instant::now();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut r = super::Retry::new(
            Duration::from_secs(5),
            Duration::from_secs(5),
            Duration::from_secs(3),
        )
        .counting_from(start);
        assert!(r.next().unwrap() <= Duration::from_secs(1));
    }

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
    fn stopping_processes_by_name_stops_them_and_never_itself() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("restore-17 (x)");
        // Short sleeps, and no inherited output: nothing outlives the test.
        let mut victim = std::process::Command::new("sh")
            .arg("-c")
            .arg("while :; do sleep 0.1; done")
            .arg(&marker)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(stop_processes_naming(&marker.display().to_string()))
            .output()
            .unwrap();
        assert!(out.status.success(), "the stopper survives itself: {out:?}");
        let status = victim.wait().unwrap();
        assert!(
            !status.success(),
            "the named process was stopped: {status:?}"
        );
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

/// Test-only strategies shared by the property tests of the modules that read outside
/// input.
#[cfg(test)]
pub(crate) mod arb {
    use proptest::prelude::*;
    use serde_json::Value;

    /// Strings that are often the words the parsers look for, else anything.
    pub fn word() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec![
                "", "0", "1", "3", "-1", "1e308", "1.5", "60s", "1m;wd1-5h9-18", "{$DELAY}",
                "6.0.14", "7.2.0rc1", "999999999", "1000000000", "18446744073709551616",
                "2026-05-20T12:00:00Z", "9999-12-31T23:59:59Z", "public", "internal", "RegionOne",
                "orchestration", "CREATE_COMPLETE", "DELETE_COMPLETE", "CREATE_FAILED", "s",
                "22", "10.0.0.13",
            ])
            .prop_map(String::from),
            1 => any::<String>(),
        ]
    }

    /// Keys the Zabbix, Keystone and Heat wire types use, or any string.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "result", "error", "code", "message", "data", "hostid", "itemid", "key_",
                "value_type", "delay", "status", "state", "lastclock", "lastns", "lastvalue",
                "clock", "ns", "value", "token", "expires_at", "issued_at", "project", "id",
                "catalog", "type", "endpoints", "interface", "url", "region_id", "region",
                "stack", "stacks", "stack_name", "stack_status", "stack_status_reason",
                "outputs", "output_key", "output_value", "output_error", "explanation", "title",
            ])
            .prop_map(String::from),
            1 => any::<String>(),
        ]
    }

    /// Arbitrary JSON, biased towards the shapes and words of the real replies.
    pub fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            word().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((key(), inner), 0..8)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }
}

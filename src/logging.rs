//! Log output on stderr, shaped for where it goes:
//!
//! - a terminal: coloured text with timestamps;
//! - a pipe or file: the same text without colour codes;
//! - the systemd journal (`JOURNAL_STREAM` names stderr): every line starts with its syslog
//!   priority, `<3>` error, `<4>` warn, `<6>` info, `<7>` debug and trace, which journald
//!   turns into the record's priority (`SyslogLevelPrefix=`, on by default) and strips;
//!   no timestamps in text (journald keeps its own);
//! - `--log-format json`: one JSON object per line (`timestamp`, `level`, `target`,
//!   `message`, the event's fields, the current span), prefixed the same way under journald.
//!
//! Secrets stay out because they are `util::Secret`, which formats as `***` everywhere.

use std::fmt;
use std::io::IsTerminal;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// How log lines look; decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogStyle {
    pub format: LogFormat,
    /// Colour codes: only when stderr is a terminal.
    pub ansi: bool,
    /// stderr is a systemd journal stream: priority prefixes, no text timestamps.
    pub journald: bool,
}

impl LogStyle {
    /// The style for this process's stderr.
    pub fn detect(format: LogFormat) -> LogStyle {
        let journald = std::env::var("JOURNAL_STREAM")
            .is_ok_and(|v| journal_stream_names(&v, stderr_identity()));
        LogStyle {
            format,
            ansi: !journald && std::io::stderr().is_terminal(),
            journald,
        }
    }
}

/// Whether `JOURNAL_STREAM` (`<device>:<inode>`, set by systemd) names the file `stderr`
/// is (its device and inode). A child whose stderr was redirected elsewhere inherits the
/// variable but not the stream, so the variable alone is not enough (systemd.exec(5)).
pub fn journal_stream_names(value: &str, stderr: Option<(u64, u64)>) -> bool {
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    match (dev.trim().parse::<u64>(), ino.trim().parse::<u64>(), stderr) {
        (Ok(dev), Ok(ino), Some(fd)) => (dev, ino) == fd,
        _ => false,
    }
}

/// Device and inode of the file behind file descriptor 2.
fn stderr_identity() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// The syslog priority journald understands for a level (`sd-daemon.h`).
pub fn syslog_priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Puts `<priority>` in front of every line another formatter writes, so that a message
/// spanning lines stays one priority in the journal.
pub struct SyslogPrefix<E>(pub E);

impl<S, N, E> FormatEvent<S, N> for SyslogPrefix<E>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    E: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        let p = syslog_priority(*event.metadata().level());
        for l in line.split_inclusive('\n') {
            write!(writer, "<{p}>{l}")?;
        }
        Ok(())
    }
}

/// The formatting layer for `style`, writing to `writer`.
pub fn layer<S, W>(style: LogStyle, writer: W) -> Box<dyn Layer<S> + Send + Sync + 'static>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let base = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(style.ansi);
    match (style.format, style.journald) {
        (LogFormat::Text, false) => base.boxed(),
        (LogFormat::Text, true) => base.without_time().map_event_format(SyslogPrefix).boxed(),
        (LogFormat::Json, false) => base.json().flatten_event(true).boxed(),
        (LogFormat::Json, true) => base
            .json()
            .flatten_event(true)
            .map_event_format(SyslogPrefix)
            .boxed(),
    }
}

/// Install the process-wide subscriber: `filter`, then `style` on stderr.
pub fn init(
    filter: EnvFilter,
    style: LogStyle,
) -> Result<(), tracing_subscriber::util::TryInitError> {
    tracing_subscriber::registry()
        .with(filter)
        .with(layer(style, std::io::stderr))
        .try_init()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A `MakeWriter` into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    /// What `emit` logs through the layer for `style`.
    fn capture(style: LogStyle, emit: impl FnOnce()) -> String {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry().with(layer(style, buf.clone()));
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    fn style(format: LogFormat, journald: bool) -> LogStyle {
        LogStyle {
            format,
            ansi: false,
            journald,
        }
    }

    fn every_level() {
        tracing::error!("at error");
        tracing::warn!("at warn");
        tracing::info!("at info");
        tracing::debug!("at debug");
        tracing::trace!("at trace");
    }

    #[test]
    fn under_journald_each_level_starts_its_line_with_its_syslog_priority() {
        let out = capture(style(LogFormat::Text, true), every_level);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        for (line, (prefix, level, msg)) in lines.iter().zip([
            ("<3>", "ERROR", "at error"),
            ("<4>", "WARN", "at warn"),
            ("<6>", "INFO", "at info"),
            ("<7>", "DEBUG", "at debug"),
            ("<7>", "TRACE", "at trace"),
        ]) {
            let rest = line
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{line:?} should start with {prefix}"));
            // No timestamp: the level comes first (journald stamps the record itself).
            assert!(rest.trim_start().starts_with(level), "{line:?}");
            assert!(rest.ends_with(msg), "{line:?}");
        }
        assert!(!out.contains('\x1b'), "no colour codes: {out:?}");
    }

    #[test]
    fn under_journald_every_line_of_a_multi_line_message_keeps_the_priority() {
        let out = capture(style(LogFormat::Text, true), || {
            tracing::warn!("first line\nsecond line\nthird line")
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines.iter().all(|l| l.starts_with("<4>")), "{out}");
    }

    #[test]
    fn outside_the_journal_text_has_timestamps_no_prefix_and_no_colour_unless_asked() {
        let out = capture(style(LogFormat::Text, false), || tracing::info!("plain"));
        let line = out.lines().next().unwrap_or_default();
        assert!(line.starts_with(|c: char| c.is_ascii_digit()), "{line:?}");
        assert!(!line.starts_with('<') && !out.contains('\x1b'), "{line:?}");
        let coloured = capture(
            LogStyle {
                ansi: true,
                ..style(LogFormat::Text, false)
            },
            || tracing::info!("plain"),
        );
        assert!(coloured.contains('\x1b'), "{coloured:?}");
    }

    #[test]
    fn json_output_is_one_parseable_object_per_line_without_secrets() {
        let secret = crate::util::Secret::new("hunter2-api-token");
        let out = capture(style(LogFormat::Json, false), || {
            let span = tracing::info_span!("migration", migration_id = "m-1");
            let _g = span.enter();
            tracing::info!(points = 42u64, "replayed \"the\" delta");
            tracing::warn!(token = %secret, "refused\nwith a second line");
            tracing::error!(error = ?secret, "failed");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        let objs: Vec<serde_json::Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
            .collect();
        assert!(objs.iter().all(|o| o.is_object()), "{out}");
        assert_eq!(objs[0]["level"], "INFO");
        assert_eq!(objs[0]["message"], "replayed \"the\" delta");
        assert_eq!(objs[0]["points"], 42);
        assert_eq!(objs[0]["span"]["migration_id"], "m-1", "{}", lines[0]);
        assert!(objs[0]["timestamp"].is_string(), "{}", lines[0]);
        assert_eq!(objs[1]["level"], "WARN");
        assert_eq!(objs[1]["message"], "refused\nwith a second line");
        assert_eq!(objs[2]["level"], "ERROR");
        assert!(!out.contains("hunter2"), "{out}");
    }

    #[test]
    fn json_under_journald_carries_the_prefix_before_each_object() {
        let out = capture(style(LogFormat::Json, true), every_level);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 5, "{out}");
        for (line, (prefix, level)) in lines.iter().zip([
            ("<3>", "ERROR"),
            ("<4>", "WARN"),
            ("<6>", "INFO"),
            ("<7>", "DEBUG"),
            ("<7>", "TRACE"),
        ]) {
            let json = line
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("{line:?} should start with {prefix}"));
            let v: serde_json::Value =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {line:?}"));
            assert_eq!(v["level"], level);
        }
    }

    #[test]
    fn journal_stream_counts_only_when_it_names_stderr() {
        assert!(journal_stream_names("8:12345", Some((8, 12345))));
        assert!(!journal_stream_names("8:12345", Some((8, 999))));
        assert!(!journal_stream_names("8:12345", None));
        assert!(!journal_stream_names("", Some((8, 12345))));
        assert!(!journal_stream_names("8", Some((8, 12345))));
        assert!(!journal_stream_names("x:y", Some((8, 12345))));
    }

    #[test]
    fn priorities_follow_syslog() {
        assert_eq!(syslog_priority(Level::ERROR), 3);
        assert_eq!(syslog_priority(Level::WARN), 4);
        assert_eq!(syslog_priority(Level::INFO), 6);
        assert_eq!(syslog_priority(Level::DEBUG), 7);
        assert_eq!(syslog_priority(Level::TRACE), 7);
    }
}

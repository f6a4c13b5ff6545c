//! The commands of the binary that are not library API: `stateshift demo` and
//! `stateshift bench`, and how the command line shows a migration's progress.

pub mod bench;
pub mod demo;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use stateshift::migrate::engine::{Phase, Progress};

static HUMAN_TO_STDERR: AtomicBool = AtomicBool::new(false);

/// From now on, lines for a person go to stderr: stdout is kept for one JSON document.
pub fn human_to_stderr() {
    HUMAN_TO_STDERR.store(true, Ordering::Relaxed);
}

/// Whether lines for a person go to stderr.
pub fn humans_on_stderr() -> bool {
    HUMAN_TO_STDERR.load(Ordering::Relaxed)
}

/// Print a line for a person (`say!`). A closed or full output (`stateshift migrate |
/// head`) loses the line, never the migration: `println!` would panic.
pub fn say_line(line: &str) {
    use std::io::Write;
    let _ = if humans_on_stderr() {
        writeln!(std::io::stderr(), "{line}")
    } else {
        writeln!(std::io::stdout(), "{line}")
    };
}

/// Progress printed for a person.
pub struct PrintProgress;
impl Progress for PrintProgress {
    fn phase_started(&self, phase: Phase) {
        say!("  -> {phase}");
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        say!("     {phase} done in {:.3} s", took.as_secs_f64());
    }
    fn note(&self, msg: &str) {
        say!("     {msg}");
    }
}

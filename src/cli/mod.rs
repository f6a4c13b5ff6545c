//! The commands of the binary that are not library API: `stateshift demo` and
//! `stateshift bench`, and how the command line shows a migration's progress.

pub mod bench;
pub mod demo;

use std::time::Duration;

use stateshift::migrate::engine::{Phase, Progress};

/// Progress printed for a person.
pub struct PrintProgress;
impl Progress for PrintProgress {
    fn phase_started(&self, phase: Phase) {
        println!("  -> {phase}");
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        println!("     {phase} done in {:.3} s", took.as_secs_f64());
    }
    fn note(&self, msg: &str) {
        println!("     {msg}");
    }
}

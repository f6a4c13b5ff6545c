//! Records the commit the binary is built from, for `stateshift --version` and the first
//! line of `stateshift bench`: a figure is worth as much as knowing which code gave it.
//! `+changes` when the sources that go into the binary differ from that commit;
//! `unknown` outside a git checkout of this package.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("--no-optional-locks") // never races an operator's `git commit` for the index
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    const SOURCES: [&str; 4] = ["src", "Cargo.toml", "Cargo.lock", "build.rs"];
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
    }
    let here = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let ours = git(&["rev-parse", "--show-toplevel"])
        .zip(Path::new(&here).canonicalize().ok())
        .is_some_and(|(top, here)| Path::new(&top).canonicalize().ok() == Some(here));
    if !ours {
        // A source tarball unpacked inside some other repository is not that commit.
        println!("cargo:rustc-env=STATESHIFT_COMMIT=unknown");
        return;
    }
    // Run again when HEAD moves: HEAD's reflog gets a line on every commit, amend,
    // checkout and reset (a packed branch ref has no file of its own to watch).
    for r in ["HEAD", "logs/HEAD"] {
        if let Some(p) = git(&["rev-parse", "--git-path", r]).filter(|p| Path::new(p).exists()) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            let mut status = vec!["status", "--porcelain", "--untracked-files=no", "--"];
            status.extend(SOURCES);
            match git(&status) {
                Some(s) if s.is_empty() => c,
                _ => format!("{c}+changes"),
            }
        }
        None => "unknown".to_string(),
    };
    println!("cargo:rustc-env=STATESHIFT_COMMIT={commit}");
}

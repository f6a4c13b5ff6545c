//! The guarded predictor against its fallback, the last value, one line per trace: the
//! figures behind the before/after tables of `docs/prediction.md`.
//!
//! ```sh
//! cargo run --example guard_vs_last -- testdata/traces        # the vendored NAB CPU traces
//! cargo run --example guard_vs_last -- --seeds 3..20          # synthetic traces, seeds 3–19
//! cargo run --example guard_vs_last -- DIR --seeds 0..3       # any directory of trace CSVs
//! ```
//!
//! Tab-separated: set, trace, guarded and last-value MAE, MAE change (%), guarded and
//! last-value F1, F1 change, share of steps with the skill gate open (%), triggers and
//! caught sustained overloads of both, sustained overloads. Window 5, min 3, threshold the
//! trace's 90th percentile, as `stateshift predict --eval`.

use std::path::Path;

use anyhow::Context;
use stateshift::predict::{eval, synthetic, Model};

fn row(set: &str, name: &str, trace: &[f64]) {
    let report = eval::evaluate(trace, 5, 3, None);
    let (Some(g), Some(l)) = (report.score(Model::Guarded), report.score(Model::Last)) else {
        return;
    };
    let change = if l.mae > 0.0 {
        100.0 * (g.mae / l.mae - 1.0)
    } else {
        0.0
    };
    println!(
        "{set}\t{name}\t{:.6}\t{:.6}\t{change:+.4}\t{:.4}\t{:.4}\t{:+.4}\t{:.1}\t{}\t{}\t{}\t{}\t{}",
        g.mae,
        l.mae,
        g.f1,
        l.f1,
        g.f1 - l.f1,
        100.0 * g.gate_open_share.unwrap_or(0.0),
        g.triggers.triggers,
        l.triggers.triggers,
        g.triggers.caught,
        l.triggers.caught,
        report.sustained_overloads,
    );
}

fn directory(dir: &Path) -> anyhow::Result<()> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "csv"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let trace = eval::parse_trace(&text).with_context(|| path.display().to_string())?;
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("?");
        row(&dir.display().to_string(), name, &trace);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let usage = "usage: guard_vs_last [DIR…] [--seeds FROM..TO]";
    println!(
        "set\ttrace\tmae_guarded\tmae_last\tmae_change_pct\tf1_guarded\tf1_last\tf1_change\t\
         gate_open_pct\ttriggers_guarded\ttriggers_last\tcaught_guarded\tcaught_last\toverloads"
    );
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--seeds" {
            let range = args.next().context(usage)?;
            let (from, to) = range.split_once("..").context(usage)?;
            let seeds = from.parse().context(usage)?..to.parse().context(usage)?;
            for t in synthetic::seeded_traces(synthetic::DEFAULT_LENGTH, seeds) {
                row("synthetic", &t.name, &t.values);
            }
        } else {
            directory(Path::new(&arg))?;
        }
    }
    Ok(())
}

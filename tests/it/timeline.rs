//! The availability timeline: a probe that follows the service through a real migration
//! between local stacks, its CSV and its SVG chart.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use stateshift::influx::Influx;
use stateshift::migrate::machine::{self, Provider};
use stateshift::timeline::probe::{self, JournalFollow, ProbeSpec, RunningProbe};
use stateshift::timeline::{CSV_HEADER, PROBE_DB};

use crate::common::*;
use crate::orchestrator::service;

/// The CSV as maps from column name to value, one per row.
fn parse_csv(text: &str) -> Vec<HashMap<String, String>> {
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some(CSV_HEADER));
    let cols: Vec<&str> = CSV_HEADER.split(',').collect();
    lines
        .map(|l| {
            // No field of ours holds a comma (URLs and labels are ;-joined).
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), cols.len(), "row {l:?}");
            cols.iter()
                .zip(f)
                .map(|(c, v)| (c.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

fn num(r: &HashMap<String, String>, c: &str) -> f64 {
    r[c].parse().unwrap_or(0.0)
}

/// A small XML well-formedness check: every tag closes in order, attributes are quoted,
/// text holds no raw `<` or `&` outside entities.
fn assert_well_formed(svg: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = svg;
    let mut roots = 0;
    while let Some(i) = rest.find('<') {
        let text = &rest[..i];
        for (j, _) in text.match_indices('&') {
            let ent = &text[j..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                    .iter()
                    .any(|e| ent.starts_with(e)),
                "raw & in text: {text:?}"
            );
        }
        let end = rest[i..].find('>').expect("unclosed tag") + i;
        let tag = &rest[i + 1..end];
        assert!(!tag.contains('<'), "< inside a tag: {tag:?}");
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes: {tag:?}"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "mismatched </{name}>"
            );
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            if stack.is_empty() {
                roots += 1;
            }
            stack.push(name);
        } else if stack.is_empty() {
            roots += 1;
        }
        rest = &rest[end + 1..];
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    assert_eq!(roots, 1, "one root element");
    assert!(rest.trim().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_follows_the_service_through_a_migration_and_the_timeline_shows_every_phase() {
    let svc = service(60).await;
    let cfg = svc.cfg();
    let source_url = cfg.source.influx_url.clone();
    let w = svc.writer(500);
    let p = RunningProbe::start(ProbeSpec::default(), JournalFollow::new(&cfg).unwrap())
        .await
        .unwrap();
    // The probe database exists before the migration starts, so it is migrated.
    let src = Influx::new(&source_url, None, None, Duration::from_secs(30));
    assert!(src
        .databases()
        .await
        .unwrap()
        .contains(&PROBE_DB.to_string()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let provider = Provider::from_config(&cfg).unwrap();
    let report = machine::migrate(&cfg, &provider, "timeline test", &Quiet)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let out = svc.dir().join("timeline");
    let (csv_path, svg_path, summary) = probe::finish_into(p, &cfg, &out, "svc migration")
        .await
        .unwrap();
    let ledger = w.finish().await;
    assert_eq!(ledger.requests_failed, 0);
    let target_url = machine::current_source(&cfg, &machine::state(&cfg).unwrap()).influx_url;
    assert_ne!(target_url, source_url);

    let rows = parse_csv(&std::fs::read_to_string(&csv_path).unwrap());
    // One row per second, contiguous, covering the whole migration.
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r["t_s"], i.to_string());
    }
    let start = num(&rows[0], "unix_time");
    let end = num(rows.last().unwrap(), "unix_time") + 1.0;
    let records =
        stateshift::migrate::journal::Journal::load(&machine::Paths::of(&cfg).journal).unwrap();
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r.migration == report.migration_id)
        .collect();
    let (first, last) = (
        mine[0].at_ms as f64 / 1000.0,
        mine.last().unwrap().at_ms as f64 / 1000.0,
    );
    assert!(
        start <= first && last < end,
        "rows {start}..{end} cover the migration {first}..{last}"
    );
    assert!(last - first >= 1.0, "a real migration takes seconds");
    assert_eq!(rows.len() as u64, (end - start).round() as u64);
    // Every phase boundary is there, each once, in order.
    let events: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r["events"]
                .split(';')
                .filter(|e| !e.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .collect();
    let want = [
        "start",
        "create stack",
        "prepare",
        "capture",
        "dump",
        "transfer",
        "restore",
        "delta",
        "cutover",
        "repointed",
        "verify",
        "dispose",
        "delete old stack",
        "succeeded",
    ];
    assert_eq!(events, want, "the journal's boundaries, in order");
    // Nothing failed; every second wrote and read.
    assert_eq!(summary.writes_failed, 0, "{summary}");
    assert_eq!(summary.reads_failed, 0, "{summary}");
    for r in &rows[..rows.len() - 1] {
        assert!(
            num(r, "writes") >= 1.0,
            "a second without a write attempt: {r:?}"
        );
        assert_eq!(r["writes_failed"], "0");
        assert_eq!(r["reads_failed"], "0");
    }
    // The probe moved with the writers: the source until the repoint, then the target,
    // where reads see the newest acknowledged point and, once drained, every point.
    let rp = rows
        .iter()
        .position(|r| r["events"].contains("repointed"))
        .unwrap();
    let vf = rows
        .iter()
        .position(|r| r["events"].contains("verify"))
        .unwrap();
    for r in &rows[..rp] {
        assert_eq!(r["url"], source_url, "before the repoint: {r:?}");
    }
    for r in &rows[rp + 1..] {
        if r["writes"] == "0" {
            continue;
        }
        assert_eq!(r["url"], target_url, "after the repoint: {r:?}");
        assert_eq!(
            r["read_sees_newest"], "1",
            "read-your-writes after cutover: {r:?}"
        );
    }
    for r in &rows[vf + 1..] {
        if r["writes"] == "0" {
            continue;
        }
        assert_eq!(
            r["reads_missing_max"], "0",
            "after the drain every acked point is visible: {r:?}"
        );
    }
    // The probe's own points were migrated: all of them are on the target.
    let dst = Influx::new(&target_url, None, None, Duration::from_secs(30));
    let s = dst
        .query(Some(PROBE_DB), "SELECT count(\"seq\") FROM \"probe\"")
        .await
        .unwrap();
    let on_target = s[0].values[0][1].as_u64().unwrap();
    assert_eq!(on_target, summary.writes - summary.writes_failed);

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert_well_formed(&svg);
    for l in want {
        assert!(
            svg.contains(&format!(">{l}</text>")),
            "phase label {l} on the chart"
        );
    }
    for id in [
        "write-p50",
        "write-p99",
        "write-max",
        "read-p99",
        "failed-writes",
        "legend",
    ] {
        assert!(svg.contains(&format!("id=\"{id}\"")), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_with_timeline_writes_the_csv_and_the_chart_and_prints_where() {
    let svc = service(61).await;
    let w = svc.writer(500);
    let dir = svc.dir().join("tl");
    let out = Command::new(bin())
        .args(["migrate", "--yes", "-c"])
        .arg(&svc.cfg_path)
        .arg("--timeline")
        .arg(&dir)
        .output()
        .unwrap();
    let ledger = w.finish().await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ledger.requests_failed, 0);
    let svg = dir.join("timeline.svg");
    let csv = dir.join("timeline.csv");
    assert!(
        stdout.contains(&format!("availability timeline: {}", svg.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("availability timeline: {}", csv.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains("availability: ") && stdout.contains(", 0 failed,"),
        "{stdout}"
    );
    let rows = parse_csv(&std::fs::read_to_string(&csv).unwrap());
    assert!(rows.iter().any(|r| r["events"].contains("succeeded")));
    assert_well_formed(&std::fs::read_to_string(&svg).unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_started_while_the_probe_takes_its_baseline_is_refused() {
    let svc = service(62).await;
    let dir = svc.dir().join("tl");
    let first = Command::new(bin())
        .args(["migrate", "--yes", "-c"])
        .arg(&svc.cfg_path)
        .arg("--timeline")
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The probe's database on the source: the first run is between its checks and its
    // migration (a 2 s baseline).
    let src = Influx::new(
        &svc.cfg().source.influx_url,
        None,
        None,
        Duration::from_secs(5),
    );
    let t = std::time::Instant::now();
    while !src.databases().await.unwrap().iter().any(|d| d == PROBE_DB) {
        assert!(t.elapsed() < Duration::from_secs(30), "no probe database");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = Command::new(bin())
        .args(["migrate", "--yes", "-c"])
        .arg(&svc.cfg_path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(
        err.contains("another migration of this service is running"),
        "{err}"
    );
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "the first one migrates undisturbed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
}

#[test]
fn the_well_formedness_check_rejects_broken_xml() {
    assert_well_formed("<svg><g a=\"1\"/><text>a &amp; b</text></svg>\n");
    for bad in [
        "<svg><g></svg>",
        "<svg>a & b</svg>",
        "<svg></svg><svg></svg>",
    ] {
        assert!(
            std::panic::catch_unwind(|| assert_well_formed(bad)).is_err(),
            "{bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_migration_keeps_the_probe_on_the_source_and_is_marked() {
    let svc = service(63).await;
    let cfg = svc.cfg();
    let src = Influx::new(&cfg.source.influx_url, None, None, Duration::from_secs(30));
    // A user whose password nobody configured stops the migration in prepare.
    src.query(None, "CREATE USER bob WITH PASSWORD 'not-in-the-config'")
        .await
        .unwrap();
    let p = RunningProbe::start(
        ProbeSpec {
            rate: 20,
            ..ProbeSpec::default()
        },
        JournalFollow::new(&cfg).unwrap(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let provider = Provider::from_config(&cfg).unwrap();
    let e = machine::migrate(&cfg, &provider, "timeline test", &Quiet)
        .await
        .unwrap_err();
    assert!(matches!(e, machine::MachineError::RolledBack { .. }), "{e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (csv_path, _, summary) = probe::finish_into(p, &cfg, &svc.dir().join("tl"), "rollback")
        .await
        .unwrap();
    let rows = parse_csv(&std::fs::read_to_string(&csv_path).unwrap());
    assert!(rows
        .iter()
        .all(|r| r["url"].is_empty() || r["url"] == cfg.source.influx_url));
    assert!(rows.iter().any(|r| r["events"].contains("rolled back")));
    assert!(!rows.iter().any(|r| r["events"].contains("repointed")));
    assert_eq!(summary.writes_failed, 0, "{summary}");
    // 20 a second asked for: about that many attempts in a full second.
    assert!(
        rows[1]["writes"].parse::<u32>().unwrap() >= 15,
        "{:?}",
        rows[1]
    );
}

use std::process::Command;

use crate::kit::lab::LabOptions;

use crate::common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn write(dir: &std::path::Path, yaml: &str) -> String {
    let p = dir.join("c.yaml");
    std::fs::write(&p, yaml).unwrap();
    p.display().to_string()
}

#[test]
fn an_unknown_config_key_exits_2_and_names_the_key_path() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "source:\n  influx_url: http://127.0.0.1:8086\n  ssh:\n    host: h\n    prot: 22\n",
    );
    let (code, _, err) = run(&["migrate", "-c", &p, "--yes"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("c.yaml")
            && err.contains("source.ssh")
            && err.contains("unknown field `prot`"),
        "{err}"
    );
}

#[test]
fn an_ill_typed_value_from_the_environment_exits_2_and_names_the_key_path() {
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "source:\n  influx_url: http://127.0.0.1:8086\n  ssh:\n    host: h\n",
    );
    let (code, _, err) = run(
        &["migrate", "-c", &p, "--yes"],
        &[("STATESHIFT__SOURCE__SSH__PORT", "twenty-two")],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("source.ssh.port"), "{err}");
}

#[test]
fn a_bad_url_exits_2_with_the_expected_form() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "source:\n  influx_url: \"influx:8086\"\n");
    let (code, _, err) = run(&["migrate", "-c", &p, "--yes"], &[]);
    assert_eq!(code, 2);
    assert!(
        err.contains("source.influx_url: expected http(s) URL, got \"influx:8086\""),
        "{err}"
    );
}

#[test]
fn a_missing_config_file_exits_2_naming_it() {
    let (code, _, err) = run(
        &["migrate", "-c", "/nonexistent/stateshift.yaml", "--yes"],
        &[],
    );
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/stateshift.yaml"), "{err}");
}

#[test]
fn the_config_comes_from_stateshift_config_or_the_default_path_when_c_is_not_given() {
    let d = tempfile::tempdir().unwrap();
    let good = write(d.path(), "source:\n  influx_url: http://127.0.0.1:8086\n");
    let (code, _, err) = run(&["config", "check"], &[("STATESHIFT_CONFIG", &good)]);
    assert_eq!(code, 0, "{err}");
    let bad = d.path().join("bad.yaml");
    std::fs::write(&bad, "source:\n  influx_url: \"influx:8086\"\n").unwrap();
    let bad = bad.display().to_string();
    let (code, _, err) = run(&["config", "check"], &[("STATESHIFT_CONFIG", &bad)]);
    assert_eq!(code, 2);
    assert!(
        err.contains(&bad) && err.contains("source.influx_url"),
        "{err}"
    );
    // -c wins over the environment.
    let (code, _, err) = run(
        &["config", "check", "-c", &good],
        &[("STATESHIFT_CONFIG", &bad)],
    );
    assert_eq!(code, 0, "{err}");
    // Neither: the default path, said in the help.
    let (_, out, _) = run(&["daemon", "--help"], &[]);
    assert!(
        out.contains("STATESHIFT_CONFIG") && out.contains("/etc/stateshift/stateshift.yaml"),
        "{out}"
    );
}

#[test]
fn the_example_config_is_valid() {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/stateshift.example.yaml"
    );
    let d = tempfile::tempdir().unwrap();
    // Its secret files are referenced by path; point them at files that exist here.
    let pw = d.path().join("pw");
    let users = d.path().join("users.yaml");
    std::fs::write(&pw, "x").unwrap();
    std::fs::write(&users, "bob: pass\n").unwrap();
    let env = [
        (
            "STATESHIFT__SOURCE__PASSWORD_FILE",
            pw.display().to_string(),
        ),
        (
            "STATESHIFT__MIGRATION__USER_PASSWORDS_FILE",
            users.display().to_string(),
        ),
        (
            "STATESHIFT__MONITOR__ZABBIX__PASSWORD_FILE",
            pw.display().to_string(),
        ),
        ("STATESHIFT__API__TOKEN_FILE", pw.display().to_string()),
    ];
    let cfg = stateshift::config::Config::load_with_env(
        std::path::Path::new(p),
        env.iter().map(|(k, v)| (k.to_string(), v.clone())),
    );
    assert!(cfg.is_ok(), "{:?}", cfg.err().map(|e| e.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_cli_refuses_a_target_damaged_before_verify_and_exits_1() {
    let lab = lab(LabOptions::default()).await;
    seed(&lab, "cyclops", 5_000).await;
    // The cutover command repoints the writers and also damages the target.
    let sabotage = format!(
        "cutover:\n  command: \"printf '%s' {{target_url}} > {d}/writer-url && curl -s -XPOST {u}/query --data-urlencode \\\"q=DROP SERIES FROM usage2 WHERE host='h002'\\\" --data-urlencode db=cyclops\"\n",
        d = lab.dir.display(),
        u = lab.target.influx_url()
    );
    let yaml = lab.config_yaml("").replace(
        &format!(
            "cutover:\n  command: \"printf '%s' {{target_url}} > {}/writer-url\"\n",
            lab.dir.display()
        ),
        &sabotage,
    );
    let p = lab.dir.join("sabotage.yaml");
    std::fs::write(&p, yaml).unwrap();
    let before = counts(&lab.source.client(), "cyclops").await;
    let report = lab.dir.join("report.json");
    let (code, out, err) = run(
        &[
            "migrate",
            "-c",
            p.to_str().unwrap(),
            "--yes",
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("verify") && err.contains("usage2") && err.contains("host=h002"),
        "{err}"
    );
    assert_eq!(counts(&lab.source.client(), "cyclops").await, before);
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(json["phase"], "verify");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_that_prints_the_word_error_while_succeeding_migrates() {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    seed(&lab, "error_log", 2_000).await;
    let before = counts(&lab.source.client(), "error_log").await;
    // influxd restore prints the paths it restores from: a work dir named after an error
    // budget is not a failed restore.
    let cfg = stateshift::config::Config::load(&p).unwrap();
    let wd = format!("{}/error-budget", cfg.target.as_ref().unwrap().work_dir);
    // (`forward`: the shards path runs no `influxd restore`.)
    let (code, out, err) = run(
        &["migrate", "-c", p.to_str().unwrap(), "--yes"],
        &[
            ("STATESHIFT__TARGET__WORK_DIR", &wd),
            ("STATESHIFT__MIGRATION__TRANSFER", "forward"),
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(counts(&lab.target.client(), "error_log").await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cutover_command_that_times_out_over_ssh_is_stopped_on_the_writers_host() {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    seed(&lab, "cyclops", 1_000).await;
    let cfg = stateshift::config::Config::load(&p).unwrap();
    let ssh = cfg.source.ssh.clone().unwrap();
    let marker = lab.dir.join("repointed-late");
    let command = format!("sleep 4; touch {}", marker.display());
    let port = ssh.port.to_string();
    let id = ssh.identity_file.clone().unwrap().display().to_string();
    let kh = ssh.known_hosts_file.clone().unwrap().display().to_string();
    let (code, out, err) = run(
        &["migrate", "-c", p.to_str().unwrap(), "--yes"],
        &[
            ("STATESHIFT__CUTOVER__COMMAND", &command),
            ("STATESHIFT__CUTOVER__TIMEOUT", "1s"),
            ("STATESHIFT__CUTOVER__SSH__HOST", &ssh.host),
            ("STATESHIFT__CUTOVER__SSH__PORT", &port),
            ("STATESHIFT__CUTOVER__SSH__USER", &ssh.user),
            ("STATESHIFT__CUTOVER__SSH__IDENTITY_FILE", &id),
            ("STATESHIFT__CUTOVER__SSH__KNOWN_HOSTS_FILE", &kh),
        ],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    // Past its deadline the command must not go on repointing writers behind our back.
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(
        !marker.exists(),
        "the timed-out cutover command kept running on the writers' host"
    );
    assert!(
        err.contains("did not finish within 1s") && err.contains("was stopped on"),
        "{err}"
    ); // The failed cutover still says where its time went: the command's second is
       // the step that failed.
    let all = format!("{out}{err}");
    let steps = all
        .lines()
        .find_map(|l| l.split_once("cutover steps: ").map(|(_, s)| s))
        .unwrap_or_else(|| panic!("no cutover steps: {all}"));
    assert!(steps.contains("repoint recorded"), "{steps}");
    let failed: f64 = steps
        .rsplit_once("until the failure ")
        .and_then(|(_, s)| s.trim_end_matches(" s").parse().ok())
        .unwrap_or_else(|| panic!("the last step is the failure's: {steps}"));
    assert!((0.9..12.0).contains(&failed), "{steps}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_cli_moves_the_data_and_writes_a_timing_report() {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    seed(&lab, "cyclops", 5_000).await;
    // A work dir the target does not have yet: the dry run must not create it.
    let cfg = stateshift::config::Config::load(&p).unwrap();
    let wd = format!("{}/not/yet", cfg.target.as_ref().unwrap().work_dir);
    let (code, out, err) = run(
        &["migrate", "-c", p.to_str().unwrap(), "--dry-run"],
        &[("STATESHIFT__TARGET__WORK_DIR", &wd)],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("nothing was changed"));
    assert!(
        lab.target.client().databases().await.unwrap().is_empty(),
        "dry run changes nothing"
    );
    assert!(
        !std::path::Path::new(&wd).exists(),
        "dry run creates nothing on the target, not even its work dir {wd}"
    );
    let report = lab.dir.join("report.json");
    let (code, out, err) = run(
        &[
            "migrate",
            "-c",
            p.to_str().unwrap(),
            "--yes",
            "--report",
            report.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let phases: Vec<&str> = json["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert!(
        out.contains("streamed")
            && out.contains("into the target's: dump, transfer and restore in one pass"),
        "streaming the shards between the RPC ports is the default: {out}"
    );
    // Journaled like any migration: status shows it, and the service now runs on the target.
    let (code, st, _) = run(&["status", "-c", p.to_str().unwrap()], &[]);
    assert_eq!(code, 0);
    assert!(
        st.contains("succeeded") && st.contains(&lab.target.influx_url()),
        "{st}"
    );
    let (code, st, err) = run(&["status", "-c", p.to_str().unwrap(), "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let st: serde_json::Value = serde_json::from_str(&st).expect("status --json is JSON");
    assert_eq!(st["influx_url"], lab.target.influx_url().as_str());
    assert_eq!(st["unfinished"], serde_json::Value::Null);
    assert_eq!(st["migrations"][0]["outcome"], "succeeded");
    assert!(st["migrations"][0]["phases"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
    // Asked again with the same static target: nothing to do there, and it says so
    // (it used to start a migration that stopped at "target already has database").
    let (code, out, err) = run(&["migrate", "-c", p.to_str().unwrap(), "--yes"], &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("already runs on the configured target")
            && !err.contains("already has database"),
        "{err}"
    );
    for p in [
        "capture", "dump", "transfer", "restore", "delta", "cutover", "verify",
    ] {
        assert!(phases.contains(&p), "{p} timed in {phases:?}");
        assert!(out.contains(p), "{p} printed");
    }
    assert_eq!(
        std::fs::read_to_string(&lab.url_file).unwrap(),
        lab.target.influx_url()
    );
    assert_eq!(
        counts(&lab.target.client(), "cyclops").await,
        counts(&lab.source.client(), "cyclops").await
    );
}

#[test]
fn configure_cyclops_rewrites_the_three_files_and_keeps_the_rest() {
    let d = tempfile::tempdir().unwrap();
    let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/cyclops");
    let st = Command::new("cp")
        .arg("-r")
        .arg(format!("{fx}/."))
        .arg(d.path())
        .status()
        .unwrap();
    assert!(st.success());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/configure-cyclops.sh");
    for _ in 0..2 {
        let out = Command::new(script)
            .arg("http://127.0.10.9:8086")
            .arg(d.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let udr = std::fs::read_to_string(d.path().join("udr/configuration.txt")).unwrap();
    let rc = std::fs::read_to_string(d.path().join("rc/configuration.txt")).unwrap();
    let js = std::fs::read_to_string(d.path().join("udr/config.js")).unwrap();
    assert!(
        udr.contains("\nInfluxDBURL=http://127.0.10.9:8086\n")
            && udr.contains("InfluxDBUsername=cyclops"),
        "{udr}"
    );
    assert!(
        rc.contains("  InfluxDBURL = http://127.0.10.9:8086\n"),
        "{rc}"
    );
    assert!(
        js.contains("url: 'http://127.0.10.9:8086',")
            && js.contains("url: \"http://127.0.10.9:8086/write\","),
        "{js}"
    );
    assert!(!udr.contains("10.0.0.12") && !rc.contains("10.0.0.12") && !js.contains("10.0.0.12"));
    // Bad input: a non-URL is refused and nothing changes.
    let out = Command::new(script)
        .arg("zabbix:80")
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        std::fs::read_to_string(d.path().join("udr/config.js")).unwrap(),
        js
    );
    let out = Command::new(script)
        .arg("http://x:1")
        .arg(d.path().join("nope"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
}

/// Killed after the restore on a static target (no stack to delete with the data in it):
/// the next run settles the interrupted migration by removing exactly the databases it
/// had recorded it was making there, keeps a database the target already had, says what
/// it did and starts nothing else; the run after that migrates. Before, the databases
/// stayed and every retry stopped at "target already has database".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_restore_on_a_static_target_is_rolled_back_exactly_and_the_retry_migrates(
) {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    seed(&lab, "cyclops", 3_000).await;
    let before = counts(&lab.source.client(), "cyclops").await;
    // Not the migration's: a rollback must never drop it.
    let dst = lab.target.client();
    dst.query(None, "CREATE DATABASE operators_own")
        .await
        .unwrap();
    let cfg = p.to_str().unwrap();
    let (code, out, err) = run(
        &["migrate", "-c", cfg, "--yes"],
        &[("STATESHIFT_CRASH_AT", "restore:done")],
    );
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("dying here"), "{err}");
    assert!(dst
        .databases()
        .await
        .unwrap()
        .contains(&"cyclops".to_string()));

    let (code, out, err) = run(&["migrate", "-c", cfg, "--yes"], &[]);
    assert!(
        code != 0 && err.contains("rolled back") && err.contains("no new migration"),
        "the settle is reported and nothing else starts: {code}\n{out}\n{err}"
    );
    let left = dst.databases().await.unwrap();
    assert_eq!(
        left,
        vec!["operators_own".to_string()],
        "exactly what the migration made is gone"
    );

    let (code, out, err) = run(&["migrate", "-c", cfg, "--yes"], &[]);
    assert_eq!(code, 0, "the retry migrates: {out}\n{err}");
    assert_eq!(counts(&dst, "cyclops").await, before);
}

/// Processes on this machine whose command line contains `needle`.
fn pids_naming(needle: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// A migration to a static target killed while `influxd restore` runs there: the restore
/// goes on without it (its SSH session outlives the process). Settling stops it before it
/// removes what the migration made, so nothing comes back afterwards, and the retry
/// migrates. Before, the orphaned restore recreated the database the rollback had
/// dropped, and every retry stopped at "target already has database".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_orphaned_by_a_killed_migration_is_stopped_when_settling() {
    orphaned_by_a_kill(
        "  transfer: forward\n",
        "influxd restore -portable -db cyclops -host ",
        "target/work/restore-",
    )
    .await;
}

/// The same for a streamed dump (`migration.transfer: stream`): the `influxd backup` a
/// killed migration started on the source, on the live service's disk, is stopped and its
/// files removed when settling. Before, it ran on and its dump stayed on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dump_orphaned_on_the_source_by_a_killed_migration_is_stopped_and_removed() {
    orphaned_by_a_kill(
        "  transfer: stream\n",
        "influxd backup -portable -host ",
        "source/work/dump-",
    )
    .await;
}

/// Kill `stateshift migrate` once a process running `command` in `scratch` (under the
/// lab's directory) is seen, settle, and check nothing of it runs or comes back.
async fn orphaned_by_a_kill(migration: &str, command: &str, scratch: &str) {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    if !migration.is_empty() {
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(
            &p,
            text.replace("migration:\n", &format!("migration:\n{migration}")),
        )
        .unwrap();
    }
    seed(&lab, "cyclops", 600_000).await;
    let before = counts(&lab.source.client(), "cyclops").await;
    let cfg = p.to_str().unwrap();
    let scratch = format!("{}/{scratch}", lab.dir.display());
    // A temporary directory of their own: no other test's stateshift clears what the
    // killed one leaves there (any later process would), so only this test's `recover` can.
    let tmp = lab.dir.join("t");
    std::fs::create_dir(&tmp).unwrap();
    let tmp_env = [("TMPDIR", tmp.to_str().unwrap())];
    let mut child = Command::new(bin())
        .args(["migrate", "-c", cfg, "--yes"])
        .envs(tmp_env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !pids_naming(command).iter().any(|&pid| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&scratch))
    }) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(120),
            "{command} never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the migration ended before {command} was seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // The migration's own directory, and the SSH masters with their control sockets in it.
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    assert_eq!(left.len(), 1, "one directory for the migration: {left:?}");
    let left = &left[0];
    let masters = pids_naming(&left.display().to_string());
    assert!(!masters.is_empty(), "the migration has SSH masters");
    child.kill().unwrap();
    let _ = child.wait();
    println!(
        "{command} still running after the kill: {}",
        !pids_naming(&scratch).is_empty()
    );
    // Still running as those masters (not as a zombie, not a reused pid).
    let running = |pids: &[u32]| -> Vec<u32> {
        pids.iter()
            .copied()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*left.to_string_lossy()))
            })
            .collect()
    };
    assert_eq!(
        running(&masters),
        masters,
        "the killed migration's SSH masters outlive it"
    );

    let (code, out, err) = run(&["recover", "-c", cfg], &tmp_env);
    assert!(
        code == 0 && format!("{out}{err}").contains("rolled back"),
        "settled as rolled back: {code}\n{out}\n{err}"
    );
    assert_eq!(
        running(&masters),
        Vec::<u32>::new(),
        "the next run closed the killed migration's SSH masters"
    );
    assert!(
        !left.exists(),
        "and removed its directory {}",
        left.display()
    );
    assert!(
        pids_naming(&scratch).is_empty(),
        "nothing of the interrupted migration runs after settling"
    );
    // Whatever had been sent before the kill has had time to land.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let dst = lab.target.client();
    assert!(
        dst.databases().await.unwrap().is_empty(),
        "nothing comes back on the target after the rollback"
    );
    for side in ["source/work", "target/work"] {
        let left: Vec<_> = std::fs::read_dir(lab.dir.join(side))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "no scratch left in {side}: {left:?}\n{out}\n{err}"
        );
    }
    let (code, out, err) = run(&["migrate", "-c", cfg, "--yes"], &[]);
    assert_eq!(code, 0, "the retry migrates: {out}\n{err}");
    assert_eq!(counts(&dst, "cyclops").await, before);
}

/// A migration killed while the target's `influxd` runs at `migration.idle_nice` (the
/// target yields from the dump to just before the repoint): settling gives it nice 0
/// back, because the lowering was journaled before it was made, and the retry finds it
/// at the default. Before, it stayed at 19, and every later migration kept it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_lowered_by_a_killed_migration_gets_its_priority_back_when_settling() {
    lowered_by_a_kill(false, None).await;
}

/// The same for the source, lowered from the end of the drain: the kill lands in the
/// verification, settling resumes the migration, and the resumed run finds the source at
/// the default (before, it took the 19 it found for the server's own value and kept it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_lowered_by_a_killed_migration_gets_its_priority_back_when_settling() {
    lowered_by_a_kill(true, None).await;
}

/// The same after a crash right after verification: settling finishes the disposal and
/// gives the source its priority first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_lowered_by_a_migration_crashed_after_verify_gets_its_priority_back() {
    lowered_by_a_kill(true, Some("verify:done")).await;
}

/// Kill `stateshift migrate` once the source's (`source`) or the target's `influxd` runs
/// at nice 19, or let it die at the journal point `crash_at`; settle; check the server has
/// nice 0 back and nothing was lost.
async fn lowered_by_a_kill(source: bool, crash_at: Option<&str>) {
    let lab = lab(LabOptions::default()).await;
    // The source is lowered from the end of the drain: its kill (or crash) must land
    // while verification still runs, which the files' proof makes too short
    // (`verify.read_back`); the aggregates take seconds on 600,000 points.
    let (p, _) = lab
        .write_config(if source {
            "verify:\n  read_back: false\n"
        } else {
            ""
        })
        .unwrap();
    seed(&lab, "cyclops", 600_000).await;
    let before = counts(&lab.source.client(), "cyclops").await;
    let pid = if source { &lab.source } else { &lab.target }.pids()[0];
    assert_eq!(thread_nices(pid), [0].into());
    let cfg = p.to_str().unwrap();
    // The source is lowered in the background once the drain ends; when verification
    // found everything already compared during the cutover, `verify:done` came before
    // that lowering landed (CI, stop 30: the kill left it at nice 0). Held 3 s after the
    // verify phase starts, the crash finds it lowered, as the test means it to.
    let mut child = Command::new(bin())
        .args(["migrate", "-c", cfg, "--yes"])
        .envs(crash_at.map(|at| ("STATESHIFT_CRASH_AT", at)))
        .envs(crash_at.map(|_| ("STATESHIFT_FAULT", "hold:verify")))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    if crash_at.is_some() {
        assert!(!child.wait().unwrap().success(), "it died at {crash_at:?}");
    } else {
        let t = std::time::Instant::now();
        while thread_nices(pid) != [19].into() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(120),
                "the server was never lowered"
            );
            assert!(
                child.try_wait().unwrap().is_none(),
                "the migration ended before the server was seen lowered"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        child.kill().unwrap();
        let _ = child.wait();
    }
    assert_eq!(thread_nices(pid), [19].into(), "the kill left it lowered");

    let (code, out, err) = run(&["recover", "-c", cfg], &[]);
    let said = format!("{out}{err}");
    assert!(
        code == 0
            && said.contains(match (source, crash_at) {
                (false, _) => "rolled back",
                (true, None) => "resuming",
                (true, Some(_)) => "finishing the disposal",
            })
            && said.contains("has nice 0 back")
            && !said.contains("already ran at nice"),
        "settled, saying so: {code}\n{out}\n{err}"
    );
    assert_eq!(thread_nices(pid), [0].into(), "settling gave it back");
    if !source {
        let (code, out, err) = run(&["migrate", "-c", cfg, "--yes"], &[]);
        assert_eq!(code, 0, "the retry migrates: {out}\n{err}");
        assert!(
            !format!("{out}{err}").contains("already ran at nice"),
            "{out}\n{err}"
        );
        assert_eq!(
            thread_nices(pid),
            [0].into(),
            "and the retry gave it back too"
        );
    }
    assert_eq!(counts(&lab.target.client(), "cyclops").await, before);
}

#[test]
fn predict_answers_in_json_when_asked() {
    let (code, out, err) = run(
        &["predict", "--json", "--model", "last", "1", "2", "3"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["model"], "last");
    assert_eq!(v["prediction"], 3.0);
    assert_eq!(v["readings"], serde_json::json!([1.0, 2.0, 3.0]));
    let trace = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/testdata/traces/ec2_cpu_utilization_24ae8d.csv"
    );
    let (code, out, err) = run(
        &["predict", "--json", "--eval", trace, "--threshold", "2"],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["threshold"], 2.0);
    let models: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model"].as_str().unwrap())
        .collect();
    assert_eq!(models, ["guarded", "gm11", "last", "ewma"]);
    assert!(v["models"][0]["triggers"]["triggers"].is_u64(), "{v}");
}

#[test]
fn config_show_prints_the_effective_config_with_every_secret_hidden() {
    let d = tempfile::tempdir().unwrap();
    let token = d.path().join("token");
    std::fs::write(&token, "api-token-value-91\n").unwrap();
    let users = d.path().join("users.yaml");
    std::fs::write(&users, "bob: user-password-77\n").unwrap();
    let p = write(
        d.path(),
        &format!(
            "source:\n  influx_url: http://127.0.0.1:8086\n  username: admin\napi:\n  token_file: {}\nmigration:\n  user_passwords_file: {}\n",
            token.display(),
            users.display()
        ),
    );
    let (code, out, err) = run(
        &["config", "show", "-c", &p],
        &[
            ("STATESHIFT__SOURCE__PASSWORD", "source-password-42"),
            ("STATESHIFT__CAPTURE__QUIET_PERIOD", "7s"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    for secret in [
        "source-password-42",
        "api-token-value-91",
        "user-password-77",
    ] {
        assert!(!out.contains(secret), "{secret} shown:\n{out}");
    }
    let yaml: serde_json::Value = serde_yaml::from_str(&out).expect("YAML");
    assert_eq!(yaml["source"]["password"], "***");
    assert_eq!(yaml["api"]["token"], "***");
    assert_eq!(yaml["migration"]["user_passwords"]["bob"], "***");
    // The environment override and the defaults, as the config file writes them.
    assert_eq!(yaml["capture"]["quiet_period"], "7s");
    assert_eq!(yaml["verify"]["query_timeout"], "30m");
    assert_eq!(yaml["monitor"]["mode"], "act");
    assert_eq!(yaml["source"]["influx_url"], "http://127.0.0.1:8086");
    // A bad file is a config error, as for every command.
    let bad = write(d.path(), "source:\n  influx_url: \"influx:8086\"\n");
    let (code, _, err) = run(&["config", "show", "-c", &bad], &[]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn replay_runs_the_recorded_readings_through_other_thresholds() {
    let d = tempfile::tempdir().unwrap();
    let work = d.path().join("state");
    std::fs::create_dir_all(&work).unwrap();
    // A reading a minute, as the daemon records them: calm, 30 minutes at 9, calm.
    let mut text = String::from("timestamp,value\n");
    for i in 0..60u64 {
        let v = if (10..40).contains(&i) { 9 } else { 1 };
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_790_000_000 + i * 60);
        text.push_str(&format!("{},{v}\n", humantime::format_rfc3339_millis(t)));
    }
    std::fs::write(work.join("readings.csv"), text).unwrap();
    let p = write(
        d.path(),
        &format!(
            "source:\n  influx_url: http://127.0.0.1:8086\nmigration:\n  work_dir: {}\nmonitor:\n  threshold: 10\n  window: 5\n  min_readings: 1\n  consecutive: 3\n  cooldown: 10m\n  model: last\n",
            work.display()
        ),
    );
    let (code, out, err) = run(&["replay", "-c", &p], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("60 readings from 2026-09-21T14:13:20Z"),
        "{out}"
    );
    assert!(out.contains("threshold 10 (model last, window 5, min 1, 3 in a row, cooldown 10m): no migration would have started"), "{out}");
    let (code, out, err) = run(
        &[
            "replay",
            "-c",
            &p,
            "--threshold",
            "8",
            "--threshold",
            "10",
            "--json",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let at8: Vec<&str> = v["runs"][0]["migrations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["at"].as_str().unwrap())
        .collect();
    assert_eq!(
        at8,
        [
            "2026-09-21T14:25:20Z",
            "2026-09-21T14:35:20Z",
            "2026-09-21T14:45:20Z"
        ],
        "{out}"
    );
    assert_eq!(v["runs"][1]["migrations"], serde_json::json!([]));
    // The last 20 minutes only: calm.
    let (code, out, _) = run(
        &["replay", "-c", &p, "--threshold", "8", "--since", "19m"],
        &[],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("20 readings") && out.contains("no migration"),
        "{out}"
    );
    // A broken record is named, with its line.
    std::fs::write(work.join("readings.csv"), "timestamp,value\nnot-a-time,3\n").unwrap();
    let (code, _, err) = run(&["replay", "-c", &p], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("readings.csv: line 2"), "{err}");
}

/// `migrate --json`: stdout holds exactly one JSON object saying how the run ended (the
/// progress goes to stderr), for a success and for a run that could not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_json_prints_one_object_with_the_outcome_and_progress_on_stderr() {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    seed(&lab, "cyclops", 2_000).await;
    let (code, out, err) = run(
        &["migrate", "-c", p.to_str().unwrap(), "--yes", "--json"],
        &[],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("stdout is one JSON object ({e}): {out}"));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["outcome"], "succeeded", "{v}");
    assert_eq!(v["error"], serde_json::Value::Null);
    assert_eq!(v["service_runs_on"], lab.target.influx_url().as_str());
    let phases: Vec<&str> = v["report"]["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert!(
        phases.contains(&"verify") && phases.contains(&"cutover"),
        "{v}"
    );
    assert!(
        err.contains("plan: migrate") && err.contains("-> dump"),
        "{err}"
    );
    assert!(err.contains("succeeded: verified"), "{err}");

    // Again: the service already runs on the configured target, so nothing starts.
    let (code, out, err) = run(
        &["migrate", "-c", p.to_str().unwrap(), "--yes", "--json"],
        &[],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["outcome"], "not_started", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("already runs on the configured target"),
        "{v}"
    );
    assert_eq!(v["report"], serde_json::Value::Null);
}

/// Run `stateshift args` with its stdout a pipe nobody reads any more (`| head` that
/// has exited): returns how it ended and its stderr.
fn run_into_closed_pipe(args: &[&str]) -> (std::process::ExitStatus, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(bin())
        .args(args)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into())
}

/// A command that only prints ends quietly when its reader has gone, as `cat` does (by
/// SIGPIPE), instead of panicking on the broken pipe.
#[test]
fn a_printing_command_whose_reader_went_away_ends_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let p = write(
        d.path(),
        "source:\n  influx_url: http://127.0.0.1:8086\ntarget:\n  influx_url: http://127.0.0.1:8087\n",
    );
    for args in [
        vec!["config", "show", "-c", &p],
        vec!["completions", "bash"],
        vec!["predict", "1", "2", "3", "4"],
    ] {
        let (status, err) = run_into_closed_pipe(&args);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(
            status.signal(),
            Some(13),
            "{args:?}: ended by SIGPIPE: {status:?} {err}"
        );
    }
}

/// A migration whose output nobody reads any more still runs to its end: a line to a
/// closed pipe is lost, never the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_whose_reader_went_away_still_finishes() {
    let lab = lab(LabOptions::default()).await;
    let (p, _) = lab.write_config("").unwrap();
    seed(&lab, "cyclops", 1_000).await;
    let before = counts(&lab.source.client(), "cyclops").await;
    let (status, err) = run_into_closed_pipe(&["migrate", "-c", p.to_str().unwrap(), "--yes"]);
    assert!(status.success(), "{status:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(counts(&lab.target.client(), "cyclops").await, before);
}

//! The operator's kit under `deploy/`, checked by the tools its users run.

use std::path::Path;
use std::process::Command;

fn promtool(args: &[&str]) -> (bool, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(&dir)
        .output()
        .expect("promtool (Debian's prometheus package) is installed by scripts/setup.sh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `promtool check rules` accepts the alert rules, and their unit tests (each alert fires
/// on the situation it names, at the time it should, and not for a healthy daemon) pass.
#[test]
fn the_prometheus_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "stateshift-alerts.yml"]);
    assert!(ok && out.contains("SUCCESS: 6 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "stateshift-alerts.test.yml"]);
    assert!(ok, "{out}");
}

/// Run `cmd args`, return (success, stdout + stderr).
fn sh(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The Debian package: built by `scripts/package-deb.sh` from this build's binary,
/// installed on this machine with dpkg, the binary answers from /usr/bin, the unit passes
/// `systemd-analyze verify`, the manual and the completions are where man and the shells
/// look; then it is purged again.
#[test]
fn the_debian_package_installs_a_working_binary_a_valid_unit_and_the_kit() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tempfile::tempdir().unwrap();
    let (ok, built) = sh(
        root.join("scripts/package-deb.sh").to_str().unwrap(),
        &[
            env!("CARGO_BIN_EXE_stateshift"),
            out.path().to_str().unwrap(),
        ],
    );
    assert!(ok, "{built}");
    let deb = built.lines().last().unwrap().trim().to_string();
    assert!(deb.ends_with(".deb"), "{built}");
    let (ok, info) = sh("dpkg-deb", &["--field", &deb, "Package", "Version"]);
    assert!(ok, "{info}");
    assert!(
        info.contains("Package: stateshift")
            && info.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{info}"
    );

    let (ok, log) = sh("dpkg", &["-i", &deb]);
    assert!(ok, "dpkg -i: {log}");
    let check = || -> Result<(), String> {
        let (ok, v) = sh("/usr/bin/stateshift", &["--version"]);
        if !ok || v.trim() != format!("stateshift {}", env!("CARGO_PKG_VERSION")) {
            return Err(format!("stateshift --version: {v}"));
        }
        let unit = "/lib/systemd/system/stateshift.service";
        let (ok, out) = sh("systemd-analyze", &["verify", unit]);
        if !ok || out.contains("stateshift.service:") {
            return Err(format!("systemd-analyze verify {unit}: {out}"));
        }
        let text = std::fs::read_to_string(unit).map_err(|e| e.to_string())?;
        if !text.contains("ExecStart=/usr/bin/stateshift daemon") {
            return Err(format!(
                "the unit does not run the packaged binary:\n{text}"
            ));
        }
        for f in [
            "/usr/share/man/man1/stateshift.1.gz",
            "/usr/share/man/man1/stateshift-trigger.1.gz",
            "/usr/share/bash-completion/completions/stateshift",
            "/usr/share/doc/stateshift/examples/stateshift.yaml",
            "/usr/share/stateshift/heat-templates/influxdb.yaml",
            "/usr/share/stateshift/scripts/configure-cyclops.sh",
            "/usr/share/stateshift/deploy/prometheus/stateshift-alerts.yml",
        ] {
            if !Path::new(f).exists() {
                return Err(format!("{f} is not installed"));
            }
        }
        let (ok, out) = sh("getent", &["passwd", "stateshift"]);
        if !ok {
            return Err(format!("no stateshift system user: {out}"));
        }
        Ok(())
    };
    let checked = check();
    let (purged, log) = sh("dpkg", &["--purge", "stateshift"]);
    checked.unwrap();
    assert!(purged, "dpkg --purge: {log}");
    assert!(!Path::new("/usr/bin/stateshift").exists());
}

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
    assert!(ok && out.contains("SUCCESS: 5 rules found"), "{out}");
    let (ok, out) = promtool(&["test", "rules", "stateshift-alerts.test.yml"]);
    assert!(ok, "{out}");
}

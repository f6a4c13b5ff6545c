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
        let want = format!(
            "stateshift {} ({})",
            env!("CARGO_PKG_VERSION"),
            env!("STATESHIFT_COMMIT")
        );
        if !ok || v.trim() != want {
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

/// The SO VM's boot (deploy/boot/so-vm.sh) makes the API's certificate for the VM's fixed
/// IP and the stack's `api_names`, keeps it while those stay the same, makes it again when
/// they change, and refuses a name that is neither a DNS name nor an IP address, keeping
/// the certificate it has. Its two functions run here under `sh`, with real `openssl`.
#[test]
fn the_so_boot_makes_the_api_certificate_for_its_names_and_again_when_they_change() {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/boot/so-vm.sh"))
            .unwrap();
    let from = script.find("api_sans() {").expect("api_sans in so-vm.sh");
    let to = script[from..]
        .find("step \"making the API's TLS certificate\"")
        .expect("api_cert's step in so-vm.sh")
        + from;
    let functions = &script[from..to];
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().display().to_string();
    let run = |names: &str| {
        // install and chown need the VM's stateshift user: their effect here is a directory.
        let prog = format!(
            "set -u\ninstall() {{ for a; do d=$a; done; mkdir -p \"$d\"; }}\nchown() {{ :; }}\n\
             STATE='{state}' SO_HOST=10.0.0.20 API_NAMES='{names}'\n{functions}\napi_cert"
        );
        let out = Command::new("sh").arg("-c").arg(prog).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let crt = dir.path().join("tls/api.crt");
    let sans = || {
        let (ok, out) = sh(
            "openssl",
            &[
                "x509",
                "-noout",
                "-ext",
                "subjectAltName",
                "-in",
                &crt.display().to_string(),
            ],
        );
        assert!(ok, "{out}");
        out.lines().nth(1).unwrap_or_default().trim().to_string()
    };

    let (ok, out) = run("");
    assert!(ok, "{out}");
    assert_eq!(sans(), "IP Address:10.0.0.20");
    let first = std::fs::read(&crt).unwrap();
    let (ok, out) = run("");
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&crt).unwrap(), first, "same names: kept");

    let (ok, out) = run("so.example.org, 192.0.2.7,2001:db8::7");
    assert!(ok && out.contains("making one for"), "{out}");
    let got = sans();
    // OpenSSL 3.0 (Debian bookworm) prints an IPv6 address in full; later ones may not.
    assert!(
        ["2001:DB8:0:0:0:0:0:7", "2001:db8::7"].iter().any(|v6| got
            == format!(
                "IP Address:10.0.0.20, DNS:so.example.org, IP Address:192.0.2.7, IP Address:{v6}"
            )),
        "{got}"
    );
    let second = std::fs::read(&crt).unwrap();

    for bad in [
        "-so.example.org",
        "so..example.org",
        "10.0.0",
        "so.example.org:8443",
    ] {
        let (ok, out) = run(bad);
        assert!(!ok, "{bad}: refused");
        assert!(
            out.contains(&format!(
                "api_names: {bad} is neither a DNS name nor an IP address"
            )),
            "{out}"
        );
        assert_eq!(std::fs::read(&crt).unwrap(), second, "{bad}: kept");
    }

    // A certificate made before the names were recorded held the fixed IP alone: kept
    // while no other name is asked for.
    std::fs::remove_file(dir.path().join("tls/api.names")).unwrap();
    let (ok, out) = run("so.example.org, 192.0.2.7,2001:db8::7");
    assert!(ok && out.contains("making one for"), "{out}");
    std::fs::remove_file(dir.path().join("tls/api.names")).unwrap();
    std::fs::write(&crt, &first).unwrap();
    let (ok, out) = run("");
    assert!(ok, "{out}");
    assert_eq!(std::fs::read(&crt).unwrap(), first);
}

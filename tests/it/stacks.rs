//! The StackProvider conformance suite, and the local provider's own checks.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stateshift::remote::{Remote, SshRemote};
use stateshift::stack::local::LocalStacks;
use stateshift::stack::{StackError, StackProvider, StackRef, StackSpec, StackStatus};

pub fn spec(name: &str, template: &Path) -> StackSpec {
    StackSpec {
        secret_parameters: Default::default(),
        name: name.into(),
        template: template.to_path_buf(),
        parameters: BTreeMap::new(),
        environment_files: Vec::new(),
        timeout: Duration::from_secs(60),
    }
}

/// What every provider must do: create → complete with the four outputs, find by name,
/// refuse a duplicate name, delete → gone, deleting again is fine.
pub async fn conformance<P: StackProvider>(p: &P, spec: &StackSpec) -> StackRef {
    let (stack, outputs) = p.create(spec).await.expect("create");
    assert_eq!(stack.name, spec.name);
    assert_eq!(p.status(&stack).await.unwrap(), StackStatus::Complete);
    assert_eq!(p.outputs(&stack).await.unwrap(), outputs);
    assert!(outputs.influxdb_url.starts_with("http"), "{outputs:?}");
    assert_eq!(p.find(&spec.name).await.unwrap(), Some(stack.clone()));
    match p.create(spec).await {
        Err(StackError::Duplicate { name }) => assert_eq!(name, spec.name),
        other => panic!(
            "a duplicate name must be refused, got {:?}",
            other.map(|r| r.0)
        ),
    }
    stack
}

pub async fn conformance_delete<P: StackProvider>(p: &P, stack: &StackRef) {
    p.delete(stack, Duration::from_secs(60))
        .await
        .expect("delete");
    assert_eq!(p.status(stack).await.unwrap(), StackStatus::Gone);
    p.delete(stack, Duration::from_secs(60))
        .await
        .expect("deleting a gone stack is fine");
    assert_eq!(p.find(&stack.name).await.unwrap(), None);
}

/// Stops whatever still runs under a test's directory when the test ends, passed or not.
struct Reap(PathBuf);
impl Drop for Reap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pkill")
            .arg("-f")
            .arg(format!("{}/", self.0.display()))
            .status();
    }
}

fn template() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/stateshift.example.yaml"
    ))
}

fn processes_under(dir: &Path) -> usize {
    let needle = format!("{}/", dir.display());
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_stacks_pass_the_conformance_suite_and_really_run_influxd_and_sshd() {
    let tmp = tempfile::Builder::new()
        .prefix("ss-st")
        .tempdir_in("/tmp")
        .unwrap();
    let _reap = Reap(tmp.path().to_path_buf());
    let p = LocalStacks::new(tmp.path(), 11).unwrap();
    let t = Instant::now();
    let stack = conformance(&p, &spec("influx-a", &template())).await;
    eprintln!("local stack create + checks: {:?}", t.elapsed());
    let outputs = p.outputs(&stack).await.unwrap();
    let inst = p.instance_config("a", &outputs);
    stateshift::influx::Influx::from_config(&inst)
        .ping()
        .await
        .expect("influxd answers on the stack's address");
    assert!(
        outputs.influxdb_host.starts_with("127.0.11."),
        "{outputs:?}"
    );
    let ssh = SshRemote::connect(inst.ssh.as_ref().unwrap())
        .await
        .expect("SSH works");
    assert_eq!(ssh.run("echo ok").await.unwrap(), "ok\n");
    drop(ssh);
    let sdir = tmp.path().join("stacks/influx-a");
    assert_eq!(processes_under(&sdir), 2, "influxd and sshd run");
    conformance_delete(&p, &stack).await;
    assert_eq!(processes_under(&sdir), 0, "nothing left running");
    assert!(!sdir.exists(), "nothing left on disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_local_stacks_side_by_side_never_collide_and_a_restart_finds_them() {
    let tmp = tempfile::Builder::new()
        .prefix("ss-st")
        .tempdir_in("/tmp")
        .unwrap();
    let _reap = Reap(tmp.path().to_path_buf());
    let p = LocalStacks::new(tmp.path(), 12).unwrap();
    let (s1, s2) = (spec("one", &template()), spec("two", &template()));
    let (a, b) = tokio::join!(p.create(&s1), p.create(&s2));
    let ((ra, oa), (rb, ob)) = (a.unwrap(), b.unwrap());
    assert_ne!(oa.influxdb_host, ob.influxdb_host);
    for o in [&oa, &ob] {
        let i =
            stateshift::influx::Influx::new(&o.influxdb_url, None, None, Duration::from_secs(5));
        i.ping().await.unwrap();
    }
    // Data written to one is not on the other.
    let ia = stateshift::influx::Influx::new(&oa.influxdb_url, None, None, Duration::from_secs(5));
    ia.query(None, "CREATE DATABASE only_a").await.unwrap();
    let ib = stateshift::influx::Influx::new(&ob.influxdb_url, None, None, Duration::from_secs(5));
    assert!(ib.databases().await.unwrap().is_empty());
    // An orchestrator restart: a new provider on the same directory finds both stacks,
    // still running, and can delete them.
    drop(p);
    let p2 = LocalStacks::new(tmp.path(), 12).unwrap();
    assert_eq!(p2.find("one").await.unwrap(), Some(ra.clone()));
    assert_eq!(p2.status(&rb).await.unwrap(), StackStatus::Complete);
    ia.ping()
        .await
        .expect("stacks outlive the provider that made them");
    p2.delete(&ra, Duration::from_secs(30)).await.unwrap();
    p2.delete(&rb, Duration::from_secs(30)).await.unwrap();
    assert_eq!(processes_under(tmp.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_stack_name_is_refused_and_a_crash_mid_create_is_cleaned_by_delete() {
    let tmp = tempfile::Builder::new()
        .prefix("ss-st")
        .tempdir_in("/tmp")
        .unwrap();
    let _reap = Reap(tmp.path().to_path_buf());
    let p = LocalStacks::new(tmp.path(), 13).unwrap();
    match p.create(&spec("../escape", &template())).await {
        Err(StackError::Invalid { msg, .. }) => assert!(msg.contains("../escape"), "{msg}"),
        other => panic!("expected Invalid, got {:?}", other.map(|r| r.0)),
    }
    // A directory without state (the orchestrator died before recording the stack).
    std::fs::create_dir_all(tmp.path().join("stacks/half/vm")).unwrap();
    let half = StackRef {
        id: "unknown".into(),
        name: "half".into(),
    };
    p.delete(&half, Duration::from_secs(10)).await.unwrap();
    assert!(!tmp.path().join("stacks/half").exists());
}

use std::time::{Duration, Instant};

use crate::kit::lab::LabOptions;
use stateshift::config::HostKeyCheck;
use stateshift::remote::{HostKeyProblem, Pipes, Remote, RemoteError, SshRemote};
use stateshift::stack::local::{LocalVm, SshKeys, VmOptions, SSH_PORT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_runs_commands_streams_stdio_and_copies_files() {
    let lab = lab(LabOptions::default()).await;
    let ssh = SshRemote::connect(&lab.source.ssh_config(&lab.keys))
        .await
        .unwrap();
    assert_eq!(
        ssh.run("echo hello; hostname >/dev/null").await.unwrap(),
        "hello\n"
    );
    // Stream 4 MB through stdin and back out of stdout.
    let mut p = ssh
        .spawn(
            "cat",
            Pipes {
                stdin: true,
                stdout: true,
            },
        )
        .await
        .unwrap();
    let mut stdin = p.stdin.take().unwrap();
    let mut stdout = p.stdout.take().unwrap();
    let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
    let d2 = data.clone();
    let w = tokio::spawn(async move {
        stdin.write_all(&d2).await.unwrap();
        stdin.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    stdout.read_to_end(&mut back).await.unwrap();
    w.await.unwrap();
    drop(stdout);
    p.finish().await.unwrap();
    assert_eq!(back, data);
    let f = lab.dir.join("payload");
    std::fs::write(&f, b"payload bytes").unwrap();
    let dest = lab.dir.join("copied").display().to_string();
    assert_eq!(ssh.copy_to(&f, &dest).await.unwrap(), 13);
    assert_eq!(std::fs::read(&dest).unwrap(), b"payload bytes");
    // A command that floods stderr (far past a pipe's 64 KB) while we read stdout.
    let out = ssh
        .run("head -c 300000 /dev/zero | tr '\\0' x >&2; echo done")
        .await
        .unwrap();
    assert_eq!(out, "done\n");
    // A failing command reports its status and stderr.
    match ssh.run("echo oops >&2; exit 3").await {
        Err(RemoteError::Failed { status, stderr, .. }) => {
            assert!(
                status.contains('3') && stderr.contains("oops"),
                "{status} {stderr}"
            );
        }
        other => panic!("expected Failed, got {other:?}", other = other.map(|_| ())),
    }
    // A command that is not there exits 127, over SSH as here (openssh reports it as an
    // error of its own): the read-back on the host tells "no python3" by it.
    match ssh.run("no-such-command-here").await {
        Err(RemoteError::Failed { code, stderr, .. }) => {
            assert_eq!(code, Some(127), "{stderr}");
            assert!(stderr.contains("not found"), "{stderr}");
        }
        other => panic!("expected Failed, got {other:?}", other = other.map(|_| ())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_waits_for_a_host_that_is_still_booting() {
    let tmp = tempfile::Builder::new()
        .prefix("ss-it")
        .tempdir_in("/tmp")
        .unwrap();
    let keys = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
    let mut vm = LocalVm::start(
        &tmp.path().join("vm"),
        VmOptions {
            ssh: Some(keys.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let cfg = vm.ssh_config(&keys);
    vm.stop_sshd().await;
    let started = Instant::now();
    let booter = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        vm.restart_sshd(&keys).await.unwrap();
        vm
    });
    let ssh = SshRemote::connect(&cfg)
        .await
        .expect("connects once sshd is up");
    let _vm = booter.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "it did wait"
    );
    assert_eq!(ssh.run("echo up").await.unwrap(), "up\n");
}

/// Keys, and a local VM with no sshd (its address only), in a directory of their own.
async fn vm_without_sshd() -> (tempfile::TempDir, SshKeys, LocalVm) {
    let tmp = tempfile::Builder::new()
        .prefix("ss-it")
        .tempdir_in("/tmp")
        .unwrap();
    let keys = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
    let vm = LocalVm::start(&tmp.path().join("vm"), VmOptions::default())
        .await
        .unwrap();
    (tmp, keys, vm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_to_a_host_that_never_answers_gives_up_with_a_clear_error() {
    let (_tmp, keys, vm) = vm_without_sshd().await;
    let mut cfg = vm.ssh_config(&keys);
    cfg.ready_timeout = Duration::from_secs(2);
    cfg.host_key_check = HostKeyCheck::Strict;
    let t = Instant::now();
    let err = SshRemote::connect(&cfg)
        .await
        .err()
        .expect("no sshd: must fail");
    assert!(matches!(err, RemoteError::NotReady { .. }), "{err}");
    assert!(
        err.to_string().contains(&vm.addr.to_string())
            && err.to_string().contains("did not answer"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
}

/// The host public key of the local VMs' sshd, `TYPE BASE64`.
fn host_public_key(keys: &SshKeys) -> String {
    std::fs::read_to_string(keys.host_key.with_extension("pub"))
        .unwrap()
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_host_keys_are_the_only_ones_accepted_whatever_known_hosts_says() {
    let tmp = tempfile::Builder::new()
        .prefix("ss-it")
        .tempdir_in("/tmp")
        .unwrap();
    let keys = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
    let vm = LocalVm::start(
        &tmp.path().join("vm"),
        VmOptions {
            ssh: Some(keys.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let right = host_public_key(&keys);
    // Another machine's key, as a reused address would have in a stale known_hosts.
    let other = SshKeys::ensure(&tmp.path().join("other")).unwrap();
    let wrong = host_public_key(&other);
    let mut cfg = vm.ssh_config(&keys);
    cfg.ready_timeout = Duration::from_secs(5);
    std::fs::write(
        &keys.known_hosts,
        format!("[{}]:{} {wrong}\n", cfg.host, cfg.port),
    )
    .unwrap();
    // Without pinning, the stale entry wins: refused as a changed key.
    let err = SshRemote::connect(&cfg).await.err().expect("stale key");
    assert!(
        matches!(
            err,
            RemoteError::HostKey {
                problem: HostKeyProblem::Changed,
                ..
            }
        ),
        "{err}"
    );
    // Pinned: the key the VM reported is accepted, the known_hosts file is not consulted.
    cfg.host_keys = vec![right.clone()];
    let ssh = SshRemote::connect(&cfg).await.expect("pinned key accepted");
    assert_eq!(ssh.run("echo pinned").await.unwrap(), "pinned\n");
    drop(ssh);
    // An impostor: the pinned key is not what the host offers. Refused at once, not after
    // the ready timeout, with a message that says why.
    cfg.host_keys = vec![wrong];
    let t = Instant::now();
    let err = SshRemote::connect(&cfg)
        .await
        .err()
        .expect("wrong pinned key");
    assert!(matches!(err, RemoteError::PinnedHostKey { .. }), "{err}");
    assert!(err.to_string().contains("pinned"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // No temporary known-hosts file is left behind: with no remote left, this process's
    // directory (`remote::scratch`) is gone, and everything in it.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("stateshift-p{}-", std::process::id()))
        })
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A local forward whose port another socket took first (the port is picked by binding
/// port 0 and letting it go; under load an outgoing connection can take it) is tried
/// again on another port, and the forward it returns does reach the remote end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_forward_whose_port_was_taken_meanwhile_moves_to_another() {
    let lab = lab(LabOptions::default()).await;
    let ssh = SshRemote::connect(&lab.source.ssh_config(&lab.keys))
        .await
        .unwrap();
    let sshd = lab.source.addr.to_string();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_at = taken.local_addr().unwrap();
    // After the taken port, fresh ones (one of them could be taken meanwhile too).
    let fresh = std::iter::repeat_with(|| {
        std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
    });
    let at = ssh
        .forward_local_tcp_on(
            std::iter::once(Ok(taken_at)).chain(fresh.take(4)),
            &sshd,
            SSH_PORT,
        )
        .await
        .expect("another port is used");
    assert_ne!(at, taken_at);
    // It reaches the remote end: the sshd's own banner comes through.
    let mut c = tokio::net::TcpStream::connect(at).await.unwrap();
    let mut banner = [0u8; 8];
    c.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    ssh.close_local(&stateshift::remote::Listen::Tcp(at), &sshd, SSH_PORT)
        .await;
    // Only taken ports: refused, naming the port and how many were tried.
    let e = ssh
        .forward_local_tcp_on([Ok(taken_at), Ok(taken_at)], &sshd, SSH_PORT)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&taken_at.to_string()) && e.contains("2 ports tried"),
        "{e}"
    );
    // The production path picks its own ports and gets one.
    let at = ssh.forward_local_tcp(&sshd, SSH_PORT).await.unwrap();
    let mut c = tokio::net::TcpStream::connect(at).await.unwrap();
    c.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"SSH-2.0-");
    drop(taken);
}

/// A read back on the target's host that the orchestrator gives up (a migration aborted
/// during its verification) stops there too: dropping an SSH command closes its channel
/// but signals no remote process, so the command watches its stdin, which
/// `run_with_input` holds open until the output ends. Its ids come on that stdin, so
/// any number of shards fits (they were once command-line arguments).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_back_on_the_host_that_is_given_up_stops_there() {
    use stateshift::influx::snapshotter;
    let lab = lab(LabOptions::default()).await;
    let ssh = SshRemote::connect(&lab.source.ssh_config(&lab.keys))
        .await
        .unwrap();
    // It answers over SSH as over a local shell: a refused port is that shard's error.
    let refused = snapshotter::shard_files_on_host_cmd(0, "127.0.0.1", 1, 2);
    let out = ssh
        .run_with_input(
            &refused,
            Some(&snapshotter::shard_files_on_host_input(&[5, 6])),
        )
        .await
        .unwrap();
    let got = snapshotter::shard_files_on_host("rpc", &out).unwrap();
    assert_eq!(got.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [5, 6]);
    assert!(got.iter().all(|(_, r)| r.is_err()), "{got:?}");
    // A server that takes the request and never answers: the read waits on it (up to
    // its 600 s socket timeout) until the orchestrator drops it.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let cmd = snapshotter::shard_files_on_host_cmd(0, "127.0.0.1", port, 1);
    let read = tokio::spawn(async move {
        ssh.run_with_input(&cmd, Some(&snapshotter::shard_files_on_host_input(&[7])))
            .await
    });
    let (mut held, _) = tokio::time::timeout(Duration::from_secs(30), silent.accept())
        .await
        .expect("the read on the host connects")
        .unwrap();
    let mut request = [0u8; 2];
    held.read_exact(&mut request).await.unwrap();
    assert_eq!(request, [3, 0], "a shard backup request");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!read.is_finished(), "it waits for the server");
    read.abort();
    assert!(read.await.unwrap_err().is_cancelled());
    // The remote python exits: its connection closes.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), held.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(_))),
        "the read on the host still held its connection 10 s after it was given up: {closed:?}"
    );
}

/// A known-hosts file that lost the host's line (as one rewritten by a killed process
/// did) and one that holds another machine's key need different fixes: the error says
/// which it is, naming the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_host_key_says_whether_the_file_held_no_key_or_another_one() {
    let tmp = tempfile::Builder::new()
        .prefix("ss-it")
        .tempdir_in("/tmp")
        .unwrap();
    let keys = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
    let vm = LocalVm::start(
        &tmp.path().join("vm"),
        VmOptions {
            ssh: Some(keys.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut cfg = vm.ssh_config(&keys);
    cfg.ready_timeout = Duration::from_secs(5);
    let file = keys.known_hosts.display().to_string();

    std::fs::write(&keys.known_hosts, "").unwrap();
    let err = SshRemote::connect(&cfg).await.err().expect("no key known");
    assert!(
        matches!(
            err,
            RemoteError::HostKey {
                problem: HostKeyProblem::Unknown,
                ..
            }
        ),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("holds no key for") && msg.contains(&file),
        "{msg}"
    );

    let other = SshKeys::ensure(&tmp.path().join("other")).unwrap();
    std::fs::write(
        &keys.known_hosts,
        format!("[{}]:{} {}\n", cfg.host, cfg.port, host_public_key(&other)),
    )
    .unwrap();
    let msg = SshRemote::connect(&cfg)
        .await
        .err()
        .expect("another key")
        .to_string();
    assert!(
        msg.contains("is not the one") && msg.contains("another machine") && msg.contains(&file),
        "{msg}"
    );

    // The right key: connected.
    std::fs::write(
        &keys.known_hosts,
        format!("[{}]:{} {}\n", cfg.host, cfg.port, host_public_key(&keys)),
    )
    .unwrap();
    let ssh = SshRemote::connect(&cfg).await.expect("right key");
    assert_eq!(ssh.run("echo ok").await.unwrap(), "ok\n");
}

/// The SSH masters negotiate AES-GCM where this CPU has AES instructions (half
/// chacha20-poly1305's CPU per byte of a shard stream, on both ends), OpenSSH's own
/// choice elsewhere. Seen from the server: an sshd that logs the cipher it agreed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_negotiates_aes_gcm_where_the_cpu_has_aes_instructions() {
    // A VM for its address only: the sshd is this test's own.
    let (tmp, keys, vm) = vm_without_sshd().await;
    let mut cfg = vm.ssh_config(&keys);
    cfg.host_keys = vec![host_public_key(&keys)];
    let d = tmp.path();
    std::fs::copy(
        keys.client_key.with_extension("pub"),
        d.join("authorized_keys"),
    )
    .unwrap();
    std::fs::write(
        d.join("sshd_config"),
        format!(
            "ListenAddress {}:{SSH_PORT}\nHostKey {}\nPidFile {}/sshd.pid\nAuthorizedKeysFile {}/authorized_keys\n\
             PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nLogLevel DEBUG1\n",
            vm.addr,
            keys.host_key.display(),
            d.display(),
            d.display()
        ),
    )
    .unwrap();
    let _sshd = tokio::process::Command::new("/usr/sbin/sshd")
        .arg("-D")
        .arg("-e")
        .arg("-f")
        .arg(d.join("sshd_config"))
        .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let ssh = SshRemote::connect(&cfg).await.expect("connects");
    assert_eq!(ssh.run("echo up").await.unwrap(), "up\n");
    let log = std::fs::read_to_string(d.join("sshd.log")).unwrap();
    let want = if stateshift::remote::cpu_has_aes() {
        "aes128-gcm@openssh.com"
    } else {
        "chacha20-poly1305@openssh.com"
    };
    assert!(
        log.contains(&format!("kex: client->server cipher: {want} ")),
        "{log}"
    );
}

//! Against the real Keystone + Heat that `scripts/openstack.sh up` starts (its env file
//! names Keystone, the demo user and project, and an application credential). Without
//! that env file every test here fails with a message saying so.
//!
//! Heat has no Nova or Neutron here: the fixtures in `tests/fixtures/heat/` compute their
//! outputs from parameters (`OS::Heat::Value`, `OS::Heat::TestResource`), and the real
//! templates render with `scripts/vmlab/env-render.yaml` (the VM lab's Heat plugin:
//! servers resolve their user_data without booting; `lab.rs` boots them for real).
//! Tests may run in parallel processes: every stack name is unique.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use stateshift::stack::heat::{Heat, HeatConfig};
use stateshift::stack::{StackError, StackProvider, StackRef, StackSpec, StackStatus};
use stateshift::util::Secret;

use super::stacks::{conformance, conformance_delete};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

pub(crate) struct Env {
    pub(crate) auth_url: String,
    pub(crate) region: String,
    pub(crate) username: String,
    pub(crate) password: Secret,
    pub(crate) project: String,
    pub(crate) project_id: String,
    pub(crate) app_cred_id: String,
    pub(crate) app_cred_secret: Secret,
    pub(crate) heat_url: String,
}

fn env_path() -> PathBuf {
    std::env::var_os("STATESHIFT_OPENSTACK_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/stateshift-openstack"))
        .join("env")
}

/// The env file `scripts/openstack.sh up` writes (`KEY='value'` lines).
pub(crate) fn env() -> Env {
    let path = env_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the test Keystone + Heat are not running; run `scripts/openstack.sh up` (as root) first",
            path.display()
        )
    });
    let vars: HashMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('\'')))
        .collect();
    let get = |k: &str| {
        vars.get(k)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no {k}; re-run `scripts/openstack.sh up`",
                    path.display()
                )
            })
            .to_string()
    };
    Env {
        auth_url: get("OS_AUTH_URL"),
        region: get("OS_REGION_NAME"),
        username: get("OS_USERNAME"),
        password: Secret::new(get("OS_PASSWORD")),
        project: get("OS_PROJECT_NAME"),
        project_id: get("OS_PROJECT_ID"),
        app_cred_id: get("OS_APPLICATION_CREDENTIAL_ID"),
        app_cred_secret: Secret::new(get("OS_APPLICATION_CREDENTIAL_SECRET")),
        heat_url: get("HEAT_URL"),
    }
}

pub(crate) fn password_cfg(e: &Env) -> HeatConfig {
    HeatConfig {
        region: Some(e.region.clone()),
        username: Some(e.username.clone()),
        password: Some(e.password.clone()),
        project_name: Some(e.project.clone()),
        ..HeatConfig::new(&e.auth_url)
    }
}

fn app_cred_cfg(e: &Env) -> HeatConfig {
    HeatConfig {
        region: Some(e.region.clone()),
        application_credential_id: Some(e.app_cred_id.clone()),
        application_credential_secret: Some(e.app_cred_secret.clone()),
        ..HeatConfig::new(&e.auth_url)
    }
}

fn heat(cfg: HeatConfig) -> Heat {
    Heat::new(cfg).expect("heat config")
}

/// A stack name no other test process uses.
pub(crate) fn unique(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        % 1_000_000_000;
    format!("ss-{tag}-{}-{n}", std::process::id())
}

pub(crate) fn fixture(name: &str) -> PathBuf {
    PathBuf::from(format!("{ROOT}/tests/fixtures/heat/{name}"))
}

fn spec(name: &str, template: PathBuf, params: &[(&str, &str)]) -> StackSpec {
    StackSpec {
        secret_parameters: Default::default(),
        name: name.into(),
        template,
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        environment_files: Vec::new(),
        timeout: Duration::from_secs(120),
    }
}

/// Revoke a token in Keystone (a user may revoke their own).
pub(crate) async fn revoke(e: &Env, token: &Secret) {
    let r = reqwest::Client::new()
        .delete(format!("{}/auth/tokens", e.auth_url))
        .header("X-Auth-Token", token.expose())
        .header("X-Subject-Token", token.expose())
        .header("Connection", "close")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204, "token revoked");
}

/// A fake HTTP server answering every request with `status` and a Heat-style error body;
/// counts the requests.
pub(crate) async fn fake_server(status: u16) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/%(tenant_id)s", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            h.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = format!(
                    r#"{{"code": {status}, "title": "fake", "error": {{"message": "fake heat says {status}", "type": "Fake"}}}}"#
                );
                let resp = format!(
                    "HTTP/1.1 {status} Fake\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (url, hits)
}

// ---------------------------------------------------------------- auth and catalog

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_auth_finds_heat_in_the_catalog_by_interface_and_region() {
    let e = env();
    let h = heat(password_cfg(&e));
    assert_eq!(h.endpoint().await.unwrap(), e.heat_url);
    assert_eq!(h.project_id().await.unwrap(), e.project_id);
    assert_eq!(h.auth_count(), 1, "one token serves every call");
    assert_eq!(h.find(&unique("none")).await.unwrap(), None);
    assert_eq!(h.auth_count(), 1);

    let internal = heat(HeatConfig {
        interface: stateshift::config::CatalogInterface::Internal,
        region: None,
        ..password_cfg(&e)
    });
    assert_eq!(internal.endpoint().await.unwrap(), e.heat_url);

    let nowhere = heat(HeatConfig {
        region: Some("Nowhere".into()),
        ..password_cfg(&e)
    });
    match nowhere.endpoint().await {
        Err(StackError::Invalid { msg, .. }) => assert!(
            msg.contains("region Nowhere") && msg.contains("public in RegionOne"),
            "{msg}"
        ),
        other => panic!("expected Invalid naming the region, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_credential_auth_reaches_the_same_project() {
    let e = env();
    let h = heat(app_cred_cfg(&e));
    assert_eq!(h.endpoint().await.unwrap(), e.heat_url);
    assert_eq!(h.project_id().await.unwrap(), e.project_id);
    assert_eq!(h.find(&unique("none")).await.unwrap(), None);
    assert!(
        h.describe().starts_with("heat http://127.0.0.1:"),
        "{}",
        h.describe()
    );
    // This Keystone (22.0.2, with the 2025 fix) refuses application-credential tokens the
    // trust Heat creates with every stack: the error says so instead of a bare 403.
    let name = unique("appcred");
    let err = h
        .create(&spec(&name, fixture("influxdb-local.yaml"), &[]))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StackError::Auth { msg, .. } if msg.contains("403") && msg.contains("trust")),
        "{err:?}"
    );
    assert_eq!(heat(password_cfg(&e)).find(&name).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_are_a_clear_auth_error_without_the_secret() {
    let e = env();
    let wrong = "wrong-pw-Zq81xv";
    let h = heat(HeatConfig {
        password: Some(Secret::new(wrong)),
        ..password_cfg(&e)
    });
    let err = h.find("anything").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StackError::Auth { .. }), "{err:?}");
    assert!(!err.is_transient());
    assert!(
        msg.contains("\"demo\"") && msg.contains("401") && msg.contains("credentials"),
        "{msg}"
    );
    assert!(
        !msg.contains(wrong) && !format!("{err:?}").contains(wrong),
        "{msg}"
    );

    let wrong_secret = "wrong-secret-Hh2k9";
    let h = heat(HeatConfig {
        application_credential_secret: Some(Secret::new(wrong_secret)),
        ..app_cred_cfg(&e)
    });
    let err = h.find("anything").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StackError::Auth { .. }), "{err:?}");
    assert!(msg.contains(&e.app_cred_id), "{msg}");
    assert!(!msg.contains(wrong_secret), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_replaced_once_and_the_call_succeeds() {
    let e = env();
    let h = heat(password_cfg(&e));
    let first = h.token().await.unwrap();
    assert_eq!(h.auth_count(), 1);
    revoke(&e, &first).await;
    assert_eq!(h.find(&unique("none")).await.unwrap(), None);
    assert_eq!(h.auth_count(), 2, "exactly one re-authentication");
    assert_ne!(h.token().await.unwrap(), first);
    assert_eq!(h.auth_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_renewed_before_it_expires() {
    let e = env();
    // Keystone's tokens here live 24 h; renewing 25 h ahead means every call renews.
    let h = heat(HeatConfig {
        token_renew_before: Duration::from_secs(25 * 3600),
        ..app_cred_cfg(&e)
    });
    h.find("x").await.unwrap();
    h.find("y").await.unwrap();
    h.find("z").await.unwrap();
    assert_eq!(h.auth_count(), 3);
    // The default margin (5 min) keeps one token.
    let h = heat(app_cred_cfg(&e));
    h.find("x").await.unwrap();
    h.find("y").await.unwrap();
    assert_eq!(h.auth_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_refusing_even_a_fresh_token_is_an_auth_error_after_one_reauth() {
    let e = env();
    let (url, hits) = fake_server(401).await;
    let h = heat(HeatConfig {
        endpoint_override: Some(url),
        ..password_cfg(&e)
    });
    let err = h.find("anything").await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StackError::Auth { .. }), "{err:?}");
    assert!(
        msg.contains("fresh token") && msg.contains("fake heat says 401"),
        "{msg}"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "the request, then once more after re-auth"
    );
    assert_eq!(h.auth_count(), 2);
    assert!(!msg.contains(e.password.expose()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_or_failing_heat_is_transient_after_bounded_retries() {
    let e = env();
    // A closed port: nothing listens on 127.0.0.1:9 here.
    let h = heat(HeatConfig {
        endpoint_override: Some("http://127.0.0.1:9/v1/{project_id}".into()),
        retry_budget: Duration::from_secs(1),
        ..password_cfg(&e)
    });
    let err = h.find("anything").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:9"), "{err}");
    let err = h
        .create(&spec(
            &unique("unreach"),
            fixture("influxdb-local.yaml"),
            &[],
        ))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err:?}");

    // 503 from Heat: retried (several requests), then transient.
    let (url, hits) = fake_server(503).await;
    let h = heat(HeatConfig {
        endpoint_override: Some(url),
        retry_budget: Duration::from_millis(1200),
        ..password_cfg(&e)
    });
    let err = h.find("anything").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("fake heat says 503"), "{err}");
    assert!(hits.load(Ordering::SeqCst) >= 2, "retried with backoff");

    // Keystone unreachable: transient as well.
    let h = heat(HeatConfig {
        auth_url: "http://127.0.0.1:9/v3".into(),
        retry_budget: Duration::from_millis(500),
        ..password_cfg(&e)
    });
    let err = h.find("anything").await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("Keystone"), "{err}");
}

// ---------------------------------------------------------------- stacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_passes_the_stack_provider_conformance_suite() {
    let e = env();
    let h = heat(password_cfg(&e));
    let name = unique("conf");
    let s = spec(
        &name,
        fixture("influxdb-local.yaml"),
        &[("host", "127.0.10.7"), ("ssh_port", "2202")],
    );
    let stack = conformance(&h, &s).await;
    let o = h.outputs(&stack).await.unwrap();
    assert_eq!(o.influxdb_host, "127.0.10.7");
    assert_eq!(o.influxdb_url, "http://127.0.10.7:8086");
    assert_eq!((o.ssh_host.as_str(), o.ssh_port), ("127.0.10.7", 2202));
    // The duplicate create left the original alone.
    assert_eq!(h.status(&stack).await.unwrap(), StackStatus::Complete);
    conformance_delete(&h, &stack).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_reports_the_time_from_create_complete_to_outputs() {
    let e = env();
    let h = heat(password_cfg(&e));
    let s = spec(
        &unique("timed"),
        fixture("influxdb-local.yaml"),
        &[("delay", "3")],
    );
    let (stack, outputs, report) = h.create_timed(&s).await.unwrap();
    assert_eq!(outputs.influxdb_host, "127.0.0.1");
    // Not a timing assertion: the figure is printed for the record (--no-capture).
    eprintln!(
        "heat create: {} polls, total {:?}, CREATE_COMPLETE -> outputs <= {:?} (create request {:?})",
        report.polls, report.total, report.complete_to_outputs_max, report.request
    );
    assert!(report.polls >= 2, "{report:?}");
    h.delete(&stack, Duration::from_secs(60)).await.unwrap();
    let r = h
        .measure_create(&spec(&unique("bench"), fixture("influxdb-local.yaml"), &[]))
        .await
        .unwrap();
    eprintln!(
        "heat measure_create (no delay): {} polls, total {:?}, CREATE_COMPLETE -> outputs <= {:?}",
        r.polls, r.total, r.complete_to_outputs_max
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_create_surfaces_heats_reason_and_is_deleted() {
    let e = env();
    let h = heat(password_cfg(&e));
    let name = unique("fail");
    let err = h
        .create(&spec(&name, fixture("fail.yaml"), &[]))
        .await
        .unwrap_err();
    match &err {
        StackError::CreateFailed { name: n, reason } => {
            assert_eq!(n, &name);
            assert!(
                reason.contains("Test Resource failed doomed"),
                "Heat's reason: {reason}"
            );
            assert!(reason.contains("the stack was deleted"), "{reason}");
        }
        other => panic!("expected CreateFailed, got {other:?}"),
    }
    assert_eq!(h.find(&name).await.unwrap(), None, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_name_is_refused_and_the_first_stack_is_untouched() {
    let e = env();
    let h = heat(password_cfg(&e));
    let name = unique("dup");
    let s = spec(&name, fixture("influxdb-local.yaml"), &[]);
    let (stack, _) = h.create(&s).await.unwrap();
    match h.create(&s).await {
        Err(StackError::Duplicate { name: n }) => assert_eq!(n, name),
        other => panic!("expected Duplicate, got {:?}", other.map(|r| r.0)),
    }
    assert_eq!(h.status(&stack).await.unwrap(), StackStatus::Complete);
    assert_eq!(h.find(&name).await.unwrap(), Some(stack.clone()));
    h.delete(&stack, Duration::from_secs(60)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_carry_heats_message_and_create_nothing() {
    let e = env();
    let h = heat(password_cfg(&e));
    let name = unique("invalid");
    let err = h
        .create(&spec(&name, fixture("invalid.yaml"), &[("needed", "x")]))
        .await
        .unwrap_err();
    match &err {
        StackError::Invalid { msg, .. } => {
            assert!(msg.contains("400") && msg.contains("colour"), "{msg}");
            assert!(msg.contains(&name), "{msg}");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // A missing required parameter.
    let err = h
        .create(&spec(
            &name,
            fixture("influxdb-local.yaml"),
            &[("nope", "1")],
        ))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StackError::Invalid { msg, .. } if msg.contains("nope")),
        "{err:?}"
    );
    // The validate call says the same without creating anything.
    let err = h
        .validate(&spec(&name, fixture("invalid.yaml"), &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    assert_eq!(h.find(&name).await.unwrap(), None);
    // A template file that does not exist names the file.
    let err = h
        .create(&spec(&name, fixture("missing.yaml"), &[]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing.yaml"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_times_out_is_deleted_and_the_error_says_so() {
    let e = env();
    let h = heat(password_cfg(&e));
    let name = unique("slow");
    let mut s = spec(&name, fixture("influxdb-local.yaml"), &[("delay", "300")]);
    s.timeout = Duration::from_secs(3);
    match h.create(&s).await {
        Err(StackError::Timeout {
            name: n,
            timeout,
            cleanup,
        }) => {
            assert_eq!(
                (n.as_str(), timeout),
                (name.as_str(), Duration::from_secs(3))
            );
            assert_eq!(cleanup, "it was deleted");
        }
        other => panic!("expected Timeout, got {:?}", other.map(|r| r.0)),
    }
    assert_eq!(h.find(&name).await.unwrap(), None, "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_stack_that_never_existed_is_fine() {
    let e = env();
    let h = heat(password_cfg(&e));
    let ghost = StackRef {
        id: "00000000-0000-4000-8000-000000000000".into(),
        name: unique("ghost"),
    };
    assert_eq!(h.status(&ghost).await.unwrap(), StackStatus::Gone);
    h.delete(&ghost, Duration::from_secs(10)).await.unwrap();
}

// ---------------------------------------------------------------- the real templates

/// The test environment that renders the templates without booting anything
/// (scripts/vmlab/env-render.yaml; the lab's Heat plugin, installed by openstack.sh).
fn render_env() -> PathBuf {
    PathBuf::from(format!("{ROOT}/scripts/vmlab/env-render.yaml"))
}

const ADMIN_PW: &str = "influx-Secret-1234";
const CYCLOPS_PW: &str = "cyclops-Secret-99";
const SSH_KEY: &str =
    "-----BEGIN OPENSSH PRIVATE KEY-----\nfake-private-key-body\n-----END OPENSSH PRIVATE KEY-----";
const KEYS_DATA: &str = r#"{"ssh_host_keys": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDIfEYXAUQtwmEsxcNkkgTeO4S3ZCKl0jGy837I7q9hC"}"#;

/// Every secret the parameters below carry: none may show anywhere but in user_data.
const SECRETS: [&str; 7] = [
    ADMIN_PW,
    CYCLOPS_PW,
    "fake-private-key-body",
    "heat-secret",
    "zabbix-secret",
    "0123456789abcdef-api-token",
    "users-secret",
];

/// Every template in heat-templates/ and deploy/.
fn all_templates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in ["heat-templates", "deploy"] {
        for e in std::fs::read_dir(format!("{ROOT}/{dir}")).unwrap() {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            if n.ends_with(".yaml") || n.ends_with(".yml") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

fn params_for(t: &std::path::Path) -> BTreeMap<String, String> {
    let name = t.file_name().unwrap().to_string_lossy().to_string();
    let mut p = BTreeMap::new();
    let mut set = |k: &str, v: &str| {
        p.insert(k.to_string(), v.to_string());
    };
    set("image", "debian-12-stateshift-lab");
    set("flavor", "m1.small");
    set("network", "lab");
    set("key_name", "stateshift");
    set("zabbix_server", "10.0.0.5:10051");
    match name.as_str() {
        "influxdb.yaml" => set("influxdb_admin_password", ADMIN_PW),
        "rcbaas.yaml" => {
            set("influxdb_url", "http://10.0.0.12:8086");
            set("influxdb_password", CYCLOPS_PW);
        }
        "so-stack.yaml" => {
            for (k, v) in [
                (
                    "stateshift_url",
                    "https://releases.example/stateshift-x86_64",
                ),
                (
                    "stateshift_sha256",
                    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                ),
                ("service_name", "rcbaas-1"),
                ("influxdb_stack", "rcbaas-1-influx-0"),
                ("influxdb_url", "http://10.0.0.12:8086"),
                ("influxdb_host", "10.0.0.12"),
                ("influxdb_ssh_host_keys", KEYS_DATA),
                ("zabbix_host", "rcbaas-1-influx-0"),
                ("cyclops_host", "10.0.0.11"),
                ("cyclops_ssh_host_keys", KEYS_DATA),
                ("ssh_private_key", SSH_KEY),
                ("influxdb_admin_password", ADMIN_PW),
                ("influxdb_user_passwords", "{cyclops: users-secret}"),
                ("heat_auth_url", "https://keystone.example:5000/v3"),
                ("heat_application_credential_id", "0a1b2c3d"),
                ("heat_application_credential_secret", "heat-secret"),
                ("target_image", "debian-12-stateshift-lab"),
                ("target_key_name", "stateshift"),
                ("zabbix_api_url", "http://10.0.0.5/api_jsonrpc.php"),
                ("zabbix_password", "zabbix-secret"),
                ("api_token", "0123456789abcdef-api-token"),
                ("access_cidr", "192.168.77.0/24"),
                ("transfer_rate_limit", "25MB/s"),
                ("write_time_guard", "5ms"),
            ] {
                set(k, v);
            }
        }
        _ => {}
    }
    p
}

/// A resource's attributes, straight from Heat's REST API.
async fn resource_attributes(h: &Heat, stack: &StackRef, resource: &str) -> Value {
    let url = format!(
        "{}/stacks/{}/{}/resources/{resource}",
        h.endpoint().await.unwrap(),
        stack.name,
        stack.id
    );
    get_json(h, &url).await["resource"]["attributes"].clone()
}

async fn get_json(h: &Heat, url: &str) -> Value {
    let r = reqwest::Client::new()
        .get(url)
        .header("X-Auth-Token", h.token().await.unwrap().expose())
        .header("Connection", "close")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

/// The user_data Heat rendered for a server (the render-only environment shows it).
async fn rendered_user_data(h: &Heat, stack: &StackRef, server: &str) -> String {
    let attrs = resource_attributes(h, stack, server).await;
    attrs["user_data"]
        .as_str()
        .unwrap_or_else(|| panic!("{server}: no user_data attribute: {attrs}"))
        .to_string()
}

/// The body of the here-document a boot script writes to `path` (`cat > PATH <<'EOF'`).
fn heredoc(script: &str, path: &str) -> String {
    let mut lines = script.lines();
    let start = lines
        .by_ref()
        .find(|l| {
            l.contains(&format!("cat > {path} <<'")) || l.contains(&format!("cat > \"{path}\" <<'"))
        })
        .unwrap_or_else(|| panic!("no here-document for {path}"));
    let mark = start.rsplit("<<'").next().unwrap().trim_end_matches('\'');
    lines
        .take_while(|l| *l != mark)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The script's own lines: here-document bodies (files it writes, which may be templates
/// with placeholders of their own) left out.
fn outside_heredocs(script: &str) -> String {
    let mut out = Vec::new();
    let mut mark: Option<String> = None;
    for l in script.lines() {
        match &mark {
            Some(m) if l == m => mark = None,
            Some(_) => {}
            None => {
                out.push(l);
                if let Some(rest) = l.split("<<'").nth(1) {
                    mark = Some(rest.trim_end_matches('\'').to_string());
                }
            }
        }
    }
    out.join("\n")
}

/// `sh -n`: the rendered boot script parses (a quote in a parameter would break it).
fn shell_parses(script: &str, what: &str) {
    let out = std::process::Command::new("sh")
        .arg("-n")
        .arg("/dev/stdin")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(script.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "{what}: the rendered boot script does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Secrets reach the VM only through its user_data: never a software config (which any
/// project member can read back), never the stack's shown parameters or outputs.
async fn secrets_stay_in_user_data(h: &Heat, stack: &StackRef, tname: &str) {
    let ep = h.endpoint().await.unwrap();
    let shown = get_json(h, &format!("{ep}/stacks/{}/{}", stack.name, stack.id)).await;
    let configs = get_json(h, &format!("{ep}/software_configs")).await;
    let mut texts = vec![shown.to_string()];
    for c in configs["software_configs"].as_array().unwrap() {
        let id = c["id"].as_str().unwrap();
        texts.push(
            get_json(h, &format!("{ep}/software_configs/{id}"))
                .await
                .to_string(),
        );
    }
    for t in texts {
        for s in SECRETS {
            assert!(
                !t.contains(s),
                "{tname}: secret {s:?} is readable through Heat's API"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_template_validates_and_renders_its_boot_on_heat() {
    let e = env();
    let h = heat(password_cfg(&e));
    let templates = all_templates();
    let mut names: Vec<String> = templates
        .iter()
        .map(|t| t.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["influxdb.yaml", "rcbaas.yaml", "so-stack.yaml"]);
    for t in &templates {
        let tname = t.file_name().unwrap().to_string_lossy().to_string();
        let mut s = spec(&unique(&tname.replace(".yaml", "")), t.clone(), &[]);
        s.parameters = params_for(t);
        s.environment_files = vec![render_env()];
        let v = h
            .validate(&s)
            .await
            .unwrap_or_else(|e| panic!("{tname}: validate: {e}"));
        assert!(v["Parameters"].is_object(), "{tname}: {v}");
        let c = h
            .create_raw(&s)
            .await
            .unwrap_or_else(|e| panic!("{tname}: create: {e}"));
        let o = &c.outputs;
        let server = match tname.as_str() {
            "rcbaas.yaml" => "cyclops",
            _ => "server",
        };
        let ud = rendered_user_data(&h, &c.stack, server).await;
        shell_parses(&ud, &tname);
        assert!(ud.starts_with("#!/bin/sh\n"), "{tname}: a shell script");
        let code = outside_heredocs(&ud);
        assert!(
            !code.contains("@@"),
            "{tname}: a placeholder is left: {code}"
        );
        // The WaitCondition's signal: endpoint and token of this stack's handle.
        assert!(
            ud.contains("/signal'") && ud.contains("SIGNAL_TOKEN='"),
            "{tname}"
        );
        secrets_stay_in_user_data(&h, &c.stack, &tname).await;
        match tname.as_str() {
            "influxdb.yaml" => {
                for k in [
                    "influxdb_host",
                    "influxdb_url",
                    "ssh_host",
                    "ssh_port",
                    "ssh_host_keys",
                    "zabbix_host",
                ] {
                    assert!(o.contains_key(k), "{tname}: output {k}: {o:?}");
                }
                // No address without a port; what Heat computes from parameters is real.
                assert_eq!(o["influxdb_url"], "http://:8086");
                assert_eq!(o["ssh_port"], Value::from(22));
                assert_eq!(o["zabbix_host"].as_str(), Some(c.stack.name.as_str()));
                assert_eq!(
                    heredoc(&ud, "\"$BOOT_SECRETS/influxdb-admin.password\""),
                    ADMIN_PW
                );
                assert_eq!(
                    ud.matches(ADMIN_PW).count(),
                    1,
                    "the password is only in its file"
                );
                assert!(ud.contains("INFLUXDB_HTTP_AUTH_ENABLED=true"));
                assert!(ud.contains("INFLUXDB_SUBSCRIBER_WRITE_CONCURRENCY=1"));
                assert!(ud.contains("INFLUXDB_MONITOR_STORE_ENABLED=false"));
                assert!(ud.contains("ZABBIX_SERVER='10.0.0.5:10051'"));
            }
            "rcbaas.yaml" => {
                for k in [
                    "cyclops_host",
                    "ssh_host_keys",
                    "cyclops_udr_url",
                    "cyclops_rc_url",
                    "cyclops_billing_url",
                ] {
                    assert!(o.contains_key(k), "{tname}: output {k}: {o:?}");
                }
                assert!(
                    !o.contains_key("influxdb_url"),
                    "the service stack holds no InfluxDB"
                );
                let script = heredoc(&ud, "/opt/stateshift/scripts/configure-cyclops.sh");
                assert_eq!(
                    script.trim_end(),
                    std::fs::read_to_string(format!("{ROOT}/scripts/configure-cyclops.sh"))
                        .unwrap()
                        .trim_end(),
                    "the cutover script is carried as is"
                );
                assert!(
                    ud.contains("configure-cyclops.sh --restart \"$INFLUXDB_URL\""),
                    "{ud}"
                );
                assert!(ud.contains("INFLUXDB_URL='http://10.0.0.12:8086'"));
                assert_eq!(
                    heredoc(&ud, "\"$BOOT_SECRETS/influxdb.password\""),
                    CYCLOPS_PW
                );
            }
            "so-stack.yaml" => {
                assert_eq!(o["api_url"], "https://:8443");
                assert_eq!(o["capture_url"], "http://:8899");
                for (path, want) in [
                    ("\"$ETC/id_ssh\"", SSH_KEY),
                    ("\"$ETC/influxdb-admin.password\"", ADMIN_PW),
                    ("\"$ETC/heat.secret\"", "heat-secret"),
                    ("\"$ETC/zabbix.password\"", "zabbix-secret"),
                    ("\"$ETC/api.token\"", "0123456789abcdef-api-token"),
                    ("\"$ETC/influx-users.yaml\"", "{cyclops: users-secret}"),
                ] {
                    assert_eq!(heredoc(&ud, path), want, "{path}");
                }
                let unit = heredoc(&ud, "/etc/systemd/system/stateshift.service");
                for line in [
                    "ExecStart=/usr/local/bin/stateshift daemon -c /etc/stateshift/stateshift.yaml",
                    "RestartPreventExitStatus=2",
                    "KillMode=mixed",
                    "RequiresMountsFor=/var/lib/stateshift",
                ] {
                    assert!(unit.lines().any(|l| l == line), "unit: {line}");
                }
                let config = with_so_address(&heredoc(&ud, "\"$ETC/stateshift.yaml\""));
                so_config_loads(&config, RENDER_SO_IP);
                let template = heredoc(&ud, "/opt/stateshift/heat-templates/influxdb.yaml");
                assert_eq!(
                    template.trim_end(),
                    std::fs::read_to_string(format!("{ROOT}/heat-templates/influxdb.yaml"))
                        .unwrap()
                        .trim_end(),
                    "the target template is carried as is"
                );
                // The VM's state lives on a volume the stack owns.
                assert!(
                    o["state_volume"].as_str().is_some_and(|v| v.len() == 36),
                    "{o:?}"
                );
            }
            other => panic!("unexpected template {other}"),
        }
        h.delete(&c.stack, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{tname}: delete: {e}"));
        assert_eq!(h.status(&c.stack).await.unwrap(), StackStatus::Gone);
    }
}

/// The daemon's own loader accepts the config so-stack renders (secret paths redirected),
/// and it says what the deployment needs.
/// Under the render environment the SO's port is `OS::Heat::None`, so its address renders
/// empty (`http://:8899`) where a cloud puts the port's fixed IP; the daemon refuses a URL
/// with no host. This puts an address in before the file is loaded.
const RENDER_SO_IP: &str = "192.0.2.10";

fn with_so_address(config: &str) -> String {
    assert!(
        config.contains("advertise_url: http://:"),
        "the SO's address renders empty here: {config}"
    );
    config.replace("http://:", &format!("http://{RENDER_SO_IP}:"))
}

fn so_config_loads(text: &str, so_ip: &str) {
    let conf: serde_yaml::Value = serde_yaml::from_str(text)
        .unwrap_or_else(|e| panic!("the daemon's config is YAML: {e}\n{text}"));
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "influxdb-admin.password",
        "zabbix.password",
        "api.token",
        "heat.secret",
    ] {
        std::fs::write(tmp.path().join(f), "x").unwrap();
    }
    std::fs::write(tmp.path().join("influx-users.yaml"), "cyclops: pw\n").unwrap();
    // The API's certificate, as the VM's boot makes it (the loader checks it).
    std::fs::create_dir_all(tmp.path().join("tls")).unwrap();
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=stateshift",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(tmp.path().join("tls/api.key"))
        .arg("-out")
        .arg(tmp.path().join("tls/api.crt"))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl req");
    let local = text
        .replace("/etc/stateshift/", &format!("{}/", tmp.path().display()))
        .replace("/var/lib/stateshift", &tmp.path().display().to_string());
    let cpath = tmp.path().join("stateshift.yaml");
    std::fs::write(&cpath, &local).unwrap();
    let loaded = stateshift::config::Config::load(&cpath)
        .unwrap_or_else(|e| panic!("the rendered config loads: {e}\n{local}"));
    use stateshift::config::{HostKeyCheck, MonitorKind, ProviderKind};
    assert_eq!(loaded.provider.kind, ProviderKind::Heat);
    assert_eq!(loaded.monitor.kind, MonitorKind::Zabbix);
    assert_eq!(
        loaded.service.stack.as_deref(),
        Some("rcbaas-1-influx-0"),
        "dispose deletes the InfluxDB stack, never the service"
    );
    assert_eq!(loaded.source.influx_url, "http://10.0.0.12:8086");
    assert_eq!(loaded.source.username.as_deref(), Some("admin"));
    assert_eq!(loaded.migration.transfer_rate_limit, 25_000_000);
    assert_eq!(
        loaded.migration.write_time_guard,
        std::time::Duration::from_millis(5)
    );
    for (what, ssh) in [
        ("source", loaded.source.ssh.as_ref()),
        ("cutover", loaded.cutover.ssh.as_ref()),
        ("provider", loaded.provider.ssh.as_ref()),
    ] {
        assert_eq!(
            ssh.map(|s| s.host_key_check),
            Some(HostKeyCheck::Strict),
            "{what}: strict host keys"
        );
    }
    assert_eq!(loaded.cutover.ssh.as_ref().unwrap().host, "10.0.0.11");
    let cmd = loaded.cutover.command.as_deref().unwrap();
    assert!(
        cmd.contains("configure-cyclops.sh --restart {target_url} /opt/cyclops"),
        "{cmd}"
    );
    // What the new InfluxDB stacks get: everything the first one had.
    let p = &loaded.provider.parameters;
    for (k, v) in [
        ("network", "lab"),
        ("access_cidr", "192.168.77.0/24"),
        ("zabbix_server", "10.0.0.5:10051"),
        ("key_name", "stateshift"),
        ("image", "debian-12-stateshift-lab"),
        ("influxdb_admin_user", "admin"),
    ] {
        assert_eq!(
            p.get(k).map(String::as_str),
            Some(v),
            "provider.parameters.{k}"
        );
    }
    assert!(
        loaded
            .provider
            .secret_parameters
            .contains_key("influxdb_admin_password"),
        "the admin password goes to new stacks from its file"
    );
    assert!(loaded.provider.environment_files.is_empty());
    assert_eq!(
        loaded.capture.advertise_url.as_deref(),
        Some(format!("http://{so_ip}:8899").as_str())
    );
    assert_eq!(loaded.api.listen.to_string(), "0.0.0.0:8443");
    let z = loaded.monitor.zabbix.as_ref().unwrap();
    assert_eq!(z.host, "rcbaas-1-influx-0");
    let hc = loaded.provider.heat.as_ref().unwrap();
    hc.validate().unwrap();
    assert_eq!(hc.application_credential_id.as_deref(), Some("0a1b2c3d"));
    assert_eq!(
        conf["api"]["tls_cert_file"].as_str(),
        Some("/var/lib/stateshift/tls/api.crt")
    );
    for s in SECRETS {
        assert!(!text.contains(s), "{s} must stay out of the config file");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_lab_environment_heat_refuses_the_templates_for_lack_of_neutron() {
    // Shows that the environment file really reaches Heat (and that Heat checks resource
    // availability): the same template, without it, is refused with Heat's reason.
    let e = env();
    let h = heat(password_cfg(&e));
    let mut s = spec(
        &unique("nonova"),
        PathBuf::from(format!("{ROOT}/heat-templates/influxdb.yaml")),
        &[],
    );
    s.parameters = params_for(&s.template);
    let err = h.validate(&s).await.unwrap_err();
    assert!(
        matches!(&err, StackError::Invalid { msg, .. } if msg.contains("neutron")),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_so_stack_renders_password_auth_and_a_target_environment_when_given() {
    let e = env();
    let h = heat(password_cfg(&e));
    let t = PathBuf::from(format!("{ROOT}/deploy/so-stack.yaml"));
    let mut s = spec(&unique("so-pw"), t.clone(), &[]);
    s.parameters = params_for(&t);
    s.parameters.remove("heat_application_credential_id");
    s.parameters.remove("heat_application_credential_secret");
    for (k, v) in [
        ("heat_username", "rcbaas-so"),
        ("heat_password", "heat-password"),
        ("heat_project", "rcbaas"),
        (
            "target_environment",
            "resource_registry:\n  OS::Nova::Server: My::Server\n",
        ),
    ] {
        s.parameters.insert(k.into(), v.into());
    }
    s.environment_files = vec![render_env()];
    let c = h.create_raw(&s).await.unwrap();
    let ud = rendered_user_data(&h, &c.stack, "server").await;
    assert_eq!(heredoc(&ud, "\"$ETC/heat.secret\""), "heat-password");
    assert_eq!(
        heredoc(
            &ud,
            "/opt/stateshift/heat-templates/target-environment.yaml"
        )
        .trim_end(),
        "resource_registry:\n  OS::Nova::Server: My::Server"
    );
    let text = with_so_address(&heredoc(&ud, "\"$ETC/stateshift.yaml\""));
    let conf: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("the daemon's config is YAML: {e}\n{text}"));
    // The whole rendered configuration loads as the daemon will load it (its secret
    // files exist only on the VM).
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &text).unwrap();
    let loaded = stateshift::config::Config::load_unresolved(file.path(), [])
        .unwrap_or_else(|e| panic!("the rendered configuration is valid: {e}\n{text}"));
    let hc: HeatConfig = loaded.provider.heat.expect("provider.heat is rendered");
    assert_eq!(hc.username.as_deref(), Some("rcbaas-so"));
    assert_eq!(hc.project_name.as_deref(), Some("rcbaas"));
    assert_eq!(
        hc.password_file,
        Some(PathBuf::from("/etc/stateshift/heat.secret"))
    );
    assert_eq!(
        conf["provider"]["environment_files"][0].as_str(),
        Some("/opt/stateshift/heat-templates/target-environment.yaml")
    );
    h.delete(&c.stack, Duration::from_secs(60)).await.unwrap();
}

/// Every parameter the SO stack writes into the daemon's configuration reaches it as the
/// text the operator gave, even text YAML would read as something else: a service named
/// 2024, a user named null (once read as no user: the default), a domain named 007 (once
/// the number 7), a network whose name holds `: ` and ` #`. Both ways to authenticate
/// to Heat, on the real Heat; the rendered file is loaded as the daemon loads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_so_stack_hands_every_text_parameter_to_the_daemon_as_given() {
    let e = env();
    let h = heat(password_cfg(&e));
    let t = PathBuf::from(format!("{ROOT}/deploy/so-stack.yaml"));
    let typed = [
        ("service_name", "2024"),
        ("influxdb_stack", "null"),
        ("influxdb_admin_user", "true"),
        ("influxdb_host", "1e3"),
        ("cyclops_host", "007"),
        ("ssh_user", "null"),
        ("network", "Net #1: ops"),
        ("heat_region", "1"),
        ("zabbix_user", "123"),
        ("zabbix_host", "0x1F"),
        ("target_create_timeout", "90m"),
        ("poll_interval", "45s"),
        ("cooldown", "0s"),
        ("threshold", "0.85"),
        ("consecutive", "100"),
    ];
    for app_cred in [false, true] {
        let mut s = spec(&unique("so-typed"), t.clone(), &[]);
        s.parameters = params_for(&t);
        let auth: &[(&str, &str)] = if app_cred {
            &[("heat_application_credential_id", "123")]
        } else {
            s.parameters.remove("heat_application_credential_id");
            s.parameters.remove("heat_application_credential_secret");
            &[
                ("heat_username", "null"),
                ("heat_password", "heat-password"),
                ("heat_project", "true"),
                ("heat_user_domain", "007"),
                ("heat_project_domain", "false"),
            ]
        };
        for (k, v) in typed.iter().chain(auth) {
            s.parameters.insert(k.to_string(), v.to_string());
        }
        s.environment_files = vec![render_env()];
        let c = h.create_raw(&s).await.unwrap();
        let ud = rendered_user_data(&h, &c.stack, "server").await;
        h.delete(&c.stack, Duration::from_secs(60)).await.unwrap();
        let text = with_so_address(&heredoc(&ud, "\"$ETC/stateshift.yaml\""));
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &text).unwrap();
        let c = stateshift::config::Config::load_unresolved(file.path(), [])
            .unwrap_or_else(|e| panic!("the rendered configuration is valid: {e}\n{text}"));
        assert_eq!(c.service.name, "2024");
        assert_eq!(c.service.stack.as_deref(), Some("null"));
        assert_eq!(c.source.name, "null");
        assert_eq!(c.source.username.as_deref(), Some("true"));
        let ssh = |s: Option<&stateshift::config::SshConfig>| {
            let s = s.expect("an ssh section is rendered");
            (s.host.clone(), s.user.clone())
        };
        assert_eq!(ssh(c.source.ssh.as_ref()), ("1e3".into(), "null".into()));
        assert_eq!(ssh(c.cutover.ssh.as_ref()), ("007".into(), "null".into()));
        assert_eq!(
            c.provider.ssh.as_ref().map(|s| s.user.as_str()),
            Some("null")
        );
        assert_eq!(
            c.provider.parameters.get("network").map(String::as_str),
            Some("Net #1: ops")
        );
        assert_eq!(
            c.provider
                .parameters
                .get("influxdb_admin_user")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(c.provider.create_timeout, Duration::from_secs(90 * 60));
        let m = &c.monitor;
        assert_eq!(
            (m.poll_interval, m.cooldown, m.threshold, m.consecutive),
            (Duration::from_secs(45), Duration::ZERO, 0.85, 100)
        );
        let z = m.zabbix.as_ref().expect("monitor.zabbix is rendered");
        assert_eq!(
            (z.username.as_deref(), z.host.as_str()),
            (Some("123"), "0x1F")
        );
        let hc = c.provider.heat.as_ref().expect("provider.heat is rendered");
        assert_eq!(hc.region.as_deref(), Some("1"));
        if app_cred {
            assert_eq!(hc.application_credential_id.as_deref(), Some("123"));
        } else {
            assert_eq!(
                (
                    hc.username.as_deref(),
                    hc.project_name.as_deref(),
                    hc.user_domain_name.as_str(),
                    hc.project_domain_name.as_str()
                ),
                (Some("null"), Some("true"), "007", "false")
            );
        }
    }
}

/// The SO stack's parameters that become the daemon's settings let through Heat only
/// what the daemon then loads: a value it would refuse is refused at stack create, with
/// Heat's reason, not after the SO VM's wait condition times out. Each parameter's
/// definition, as deploy/so-stack.yaml has it, goes to the real Heat in a template of its
/// own (nothing else in it to create); the daemon reads the same value in a minimal
/// configuration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_so_stack_lets_through_heat_only_settings_the_daemon_loads() {
    let e = env();
    let h = heat(password_cfg(&e));
    let so: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/so-stack.yaml")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // (parameter, the daemon's setting as the SO stack writes it (a value in `"` is
    // quoted there), values both take, values the daemon refuses)
    let heat_auth = "provider:\n  kind: heat\n  heat:\n    username: so\n    password: pw\n    project_name: p\n    auth_url";
    let zabbix_url = "monitor:\n  kind: zabbix\n  zabbix:\n    username: so\n    password: pw\n    host: h\n    url";
    let cases: [(&str, &str, &[&str], &[&str]); 11] = [
        (
            "transfer_rate_limit",
            "migration:\n  transfer_rate_limit",
            &["0", "1MB/s", "40MB/s", "1.5GB/s", "2MiB/s"],
            &["999KB/s", "1KB/s", "0.5MB/s", "40"],
        ),
        (
            "write_time_guard",
            "migration:\n  write_time_guard",
            &["0s", "1ms", "5ms", "60s", "60000ms"],
            &["61s", "99999ms"],
        ),
        (
            "poll_interval",
            "monitor:\n  poll_interval",
            &["1s", "30s", "5m", "1000ms", "99h"],
            &["0s", "500ms", "999ms", "3000000000000000h"],
        ),
        (
            "target_create_timeout",
            "provider:\n  create_timeout",
            &["0s", "20m", "30m", "99h"],
            &["100000000000000h", "8d"],
        ),
        (
            "cooldown",
            "monitor:\n  cooldown",
            &["0s", "15m", "99h", "99999s"],
            &["8d", "99999999999999999999s"],
        ),
        // Heat's numbers take nan, inf and 2.5: these two are text with a pattern.
        (
            "threshold",
            "monitor:\n  threshold: {}",
            &["10", "0.85", "0", "250000"],
            &["nan", "inf", "1,5"],
        ),
        (
            "consecutive",
            "monitor:\n  consecutive: {}",
            &["1", "3", "100"],
            &["0", "2.5", "-1"],
        ),
        (
            "heat_auth_url",
            heat_auth,
            &[
                "http://ks",
                "https://keystone.example:5000/v3",
                "http://[fd00::1]:5000/v3",
            ],
            &["http://so:pw@ks:5000/v3", "http://:5000/v3", "https://"],
        ),
        (
            "zabbix_api_url",
            zabbix_url,
            &[
                "http://10.0.0.5/api_jsonrpc.php",
                "https://zabbix.example/zabbix/api_jsonrpc.php",
            ],
            &[
                "http://so:pw@zabbix/api_jsonrpc.php",
                "http://:80/api_jsonrpc.php",
            ],
        ),
        (
            "influxdb_url",
            "source:\n  username: admin\n  influx_url",
            &["http://10.0.0.12:8086", "http://[fd00::2]:8086/"],
            &["http://:8086", "http://10.0.0.12:80860"],
        ),
        // Any name, but no `"` or `\` that would end or escape its quoted place.
        (
            "network",
            "provider:\n  parameters:\n    network",
            &["lab", "Net #1: ops", "5e1f2c3a-0b6d-4f7e-9a2b-1c3d4e5f6a7b"],
            &["lab\"", "a\\x"],
        ),
    ];
    let daemon_loads = |setting: &str, v: &str| {
        let file = dir.path().join("stateshift.yaml");
        let line = if setting.contains("{}") {
            setting.replace("{}", v)
        } else {
            format!("{setting}: \"{v}\"")
        };
        let source = if setting.starts_with("source:") {
            ""
        } else {
            "source:\n  influx_url: http://127.0.0.1:8086\n  username: admin\n"
        };
        std::fs::write(&file, format!("{source}{line}\n")).unwrap();
        stateshift::config::Config::load_unresolved(&file, [])
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for (param, setting, both_take, daemon_refuses) in cases {
        let def = so["parameters"][param].clone();
        assert!(
            def["constraints"].is_sequence(),
            "{param} has constraints in deploy/so-stack.yaml: {def:?}"
        );
        let template = dir.path().join(format!("{param}.yaml"));
        std::fs::write(
            &template,
            serde_yaml::to_string(&serde_json::json!({
                "heat_template_version": "2018-08-31",
                "parameters": { param: def },
                "resources": {},
                "outputs": { "value": { "value": { "get_param": param } } },
            }))
            .unwrap(),
        )
        .unwrap();
        for v in both_take {
            if let Err(err) = daemon_loads(setting, v) {
                panic!("the daemon loads {param} = {v:?}: {err}");
            }
            let s = spec(&unique("pattern"), template.clone(), &[(param, v)]);
            let c = h
                .create_raw(&s)
                .await
                .unwrap_or_else(|err| panic!("Heat takes {param} = {v:?}: {err}"));
            h.delete(&c.stack, Duration::from_secs(60)).await.unwrap();
        }
        for v in daemon_refuses {
            assert!(
                daemon_loads(setting, v).is_err(),
                "the daemon refuses {param} = {v:?}"
            );
            let name = unique("pattern");
            let err = match h
                .create_raw(&spec(&name, template.clone(), &[(param, v)]))
                .await
            {
                Ok(c) => {
                    h.delete(&c.stack, Duration::from_secs(60)).await.unwrap();
                    panic!("Heat refuses {param} = {v:?}, as the daemon would");
                }
                Err(err) => err,
            };
            assert!(
                matches!(&err, StackError::Invalid { msg, .. } if msg.contains(param)),
                "Heat's refusal names {param}: {err:?}"
            );
            assert_eq!(h.find(&name).await.unwrap(), None, "nothing created");
        }
    }
}

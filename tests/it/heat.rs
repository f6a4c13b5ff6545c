//! Against the real Keystone + Heat that `scripts/openstack.sh up` starts (its env file
//! names Keystone, the demo user and project, and an application credential). Without
//! that env file every test here fails with a message saying so.
//!
//! Heat has no Nova or Neutron here: the fixtures in `tests/fixtures/heat/` compute their
//! outputs from parameters (`OS::Heat::Value`, `OS::Heat::TestResource`), and the real
//! templates run with `heat-templates/env-nova-free.yaml`, which maps servers and network
//! resources to `OS::Heat::None`. Tests may run in parallel processes: every stack name is
//! unique.

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

fn nova_free() -> PathBuf {
    PathBuf::from(format!("{ROOT}/heat-templates/env-nova-free.yaml"))
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
        interface: "internal".into(),
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

fn template_params() -> Vec<(&'static str, &'static str)> {
    vec![
        ("image", "debian-12"),
        ("flavor", "m1.small"),
        ("network", "service-net"),
        ("key_name", "stateshift"),
        ("zabbix_server", "10.0.0.5"),
    ]
}

/// Every template in heat-templates/ and deploy/ (but the environment files).
fn all_templates() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in ["heat-templates", "deploy"] {
        for e in std::fs::read_dir(format!("{ROOT}/{dir}")).unwrap() {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            if (n.ends_with(".yaml") || n.ends_with(".yml")) && !n.starts_with("env-") {
                v.push(p);
            }
        }
    }
    v.sort();
    v
}

fn params_for(t: &std::path::Path) -> BTreeMap<String, String> {
    let name = t.file_name().unwrap().to_string_lossy().to_string();
    let mut p: BTreeMap<String, String> = template_params()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    match name.as_str() {
        "rcbaas.yaml" => {
            p.insert("cyclops_image".into(), "cyclops-2.0".into());
        }
        "so-stack.yaml" => {
            p.remove("zabbix_server");
            for (k, v) in [
                ("stateshift_url", "https://releases.example/stateshift-x86_64"),
                (
                    "stateshift_sha256",
                    "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                ),
                ("service_name", "rcbaas-1"),
                ("service_stack", "rcbaas-1-a"),
                ("influxdb_url", "http://10.0.0.12:8086"),
                ("influxdb_host", "10.0.0.12"),
                ("cyclops_host", "10.0.0.11"),
                ("ssh_private_key", "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----\n"),
                ("influxdb_admin_user", "admin"),
                ("influxdb_admin_password", "influx-secret"),
                ("heat_auth_url", "https://keystone.example:5000/v3"),
                ("heat_application_credential_id", "0a1b2c3d"),
                ("heat_application_credential_secret", "heat-secret"),
                ("target_image", "debian-12"),
                ("target_key_name", "stateshift"),
                ("zabbix_server", "10.0.0.5"),
                ("zabbix_api_url", "http://10.0.0.5/api_jsonrpc.php"),
                ("zabbix_password", "zabbix-secret"),
                ("zabbix_host", "rcbaas-1-a-influxdb"),
                ("api_token", "0123456789abcdef-api-token"),
            ] {
                p.insert(k.into(), v.into());
            }
        }
        _ => {}
    }
    p
}

/// The `write_files` of a rendered `OS::Heat::CloudConfig` resource.
async fn rendered_files(h: &Heat, stack: &StackRef, resource: &str) -> Vec<serde_yaml::Value> {
    let attrs = resource_attributes(h, stack, resource).await;
    let cc = attrs["config"].as_str().expect("rendered cloud-config");
    let cc: serde_yaml::Value = serde_yaml::from_str(cc).expect("cloud-config is YAML");
    cc["write_files"].as_sequence().unwrap().clone()
}

fn written(files: &[serde_yaml::Value], path: &str) -> serde_yaml::Value {
    files
        .iter()
        .find(|f| f["path"].as_str() == Some(path))
        .unwrap_or_else(|| panic!("{path} written"))
        .clone()
}

/// A resource's attributes, straight from Heat's REST API.
async fn resource_attributes(h: &Heat, stack: &StackRef, resource: &str) -> Value {
    let url = format!(
        "{}/stacks/{}/{}/resources/{resource}",
        h.endpoint().await.unwrap(),
        stack.name,
        stack.id
    );
    let r = reqwest::Client::new()
        .get(url)
        .header("X-Auth-Token", h.token().await.unwrap().expose())
        .header("Connection", "close")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v: Value = r.json().await.unwrap();
    v["resource"]["attributes"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_template_validates_and_creates_on_heat_with_the_nova_free_environment() {
    let e = env();
    let h = heat(password_cfg(&e));
    let templates = all_templates();
    let names: Vec<String> = templates
        .iter()
        .map(|t| t.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for want in ["rcbaas.yaml", "influxdb-target.yaml", "so-stack.yaml"] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    for t in &templates {
        let tname = t.file_name().unwrap().to_string_lossy().to_string();
        let mut s = spec(&unique(&tname.replace(".yaml", "")), t.clone(), &[]);
        s.parameters = params_for(t);
        s.environment_files = vec![nova_free()];
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
        match tname.as_str() {
            "rcbaas.yaml" | "influxdb-target.yaml" => {
                for k in ["influxdb_host", "influxdb_url", "ssh_host", "ssh_port"] {
                    assert!(o.contains_key(k), "{tname}: output {k}: {o:?}");
                }
                // Addresses are null without Neutron; what Heat computes from parameters is real.
                assert_eq!(o["ssh_port"], Value::from(22), "{tname}");
                assert_eq!(o["influxdb_url"], "http://:8086", "{tname}");
            }
            _ => {}
        }
        if tname == "rcbaas.yaml" {
            for k in [
                "cyclops_host",
                "cyclops_udr_url",
                "cyclops_rc_url",
                "cyclops_billing_url",
            ] {
                assert!(o.contains_key(k), "{tname}: output {k}: {o:?}");
            }
            assert_eq!(o["cyclops_rc_url"], "http://:4568");
        }
        if tname == "so-stack.yaml" {
            assert_eq!(o["api_url"], "http://:8080");
            // Heat rendered the cloud-config: the daemon's config and 0600 secret files.
            let files = rendered_files(&h, &c.stack, "boot_config").await;
            let file = |p: &str| written(&files, p);
            for secret in [
                "/etc/stateshift/id_ed25519",
                "/etc/stateshift/heat.secret",
                "/etc/stateshift/zabbix.password",
                "/etc/stateshift/api.token",
                "/etc/stateshift/source.password",
                "/etc/stateshift/stateshift.yaml",
            ] {
                assert_eq!(
                    file(secret)["permissions"].as_str(),
                    Some("0600"),
                    "{secret}"
                );
            }
            assert_eq!(
                file("/etc/stateshift/heat.secret")["content"].as_str(),
                Some("heat-secret")
            );
            let unit = file("/etc/systemd/system/stateshift.service");
            assert!(unit["content"].as_str().unwrap().contains(
                "ExecStart=/usr/local/bin/stateshift daemon -c /etc/stateshift/stateshift.yaml"
            ));
            let text = file("/etc/stateshift/stateshift.yaml")["content"]
                .as_str()
                .unwrap()
                .to_string();
            let conf: serde_yaml::Value = serde_yaml::from_str(&text)
                .unwrap_or_else(|e| panic!("the daemon's config is YAML: {e}\n{text}"));
            // The daemon's own loader accepts the rendered file (secret paths redirected).
            let tmp = tempfile::tempdir().unwrap();
            for f in [
                "source.password",
                "zabbix.password",
                "api.token",
                "heat.secret",
            ] {
                std::fs::write(tmp.path().join(f), "x").unwrap();
            }
            std::fs::write(tmp.path().join("influx-users.yaml"), "bob: pw\n").unwrap();
            let local = text
                .replace("/etc/stateshift/", &format!("{}/", tmp.path().display()))
                .replace("/var/lib/stateshift", &tmp.path().display().to_string());
            let cpath = tmp.path().join("stateshift.yaml");
            std::fs::write(&cpath, &local).unwrap();
            let loaded = stateshift::config::Config::load(&cpath)
                .unwrap_or_else(|e| panic!("the rendered config loads: {e}\n{local}"));
            assert_eq!(loaded.provider.kind, stateshift::config::ProviderKind::Heat);
            assert_eq!(loaded.monitor.kind, stateshift::config::MonitorKind::Zabbix);
            assert!(
                loaded.provider.ssh.is_some(),
                "created stacks are reached over SSH"
            );
            assert_eq!(
                conf["source"]["influx_url"].as_str(),
                Some("http://10.0.0.12:8086")
            );
            assert_eq!(conf["source"]["username"].as_str(), Some("admin"));
            assert_eq!(
                conf["source"]["password_file"].as_str(),
                Some("/etc/stateshift/source.password")
            );
            assert_eq!(conf["cutover"]["ssh"]["host"].as_str(), Some("10.0.0.11"));
            assert_eq!(conf["provider"]["kind"].as_str(), Some("heat"));
            let hc: HeatConfig = serde_yaml::from_value(conf["provider"]["heat"].clone())
                .expect("provider.heat is a HeatConfig");
            hc.validate().unwrap();
            assert_eq!(hc.application_credential_id.as_deref(), Some("0a1b2c3d"));
            assert_eq!(
                hc.application_credential_secret_file,
                Some(PathBuf::from("/etc/stateshift/heat.secret"))
            );
            assert_eq!(conf["monitor"]["threshold"].as_u64(), Some(10));
            let text = serde_yaml::to_string(&conf).unwrap();
            for secret in [
                "heat-secret",
                "zabbix-secret",
                "influx-secret",
                "api-token",
                "PRIVATE KEY",
            ] {
                assert!(
                    !text.contains(secret),
                    "{secret} must stay out of the config file"
                );
            }
        }
        if tname == "rcbaas.yaml" {
            let attrs = resource_attributes(&h, &c.stack, "cyclops_config").await;
            let cc = attrs["config"].as_str().expect("rendered cloud-config");
            assert!(
                cc.contains("InfluxDBURL="),
                "configure-cyclops.sh is carried: {cc}"
            );
            assert!(cc.contains("Server=%s"), "{cc}");
        }
        h.delete(&c.stack, Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("{tname}: delete: {e}"));
        assert_eq!(h.status(&c.stack).await.unwrap(), StackStatus::Gone);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_nova_free_environment_heat_refuses_the_templates_for_lack_of_neutron() {
    // Shows that the environment file really reaches Heat (and that Heat checks resource
    // availability): the same template, without it, is refused with Heat's reason.
    let e = env();
    let h = heat(password_cfg(&e));
    let mut s = spec(
        &unique("nonova"),
        PathBuf::from(format!("{ROOT}/heat-templates/influxdb-target.yaml")),
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
async fn the_so_stack_renders_password_auth_when_no_application_credential_is_given() {
    let e = env();
    let h = heat(password_cfg(&e));
    let t = PathBuf::from(format!("{ROOT}/deploy/so-stack.yaml"));
    let mut s = spec(&unique("so-pw"), t.clone(), &[]);
    s.parameters = params_for(&t);
    s.parameters.remove("heat_application_credential_id");
    s.parameters.remove("heat_application_credential_secret");
    s.parameters.remove("influxdb_admin_user");
    for (k, v) in [
        ("heat_username", "rcbaas-so"),
        ("heat_password", "heat-password"),
        ("heat_project", "rcbaas"),
    ] {
        s.parameters.insert(k.into(), v.into());
    }
    s.environment_files = vec![nova_free()];
    let c = h.create_raw(&s).await.unwrap();
    let files = rendered_files(&h, &c.stack, "boot_config").await;
    assert_eq!(
        written(&files, "/etc/stateshift/heat.secret")["content"].as_str(),
        Some("heat-password")
    );
    let text = written(&files, "/etc/stateshift/stateshift.yaml")["content"]
        .as_str()
        .unwrap()
        .to_string();
    let conf: serde_yaml::Value = serde_yaml::from_str(&text)
        .unwrap_or_else(|e| panic!("the daemon's config is YAML: {e}\n{text}"));
    let hc: HeatConfig = serde_yaml::from_value(conf["provider"]["heat"].clone())
        .expect("provider.heat is a HeatConfig");
    hc.validate().unwrap();
    assert_eq!(hc.username.as_deref(), Some("rcbaas-so"));
    assert_eq!(hc.project_name.as_deref(), Some("rcbaas"));
    assert_eq!(
        hc.password_file,
        Some(PathBuf::from("/etc/stateshift/heat.secret"))
    );
    // Without an InfluxDB admin user the source has no credentials.
    assert!(conf["source"]["username"].is_null(), "{conf:?}");
    h.delete(&c.stack, Duration::from_secs(60)).await.unwrap();
}

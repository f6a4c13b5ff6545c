//! Malformed answers from Zabbix, Keystone and Heat: truncated JSON, wrong types, an HTML
//! error page, an empty body and a 200 MB body, from a tiny HTTP server on 127.0.0.1:0
//! (no real service needed). Every one must be a typed error that names the method or
//! URL and what was wrong, never a panic, never a secret, and the huge body must be
//! refused at the client's cap instead of buffered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use stateshift::monitor::zabbix::{
    Credentials, Zabbix, ZabbixConfig, ZabbixError, MAX_ANSWER_BYTES,
};
use stateshift::stack::heat::{Heat, HeatConfig, MAX_REPLY_BYTES};
use stateshift::stack::{StackError, StackProvider, StackRef};
use stateshift::util::Secret;

const PASSWORD: &str = "pw-Kq7-never-shown";
const TOKEN: &str = "tok-Zr4-never-shown";
const HUGE: usize = 200 << 20;

/// What the fake server answers.
#[derive(Clone)]
enum Answer {
    /// A status, a content type and a body, with its Content-Length.
    Body(u16, &'static str, Vec<u8>),
    /// 200 with `HUGE` bytes of JSON-ish filler, streamed in 1 MiB chunks, announced by
    /// Content-Length (`true`) or not (`false`: read until the connection closes).
    Huge { announced: bool },
}

fn json(status: u16, body: &str) -> Answer {
    Answer::Body(status, "application/json", body.as_bytes().to_vec())
}

/// One request as the fake server saw it.
struct Request {
    path: String,
    body: String,
}

type Script = Arc<dyn Fn(&Request) -> Answer + Send + Sync>;

/// Serve `script` on 127.0.0.1:0; returns `http://addr`.
async fn serve(script: Script) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let script = script.clone();
            tokio::spawn(async move {
                let Some(req) = read_request(&mut s).await else {
                    return;
                };
                let _ = match script(&req) {
                    Answer::Body(status, ctype, body) => {
                        let head = format!(
                            "HTTP/1.1 {status} Fake\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nX-Subject-Token: {TOKEN}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        s.write_all(&body).await
                    }
                    Answer::Huge { announced } => {
                        let len = if announced {
                            format!("Content-Length: {HUGE}\r\n")
                        } else {
                            String::new()
                        };
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{len}X-Subject-Token: {TOKEN}\r\nConnection: close\r\n\r\n"
                        );
                        let _ = s.write_all(head.as_bytes()).await;
                        let chunk = vec![b' '; 1 << 20];
                        let mut sent = 0;
                        // Stops with an error as soon as the client hangs up.
                        let mut r = Ok(());
                        while sent < HUGE && r.is_ok() {
                            r = s.write_all(&chunk).await;
                            sent += chunk.len();
                        }
                        r
                    }
                };
            });
        }
    });
    url
}

async fn read_request(s: &mut tokio::net::TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        path: head.split_whitespace().nth(1).unwrap_or("").to_string(),
        body: String::from_utf8_lossy(&buf[head_end..]).to_string(),
    })
}

/// The malformed answers every client must survive, by name.
fn malformed() -> Vec<(&'static str, Answer)> {
    vec![
        (
            "truncated JSON",
            json(200, r#"{"jsonrpc":"2.0","result":[{"hostid":"1"#),
        ),
        (
            "HTML error page",
            Answer::Body(
                200,
                "text/html",
                b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
                    .to_vec(),
            ),
        ),
        (
            "empty body",
            Answer::Body(200, "application/json", Vec::new()),
        ),
    ]
}

fn assert_no_secret(msg: &str) {
    assert!(
        !msg.contains(PASSWORD) && !msg.contains(TOKEN),
        "a secret leaked: {msg}"
    );
}

// ---------------------------------------------------------------- Zabbix

const VERSION: &str = r#"{"jsonrpc":"2.0","result":"6.0.14","id":1}"#;

/// A Zabbix that answers `apiinfo.version` properly and `bad` to everything else.
async fn zabbix_answering(bad: Answer) -> String {
    let url = serve(Arc::new(move |r: &Request| {
        if r.body.contains("apiinfo.version") {
            json(200, VERSION)
        } else {
            bad.clone()
        }
    }))
    .await;
    format!("{url}/api_jsonrpc.php")
}

fn zabbix(url: &str, credentials: Credentials) -> Zabbix {
    Zabbix::new(ZabbixConfig {
        url: url.to_string(),
        credentials,
        timeout: Duration::from_secs(20),
    })
    .unwrap()
}

fn password() -> Credentials {
    Credentials::Password {
        user: "Admin".into(),
        password: Secret::new(PASSWORD),
    }
}

#[tokio::test]
async fn zabbix_malformed_answers_are_bad_responses_naming_url_and_method() {
    let mut cases = malformed();
    cases.push((
        "wrong types (number for string, object for list)",
        json(200, r#"{"jsonrpc":"2.0","result":{"hostid":10084},"id":2}"#),
    ));
    cases.push((
        "wrong types inside an item",
        json(
            200,
            r#"{"jsonrpc":"2.0","result":[{"itemid":42237}],"id":2}"#,
        ),
    ));
    for (what, answer) in cases {
        let url = zabbix_answering(answer).await;
        // The API token travels with item.get; the error must not show it.
        let mut z = zabbix(&url, Credentials::ApiToken(Secret::new(TOKEN)));
        let err = z.item("h", "k").await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ZabbixError::BadResponse { .. }),
            "{what}: {err:?}"
        );
        assert!(
            msg.contains(&url) && msg.contains("host.get"),
            "{what}: {msg}"
        );
        assert!(!err.is_transient(), "{what}");
        assert_no_secret(&msg);
        assert_no_secret(&format!("{err:?}"));
    }
}

#[tokio::test]
async fn zabbix_malformed_login_answers_never_show_the_password() {
    for (what, answer) in malformed().into_iter().chain([
        (
            "a session id of the wrong type",
            json(200, r#"{"jsonrpc":"2.0","result":{"sessionid":1},"id":2}"#),
        ),
        (
            "an error object of the wrong type",
            json(
                200,
                r#"{"jsonrpc":"2.0","error":"Login name or password is incorrect.","id":2}"#,
            ),
        ),
    ]) {
        let url = zabbix_answering(answer).await;
        let err = zabbix(&url, password()).login().await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ZabbixError::BadResponse { .. }) && msg.contains("user.login"),
            "{what}: {msg}"
        );
        assert_no_secret(&msg);
        assert_no_secret(&format!("{err:?}"));
    }
}

#[tokio::test]
async fn zabbix_html_error_status_is_an_http_error_not_a_parse_error() {
    let url = serve(Arc::new(|_: &Request| {
        Answer::Body(
            503,
            "text/html",
            b"<html>Service Unavailable</html>".to_vec(),
        )
    }))
    .await;
    let err = zabbix(&url, password()).api_version().await.unwrap_err();
    assert!(
        matches!(err, ZabbixError::HttpStatus { status: 503, .. }) && err.is_transient(),
        "{err:?}"
    );
    assert!(err.to_string().contains("apiinfo.version"), "{err}");
}

#[tokio::test]
async fn zabbix_refuses_a_200_mb_answer_at_its_cap() {
    for announced in [true, false] {
        let url = zabbix_answering(Answer::Huge { announced }).await;
        let mut z = zabbix(&url, Credentials::ApiToken(Secret::new(TOKEN)));
        let start = Instant::now();
        let err = z.host_id("h", "k").await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, ZabbixError::TooLarge { limit, .. } if limit == MAX_ANSWER_BYTES),
            "announced {announced}: {err:?}"
        );
        assert!(
            msg.contains(&url)
                && msg.contains("host.get")
                && msg.contains(&MAX_ANSWER_BYTES.to_string()),
            "{msg}"
        );
        assert_no_secret(&msg);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
}

// ---------------------------------------------------------------- Keystone and Heat

fn token_reply(heat_url: &str) -> String {
    serde_json::json!({"token": {
        "expires_at": "2099-01-01T00:00:00Z", "issued_at": "2098-12-31T23:00:00Z",
        "project": {"id": "p1"},
        "catalog": [{"type": "orchestration", "endpoints": [
            {"interface": "public", "url": heat_url, "region_id": "RegionOne"}]}]}})
    .to_string()
}

/// Keystone answering `keystone` to `POST /v3/auth/tokens`, Heat (same server, under
/// `/heat/v1/p1`) answering `heat` to everything else.
async fn openstack(keystone: Answer, heat: Answer) -> (String, Heat) {
    let url = serve(Arc::new(move |r: &Request| {
        if r.path.ends_with("/auth/tokens") {
            keystone.clone()
        } else {
            heat.clone()
        }
    }))
    .await;
    let h = Heat::new(HeatConfig {
        username: Some("demo".into()),
        password: Some(Secret::new(PASSWORD)),
        project_name: Some("demo".into()),
        retry_budget: Duration::from_millis(300),
        request_timeout: Duration::from_secs(20),
        ..HeatConfig::new(format!("{url}/v3"))
    })
    .unwrap();
    (url, h)
}

fn stack() -> StackRef {
    StackRef {
        name: "s1".into(),
        id: "id1".into(),
    }
}

#[tokio::test]
async fn keystone_malformed_token_replies_are_errors_naming_keystone() {
    let mut cases = malformed();
    cases.push((
        "wrong types (number for expires_at)",
        json(
            201,
            r#"{"token": {"expires_at": 4070908800, "project": {"id": "p1"}}}"#,
        ),
    ));
    cases.push((
        "object where the catalog list belongs",
        json(
            201,
            r#"{"token": {"expires_at": "2099-01-01T00:00:00Z", "project": {"id": "p1"}, "catalog": {"type": "orchestration"}}}"#,
        ),
    ));
    for (what, answer) in cases {
        let (url, h) = openstack(answer, json(200, "{}")).await;
        let err = h.status(&stack()).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, StackError::Other { .. }) && !err.is_transient(),
            "{what}: {err:?}"
        );
        assert!(
            msg.contains(&format!("Keystone {url}/v3/auth/tokens"))
                && msg.contains("unexpected token reply"),
            "{what}: {msg}"
        );
        assert_no_secret(&msg);
    }
}

#[tokio::test]
async fn heat_malformed_stack_replies_are_errors_naming_the_url() {
    let mut cases = malformed();
    cases.push((
        "wrong types (string where the stack object belongs)",
        json(200, r#"{"stack": "CREATE_COMPLETE"}"#),
    ));
    for (what, answer) in cases {
        // Keystone's catalog points at a second server that answers `answer`.
        let l = serve(Arc::new(move |_: &Request| answer.clone())).await;
        let (_, h) = openstack(
            json(201, &token_reply(&format!("{l}/heat/v1/p1"))),
            json(200, "{}"),
        )
        .await;
        let err = h.status(&stack()).await.unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StackError::Other { .. }), "{what}: {err:?}");
        assert!(
            msg.contains(&format!("GET {l}/heat/v1/p1/stacks/s1/id1"))
                && msg.contains("unexpected reply"),
            "{what}: {msg}"
        );
        assert_no_secret(&msg);
    }
}

#[tokio::test]
async fn heat_wrong_types_in_outputs_name_the_output() {
    let body = r#"{"stack": {"stack_status": "CREATE_COMPLETE", "outputs": [
        {"output_key": "influxdb_host", "output_value": "10.0.0.13"},
        {"output_key": "influxdb_url", "output_value": ["http://10.0.0.13:8086"]},
        {"output_key": "ssh_host", "output_value": "10.0.0.13"},
        {"output_key": "ssh_port", "output_value": 22}]}}"#;
    let heat_url = serve(Arc::new(move |_: &Request| json(200, body))).await;
    let (_, h) = openstack(
        json(201, &token_reply(&format!("{heat_url}/heat/v1/p1"))),
        json(200, "{}"),
    )
    .await;
    let err = h.outputs(&stack()).await.unwrap_err();
    assert!(
        matches!(&err, StackError::Output { output, .. } if output == "influxdb_url"),
        "{err:?}"
    );
}

#[tokio::test]
async fn keystone_and_heat_refuse_a_200_mb_reply_at_their_cap() {
    for announced in [true, false] {
        let (url, h) = openstack(Answer::Huge { announced }, json(200, "{}")).await;
        let start = Instant::now();
        let msg = h.status(&stack()).await.unwrap_err().to_string();
        assert!(
            msg.contains(&format!("Keystone {url}/v3/auth/tokens"))
                && msg.contains(&format!("larger than {MAX_REPLY_BYTES} bytes")),
            "{msg}"
        );
        assert_no_secret(&msg);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );

        let heat_url = serve(Arc::new(move |_: &Request| Answer::Huge { announced })).await;
        let (_, h) = openstack(
            json(201, &token_reply(&format!("{heat_url}/heat/v1/p1"))),
            json(200, "{}"),
        )
        .await;
        let start = Instant::now();
        let msg = h.status(&stack()).await.unwrap_err().to_string();
        assert!(
            msg.contains(&format!("GET {heat_url}/heat/v1/p1/stacks/s1/id1"))
                && msg.contains(&format!("larger than {MAX_REPLY_BYTES} bytes")),
            "{msg}"
        );
        assert_no_secret(&msg);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }
}

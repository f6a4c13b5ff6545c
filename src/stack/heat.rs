//! OpenStack Heat stacks, through Keystone v3 and Heat's v1 REST API.
//!
//! - Auth: Keystone v3 password (user + project, scoped by names) or application
//!   credential (id + secret; the credential carries its project). The token
//!   (`X-Subject-Token`) is cached and renewed `token_renew_before` ahead of its expiry,
//!   measured on our monotonic clock from Keystone's own `issued_at`/`expires_at` (no
//!   clock-skew assumptions). A request that Heat answers 401 re-authenticates exactly
//!   once; a second 401 is a clear [`StackError::Auth`].
//! - Endpoint: the `orchestration` service in the token's catalog, by interface and
//!   region (or `endpoint_override`).
//! - Create: `POST {endpoint}/stacks` with the template as read from disk, `files` (the
//!   template's `get_file` targets, the environment files and the templates their
//!   `resource_registry` names) and `environment_files` in order, `disable_rollback` (we
//!   see the reason, then delete ourselves). Then `GET .../stacks/{name}/{id}` (name and
//!   id: `.../stacks/{name}` only redirects) with fast first polls backing off to
//!   `poll_max_interval` (500 ms), until `CREATE_COMPLETE` (the outputs come with that
//!   very poll: every poll asks Heat to resolve them) or
//!   `CREATE_FAILED` (Heat's `stack_status_reason` surfaced). A failed, vanished or
//!   timed-out create is deleted and the error says what happened to it.
//! - Delete: `DELETE`, then poll until 404 or `DELETE_COMPLETE` (Heat keeps deleted
//!   stacks visible by id).
//! - Failures: connection errors, timeouts and 5xx are retried with bounded exponential
//!   backoff (`retry_budget`; a create `POST` only when the connection never opened), then
//!   [`StackError::Transient`]; 409 on create is [`StackError::Duplicate`]; 400 is
//!   [`StackError::Invalid`] with Heat's own message.
//! - Wire hygiene: Keystone under uwsgi's `--http-socket` has no keep-alive, so no
//!   connection is pooled and every request says `Connection: close`. Secrets go on the
//!   wire only: never in logs, errors or `Debug`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderValue, ACCEPT, CONNECTION};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::{StackError, StackOutputs, StackProvider, StackRef, StackSpec, StackStatus};
use crate::util::{read_body_capped, CappedReadError, Secret};

/// The largest Keystone or Heat reply read. Token replies with a big catalog and stack
/// lists are tens of kilobytes; a reply near this is a wrong URL or a broken server, and
/// is refused rather than buffered.
pub const MAX_REPLY_BYTES: usize = 32 << 20;

pub use crate::config::{CatalogInterface, HeatConfig};

// ---------------------------------------------------------------- the provider

enum Credentials {
    Password {
        user: String,
        user_domain: String,
        password: Secret,
        project: String,
        project_domain: String,
    },
    AppCredential {
        id: String,
        secret: Secret,
    },
}

struct Token {
    value: Secret,
    project_id: String,
    /// Orchestration base URL, `.../v1/{project_id}`, no trailing slash.
    endpoint: String,
    renew_at: Instant,
}

/// Stacks in OpenStack Heat. Cheap to share behind an `Arc`; one token for all callers.
pub struct Heat {
    cfg: HeatConfig,
    creds: Credentials,
    http: reqwest::Client,
    token: Mutex<Option<Arc<Token>>>,
    auths: AtomicU64,
    keystone: String,
    name: String,
}

impl fmt::Debug for Heat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Heat")
            .field("keystone", &self.keystone)
            .finish()
    }
}

/// How a create went, for the figure "CREATE_COMPLETE → outputs in hand".
#[derive(Debug, Clone)]
pub struct CreateReport {
    /// Status polls after the create request.
    pub polls: u32,
    /// Create request sent → outputs in hand.
    pub total: Duration,
    /// Upper bound of the time from Heat reaching `CREATE_COMPLETE` to outputs in hand:
    /// measured from when the last poll that still saw `CREATE_IN_PROGRESS` was sent
    /// (the stack completed after that).
    pub complete_to_outputs_max: Duration,
    /// The create request's round trip (Heat stores the stack and creates its trust;
    /// a trivial stack may complete within it).
    pub request: Duration,
}

/// A complete stack with its outputs as Heat returned them (`null` for an output Heat
/// could not resolve) and the timing of the create.
#[derive(Debug, Clone)]
pub struct Created {
    pub stack: StackRef,
    pub outputs: BTreeMap<String, Value>,
    pub report: CreateReport,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// GET, DELETE, validate: retry connection failures, timeouts and 5xx.
    Idempotent,
    /// Create: retry only when the connection never opened (Heat saw nothing).
    ConnectOnly,
}

struct Reply {
    status: StatusCode,
    /// The request's URL, for errors.
    url: String,
    body: Value,
    text: String,
}

/// Heat's reply to `GET .../stacks/{name}/{id}`: the stack's status, its reason and its
/// `outputs` list.
#[derive(Debug, Clone, PartialEq)]
pub struct StackReply {
    pub status: String,
    pub reason: String,
    pub outputs: Vec<Value>,
}

impl StackReply {
    /// Read a stack reply body (pure); `None` when it holds no `stack` object. Missing
    /// or mistyped fields read as empty.
    pub fn from_body(body: &Value) -> Option<StackReply> {
        let s = body.get("stack").filter(|s| s.is_object())?;
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        Some(StackReply {
            status: text("stack_status"),
            reason: text("stack_status_reason"),
            outputs: s
                .get("outputs")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// Poll intervals: 50 ms, growing ×1.5 to `max`.
struct PollSchedule {
    next: Duration,
    max: Duration,
}

impl PollSchedule {
    fn new(max: Duration) -> Self {
        PollSchedule {
            next: Duration::from_millis(50).min(max),
            max,
        }
    }
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.mul_f64(1.5).min(self.max);
        d
    }
}

/// Retry delays for transient failures: 250 ms doubling to 4 s (with jitter), for
/// `budget` from the first failure.
fn backoff(budget: Duration) -> crate::util::Retry {
    crate::util::Retry::new(Duration::from_millis(250), Duration::from_secs(4), budget)
}

impl Heat {
    /// Check the config, read the secret files and the CA file, build the HTTP client.
    /// No network yet: the first call authenticates.
    pub fn new(cfg: HeatConfig) -> Result<Heat, StackError> {
        let invalid = |msg: String| StackError::Invalid {
            provider: "heat".into(),
            msg,
        };
        cfg.validate().map_err(|e| invalid(e.to_string()))?;
        let read_secret = |key: &str, path: &Path| -> Result<Secret, StackError> {
            let s = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("provider.heat.{key}: {}: {e}", path.display())))?;
            let s = s.trim_end_matches(['\n', '\r']);
            if s.is_empty() {
                return Err(invalid(format!(
                    "provider.heat.{key}: {}: empty",
                    path.display()
                )));
            }
            Ok(Secret::new(s))
        };
        let creds = if let Some(id) = &cfg.application_credential_id {
            let secret = match (
                &cfg.application_credential_secret,
                &cfg.application_credential_secret_file,
            ) {
                (Some(s), _) => s.clone(),
                (None, Some(p)) => read_secret("application_credential_secret_file", p)?,
                (None, None) => unreachable!("validated"),
            };
            Credentials::AppCredential {
                id: id.clone(),
                secret,
            }
        } else {
            let password = match (&cfg.password, &cfg.password_file) {
                (Some(s), _) => s.clone(),
                (None, Some(p)) => read_secret("password_file", p)?,
                (None, None) => unreachable!("validated"),
            };
            Credentials::Password {
                user: cfg.username.clone().unwrap_or_default(),
                user_domain: cfg.user_domain_name.clone(),
                password,
                project: cfg.project_name.clone().unwrap_or_default(),
                project_domain: cfg.project_domain_name.clone(),
            }
        };
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(true)
            .pool_max_idle_per_host(0)
            .connect_timeout(cfg.connect_timeout)
            .timeout(cfg.request_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("stateshift/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca)
                .map_err(|e| invalid(format!("provider.heat.ca_file: {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    invalid(format!(
                        "provider.heat.ca_file: {}: no PEM certificate in it",
                        ca.display()
                    ))
                })?;
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        let http = b.build().map_err(|e| {
            invalid(format!(
                "heat: HTTP client: {}",
                crate::util::error_chain(&e)
            ))
        })?;
        let mut keystone = cfg.auth_url.trim().trim_end_matches('/').to_string();
        if !keystone.ends_with("/v3") {
            keystone.push_str("/v3");
        }
        let name = format!("heat {keystone}");
        Ok(Heat {
            cfg,
            creds,
            http,
            token: Mutex::new(None),
            auths: AtomicU64::new(0),
            keystone,
            name,
        })
    }

    /// How many times this provider has authenticated with Keystone (metrics, tests).
    pub fn auth_count(&self) -> u64 {
        self.auths.load(Ordering::Relaxed)
    }

    /// The current token (authenticating if there is none or it is due for renewal).
    pub async fn token(&self) -> Result<Secret, StackError> {
        Ok(self.current_token().await?.value.clone())
    }

    /// The orchestration endpoint in use, `.../v1/{project_id}`.
    pub async fn endpoint(&self) -> Result<String, StackError> {
        Ok(self.current_token().await?.endpoint.clone())
    }

    /// The project the token is scoped to.
    pub async fn project_id(&self) -> Result<String, StackError> {
        Ok(self.current_token().await?.project_id.clone())
    }

    /// Ask Heat to validate the template with these parameters and environment files
    /// (`POST .../validate`); returns Heat's description of the template's parameters.
    pub async fn validate(&self, spec: &StackSpec) -> Result<Value, StackError> {
        let mut body = stack_body(spec).map_err(|msg| self.invalid(msg))?;
        let obj = body.as_object_mut().expect("object");
        for k in ["stack_name", "timeout_mins", "disable_rollback"] {
            obj.remove(k);
        }
        let r = self
            .call(
                Method::POST,
                "/validate",
                &[],
                Some(&body),
                Retry::Idempotent,
            )
            .await?;
        if r.status.is_success() {
            return Ok(r.body);
        }
        Err(self.heat_error(&format!("template {}", spec.template.display()), &r))
    }

    /// Create and wait until complete; outputs as Heat returned them, unchecked (for
    /// templates that are not InfluxDB stacks). A failed or timed-out create is deleted.
    pub async fn create_raw(&self, spec: &StackSpec) -> Result<Created, StackError> {
        let body = stack_body(spec).map_err(|msg| self.invalid(msg))?;
        let name = spec.name.clone();
        let started = Instant::now();
        let deadline = started + spec.timeout;
        let r = self
            .call(
                Method::POST,
                "/stacks",
                &[],
                Some(&body),
                Retry::ConnectOnly,
            )
            .await?;
        let stack = match r.status {
            s if s.is_success() => {
                let id = r
                    .body
                    .pointer("/stack/id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| StackError::Other {
                        provider: self.name.clone(),
                        msg: format!(
                            "stack {name}: create answered {s} without a stack id: {}",
                            clip(&r.text)
                        ),
                    })?;
                StackRef {
                    id: id.to_string(),
                    name: name.clone(),
                }
            }
            StatusCode::CONFLICT => return Err(StackError::Duplicate { name }),
            _ => return Err(self.heat_error(&format!("stack {name}: create"), &r)),
        };
        let request = started.elapsed();
        tracing::info!(stack = %name, id = %stack.id, "heat: stack create accepted");
        let mut last_in_progress_sent = started;
        let mut polls = 0u32;
        let mut sched = PollSchedule::new(self.cfg.poll_max_interval);
        loop {
            let now = Instant::now();
            if now >= deadline {
                let cleanup = match self.delete(&stack, self.cfg.delete_timeout).await {
                    Ok(()) => "it was deleted".to_string(),
                    Err(e) => format!(
                        "deleting it failed too ({e}); it may be left behind as {} (id {})",
                        stack.name, stack.id
                    ),
                };
                tracing::warn!(stack = %name, timeout = ?spec.timeout, %cleanup, "heat: create timed out");
                return Err(StackError::Timeout {
                    name,
                    timeout: spec.timeout,
                    cleanup,
                });
            }
            tokio::time::sleep(sched.next().min(deadline - now)).await;
            let sent = Instant::now();
            polls += 1;
            // Outputs are resolved in every poll: the one that reads CREATE_COMPLETE
            // brings them (measured: no slower than a poll without them).
            let show = match self.show(&stack, true).await {
                Ok(s) => s,
                Err(e) => {
                    let cleanup = self.cleanup(&stack).await;
                    return Err(match e {
                        StackError::Transient { provider, msg } => StackError::Transient {
                            provider,
                            msg: format!("{msg}; stack {name} was being created: {cleanup}"),
                        },
                        other => StackError::CreateFailed {
                            name,
                            reason: format!("polling its status failed: {other}; {cleanup}"),
                        },
                    });
                }
            };
            let Some(show) = show else {
                return Err(StackError::CreateFailed {
                    name,
                    reason: "the stack vanished while being created (404); nothing to delete"
                        .into(),
                });
            };
            tracing::debug!(stack = %name, status = %show.status, polls, "heat: poll");
            match show.status.as_str() {
                "CREATE_IN_PROGRESS" => last_in_progress_sent = sent,
                "CREATE_COMPLETE" => {
                    let done = Instant::now();
                    let (outputs, _) = parse_outputs(show.outputs);
                    let report = CreateReport {
                        polls,
                        total: done - started,
                        complete_to_outputs_max: done - last_in_progress_sent,
                        request,
                    };
                    tracing::info!(stack = %name, id = %stack.id, polls,
                        total_ms = report.total.as_millis() as u64,
                        complete_to_outputs_max_ms = report.complete_to_outputs_max.as_millis() as u64,
                        "heat: stack created");
                    return Ok(Created {
                        stack,
                        outputs,
                        report,
                    });
                }
                "CREATE_FAILED" => {
                    let cleanup = self.cleanup(&stack).await;
                    tracing::warn!(stack = %name, reason = %show.reason, %cleanup, "heat: create failed");
                    return Err(StackError::CreateFailed {
                        name,
                        reason: format!("{}; {cleanup}", show.reason),
                    });
                }
                other => {
                    let cleanup = self.cleanup(&stack).await;
                    return Err(StackError::CreateFailed {
                        name,
                        reason: format!(
                            "unexpected status {other} while creating ({}); {cleanup}",
                            show.reason
                        ),
                    });
                }
            }
        }
    }

    /// Create, check the four InfluxDB outputs, and report the timing.
    pub async fn create_timed(
        &self,
        spec: &StackSpec,
    ) -> Result<(StackRef, StackOutputs, CreateReport), StackError> {
        let c = self.create_raw(spec).await?;
        match StackOutputs::from_raw(&c.stack.name, c.outputs) {
            Ok(o) => Ok((c.stack, o, c.report)),
            Err(e) => {
                let cleanup = self.cleanup(&c.stack).await;
                Err(StackError::CreateFailed {
                    name: c.stack.name,
                    reason: format!("{e}; {cleanup}"),
                })
            }
        }
    }

    /// The benchmark hook: create `spec`, measure, delete it again.
    pub async fn measure_create(&self, spec: &StackSpec) -> Result<CreateReport, StackError> {
        let c = self.create_raw(spec).await?;
        self.delete(&c.stack, self.cfg.delete_timeout).await?;
        Ok(c.report)
    }

    // ------------------------------------------------------------ internals

    fn invalid(&self, msg: String) -> StackError {
        StackError::Invalid {
            provider: self.name.clone(),
            msg,
        }
    }

    fn transient(&self, msg: String) -> StackError {
        StackError::Transient {
            provider: self.name.clone(),
            msg,
        }
    }

    /// Delete after a failed create; says what happened, for the error message.
    async fn cleanup(&self, stack: &StackRef) -> String {
        match self.delete(stack, self.cfg.delete_timeout).await {
            Ok(()) => "the stack was deleted".into(),
            Err(e) => format!(
                "deleting it failed too ({e}); it may be left behind as {} (id {})",
                stack.name, stack.id
            ),
        }
    }

    fn stack_path(stack: &StackRef) -> String {
        format!("/stacks/{}/{}", seg(&stack.name), seg(&stack.id))
    }

    /// `GET .../stacks/{name}/{id}`; `None` on 404.
    async fn show(
        &self,
        stack: &StackRef,
        outputs: bool,
    ) -> Result<Option<StackReply>, StackError> {
        let q: &[(&str, &str)] = if outputs {
            &[]
        } else {
            &[("resolve_outputs", "false")]
        };
        let r = self
            .call(
                Method::GET,
                &Self::stack_path(stack),
                q,
                None,
                Retry::Idempotent,
            )
            .await?;
        if r.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !r.status.is_success() {
            return Err(self.heat_error(&format!("stack {}", stack.name), &r));
        }
        StackReply::from_body(&r.body)
            .map(Some)
            .ok_or_else(|| StackError::Other {
                provider: self.name.clone(),
                msg: format!(
                    "stack {}: GET {}: unexpected reply {}",
                    stack.name,
                    r.url,
                    clip(&r.text)
                ),
            })
    }

    /// Outputs as a map, plus Heat's error for each output it could not resolve.
    async fn raw_outputs(
        &self,
        stack: &StackRef,
    ) -> Result<(BTreeMap<String, Value>, BTreeMap<String, String>), StackError> {
        let show = self
            .show(stack, true)
            .await?
            .ok_or_else(|| StackError::Other {
                provider: self.name.clone(),
                msg: format!("stack {}: gone (404) while reading its outputs", stack.name),
            })?;
        Ok(parse_outputs(show.outputs))
    }

    async fn current_token(&self) -> Result<Arc<Token>, StackError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            if Instant::now() < t.renew_at {
                return Ok(t.clone());
            }
            tracing::debug!("heat: token due for renewal");
        }
        let t = Arc::new(self.authenticate().await?);
        *guard = Some(t.clone());
        Ok(t)
    }

    /// Forget `stale` (if it is still the cached token) so the next call re-authenticates.
    async fn drop_token(&self, stale: &Arc<Token>) {
        let mut guard = self.token.lock().await;
        if guard.as_ref().is_some_and(|t| Arc::ptr_eq(t, stale)) {
            *guard = None;
        }
    }

    fn who(&self) -> String {
        match &self.creds {
            Credentials::Password {
                user,
                user_domain,
                project,
                project_domain,
                ..
            } => format!(
                "user {user:?} (domain {user_domain:?}) for project {project:?} (domain {project_domain:?})"
            ),
            Credentials::AppCredential { id, .. } => format!("application credential {id}"),
        }
    }

    async fn authenticate(&self) -> Result<Token, StackError> {
        let url = format!("{}/auth/tokens", self.keystone);
        let body = match &self.creds {
            Credentials::Password {
                user,
                user_domain,
                password,
                project,
                project_domain,
            } => json!({"auth": {
                "identity": {"methods": ["password"], "password": {"user": {
                    "name": user, "domain": {"name": user_domain}, "password": password.expose()}}},
                "scope": {"project": {"name": project, "domain": {"name": project_domain}}}}}),
            Credentials::AppCredential { id, secret } => json!({"auth": {
                "identity": {"methods": ["application_credential"],
                    "application_credential": {"id": id, "secret": secret.expose()}}}}),
        };
        let mut backoff = backoff(self.cfg.retry_budget);
        loop {
            let sent = Instant::now();
            let res = self
                .http
                .post(&url)
                .header(CONNECTION, HeaderValue::from_static("close"))
                .header(ACCEPT, HeaderValue::from_static("application/json"))
                .json(&body)
                .send()
                .await;
            let failure = match res {
                Err(e) => format!("Keystone {url}: {}", crate::util::error_chain(&e)),
                Ok(r) => {
                    let status = r.status();
                    let subject = r
                        .headers()
                        .get("x-subject-token")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    match read_body_capped(r, MAX_REPLY_BYTES).await {
                        Err(CappedReadError::TooLarge) => {
                            return Err(StackError::Other {
                                provider: self.name.clone(),
                                msg: format!(
                                    "Keystone {url}: reply larger than {MAX_REPLY_BYTES} bytes, refused; is heat.auth_url Keystone's v3 URL?"
                                ),
                            })
                        }
                        Err(CappedReadError::Transport(e)) => {
                            format!("Keystone {url}: reading the reply: {}", crate::util::error_chain(&e))
                        }
                        Ok(body) if status.is_server_error() => format!(
                            "Keystone {url} answered {status}: {}",
                            message(&String::from_utf8_lossy(&body))
                        ),
                        Ok(body) => {
                            let text = String::from_utf8_lossy(&body);
                            return self.token_from(status, subject, &text, sent, &url);
                        }
                    }
                }
            };
            match backoff.next() {
                Some(d) => {
                    tracing::warn!(error = %failure, retry_in = ?d, "heat: Keystone unreachable or failing; retrying");
                    tokio::time::sleep(d).await;
                }
                None => return Err(self.transient(failure)),
            }
        }
    }

    fn token_from(
        &self,
        status: StatusCode,
        subject: Option<String>,
        text: &str,
        sent: Instant,
        url: &str,
    ) -> Result<Token, StackError> {
        let auth = |msg: String| StackError::Auth {
            provider: self.name.clone(),
            msg,
        };
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(auth(format!(
                "Keystone {url} refused {} ({status}: {}); check the credentials in the heat config",
                self.who(),
                message(text)
            )));
        }
        if !status.is_success() {
            return Err(self.invalid(format!(
                "Keystone {url} refused the request for {} ({status}): {}",
                self.who(),
                message(text)
            )));
        }
        let value = subject.ok_or_else(|| {
            auth(format!(
                "Keystone {url} answered {status} without an X-Subject-Token header"
            ))
        })?;
        let t = TokenReply::parse(text, SystemTime::now()).map_err(|e| StackError::Other {
            provider: self.name.clone(),
            msg: format!("Keystone {url}: unexpected token reply: {e}"),
        })?;
        let project_id = t.project_id.clone().ok_or_else(|| {
            auth(format!(
                "Keystone {url}: the token for {} is not scoped to a project",
                self.who()
            ))
        })?;
        let lifetime = t.lifetime.ok_or_else(|| StackError::Other {
            provider: self.name.clone(),
            msg: format!("Keystone {url}: unreadable expires_at {:?}", t.expires_at),
        })?;
        let endpoint = match &self.cfg.endpoint_override {
            Some(o) => o
                .replace("%(tenant_id)s", &project_id)
                .replace("%(project_id)s", &project_id)
                .replace("{project_id}", &project_id)
                .trim_end_matches('/')
                .to_string(),
            None => t
                .endpoint(
                    "orchestration",
                    self.cfg.interface.as_str(),
                    self.cfg.region.as_deref(),
                )
                .map_err(|msg| self.invalid(format!("Keystone {url}: {msg}")))?,
        };
        let renew_at = sent + lifetime.saturating_sub(self.cfg.token_renew_before);
        self.auths.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(expires_at = %t.expires_at, lifetime = ?lifetime, %endpoint, "heat: authenticated");
        Ok(Token {
            value: Secret::new(value),
            project_id,
            endpoint,
            renew_at,
        })
    }

    /// One Heat request, with the re-auth-once rule and bounded retries of transient
    /// failures. Returns every non-5xx, non-401 reply for the caller to judge.
    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, &str)],
        body: Option<&Value>,
        retry: Retry,
    ) -> Result<Reply, StackError> {
        let mut reauthed = false;
        let mut backoff = backoff(self.cfg.retry_budget);
        loop {
            let tok = self.current_token().await?;
            let url = format!("{}{}", tok.endpoint, path);
            let mut req = self
                .http
                .request(method.clone(), &url)
                .header("X-Auth-Token", tok.value.expose())
                .header(CONNECTION, HeaderValue::from_static("close"))
                .header(ACCEPT, HeaderValue::from_static("application/json"));
            if !query.is_empty() {
                req = req.query(query);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let failure = match req.send().await {
                Err(e) => {
                    let msg = format!("Heat {method} {url}: {}", crate::util::error_chain(&e));
                    if retry == Retry::ConnectOnly && !e.is_connect() {
                        // The request may have reached Heat: retrying could create twice.
                        return Err(self.transient(format!(
                            "{msg} (not retried: Heat may have received it; look for the stack by name)"
                        )));
                    }
                    msg
                }
                Ok(r) => {
                    let status = r.status();
                    let text = match read_body_capped(r, MAX_REPLY_BYTES).await {
                        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                        Err(CappedReadError::TooLarge) => {
                            return Err(StackError::Other {
                                provider: self.name.clone(),
                                msg: format!(
                                    "Heat {method} {url}: reply larger than {MAX_REPLY_BYTES} bytes, refused"
                                ),
                            })
                        }
                        Err(CappedReadError::Transport(e)) => {
                            return Err(self.transient(format!(
                                "Heat {method} {url}: reading the reply: {}",
                                crate::util::error_chain(&e)
                            )))
                        }
                    };
                    if status == StatusCode::UNAUTHORIZED {
                        if reauthed {
                            return Err(StackError::Auth {
                                provider: self.name.clone(),
                                msg: format!(
                                    "Heat {method} {url} refused a fresh token from Keystone too (401: {}); check {}'s roles on the project and Heat's [keystone_authtoken] settings",
                                    message(&text),
                                    self.who()
                                ),
                            });
                        }
                        tracing::info!(%url, "heat: token refused (401); re-authenticating once");
                        reauthed = true;
                        self.drop_token(&tok).await;
                        continue;
                    }
                    if status.is_server_error() {
                        let msg =
                            format!("Heat {method} {url} answered {status}: {}", message(&text));
                        if retry == Retry::ConnectOnly {
                            return Err(self.transient(msg));
                        }
                        msg
                    } else {
                        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
                        return Ok(Reply {
                            status,
                            url,
                            body,
                            text,
                        });
                    }
                }
            };
            match backoff.next() {
                Some(d) => {
                    tracing::warn!(error = %failure, retry_in = ?d, "heat: unreachable or failing; retrying");
                    tokio::time::sleep(d).await;
                }
                None => return Err(self.transient(failure)),
            }
        }
    }

    /// A non-success reply as an error: 400 → Invalid with Heat's message, 403 → Auth,
    /// anything else → Other.
    fn heat_error(&self, what: &str, r: &Reply) -> StackError {
        let msg = format!("{what}: Heat answered {}: {}", r.status, message(&r.text));
        match r.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => self.invalid(msg),
            StatusCode::FORBIDDEN => StackError::Auth {
                provider: self.name.clone(),
                msg: match self.creds {
                    Credentials::Password { .. } => format!(
                        "{msg}; the user lacks a role Heat requires (member or heat_stack_owner on the project)"
                    ),
                    // Measured on Keystone 22.0.2 (Zed, Debian security update): tokens from
                    // application credentials may not create trusts, which Heat makes on
                    // every create with deferred_auth_method = trusts.
                    Credentials::AppCredential { .. } => format!(
                        "{msg}; with an application credential this usually means Keystone refuses it the trust \
                         Heat creates for the stack (Keystone [security_compliance] \
                         allow_insecure_application_credential_trust_escalation is off): use password \
                         auth, or a cloud that allows it; else the user lacks a role Heat requires"
                    ),
                },
            },
            _ => StackError::Other {
                provider: self.name.clone(),
                msg,
            },
        }
    }
}

impl StackProvider for Heat {
    fn describe(&self) -> String {
        self.name.clone()
    }

    /// The VM's addresses from the stack's outputs; credentials, work directory and the
    /// SSH user and key from `defaults`; the SSH host keys the VM reported, pinned.
    fn reach(
        &self,
        stack: &StackRef,
        o: &StackOutputs,
        defaults: &crate::config::InstanceConfig,
    ) -> crate::config::InstanceConfig {
        crate::config::InstanceConfig {
            name: stack.name.clone(),
            influx_url: o.influxdb_url.clone(),
            rpc_address: rpc_address(o),
            password_file: None,
            ssh: defaults.ssh.clone().map(|mut c| {
                c.host = o.ssh_host.clone();
                c.port = o.ssh_port;
                // The keys the VM reported through its stack: checked from the first
                // contact on, and a reused address with a new VM behind it just works.
                if !o.ssh_host_keys.is_empty() {
                    c.host_keys = o.ssh_host_keys.clone();
                }
                c
            }),
            ..defaults.clone()
        }
    }

    async fn create(&self, spec: &StackSpec) -> Result<(StackRef, StackOutputs), StackError> {
        let (stack, outputs, _) = self.create_timed(spec).await?;
        Ok((stack, outputs))
    }

    async fn status(&self, stack: &StackRef) -> Result<StackStatus, StackError> {
        Ok(match self.show(stack, false).await? {
            None => StackStatus::Gone,
            Some(s) => status_of(&s.status, &s.reason),
        })
    }

    async fn outputs(&self, stack: &StackRef) -> Result<StackOutputs, StackError> {
        let (raw, errors) = self.raw_outputs(stack).await?;
        StackOutputs::from_raw(&stack.name, raw).map_err(|e| match &e {
            StackError::Output { output, .. } if errors.contains_key(output) => StackError::Other {
                provider: self.name.clone(),
                msg: format!(
                    "stack {}: output {output}: Heat could not resolve it: {}",
                    stack.name, errors[output]
                ),
            },
            _ => e,
        })
    }

    async fn delete(&self, stack: &StackRef, timeout: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        let path = Self::stack_path(stack);
        let other = |msg: String| StackError::Other {
            provider: self.name.clone(),
            msg: format!("stack {} (id {}): {msg}", stack.name, stack.id),
        };
        let mut sent = 0;
        'send: loop {
            sent += 1;
            let r = self
                .call(Method::DELETE, &path, &[], None, Retry::Idempotent)
                .await?;
            match r.status {
                StatusCode::NOT_FOUND => return Ok(()),
                // 409: an action is in progress (a delete already, or a create Heat is
                // cancelling); wait for it below.
                s if s.is_success() || s == StatusCode::CONFLICT => {}
                _ => return Err(self.heat_error(&format!("stack {}: delete", stack.name), &r)),
            }
            let mut sched = PollSchedule::new(self.cfg.poll_max_interval);
            loop {
                let now = Instant::now();
                if now >= deadline {
                    let last = match self.show(stack, false).await {
                        Ok(Some(s)) => s.status,
                        Ok(None) => return Ok(()),
                        Err(e) => format!("unknown: {e}"),
                    };
                    return Err(other(format!(
                        "delete not finished within {timeout:?} (status {last}); Heat goes on with it"
                    )));
                }
                tokio::time::sleep(sched.next().min(deadline - now)).await;
                let Some(s) = self.show(stack, false).await? else {
                    return Ok(());
                };
                match s.status.as_str() {
                    "DELETE_COMPLETE" => {
                        tracing::info!(stack = %stack.name, id = %stack.id, "heat: stack deleted");
                        return Ok(());
                    }
                    // Another action still running (a create being cancelled) or ours.
                    st if st.ends_with("_IN_PROGRESS") => {}
                    // Failed, or some other action ended without our delete taking:
                    // ask again (Heat retries a DELETE_FAILED stack's delete).
                    st if sent < 3 => {
                        tracing::warn!(stack = %stack.name, status = st, reason = %s.reason,
                            "heat: stack not deleted; asking again");
                        continue 'send;
                    }
                    st => {
                        return Err(other(format!(
                            "delete asked {sent} times, still {st}: {}",
                            s.reason
                        )))
                    }
                }
            }
        }
    }

    async fn find(&self, name: &str) -> Result<Option<StackRef>, StackError> {
        let r = self
            .call(
                Method::GET,
                "/stacks",
                &[("name", name)],
                None,
                Retry::Idempotent,
            )
            .await?;
        if !r.status.is_success() {
            return Err(self.heat_error(&format!("list stacks named {name}"), &r));
        }
        Ok(stack_in_list(&r.body, name))
    }
}

// ---------------------------------------------------------------- wire types, pure helpers

#[derive(Deserialize)]
struct TokenBody {
    token: TokenInfo,
}

/// A Keystone v3 token reply body, read: the project the token is scoped to, its
/// `expires_at`, its lifetime (from Keystone's own timestamps, `None` when `expires_at`
/// does not parse) and its service catalog.
pub struct TokenReply {
    pub project_id: Option<String>,
    pub expires_at: String,
    pub lifetime: Option<Duration>,
    catalog: Vec<CatalogEntry>,
}

impl TokenReply {
    /// Read a token reply body (pure; `now` stands in for a missing `issued_at`).
    pub fn parse(text: &str, now: SystemTime) -> Result<TokenReply, serde_json::Error> {
        let t = serde_json::from_str::<TokenBody>(text)?.token;
        Ok(TokenReply {
            project_id: t.project.map(|p| p.id),
            lifetime: token_lifetime(&t.expires_at, t.issued_at.as_deref(), now),
            expires_at: t.expires_at,
            catalog: t.catalog,
        })
    }

    /// The URL of the `kind` service's endpoint with `interface` (in `region`, when
    /// given), without a trailing slash; the error lists what the catalog has.
    pub fn endpoint(
        &self,
        kind: &str,
        interface: &str,
        region: Option<&str>,
    ) -> Result<String, String> {
        pick_endpoint(&self.catalog, kind, interface, region)
    }
}

#[derive(Deserialize)]
struct TokenInfo {
    expires_at: String,
    #[serde(default)]
    issued_at: Option<String>,
    #[serde(default)]
    project: Option<ProjectRef>,
    #[serde(default)]
    catalog: Vec<CatalogEntry>,
}

#[derive(Deserialize)]
struct ProjectRef {
    id: String,
}

#[derive(Deserialize)]
struct CatalogEntry {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<Endpoint>,
}

#[derive(Deserialize)]
struct Endpoint {
    interface: String,
    url: String,
    #[serde(default)]
    region_id: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

/// The token's lifetime from Keystone's own timestamps (`issued_at` → `expires_at`), or,
/// without `issued_at`, from `now`.
fn token_lifetime(expires_at: &str, issued_at: Option<&str>, now: SystemTime) -> Option<Duration> {
    let exp = humantime::parse_rfc3339_weak(expires_at).ok()?;
    let from = issued_at
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .unwrap_or(now);
    Some(exp.duration_since(from).unwrap_or(Duration::ZERO))
}

fn pick_endpoint(
    catalog: &[CatalogEntry],
    kind: &str,
    interface: &str,
    region: Option<&str>,
) -> Result<String, String> {
    let services: Vec<&CatalogEntry> = catalog.iter().filter(|c| c.kind == kind).collect();
    if services.is_empty() {
        let kinds: Vec<&str> = catalog.iter().map(|c| c.kind.as_str()).collect();
        return Err(format!(
            "no {kind} service in the catalog (it has: {}); is Heat registered in Keystone?",
            if kinds.is_empty() {
                "nothing".to_string()
            } else {
                kinds.join(", ")
            }
        ));
    }
    let all: Vec<&Endpoint> = services.iter().flat_map(|s| s.endpoints.iter()).collect();
    all.iter()
        .find(|e| {
            e.interface == interface
                && region.is_none_or(|r| {
                    e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r)
                })
        })
        .map(|e| e.url.trim_end_matches('/').to_string())
        .ok_or_else(|| {
            let have: Vec<String> = all
                .iter()
                .map(|e| {
                    format!(
                        "{} in {}",
                        e.interface,
                        e.region_id.as_deref().or(e.region.as_deref()).unwrap_or("no region")
                    )
                })
                .collect();
            format!(
                "no {kind} endpoint with interface {interface}{} in the catalog (it has: {}); set provider.heat.interface / provider.heat.region",
                region.map(|r| format!(" in region {r}")).unwrap_or_default(),
                have.join(", ")
            )
        })
}

/// The stack named exactly `name` (and not deleted) in Heat's reply to `GET .../stacks`
/// (pure).
pub fn stack_in_list(body: &Value, name: &str) -> Option<StackRef> {
    body.get("stacks")?
        .as_array()?
        .iter()
        .filter(|s| s.get("stack_name").and_then(Value::as_str) == Some(name))
        .filter(|s| s.get("stack_status").and_then(Value::as_str) != Some("DELETE_COMPLETE"))
        .find_map(|s| {
            Some(StackRef {
                id: s.get("id")?.as_str()?.to_string(),
                name: name.to_string(),
            })
        })
}

/// Heat's `outputs` list as a map (`null` for an output Heat could not resolve), and
/// Heat's error for each such output (pure).
pub fn parse_outputs(list: Vec<Value>) -> (BTreeMap<String, Value>, BTreeMap<String, String>) {
    let mut raw = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for o in list {
        let Some(key) = o.get("output_key").and_then(Value::as_str) else {
            continue;
        };
        if let Some(e) = o.get("output_error").and_then(Value::as_str) {
            errors.insert(key.to_string(), e.to_string());
        }
        raw.insert(
            key.to_string(),
            o.get("output_value").cloned().unwrap_or(Value::Null),
        );
    }
    (raw, errors)
}

/// Heat's or Keystone's error message from a reply body (pure; clipped to 400 bytes when
/// the body is not a JSON error).
pub fn message(text: &str) -> String {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let typ = v.pointer("/error/type").and_then(Value::as_str);
    let msg = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .or_else(|| v.get("explanation").and_then(Value::as_str))
        .or_else(|| v.get("title").and_then(Value::as_str));
    match (typ, msg) {
        (Some(t), Some(m)) if !m.starts_with(t) => format!("{t}: {}", m.trim()),
        (_, Some(m)) => m.trim().to_string(),
        _ if text.trim().is_empty() => "(empty reply)".into(),
        _ => clip(text.trim()),
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 400;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Percent-encode one URL path segment.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A Heat `stack_status` (and its reason) as a [`StackStatus`] (pure).
pub fn status_of(status: &str, reason: &str) -> StackStatus {
    match status {
        "DELETE_COMPLETE" => StackStatus::Gone,
        s if s.ends_with("_IN_PROGRESS") => StackStatus::InProgress(s.to_string()),
        s if s.ends_with("_FAILED") => StackStatus::Failed(format!("{s}: {reason}")),
        s if s.ends_with("_COMPLETE") => StackStatus::Complete,
        s => StackStatus::InProgress(s.to_string()),
    }
}

/// The create/validate request body: the template text as on disk, `files` and
/// `environment_files`. Errors name the file.
fn stack_body(spec: &StackSpec) -> Result<Value, String> {
    let mut files = BTreeMap::new();
    let template = read(&spec.template, "template")?;
    template_files(&spec.template, &template, &mut files, 0)?;
    let mut env_names = Vec::new();
    for f in &spec.environment_files {
        let content = read(f, "environment file")?;
        let ev: serde_yaml::Value = serde_yaml::from_str(&content)
            .map_err(|e| format!("environment file {}: not YAML: {e}", f.display()))?;
        let edir = f.parent().unwrap_or(Path::new("."));
        if let Some(reg) = ev.get("resource_registry") {
            let mut names = Vec::new();
            registry_templates(reg, &mut names);
            for n in names {
                if let Some(p) = local_ref(&n, edir) {
                    let what = format!("environment file {}: resource_registry", f.display());
                    let c = read(&p, &what)?;
                    add_file(&mut files, &n, &c)?;
                    template_files(&p, &c, &mut files, 1)?;
                }
            }
        }
        let abs = std::path::absolute(f).unwrap_or_else(|_| f.clone());
        let name = format!("file://{}", abs.display());
        add_file(&mut files, &name, &content)?;
        env_names.push(name);
    }
    let mins = spec.timeout.as_secs().div_ceil(60).max(1);
    let mut parameters: BTreeMap<&str, &str> = spec
        .parameters
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (k, v) in &spec.secret_parameters {
        parameters.insert(k.as_str(), v.expose());
    }
    Ok(json!({
        "stack_name": spec.name,
        "template": template,
        "files": files,
        "environment_files": env_names,
        "parameters": parameters,
        "timeout_mins": mins,
        "disable_rollback": true,
    }))
}

/// Add to `files` what a template needs from disk: its `get_file` targets and the nested
/// templates its resources name as their type (recursively), keyed by the reference as
/// written, resolved relative to the template's directory.
fn template_files(
    path: &Path,
    text: &str,
    files: &mut BTreeMap<String, String>,
    depth: u32,
) -> Result<(), String> {
    if depth > 8 {
        return Err(format!(
            "template {}: nested more than 8 deep",
            path.display()
        ));
    }
    let v: serde_yaml::Value = serde_yaml::from_str(text)
        .map_err(|e| format!("template {}: not YAML: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut refs = Vec::new();
    get_file_refs(&v, &mut refs);
    for r in refs {
        if let Some(p) = local_ref(&r, dir) {
            let content = read(&p, &format!("template {}: get_file", path.display()))?;
            add_file(files, &r, &content)?;
        }
    }
    if let Some(res) = v.get("resources").and_then(serde_yaml::Value::as_mapping) {
        for r in res.values() {
            let Some(t) = r.get("type").and_then(serde_yaml::Value::as_str) else {
                continue;
            };
            if !is_template_name(t) {
                continue;
            }
            if let Some(p) = local_ref(t, dir) {
                let what = format!("template {}: nested template", path.display());
                let content = read(&p, &what)?;
                add_file(files, t, &content)?;
                template_files(&p, &content, files, depth + 1)?;
            }
        }
    }
    Ok(())
}

fn add_file(files: &mut BTreeMap<String, String>, key: &str, content: &str) -> Result<(), String> {
    match files.get(key) {
        Some(old) if old != content => Err(format!(
            "files: {key:?} names two different files (relative to different templates); use distinct names"
        )),
        _ => {
            files.insert(key.to_string(), content.to_string());
            Ok(())
        }
    }
}

fn is_template_name(s: &str) -> bool {
    !s.contains("::")
        && [".yaml", ".yml", ".template"]
            .iter()
            .any(|e| s.ends_with(e))
}

fn read(p: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("{what} {}: {e}", p.display()))
}

/// A `get_file` or registry reference to a local file: `file://` URLs and relative or
/// absolute paths (relative to `dir`); `None` for other URLs (Heat fetches those itself,
/// or refuses).
fn local_ref(r: &str, dir: &Path) -> Option<PathBuf> {
    if let Some(p) = r.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    if r.contains("://") {
        return None;
    }
    Some(dir.join(r))
}

fn get_file_refs(v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => {
            for (k, val) in m {
                if k.as_str() == Some("get_file") {
                    if let Some(s) = val.as_str() {
                        out.push(s.to_string());
                        continue;
                    }
                }
                get_file_refs(val, out);
            }
        }
        serde_yaml::Value::Sequence(s) => s.iter().for_each(|x| get_file_refs(x, out)),
        serde_yaml::Value::Tagged(t) => get_file_refs(&t.value, out),
        _ => {}
    }
}

/// Registry values that name template files (not other resource types).
fn registry_templates(v: &serde_yaml::Value, out: &mut Vec<String>) {
    match v {
        serde_yaml::Value::Mapping(m) => m.values().for_each(|x| registry_templates(x, out)),
        serde_yaml::Value::String(s)
            if !s.contains("::")
                && [".yaml", ".yml", ".template"]
                    .iter()
                    .any(|e| s.ends_with(e)) =>
        {
            out.push(s.clone())
        }
        _ => {}
    }
}

/// The backup/restore RPC address of a stack's InfluxDB, as its VM reaches it (dump and
/// restore run there over SSH): the optional output `influxdb_rpc_address`, else
/// `127.0.0.1:8088`, where `heat-templates/influxdb.yaml` binds it.
fn rpc_address(o: &StackOutputs) -> String {
    o.raw
        .get("influxdb_rpc_address")
        .and_then(Value::as_str)
        .filter(|a| !a.trim().is_empty())
        .unwrap_or("127.0.0.1:8088")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::arb;
    use proptest::prelude::*;

    fn outputs(extra: Option<Value>) -> StackOutputs {
        let mut raw = BTreeMap::new();
        raw.insert("influxdb_host".to_string(), json!("10.0.0.13"));
        raw.insert("influxdb_url".to_string(), json!("http://10.0.0.13:8086"));
        raw.insert("ssh_host".to_string(), json!("10.0.0.13"));
        raw.insert("ssh_port".to_string(), json!(22));
        if let Some(v) = extra {
            raw.insert("influxdb_rpc_address".to_string(), v);
        }
        StackOutputs::from_raw("s", raw).unwrap()
    }

    #[test]
    fn a_stacks_rpc_address_is_its_output_or_the_templates_loopback_default() {
        assert_eq!(rpc_address(&outputs(None)), "127.0.0.1:8088");
        assert_eq!(rpc_address(&outputs(Some(json!("")))), "127.0.0.1:8088");
        assert_eq!(rpc_address(&outputs(Some(json!(null)))), "127.0.0.1:8088");
        assert_eq!(
            rpc_address(&outputs(Some(json!("127.0.70.3:8088")))),
            "127.0.70.3:8088"
        );
    }

    /// Everything the provider does with a Keystone or Heat reply body, as the fuzz
    /// target does it.
    fn read_everything(text: &str) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        if let Ok(t) = TokenReply::parse(text, now) {
            for (interface, region) in [("public", None), ("internal", Some("RegionOne"))] {
                match t.endpoint("orchestration", interface, region) {
                    Ok(url) => assert!(!url.ends_with('/')),
                    Err(msg) => assert!(msg.contains("orchestration")),
                }
            }
        }
        let body: Value = serde_json::from_str(text).unwrap_or(Value::Null);
        if let Some(reply) = StackReply::from_body(&body) {
            let _ = status_of(&reply.status, &reply.reason);
            let (raw, errors) = parse_outputs(reply.outputs);
            assert!(errors.keys().all(|k| raw.contains_key(k)));
            let _ = StackOutputs::from_raw("s", raw).map_err(|e| e.to_string());
        }
        if let Some(found) = stack_in_list(&body, "s") {
            assert_eq!(found.name, "s");
        }
        let _ = message(text);
    }

    proptest! {
        #[test]
        fn any_reply_text_is_read_without_panic(text in any::<String>()) {
            read_everything(&text);
        }

        #[test]
        fn any_json_reply_is_read_without_panic(v in arb::json()) {
            read_everything(&v.to_string());
            for wrap in ["token", "stack"] {
                read_everything(&serde_json::json!({ wrap: v.clone() }).to_string());
            }
            read_everything(&serde_json::json!({ "stacks": [v.clone()] }).to_string());
            read_everything(&serde_json::json!({ "stack": { "outputs": [v] } }).to_string());
        }

        #[test]
        fn token_lifetimes_never_panic_on_any_timestamps(
            exp in arb::word(), issued in prop::option::of(arb::word()), now in any::<u32>(),
        ) {
            let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now.into());
            let _ = token_lifetime(&exp, issued.as_deref(), now);
        }
    }

    #[test]
    fn malformed_token_and_stack_replies_are_refused_not_misread() {
        let now = SystemTime::now();
        // Truncated, wrong types, HTML, empty.
        for text in [
            r#"{"token": {"expires_at": "2026-05-20T12:00:00Z", "catalog": ["#,
            r#"{"token": {"expires_at": 1779278400}}"#,
            r#"{"token": {"expires_at": "2026-05-20T12:00:00Z", "catalog": {"type": "orchestration"}}}"#,
            "<html><body><h1>503 Service Unavailable</h1></body></html>",
            "",
        ] {
            assert!(TokenReply::parse(text, now).is_err(), "{text}");
        }
        let t = TokenReply::parse(r#"{"token": {"expires_at": "soon"}}"#, now).unwrap();
        assert_eq!((t.project_id, t.lifetime), (None, None));
        for body in [
            serde_json::json!({"stack": "CREATE_COMPLETE"}),
            serde_json::json!({"stack": [1, 2]}),
            serde_json::json!({"stacks": []}),
            Value::Null,
        ] {
            assert_eq!(StackReply::from_body(&body), None, "{body}");
        }
        let r = StackReply::from_body(
            &serde_json::json!({"stack": {"stack_status": 5, "outputs": {"a": 1}}}),
        )
        .unwrap();
        assert_eq!((r.status.as_str(), r.outputs.len()), ("", 0));
        assert_eq!(
            stack_in_list(&serde_json::json!({"stacks": {"s": 1}}), "s"),
            None
        );
        assert_eq!(
            stack_in_list(
                &serde_json::json!({"stacks": [{"stack_name": "s", "id": 7}]}),
                "s"
            ),
            None
        );
    }

    fn app_credential() -> HeatConfig {
        HeatConfig {
            application_credential_id: Some("a".into()),
            application_credential_secret: Some(Secret::new("topsecret")),
            ..HeatConfig::new("http://127.0.0.1:5000/v3")
        }
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = app_credential();
        assert!(!format!("{c:?}").contains("topsecret"));
        let heat = Heat::new(c).unwrap();
        assert!(!format!("{heat:?}").contains("topsecret"));
    }

    #[test]
    fn missing_or_empty_ca_file_is_a_clear_error() {
        let mut c = app_credential();
        c.ca_file = Some("/nonexistent/ca.pem".into());
        let e = Heat::new(c.clone()).unwrap_err().to_string();
        assert!(
            e.contains("heat.ca_file") && e.contains("/nonexistent/ca.pem"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca.pem");
        std::fs::write(&p, "not a certificate").unwrap();
        c.ca_file = Some(p);
        let e = Heat::new(c).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }

    fn catalog() -> Vec<CatalogEntry> {
        serde_json::from_value::<Vec<CatalogEntry>>(json!([
            {"type": "identity", "endpoints": [{"interface": "public", "url": "http://k/v3", "region_id": "RegionOne"}]},
            {"type": "orchestration", "endpoints": [
                {"interface": "internal", "url": "http://heat-int:8004/v1/p", "region_id": "RegionOne", "region": "RegionOne"},
                {"interface": "public", "url": "https://heat-two/v1/p/", "region_id": "RegionTwo"},
                {"interface": "public", "url": "https://heat-one/v1/p", "region_id": "RegionOne"}]}
        ]))
        .unwrap()
    }

    #[test]
    fn the_endpoint_is_chosen_by_interface_and_region() {
        let c = catalog();
        assert_eq!(
            pick_endpoint(&c, "orchestration", "public", Some("RegionOne")).unwrap(),
            "https://heat-one/v1/p"
        );
        assert_eq!(
            pick_endpoint(&c, "orchestration", "public", Some("RegionTwo")).unwrap(),
            "https://heat-two/v1/p"
        );
        assert_eq!(
            pick_endpoint(&c, "orchestration", "internal", None).unwrap(),
            "http://heat-int:8004/v1/p"
        );
        let e = pick_endpoint(&c, "orchestration", "admin", Some("RegionOne")).unwrap_err();
        assert!(
            e.contains("interface admin in region RegionOne") && e.contains("public in RegionTwo"),
            "{e}"
        );
        let e = pick_endpoint(&c[..1], "orchestration", "public", None).unwrap_err();
        assert!(
            e.contains("no orchestration service") && e.contains("identity"),
            "{e}"
        );
    }

    #[test]
    fn token_lifetime_comes_from_keystones_own_timestamps() {
        let l = token_lifetime(
            "2024-05-09T10:00:00.000000Z",
            Some("2024-05-09T09:00:00.000000Z"),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(l, Some(Duration::from_secs(3600)));
        assert_eq!(token_lifetime("yesterday", None, SystemTime::now()), None);
        // Already expired by our clock and no issued_at: renew at once.
        assert_eq!(
            token_lifetime("2000-01-01T00:00:00Z", None, SystemTime::now()),
            Some(Duration::ZERO)
        );
    }

    #[test]
    fn polls_start_fast_and_back_off_to_the_cap() {
        let mut s = PollSchedule::new(Duration::from_millis(700));
        let v: Vec<u128> = (0..8).map(|_| s.next().as_millis()).collect();
        assert_eq!(v[0], 50);
        assert!(v.windows(2).all(|w| w[0] <= w[1]), "{v:?}");
        assert_eq!(*v.last().unwrap(), 700);
        let sum: u128 = v[..4].iter().sum();
        assert!(
            sum < 500,
            "the first four polls come within half a second: {v:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn transient_retries_double_within_a_budget_counted_from_the_first_failure() {
        let mut b = backoff(Duration::from_secs(10));
        let d: Vec<u128> = std::iter::from_fn(|| b.next())
            .take(5)
            .map(|d| d.as_millis())
            .collect();
        for (got, step) in d.iter().zip([250u128, 500, 1000, 2000, 4000]) {
            assert!((step / 2..=step).contains(got), "{d:?}");
        }
        assert_eq!(backoff(Duration::ZERO).next(), None);
        // Time spent before the first failure (authenticating, say) is not counted.
        let mut b = backoff(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(150)).await;
        let d = b.next().expect("the budget starts now");
        assert!(d > Duration::ZERO, "{d:?}");
    }

    #[test]
    fn heat_and_keystone_messages_are_extracted() {
        let heat = r#"{"explanation": "The server could not comply", "code": 400,
            "error": {"message": "Property error: resources.x.properties: Unknown Property foo",
            "traceback": null, "type": "StackValidationFailed"}, "title": "Bad Request"}"#;
        assert_eq!(
            message(heat),
            "StackValidationFailed: Property error: resources.x.properties: Unknown Property foo"
        );
        let ks = r#"{"error":{"code":401,"message":"The request you have made requires authentication.","title":"Unauthorized"}}"#;
        assert_eq!(
            message(ks),
            "The request you have made requires authentication."
        );
        assert_eq!(message(""), "(empty reply)");
        assert_eq!(message("<html>boom</html>"), "<html>boom</html>");
    }

    #[test]
    fn status_strings_map_to_domain_states() {
        assert_eq!(status_of("CREATE_COMPLETE", ""), StackStatus::Complete);
        assert_eq!(status_of("DELETE_COMPLETE", ""), StackStatus::Gone);
        assert_eq!(
            status_of("CREATE_IN_PROGRESS", ""),
            StackStatus::InProgress("CREATE_IN_PROGRESS".into())
        );
        assert_eq!(
            status_of("CREATE_FAILED", "boom"),
            StackStatus::Failed("CREATE_FAILED: boom".into())
        );
        assert_eq!(seg("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn the_body_carries_get_file_targets_and_environment_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("scripts")).unwrap();
        std::fs::write(d.join("scripts/hello.sh"), "echo hello\n").unwrap();
        std::fs::write(d.join("nested.yaml"), "heat_template_version: 2018-08-31\n").unwrap();
        std::fs::write(
            d.join("t.yaml"),
            "heat_template_version: 2018-08-31\nresources:\n  c:\n    type: OS::Heat::Value\n    properties:\n      value: {get_file: scripts/hello.sh}\n  n:\n    type: sub/inner.yaml\n",
        )
        .unwrap();
        // A nested template with its own get_file, relative to its own directory.
        std::fs::create_dir(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/inner.txt"), "inner\n").unwrap();
        std::fs::write(
            d.join("sub/inner.yaml"),
            "heat_template_version: 2018-08-31\noutputs:\n  o: {value: {get_file: inner.txt}}\n",
        )
        .unwrap();
        std::fs::write(
            d.join("e1.yaml"),
            "resource_registry:\n  OS::Nova::Server: OS::Heat::None\n  My::Thing: nested.yaml\n",
        )
        .unwrap();
        std::fs::write(d.join("e2.yaml"), "parameter_defaults: {a: b}\n").unwrap();
        let spec = StackSpec {
            secret_parameters: Default::default(),
            name: "s".into(),
            template: d.join("t.yaml"),
            parameters: [("p".to_string(), "v".to_string())].into(),
            environment_files: vec![d.join("e1.yaml"), d.join("e2.yaml")],
            timeout: Duration::from_secs(61),
        };
        let b = stack_body(&spec).unwrap();
        assert_eq!(b["files"]["scripts/hello.sh"], "echo hello\n");
        assert!(b["files"]["sub/inner.yaml"]
            .as_str()
            .unwrap()
            .contains("inner.txt"));
        assert_eq!(b["files"]["inner.txt"], "inner\n");
        assert_eq!(
            b["files"]["nested.yaml"],
            "heat_template_version: 2018-08-31\n"
        );
        let envs = b["environment_files"].as_array().unwrap();
        assert_eq!(envs.len(), 2);
        assert!(envs[0].as_str().unwrap().ends_with("/e1.yaml"));
        assert!(b["files"][envs[1].as_str().unwrap()]
            .as_str()
            .unwrap()
            .contains("parameter_defaults"));
        assert_eq!(b["timeout_mins"], 2);
        assert_eq!(b["parameters"]["p"], "v");
        assert!(b["template"]
            .as_str()
            .unwrap()
            .starts_with("heat_template_version"));

        let mut bad = spec.clone();
        bad.environment_files = vec![d.join("missing.yaml")];
        let e = stack_body(&bad).unwrap_err();
        assert!(
            e.contains("environment file") && e.contains("missing.yaml"),
            "{e}"
        );
    }
}

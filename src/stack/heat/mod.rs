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
//!
//! Layout: `keystone` (credentials, tokens, the catalog), `http` (one retrying call to
//! Keystone or Heat and its errors), `bundle` (the create body: the template and every
//! file it names), and here the provider itself.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};

use serde_json::Value;
use tokio::sync::Mutex;

use super::{StackError, StackOutputs, StackProvider, StackRef, StackSpec, StackStatus};
use crate::util::Secret;

/// The largest Keystone or Heat reply read. Token replies with a big catalog and stack
/// lists are tens of kilobytes; a reply near this is a wrong URL or a broken server, and
/// is refused rather than buffered.
pub const MAX_REPLY_BYTES: usize = 32 << 20;

pub use crate::config::{CatalogInterface, HeatConfig};

mod bundle;
mod http;
mod keystone;

use bundle::stack_body;
pub use http::message;
use http::{clip, seg, Retry};
pub use keystone::TokenReply;
use keystone::{Credentials, Token};

// ---------------------------------------------------------------- the provider

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
    use super::keystone::token_lifetime;
    use super::*;
    use crate::util::arb;
    use proptest::prelude::*;
    use serde_json::json;
    use std::time::SystemTime;

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
}

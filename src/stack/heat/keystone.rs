//! Keystone v3: the credentials, the token and its renewal, and the orchestration
//! endpoint picked from the token's catalog.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderValue, ACCEPT, CONNECTION};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::http::{backoff, message};
use super::{Heat, MAX_REPLY_BYTES};
use crate::stack::StackError;
use crate::util::{read_body_capped, CappedReadError, Secret};

pub(super) enum Credentials {
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
pub(super) struct Token {
    pub(super) value: Secret,
    pub(super) project_id: String,
    /// Orchestration base URL, `.../v1/{project_id}`, no trailing slash.
    pub(super) endpoint: String,
    pub(super) renew_at: Instant,
}

impl Heat {
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
    pub(super) async fn current_token(&self) -> Result<Arc<Token>, StackError> {
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
    pub(super) async fn drop_token(&self, stale: &Arc<Token>) {
        let mut guard = self.token.lock().await;
        if guard.as_ref().is_some_and(|t| Arc::ptr_eq(t, stale)) {
            *guard = None;
        }
    }
    pub(super) fn who(&self) -> String {
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
    pub(super) async fn authenticate(&self) -> Result<Token, StackError> {
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
    pub(super) fn token_from(
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
}
#[derive(Deserialize)]
pub(super) struct TokenBody {
    pub(super) token: TokenInfo,
}
/// A Keystone v3 token reply body, read: the project the token is scoped to, its
/// `expires_at`, its lifetime (from Keystone's own timestamps, `None` when `expires_at`
/// does not parse) and its service catalog.
pub struct TokenReply {
    pub project_id: Option<String>,
    pub expires_at: String,
    pub lifetime: Option<Duration>,
    pub(super) catalog: Vec<CatalogEntry>,
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
pub(super) struct TokenInfo {
    pub(super) expires_at: String,
    #[serde(default)]
    pub(super) issued_at: Option<String>,
    #[serde(default)]
    pub(super) project: Option<ProjectRef>,
    #[serde(default)]
    pub(super) catalog: Vec<CatalogEntry>,
}
#[derive(Deserialize)]
pub(super) struct ProjectRef {
    pub(super) id: String,
}
#[derive(Deserialize)]
pub(super) struct CatalogEntry {
    #[serde(rename = "type")]
    pub(super) kind: String,
    #[serde(default)]
    pub(super) endpoints: Vec<Endpoint>,
}
#[derive(Deserialize)]
pub(super) struct Endpoint {
    pub(super) interface: String,
    pub(super) url: String,
    #[serde(default)]
    pub(super) region_id: Option<String>,
    #[serde(default)]
    pub(super) region: Option<String>,
}
/// The token's lifetime from Keystone's own timestamps (`issued_at` → `expires_at`), or,
/// without `issued_at`, from `now`.
pub(super) fn token_lifetime(
    expires_at: &str,
    issued_at: Option<&str>,
    now: SystemTime,
) -> Option<Duration> {
    let exp = humantime::parse_rfc3339_weak(expires_at).ok()?;
    let from = issued_at
        .and_then(|s| humantime::parse_rfc3339_weak(s).ok())
        .unwrap_or(now);
    Some(exp.duration_since(from).unwrap_or(Duration::ZERO))
}
pub(super) fn pick_endpoint(
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

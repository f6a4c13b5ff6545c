//! One call to Keystone or Heat: bounded replies, retries of what may be retried (with
//! re-authentication on a 401), and errors that quote the service's own message.

use std::time::Duration;

use reqwest::header::{HeaderValue, ACCEPT, CONNECTION};
use reqwest::{Method, StatusCode};
use serde_json::Value;

use super::keystone::Credentials;
use super::{Heat, MAX_REPLY_BYTES};
use crate::stack::StackError;
use crate::util::{read_body_capped, CappedReadError};

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Retry {
    /// GET, DELETE, validate: retry connection failures, timeouts and 5xx.
    Idempotent,
    /// Create: retry only when the connection never opened (Heat saw nothing).
    ConnectOnly,
}
pub(super) struct Reply {
    pub(super) status: StatusCode,
    /// The request's URL, for errors.
    pub(super) url: String,
    pub(super) body: Value,
    pub(super) text: String,
}
/// Retry delays for transient failures: 250 ms doubling to 4 s (with jitter), for
/// `budget` from the first failure.
pub(super) fn backoff(budget: Duration) -> crate::util::Retry {
    crate::util::Retry::new(Duration::from_millis(250), Duration::from_secs(4), budget)
}

impl Heat {
    /// One Heat request, with the re-auth-once rule and bounded retries of transient
    /// failures. Returns every non-5xx, non-401 reply for the caller to judge.
    pub(super) async fn call(
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
    pub(super) fn heat_error(&self, what: &str, r: &Reply) -> StackError {
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
pub(super) fn clip(s: &str) -> String {
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
pub(super) fn seg(s: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

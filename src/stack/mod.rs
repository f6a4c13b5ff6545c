//! Stacks: the capability [`StackProvider`] (create from a template with parameters,
//! status, outputs, delete, all bounded by timeouts) and its implementations by backend:
//! `heat` (OpenStack Heat with Keystone v3) and [`local::LocalStacks`] (local "VMs" on
//! loopback addresses, the embedded default). Providers convert their wire types to the
//! domain types below at the boundary; the orchestrator sees only these.

pub mod heat;
pub mod local;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// What to create.
#[derive(Debug, Clone)]
pub struct StackSpec {
    /// Stack name (unique per provider; a duplicate is an error, never a silent reuse).
    pub name: String,
    /// Template file (HOT YAML for Heat; ignored by the local provider beyond a check).
    pub template: PathBuf,
    /// Template parameters.
    pub parameters: BTreeMap<String, String>,
    /// Template parameters that are secrets (the provider sends them with the others;
    /// `Debug` never shows them).
    pub secret_parameters: BTreeMap<String, crate::util::Secret>,
    /// Environment files (Heat `environment_files`), in order.
    pub environment_files: Vec<PathBuf>,
    /// Give up on a create that is not complete after this long (the stack is deleted).
    pub timeout: Duration,
}

/// A created stack.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StackRef {
    pub id: String,
    pub name: String,
}

/// The outputs every InfluxDB stack template must provide (output names in the
/// templates: `influxdb_host`, `influxdb_url`, `ssh_host`, `ssh_port`), plus the rest raw.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StackOutputs {
    /// Address of the InfluxDB VM.
    pub influxdb_host: String,
    /// Its HTTP API, e.g. `http://10.0.0.13:8086`.
    pub influxdb_url: String,
    /// Where its SSH server answers.
    pub ssh_host: String,
    pub ssh_port: u16,
    /// The VM's SSH host public keys as the VM itself reported them (optional output
    /// `ssh_host_keys`): pinned, so the first contact is verified too.
    #[serde(default)]
    pub ssh_host_keys: Vec<String>,
    /// Every output as the provider returned it.
    pub raw: BTreeMap<String, serde_json::Value>,
}

/// Where a stack stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackStatus {
    InProgress(String),
    Complete,
    /// Failed, with the provider's reason.
    Failed(String),
    /// Deleted (Heat keeps `DELETE_COMPLETE` stacks visible) or never existed.
    Gone,
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("stack {name}: create failed: {reason}")]
    CreateFailed { name: String, reason: String },
    #[error("stack {name}: not complete within {timeout:?}; {cleanup}")]
    Timeout {
        name: String,
        timeout: Duration,
        /// What happened to the half-made stack ("it was deleted" or why not).
        cleanup: String,
    },
    #[error("stack {name}: a stack with this name already exists")]
    Duplicate { name: String },
    #[error("stack {name}: output {output:?} is missing or not {expected}")]
    Output {
        name: String,
        output: String,
        expected: &'static str,
    },
    #[error("{provider}: {msg}")]
    Invalid { provider: String, msg: String },
    #[error("{provider}: authentication failed: {msg}")]
    Auth { provider: String, msg: String },
    #[error("{provider}: unreachable or failing ({msg}); will retry")]
    Transient { provider: String, msg: String },
    #[error("{provider}: {msg}")]
    Other { provider: String, msg: String },
}

impl StackError {
    pub fn is_transient(&self) -> bool {
        matches!(self, StackError::Transient { .. })
    }
}

/// Create and dispose of stacks.
#[allow(async_fn_in_trait)]
pub trait StackProvider {
    /// A name for messages: `heat http://...` or `local /var/lib/...`.
    fn describe(&self) -> String;

    /// Create the stack and wait until it is complete; return it with its outputs.
    /// A failed or timed-out create is deleted before the error is returned.
    async fn create(&self, spec: &StackSpec) -> Result<(StackRef, StackOutputs), StackError>;

    async fn status(&self, stack: &StackRef) -> Result<StackStatus, StackError>;

    async fn outputs(&self, stack: &StackRef) -> Result<StackOutputs, StackError>;

    /// Delete and wait until gone (deleting a stack that is already gone is not an error).
    async fn delete(&self, stack: &StackRef, timeout: Duration) -> Result<(), StackError>;

    /// Find a stack by name (an orchestrator restart finds its stacks again).
    async fn find(&self, name: &str) -> Result<Option<StackRef>, StackError>;

    /// How to reach the InfluxDB of one of this provider's stacks: its HTTP API, its
    /// backup/restore RPC address as its own host reaches it, and SSH to that host. Only
    /// the provider knows how its outputs map to these; `defaults` holds what it does not
    /// know itself (the service's credentials and work directory, the SSH user and key).
    fn reach(
        &self,
        stack: &StackRef,
        outputs: &StackOutputs,
        defaults: &crate::config::InstanceConfig,
    ) -> crate::config::InstanceConfig;
}

impl StackOutputs {
    /// Build from raw outputs, checking the four required ones.
    pub fn from_raw(
        name: &str,
        raw: BTreeMap<String, serde_json::Value>,
    ) -> Result<StackOutputs, StackError> {
        let s = |k: &str| -> Result<String, StackError> {
            raw.get(k)
                .and_then(|v| {
                    v.as_str()
                        .map(String::from)
                        .or_else(|| v.as_u64().map(|n| n.to_string()))
                })
                .filter(|v| !v.is_empty())
                .ok_or_else(|| StackError::Output {
                    name: name.into(),
                    output: k.into(),
                    expected: "a non-empty string",
                })
        };
        let port = s("ssh_port")?
            .parse::<u16>()
            .map_err(|_| StackError::Output {
                name: name.into(),
                output: "ssh_port".into(),
                expected: "a port number",
            })?;
        let ssh_host_keys = match raw.get("ssh_host_keys") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(v) => host_keys(v).ok_or_else(|| StackError::Output {
                name: name.into(),
                output: "ssh_host_keys".into(),
                expected: "SSH public keys (\"TYPE BASE64\" lines, a list of them, or a WaitCondition's data holding them)",
            })?,
        };
        Ok(StackOutputs {
            influxdb_host: s("influxdb_host")?,
            influxdb_url: s("influxdb_url")?,
            ssh_host: s("ssh_host")?,
            ssh_port: port,
            ssh_host_keys,
            raw,
        })
    }
}

/// SSH host keys from a stack output: `TYPE BASE64` lines, a list of such strings, or the
/// JSON text of a WaitCondition's `data` attribute (`{"<signal id>": "<lines>"}`), which
/// is how the templates publish what the VM reported. `None` when any line is not a key
/// (an empty value gives no keys: a template without them falls back to known_hosts).
pub fn host_keys(v: &serde_json::Value) -> Option<Vec<String>> {
    fn lines(text: &str, out: &mut Vec<String>) -> Option<()> {
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if !crate::config::is_public_key_line(line) {
                return None;
            }
            out.push(
                line.split_whitespace()
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        Some(())
    }
    let mut out = Vec::new();
    match v {
        serde_json::Value::String(s) if s.trim_start().starts_with('{') => {
            let obj: serde_json::Map<String, serde_json::Value> = serde_json::from_str(s).ok()?;
            // The templates signal with id "ssh_host_keys"; other signals may carry other data.
            match obj.get("ssh_host_keys") {
                Some(val) => lines(val.as_str()?, &mut out)?,
                None => {
                    for val in obj.values() {
                        lines(val.as_str()?, &mut out)?;
                    }
                }
            }
        }
        serde_json::Value::String(s) => lines(s, &mut out)?,
        serde_json::Value::Array(a) => {
            for val in a {
                lines(val.as_str()?, &mut out)?;
            }
        }
        _ => return None,
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_need_the_four_named_values_with_the_right_types() {
        let mut raw = BTreeMap::new();
        raw.insert("influxdb_host".to_string(), json!("10.0.0.13"));
        raw.insert("influxdb_url".to_string(), json!("http://10.0.0.13:8086"));
        raw.insert("ssh_host".to_string(), json!("10.0.0.13"));
        raw.insert("ssh_port".to_string(), json!(22));
        let o = StackOutputs::from_raw("s", raw.clone()).unwrap();
        assert_eq!(
            (o.ssh_port, o.influxdb_url.as_str()),
            (22, "http://10.0.0.13:8086")
        );
        raw.insert("ssh_port".to_string(), json!("twenty-two"));
        let e = StackOutputs::from_raw("s", raw.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains("ssh_port") && e.contains("port number"), "{e}");
        raw.remove("influxdb_url");
        raw.insert("ssh_port".to_string(), json!("22"));
        let e = StackOutputs::from_raw("s", raw).unwrap_err().to_string();
        assert!(e.contains("influxdb_url"), "{e}");
    }

    const ED: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDIfEYXAUQtwmEsxcNkkgTeO4S3ZCKl0jGy837I7q9hC";
    const EC: &str = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTY=";

    #[test]
    fn host_keys_come_from_a_wait_conditions_data_or_plain_lines_and_anything_else_is_refused() {
        let data = json!({ "ssh_host_keys": format!("{ED}\n{EC}\n") }).to_string();
        assert_eq!(
            host_keys(&json!(data)),
            Some(vec![ED.to_string(), EC.to_string()])
        );
        assert_eq!(
            host_keys(&json!(format!("{ED} root@vm\n"))),
            Some(vec![ED.to_string()]),
            "the comment is dropped"
        );
        assert_eq!(host_keys(&json!([ED, EC])).map(|k| k.len()), Some(2));
        assert_eq!(host_keys(&json!("")), Some(vec![]));
        // A boot that failed signals empty data: no keys, not an error.
        assert_eq!(host_keys(&json!("{\"ssh_host_keys\": \"\"}")), Some(vec![]));
        assert_eq!(host_keys(&json!("not a key")), None);
        assert_eq!(host_keys(&json!("{\"x\": \"ssh-ed25519 !!!\"}")), None);
        assert_eq!(host_keys(&json!(42)), None);
        let two = json!({ "ssh_host_keys": ED, "api_certificate": "-----BEGIN CERTIFICATE-----" });
        assert_eq!(
            host_keys(&json!(two.to_string())),
            Some(vec![ED.to_string()])
        );
        let mut raw = BTreeMap::new();
        raw.insert("influxdb_host".to_string(), json!("10.0.0.13"));
        raw.insert("influxdb_url".to_string(), json!("http://10.0.0.13:8086"));
        raw.insert("ssh_host".to_string(), json!("10.0.0.13"));
        raw.insert("ssh_port".to_string(), json!(22));
        raw.insert("ssh_host_keys".to_string(), json!("garbage"));
        let e = StackOutputs::from_raw("s", raw).unwrap_err().to_string();
        assert!(e.contains("ssh_host_keys"), "{e}");
    }
}

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
        Ok(StackOutputs {
            influxdb_host: s("influxdb_host")?,
            influxdb_url: s("influxdb_url")?,
            ssh_host: s("ssh_host")?,
            ssh_port: port,
            raw,
        })
    }
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
}

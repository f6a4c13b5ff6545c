//! stateshift — a service orchestrator that moves the whole live state of a running
//! InfluxDB 1.x service instance to a freshly created one, losing nothing.
//!
//! Map of the crate (see `ARCHITECTURE.md` for the invariants):
//!
//! - [`config`]: the typed configuration: YAML file + `STATESHIFT__SECTION__KEY`
//!   environment overrides, validated purely into [`config::Config`].
//! - [`influx`]: InfluxDB 1.x HTTP client (ping, chunked queries, writes, metadata)
//!   and line-protocol helpers.
//! - [`remote`]: running commands on a host, locally or over SSH, with streamed stdio.
//! - [`stack`]: hosts and stacks; `local` starts "VMs" as processes on loopback addresses.
//! - [`migrate`]: the data engine (one module per phase over a shared context, a pure
//!   plan of what runs next), the capture receiver and spool, verification, the journal,
//!   and the machine that runs a whole migration of a service around the engine.
//! - [`monitor`]: the `MetricSource` capability, the Zabbix JSON-RPC client and the poller.
//! - [`predict`]: GM(1,1) and baseline predictors, trigger policy, trace evaluation.
//! - [`daemon`]: the service orchestrator: the decision loop over the load, the journaled
//!   migrations it triggers, and its HTTP(S) API.
//! - [`tls`]: the API's certificate and key, checked to belong together, and a TLS
//!   listener that bounds every handshake.
//! - [`util`]: secrets that never print, capped HTTP bodies, atomic writes, the retry
//!   schedule, fault hooks.
//! - [`logging`]: log lines for a terminal, a file, the systemd journal, or as JSON.
//! - [`timeline`]: the availability timeline: a probe writer/reader that follows the
//!   service through a migration, per-second CSV and an SVG chart with the phases.
//!
//! Not here: `stateshift demo` and `stateshift bench` are the binary's own modules
//! (`src/cli/`), and the lab and workload kit they and the tests use (`src/kit/`) is
//! compiled into the binary and included by path in the tests, so this library exposes
//! what an integrator uses and nothing of the scaffolding.

pub mod config;
pub mod daemon;
pub mod influx;
pub mod logging;
pub mod migrate;
pub mod monitor;
pub mod predict;
pub mod remote;
pub mod stack;
pub mod timeline;
pub mod tls;
pub mod util;

//! Integration tests against real InfluxDB 1.x servers and real sshd processes, each
//! started by the test on its own loopback address (`scripts/setup.sh` installs them).

/// The lab and workload kit, compiled here as the binary compiles it (it is not library
/// API); each test binary uses part of it.
#[allow(dead_code)]
#[path = "../../src/kit/mod.rs"]
mod kit;

mod abort;
mod api_tls;
mod campaign;
mod cli;
mod common;
mod deploy;
mod faults;
mod heat;
mod heat_migration;
mod lab;
mod malformed;
mod migration;
mod orchestrator;
mod page;
mod remote;
mod security;
mod soak;
mod stacks;
mod timeline;
mod zabbix;

//! Integration tests against real InfluxDB 1.x servers and real sshd processes, each
//! started by the test on its own loopback address (`scripts/setup.sh` installs them).

mod api_tls;
mod cli;
mod common;
mod faults;
mod heat;
mod heat_migration;
mod lab;
mod malformed;
mod migration;
mod orchestrator;
mod remote;
mod security;
mod soak;
mod stacks;
mod timeline;
mod zabbix;

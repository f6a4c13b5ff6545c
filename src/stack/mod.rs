//! Hosts and stacks. [`local`] starts "VMs" on this machine: each one a set of processes
//! (`influxd`, `sshd`) bound to its own loopback address.

pub mod local;

//! The data phases of a migration: capture → dump → transfer → restore → delta →
//! cutover → verify (DESIGN.md §3), the capture receiver and spool, and verification.
//!
//! This module never speaks HTTP to a service other than through [`crate::influx`] and
//! never runs a command other than through [`crate::remote::Remote`].

pub mod abort;
pub mod capture;
pub mod engine;
pub mod journal;
pub mod machine;
pub mod spool;
pub mod verify;

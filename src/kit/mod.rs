//! The kit the demo, the benchmark and the tests start from: a lab of local VMs and a
//! configuration naming them, seeded data and live writers with their own ledger of
//! acknowledged points. Not library API: the binary compiles it as its own module, the
//! integration tests and examples include it by path.

pub mod lab;
pub mod workload;

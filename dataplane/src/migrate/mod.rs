//! Live migration: the pre-copy driver at the source, its peer at the destination, and the
//! policies that decide when to stop.

pub mod policy;

pub use policy::{Decision, IterationReport, Policy, StopDecider, StopReason};

//! skyferry's data plane.
//!
//! This crate holds the sans-IO core: pages ([`page`]), the page codec with zero pages,
//! content-based redundancy elimination and page deltas ([`codec`]), and sealed frames
//! ([`frame`], [`crypto`]). Pipelines, transport and the daemon build on it; [`disk`] steers
//! DRBD, which carries the guest's disk.

pub mod codec;
pub mod coordinator;
pub mod crypto;
pub mod daemon;
pub mod disk;
pub mod frame;
pub mod guest;
pub mod limits;
pub mod migrate;
pub mod network;
pub mod page;
pub mod pipeline;
pub mod protocol;
pub mod transport;
pub mod units;

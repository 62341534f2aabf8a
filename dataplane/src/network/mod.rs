//! Network switchover: announcing a migrated guest at its new location (the CloudNet paper,
//! section IV-A3, "Maintaining Network Connections").
//!
//! [`frame`] builds the frames: a gratuitous ARP request and a RARP request.

pub mod frame;

pub use frame::{MacAddr, MacError};

//! Synchronized Arrival (paper IV-B4, V-C): migrations of one application arrive together.
//!
//! Any skyferryd can serve the coordinator (`[coordinator] listen`). Migrations started with
//! `--group G` join it, report every iteration, and are held once their own policy would
//! stop until every member is ready; then all stop at their next iteration end, so the
//! switchovers land within one iteration of each other. A held member may pace itself
//! (wait instead of re-sending pages it will send again anyway); the coordinator counts what
//! that saved. `group.rs` is the decision, without I/O; `wire.rs`, `server.rs` and
//! `client.rs` carry it over TCP, after a mutual proof of the pre-shared key.

pub mod client;
pub mod group;
pub mod server;
pub mod wire;

pub use client::{GroupOptions, Member, show};
pub use group::{Group, GroupFailure, MemberState, Progress, Verdict};
pub use server::Coordinator;

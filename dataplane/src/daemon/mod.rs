//! `skyferryd`: configuration, the control socket and the registry of migrations.
//!
//! One daemon runs on each host. As a source it runs migrations the CLI starts; as a
//! destination it listens on the migration port and receives them, several at once
//! (`acceptor`).

pub mod acceptor;
pub mod admission;
pub mod cli;
pub mod config;
pub mod control;
pub mod control_server;
pub mod metrics;
pub mod registry;
pub mod service;

pub use config::{ConfigError, DaemonConfig};
pub use control::{Request, Response, StartRequest};
pub use registry::Registry;

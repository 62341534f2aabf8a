//! Live migration: the pre-copy driver at the source, its peer at the destination, and the
//! policies that decide when to stop.

pub mod announcer;
pub mod converge;
pub mod dest;
pub mod disk;
pub mod hold;
pub mod job_stats;
pub mod migration_id;
pub mod policy;
pub mod source;
pub mod status;

pub use job_stats::{IterationPoint, JobStats};
pub use migration_id::MigrationId;
pub use policy::{Decision, IterationReport, Policy, StopDecider, StopReason};
pub use status::{MigrationStatus, Phase, Role, Saved};

/// How a destination's refusal that means "ask again later" begins (the source then retries
/// with backoff, see `source::ResumePolicy::busy_within`).
pub const BUSY_REFUSAL: &str = "destination busy";

impl MigrateError {
    /// The link broke (a closed or reset connection, a stall, a data stream that ended),
    /// as opposed to a refusal, a bad frame or a local failure: pre-copy may resume.
    pub fn is_link_lost(&self) -> bool {
        use crate::pipeline::PipelineError;
        use crate::protocol::ProtocolError;
        match self {
            MigrateError::LinkLost(_) | MigrateError::Timeout(..) => true,
            MigrateError::Protocol(p) => {
                matches!(p, ProtocolError::Io { .. } | ProtocolError::Closed { .. })
            }
            MigrateError::Pipeline(PipelineError::Transport(t)) => t.is_disconnect(),
            _ => false,
        }
    }

    /// The destination refused because it is busy (its `max_migrations` reached): asking
    /// again later may succeed.
    pub fn is_busy(&self) -> bool {
        matches!(
            self,
            MigrateError::Protocol(crate::protocol::ProtocolError::Refused(why))
                if why.starts_with(BUSY_REFUSAL)
        )
    }

    /// The message without the variant's own prefix, for wrapping in another.
    pub fn detail(&self) -> String {
        match self {
            MigrateError::LinkLost(d) => d.clone(),
            e => e.to_string(),
        }
    }
}

/// Why a migration failed, for the operator.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// the protocol failed (connection, handshake, peer)
    #[error(transparent)]
    Protocol(#[from] crate::protocol::ProtocolError),
    /// a pipeline stage failed
    #[error(transparent)]
    Pipeline(#[from] crate::pipeline::PipelineError),
    /// the guest backend failed
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// the codec config is unusable
    #[error(transparent)]
    Config(#[from] crate::codec::ConfigError),
    /// the peer reported a failure
    #[error("peer failed: {0}")]
    Peer(String),
    /// the memory digests differ
    #[error("memory verification failed: source digest {ours:#018x}, destination {dest:#018x}")]
    DigestMismatch {
        /// The source's digest.
        ours: u64,
        /// The destination's.
        dest: u64,
    },
    /// the completion action `abort` applied: the guest did not converge in time
    #[error("not converged: {0}; the guest keeps running at the source")]
    NotConverged(String),
    /// the operator aborted the migration
    #[error("aborted by the operator")]
    Aborted,
    /// the peer stopped answering
    #[error("peer did not answer within {0} s ({1})")]
    Timeout(u64, &'static str),
    /// the connection to the peer broke (closed, reset, or data stopped arriving)
    #[error("lost the link to the peer: {0}")]
    LinkLost(String),
    /// the connection failed
    #[error("{0}: {1}")]
    Connect(String, std::io::Error),
    /// Synchronized Arrival failed: the coordinator, or another member
    #[error("group {0}: {1}")]
    Group(String, String),
    /// steering the guest's DRBD disk failed
    #[error(transparent)]
    Disk(#[from] crate::disk::drbd::DrbdError),
    /// what the source asked for cannot be done here (no `[drbd]`, no `[announce]`, ...)
    #[error("{0}")]
    Unsupported(String),
    /// the destination lost the source after `Ready`: the guest's fate is the source's
    /// decision, unknown here; the guest is held, paused, for the operator
    #[error("{0}")]
    InDoubt(String),
}

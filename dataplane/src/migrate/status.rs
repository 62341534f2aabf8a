//! What a migration is doing, for `skyferry status` and `watch`.

use serde::{Deserialize, Serialize};

use super::StopReason;
use crate::codec::CodecStats;

/// Which end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sends the guest.
    Source,
    /// Receives it.
    Destination,
}

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Admission: waiting for one of this host's migration slots (`[admission]`);
    /// `queue_position` says where it stands.
    Queued,
    /// Handshake and stream set-up.
    Connecting,
    /// At the source: the destination refused the migration as busy (its `max_migrations`
    /// reached); it is asked again with backoff (`waiting` says when). The guest runs here.
    Waiting,
    /// Before iteration 1: the guest's disk is brought in sync (DRBD's bulk copy) and made
    /// synchronous, at both ends.
    Preparing,
    /// Pre-copy: the guest runs while memory is copied.
    Iterating,
    /// Pre-copy lost its link: the source reconnects (with backoff, within its bounds) and
    /// goes on from the last iteration the destination acknowledged; the destination holds
    /// what it received until then. The guest runs at the source.
    Reconnecting,
    /// The guest is paused; the last pages and the state go over.
    StopAndCopy,
    /// The destination checks it holds everything.
    Verifying,
    /// The guest now runs at the destination.
    Completed,
    /// Stopped by the operator before the commit; the guest runs at the source.
    Aborted,
    /// Failed before the commit; the guest runs at the source.
    Failed,
    /// Committed, but the destination did not confirm that the guest started.
    CommittedUnconfirmed,
    /// At the destination: the source was lost after `Ready`, so it may or may not have
    /// committed. The guest is held here, paused, until the operator resolves it
    /// (`skyferry resolve`).
    InDoubt,
}

impl Phase {
    /// True once nothing will change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Phase::Completed | Phase::Aborted | Phase::Failed | Phase::CommittedUnconfirmed
        )
    }
}

/// Bytes saved per optimization.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// By zero pages and blocks.
    pub zero: u64,
    /// By the block cache.
    pub cbr: u64,
    /// By page deltas.
    pub delta: u64,
    /// By compressing frame bodies (after the three above).
    #[serde(default)]
    pub compress: u64,
}

/// The state of one migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// Version of this schema (`docs/status-schema.md`); 0 from daemons before it had one.
    #[serde(default)]
    pub schema_version: u32,
    /// Migration id, a hex string in JSON as everywhere.
    #[serde(with = "super::migration_id::hex")]
    pub id: u64,
    /// Which end.
    pub role: Role,
    /// Operator's label of the guest.
    pub guest: String,
    /// Phase.
    pub phase: Phase,
    /// Current (or last) iteration.
    pub iteration: u32,
    /// Guest pages.
    pub guest_pages: u64,
    /// Pages sent (or received) so far, all iterations.
    pub pages_sent: u64,
    /// Pages sent in the last finished iteration.
    pub last_sent: u64,
    /// Pages dirtied during the last finished iteration.
    pub last_dirtied: u64,
    /// Pages left to send.
    pub remaining: u64,
    /// Bytes on the wire so far.
    pub wire_bytes: u64,
    /// Bytes saved by each optimization.
    pub saved: Saved,
    /// Estimated time to completion, ms (libvirt's time remaining): this iteration's
    /// remaining pages and the iterations expected after it, at the measured rates.
    pub eta_ms: Option<u64>,
    /// Expected pause if the guest stopped now, ms.
    pub expected_downtime_ms: Option<u64>,
    /// Time since the start, ms.
    pub elapsed_ms: u64,
    /// How long the guest was paused, ms (once known).
    pub pause_ms: Option<u64>,
    /// Bytes sent while the guest was paused: the final iteration's frames and the state
    /// blob (once known).
    #[serde(default)]
    pub paused_bytes: Option<u64>,
    /// Size of the CPU/device state blob (for a QEMU guest, QEMU's device-state stream plus
    /// an 18-byte header), once sent.
    #[serde(default)]
    pub state_bytes: Option<u64>,
    /// Why pre-copy stopped.
    pub stop_reason: Option<StopReason>,
    /// Synchronized Arrival: the group, and where this member stands in it (`iterating`,
    /// `held`, `paced`, `go`, `alone`).
    #[serde(default)]
    pub group: Option<String>,
    /// See `group`.
    #[serde(default)]
    pub group_state: Option<String>,
    /// The guest's DRBD disk: resource, this host's side, phase and sync percentage.
    #[serde(default)]
    pub disk: Option<crate::disk::drbd::DiskStatus>,
    /// A disk step that failed after the commit, or a roll back that could not undo
    /// everything: the disk needs the operator.
    #[serde(default)]
    pub disk_error: Option<String>,
    /// The network switchover: where the guest was announced, and how it went.
    #[serde(default)]
    pub network: Option<String>,
    /// Times pre-copy resumed after its link broke.
    #[serde(default)]
    pub resumes: u32,
    /// Why the link last broke (kept after it resumed), or why the destination refused
    /// while the source waits.
    #[serde(default)]
    pub link_error: Option<String>,
    /// While the phase is `waiting`: "destination busy, retry n in Xs".
    #[serde(default)]
    pub waiting: Option<String>,
    /// What a guest that checks itself (the `kvm` backend's) says: at the source as it
    /// paused, at the destination as it runs there.
    #[serde(default)]
    pub guest_check: Option<crate::guest::GuestCheck>,
    /// Auto-converge: how much of the guest's vCPU time is taken away now, percent (0 once
    /// released at the pause or on failure).
    #[serde(default)]
    pub throttle_percent: u8,
    /// The most auto-converge took away during this migration, percent.
    #[serde(default)]
    pub throttle_peak_percent: u8,
    /// The completion action: announced (a countdown, or iterations left over the
    /// ceiling) before it applies, kept after.
    #[serde(default)]
    pub completion: Option<super::converge::CompletionNotice>,
    /// Memory digests matched at both ends.
    pub verified: Option<bool>,
    /// What went wrong, for failed and aborted migrations.
    pub error: Option<String>,
    /// QEMU/libvirt-style job statistics (flattened into this object in JSON).
    #[serde(flatten)]
    pub job: super::job_stats::JobStats,
    /// The finished iterations, bounded (`job_stats::HISTORY_LIMIT`), for the timeline.
    #[serde(default)]
    pub history: Vec<super::job_stats::IterationPoint>,
}

impl MigrationStatus {
    /// A fresh status.
    pub fn new(id: u64, role: Role, guest: &str, guest_pages: u64) -> Self {
        MigrationStatus {
            schema_version: super::job_stats::STATUS_SCHEMA_VERSION,
            id,
            role,
            guest: guest.to_string(),
            phase: Phase::Connecting,
            iteration: 0,
            guest_pages,
            pages_sent: 0,
            last_sent: 0,
            last_dirtied: 0,
            remaining: guest_pages,
            wire_bytes: 0,
            saved: Saved::default(),
            eta_ms: None,
            expected_downtime_ms: None,
            elapsed_ms: 0,
            pause_ms: None,
            paused_bytes: None,
            state_bytes: None,
            stop_reason: None,
            group: None,
            group_state: None,
            disk: None,
            disk_error: None,
            network: None,
            resumes: 0,
            link_error: None,
            waiting: None,
            guest_check: None,
            throttle_percent: 0,
            throttle_peak_percent: 0,
            completion: None,
            verified: None,
            error: None,
            job: super::job_stats::JobStats {
                started_at_ms: super::job_stats::unix_ms(),
                ..Default::default()
            },
            history: Vec::new(),
        }
    }

    /// Takes the codec's counters.
    pub fn set_codec(&mut self, c: &CodecStats) {
        use crate::codec::RecordKind;
        self.job.zero_pages = c.pages_of(RecordKind::Zero);
        self.job.normal_pages = c.pages_total() - self.job.zero_pages;
        self.saved = Saved {
            zero: c.saved_zero,
            cbr: c.saved_cbr,
            delta: c.saved_delta,
            compress: c.saved_compress,
        };
    }
}

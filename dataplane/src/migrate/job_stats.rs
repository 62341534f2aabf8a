//! Job statistics in QEMU's and libvirt's vocabulary (`query-migrate`, job stats), the
//! time-to-completion estimate, and the per-iteration history a finished migration keeps for
//! its timeline. The schema is `docs/status-schema.md`; bump `STATUS_SCHEMA_VERSION` with it.

use serde::{Deserialize, Serialize};

use super::{MigrationStatus, Saved};
use crate::page::PAGE_SIZE;

/// Version of the `status --json` schema (`docs/status-schema.md`).
pub const STATUS_SCHEMA_VERSION: u32 = 2;

/// Most iterations a status keeps in its history: the first one and the latest ones.
pub const HISTORY_LIMIT: usize = 64;

/// Pre-copy iterations the estimate looks ahead at most (the xen-default policy's limit).
const ESTIMATE_ITERATIONS: u32 = 30;

/// The job's figures besides the ones `MigrationStatus` has always carried. Bytes, bytes per
/// second, milliseconds; rates are `None`-free floats (0 when not measured yet).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct JobStats {
    /// Guest memory, bytes (QEMU `total`, libvirt `data_total`).
    pub data_total_bytes: u64,
    /// Guest memory sent so far, all iterations, before the codec (libvirt `data_processed`).
    pub data_processed_bytes: u64,
    /// Guest memory left to send in this iteration or the next (QEMU `remaining`).
    pub data_remaining_bytes: u64,
    /// Pages sent as all-zero records (QEMU `duplicate`).
    pub zero_pages: u64,
    /// Pages sent with content: full, block or delta records (QEMU `normal`).
    pub normal_pages: u64,
    /// Guest memory dirtied per second during the last finished iteration (QEMU
    /// `dirty-pages-rate` times the page size).
    pub dirty_rate_bps: f64,
    /// Bytes on the wire per second during the current (or last) iteration (QEMU `mbps` / 8).
    pub transfer_rate_bps: f64,
    /// Bytes on the wire per second over pre-copy so far: the rate the stop policy predicts
    /// with (`expected_downtime_ms`, `eta_ms`).
    pub link_rate_bps: f64,
    /// Dirty logs collected (QEMU `dirty-sync-count`).
    pub dirty_sync_count: u32,
    /// From the start to the first page sent: handshake, streams, disk sync (QEMU
    /// `setup-time`).
    pub setup_ms: Option<u64>,
    /// Wall clock at the start, ms since the Unix epoch.
    pub started_at_ms: u64,
    /// Wall clock at the end (any final phase), ms since the Unix epoch.
    pub ended_at_ms: Option<u64>,
    /// Admission: this migration's place in its host's queue (1 = next), while it waits.
    pub queue_position: Option<u32>,
}

/// One iteration of a migration, for its timeline (`skyferry report --svg`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IterationPoint {
    /// Iteration number (the final, paused one included).
    pub iteration: u32,
    /// Pages sent.
    pub sent: u64,
    /// Pages dirtied while it ran.
    pub dirtied: u64,
    /// Pages left to send after it.
    pub remaining: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Duration, ms.
    pub ms: u64,
    /// Bytes saved by each optimization during this iteration.
    pub saved: Saved,
    /// The guest was paused (the stop-and-copy).
    pub paused: bool,
}

impl IterationPoint {
    /// Wire bytes per second during the iteration.
    pub fn rate_bps(&self) -> f64 {
        if self.ms == 0 {
            0.0
        } else {
            self.wire_bytes as f64 * 1000.0 / self.ms as f64
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Time to completion, ms: the pages left in this iteration at `pages_per_s`, then the
/// iterations that follow, each sending what the previous one dirtied at
/// `dirty_pages_per_s` (at most `guest_pages`), until what remains is small (under 50 pages,
/// the xen-default threshold) or grows (Smart Stop then stops: one last, paused copy).
/// `None` until a send rate is measured. It leaves out the verification after the pause.
pub fn estimate_completion_ms(
    remaining_pages: u64,
    pages_per_s: f64,
    dirty_pages_per_s: f64,
    guest_pages: u64,
) -> Option<u64> {
    if pages_per_s <= 0.0 || !pages_per_s.is_finite() {
        return None;
    }
    let mut pages = remaining_pages as f64;
    let mut total = 0.0;
    for _ in 0..ESTIMATE_ITERATIONS {
        let t = pages / pages_per_s;
        total += t;
        let next = (t * dirty_pages_per_s.max(0.0)).min(guest_pages as f64);
        if next >= pages {
            // Not converging: the stop policy ends pre-copy; the next copy is the last.
            total += next / pages_per_s;
            break;
        }
        pages = next;
        if pages < 50.0 {
            total += pages / pages_per_s;
            break;
        }
    }
    let ms = (total * 1000.0).ceil();
    // The float is finite and non-negative here; the cast saturates past u64::MAX.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Some(ms as u64)
}

impl MigrationStatus {
    /// Fills the figures that follow from the others (byte counts from page counts).
    pub fn derive_job(&mut self) {
        let page = PAGE_SIZE as u64;
        self.job.data_total_bytes = self.guest_pages * page;
        self.job.data_processed_bytes = self.pages_sent * page;
        self.job.data_remaining_bytes = self.remaining * page;
    }

    /// Records a finished iteration in the bounded history: past the limit the oldest after
    /// the first is dropped, so the start and the end of a long migration stay.
    pub fn push_history(&mut self, point: IterationPoint) {
        if self.history.len() >= HISTORY_LIMIT {
            self.history.remove(1);
        }
        self.history.push(point);
    }

    /// The bytes saved since `before`, per optimization.
    pub fn saved_since(&self, before: &Saved) -> Saved {
        Saved {
            zero: self.saved.zero.saturating_sub(before.zero),
            cbr: self.saved.cbr.saturating_sub(before.cbr),
            delta: self.saved.delta.saturating_sub(before.delta),
            compress: self.saved.compress.saturating_sub(before.compress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::Role;

    #[test]
    fn the_estimate_adds_up_the_iterations_to_come() {
        // 1000 pages at 100 pages/s with nothing dirtied: 10 s and done.
        assert_eq!(
            estimate_completion_ms(1000, 100.0, 0.0, 10_000),
            Some(10_000)
        );
        // Dirtying at half the send rate: 10 + 5 + 2.5 + ... ~ 20 s, more than the first
        // iteration alone and bounded.
        let half = estimate_completion_ms(1000, 100.0, 50.0, 10_000).unwrap();
        assert!((19_000..=20_100).contains(&half), "{half}");
        // Dirtying faster than it sends: this iteration and one last copy.
        let fast = estimate_completion_ms(1000, 100.0, 200.0, 10_000).unwrap();
        assert_eq!(fast, 10_000 + 20_000);
        // The dirtied pages are bounded by the guest.
        let capped = estimate_completion_ms(1000, 100.0, 10_000.0, 1500).unwrap();
        assert_eq!(capped, 10_000 + 15_000);
        assert_eq!(estimate_completion_ms(1000, 0.0, 0.0, 10), None);
    }

    #[test]
    fn the_history_keeps_the_first_and_the_latest_iterations() {
        let mut s = MigrationStatus::new(1, Role::Source, "g", 10);
        let limit = u32::try_from(HISTORY_LIMIT).unwrap();
        for i in 1..=(limit + 10) {
            s.push_history(IterationPoint {
                iteration: i,
                ..Default::default()
            });
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.history[0].iteration, 1);
        assert_eq!(s.history[1].iteration, 12);
        assert_eq!(s.history.last().unwrap().iteration, limit + 10);
    }

    #[test]
    fn the_json_carries_the_schema_version_and_the_hex_id() {
        let mut s = MigrationStatus::new(0xabc, Role::Source, "g", 4);
        s.pages_sent = 3;
        s.remaining = 1;
        s.derive_job();
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["schema_version"], STATUS_SCHEMA_VERSION);
        assert_eq!(v["id"], "abc");
        assert_eq!(v["data_total_bytes"], 4 * PAGE_SIZE as u64);
        assert_eq!(v["data_processed_bytes"], 3 * PAGE_SIZE as u64);
        assert_eq!(v["data_remaining_bytes"], PAGE_SIZE as u64);
        assert!(v.get("rate_bps").is_none(), "split into two rates");
        let back: MigrationStatus = serde_json::from_value(v).unwrap();
        assert_eq!(back.id, 0xabc);
        assert_eq!(back.job, s.job);
    }
}

//! Named points where a migration can be made to wait, for fault-injection tests:
//! `SKYFERRY_HOLD=source-paused:3000,dest-ready:2000` makes the daemon log
//! `holding at source-paused for 3000 ms` there and sleep, so a test can cut the link,
//! freeze it or kill a daemon at exactly that moment of the protocol. Unset (always, in
//! production), a point costs one branch on a value read once.
//!
//! Points: `source-paused` (the guest just paused, `Paused` sent), `source-ready` (the
//! destination's `Ready` received, before the commit), `source-committed` (`Commit` sent,
//! before `Started`), `dest-ready` (`Ready` sent, before `Commit`).

use std::sync::OnceLock;
use std::time::Duration;

/// The environment variable.
pub const VAR: &str = "SKYFERRY_HOLD";

fn points() -> &'static [(String, Duration)] {
    static POINTS: OnceLock<Vec<(String, Duration)>> = OnceLock::new();
    POINTS.get_or_init(|| {
        let Ok(spec) = std::env::var(VAR) else {
            return Vec::new();
        };
        spec.split(',')
            .filter_map(|p| {
                let (name, ms) = p.trim().split_once(':')?;
                let ms = ms.parse().ok()?;
                Some((name.to_string(), Duration::from_millis(ms)))
            })
            .collect()
    })
}

/// Waits here if `SKYFERRY_HOLD` names `point`.
pub fn at(point: &str, migration: u64) {
    if let Some((_, d)) = points().iter().find(|(n, _)| n == point) {
        tracing::warn!(
            migration = %super::MigrationId(migration),
            "holding at {point} for {} ms ({VAR})",
            d.as_millis()
        );
        std::thread::sleep(*d);
    }
}

//! Named points where a migration can be made to wait, for fault-injection tests:
//! `SKYFERRY_HOLD=source-paused:3000,dest-ready:/tmp/t/go` makes the daemon log
//! `holding at source-paused` there and wait, 3000 ms, or until the file `/tmp/t/go`
//! exists (at most [`MAX_HOLD`]), so a test can cut the link, freeze it or kill a daemon at
//! exactly that moment of the protocol, and then let it go on: a file is an event, so a
//! slow host cannot make the strike miss its moment. Unset (always, in production), a point
//! costs one branch on a value read once.
//!
//! Points: `source-paused` (the guest just paused, `Paused` sent), `source-ready` (the
//! destination's `Ready` received, before the commit), `source-committed` (`Commit` sent,
//! before `Started`), `source-iteration-N` (iteration N's pages handed to the pipeline,
//! which goes on sending them; the driver waits), `dest-ready` (`Ready` sent, before
//! `Commit`).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The environment variable.
pub const VAR: &str = "SKYFERRY_HOLD";

/// The longest a hold waits for its file.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

/// How long a point holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Until {
    /// This long.
    For(Duration),
    /// Until this file exists.
    File(PathBuf),
}

fn points() -> &'static [(String, Until)] {
    static POINTS: OnceLock<Vec<(String, Until)>> = OnceLock::new();
    POINTS.get_or_init(|| std::env::var(VAR).map_or_else(|_| Vec::new(), |s| parse(&s)))
}

fn parse(spec: &str) -> Vec<(String, Until)> {
    spec.split(',')
        .filter_map(|p| {
            let (name, until) = p.trim().split_once(':')?;
            let until = match until.parse() {
                Ok(ms) => Until::For(Duration::from_millis(ms)),
                Err(_) if !until.is_empty() => Until::File(until.into()),
                Err(_) => return None,
            };
            Some((name.to_string(), until))
        })
        .collect()
}

/// Waits here if `SKYFERRY_HOLD` names `point`.
pub fn at(point: &str, migration: u64) {
    let Some((_, until)) = points().iter().find(|(n, _)| n == point) else {
        return;
    };
    match until {
        Until::For(d) => {
            tracing::warn!(
                migration = %super::MigrationId(migration),
                "holding at {point} for {} ms ({VAR})",
                d.as_millis()
            );
            std::thread::sleep(*d);
        }
        Until::File(f) => {
            tracing::warn!(
                migration = %super::MigrationId(migration),
                "holding at {point} until {} exists ({VAR})",
                f.display()
            );
            let end = Instant::now() + MAX_HOLD;
            while !f.exists() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(10));
            }
            tracing::warn!(migration = %super::MigrationId(migration), "released at {point}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_holds_for_a_time_or_until_a_file() {
        assert_eq!(
            parse("source-paused:3000, dest-ready:/tmp/x/go,bad,empty:"),
            vec![
                (
                    "source-paused".to_string(),
                    Until::For(Duration::from_millis(3000))
                ),
                ("dest-ready".to_string(), Until::File("/tmp/x/go".into())),
            ]
        );
    }
}

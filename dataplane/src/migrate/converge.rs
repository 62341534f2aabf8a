//! What to do with a guest that cannot converge (sans-IO): the completion timeout and its
//! action, and auto-converge's throttle steps. [`StopDecider`](super::StopDecider) drives
//! both; the source driver applies what they decide.

use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Auto-converge's first throttle, percent of vCPU time taken away (QEMU's
/// `cpu-throttle-initial`).
pub const THROTTLE_INITIAL: u8 = 20;
/// Added at each further step (QEMU's `cpu-throttle-increment`).
pub const THROTTLE_STEP: u8 = 10;
/// The most taken away (QEMU's `max-cpu-throttle`).
pub const THROTTLE_MAX: u8 = 99;
/// Iterations in a row that must fall behind before the throttle engages or steps up (QEMU
/// looks at two sync periods too).
pub const THROTTLE_WINDOW: u32 = 2;
/// An iteration falls behind when it dirtied at least this percentage of what it sent (QEMU's
/// `throttle-trigger-threshold`, 50): pre-copy then shrinks by half at best per iteration,
/// too slowly to bring a saturated working set under a ceiling.
pub const THROTTLE_TRIGGER_PERCENT: u64 = 50;
/// Iterations allowed after the stop policy's own search ended with a predicted pause over
/// the ceiling: then the completion action applies, so a ceiling never makes pre-copy
/// unbounded, with or without a completion timeout.
pub const MAX_ITERATIONS_OVER_CEILING: u32 = 30;

/// What happens when a migration has not completed in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompletionAction {
    /// Give up: the guest keeps running at the source; the migration fails with the reason.
    #[default]
    Abort,
    /// Pause and copy what remains, whatever the ceiling.
    Force,
}

impl CompletionAction {
    /// The name operators type.
    pub fn name(self) -> &'static str {
        match self {
            CompletionAction::Abort => "abort",
            CompletionAction::Force => "force",
        }
    }
}

impl std::fmt::Display for CompletionAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for CompletionAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "abort" => Ok(CompletionAction::Abort),
            "force" => Ok(CompletionAction::Force),
            other => Err(format!(
                "unknown completion action {other:?}; use abort or force"
            )),
        }
    }
}

/// The operator's choices for a migration that does not converge.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ConvergeOptions {
    /// Completion timeout per GiB of guest memory (OpenStack's
    /// `live_migration_completion_timeout`); `None`: no timeout.
    pub completion_timeout_per_gib: Option<Duration>,
    /// What happens at the timeout, or when the stop policy's search ended over the ceiling
    /// and [`MAX_ITERATIONS_OVER_CEILING`] more iterations did not bring the pause under it.
    pub completion_action: CompletionAction,
    /// Throttle the guest's vCPUs while dirtying outpaces the link.
    pub auto_converge: bool,
}

impl ConvergeOptions {
    /// The completion timeout of a guest of `guest_pages` pages.
    pub fn completion_timeout(&self, guest_pages: u64) -> Option<Duration> {
        let gib = (guest_pages * crate::page::PAGE_SIZE as u64) as f64 / (1u64 << 30) as f64;
        self.completion_timeout_per_gib
            .map(|per| Duration::from_secs_f64(per.as_secs_f64() * gib))
    }
}

/// Why the completion action applies (or will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CompletionCause {
    /// The completion timeout.
    Timeout,
    /// The stop policy's search ended over the ceiling and the iterations allowed after it
    /// ran out.
    OverCeiling,
}

/// What `status` announces before the completion action applies, and keeps after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionNotice {
    /// What will happen (or happened).
    pub action: CompletionAction,
    /// Why.
    pub cause: CompletionCause,
    /// Time left before the completion timeout, ms (for `timeout`).
    #[serde(default)]
    pub in_ms: Option<u64>,
    /// Iterations left over the ceiling (for `over-ceiling`).
    #[serde(default)]
    pub iterations_left: Option<u32>,
    /// The action has been taken.
    #[serde(default)]
    pub applied: bool,
}

impl std::fmt::Display for CompletionNotice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match (self.action, self.applied) {
            (CompletionAction::Abort, false) => "will abort",
            (CompletionAction::Force, false) => "will force the pause",
            (CompletionAction::Abort, true) => "aborted",
            (CompletionAction::Force, true) => "forced the pause",
        };
        match (self.cause, self.applied) {
            (CompletionCause::Timeout, true) => write!(f, "completion timeout reached: {verb}"),
            (CompletionCause::Timeout, false) => write!(
                f,
                "completion timeout in {} s: {verb}",
                self.in_ms.unwrap_or(0).div_ceil(1000)
            ),
            (CompletionCause::OverCeiling, true) => {
                write!(f, "the pause never fit under max_downtime: {verb}")
            }
            (CompletionCause::OverCeiling, false) => write!(
                f,
                "pause over max_downtime: {} iteration(s) left, then {verb}",
                self.iterations_left.unwrap_or(0)
            ),
        }
    }
}

/// Auto-converge's throttle: steps up while iterations keep falling behind, never steps down
/// until released (as QEMU's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Throttle {
    percent: u8,
    /// Iterations in a row that fell behind.
    behind: u32,
}

impl Throttle {
    /// The throttle now, percent (0: none).
    pub fn percent(&self) -> u8 {
        self.percent
    }

    /// Takes one iteration (`sent`, `dirtied` pages; iteration 1 excluded by the caller) and
    /// returns the new percentage if it changed.
    pub fn after_iteration(&mut self, sent: u64, dirtied: u64) -> Option<u8> {
        // An iteration that sent nothing says nothing of the race.
        if sent == 0 || dirtied * 100 < sent * THROTTLE_TRIGGER_PERCENT {
            self.behind = 0;
            return None;
        }
        self.behind += 1;
        if self.behind < THROTTLE_WINDOW {
            return None;
        }
        self.behind = 0;
        let next = match self.percent {
            0 => THROTTLE_INITIAL,
            p => p.saturating_add(THROTTLE_STEP).min(THROTTLE_MAX),
        };
        (next != self.percent).then(|| {
            self.percent = next;
            next
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_steps_like_qemu_and_stops_at_99() {
        let mut t = Throttle::default();
        assert_eq!(
            t.after_iteration(100, 150),
            None,
            "one iteration is no trend"
        );
        assert_eq!(t.after_iteration(100, 150), Some(20));
        assert_eq!(
            t.after_iteration(100, 40),
            None,
            "converging resets the count"
        );
        assert_eq!(t.after_iteration(100, 100), None);
        assert_eq!(t.after_iteration(100, 50), Some(30), "half of it is behind");
        assert_eq!(t.after_iteration(0, 0), None, "nothing sent: no step");
        assert_eq!(t.after_iteration(0, 3), None);
        let mut seen = vec![];
        for _ in 0..40 {
            seen.extend(t.after_iteration(1, 1));
        }
        assert_eq!(seen, vec![40, 50, 60, 70, 80, 90, 99]);
        assert_eq!(t.percent(), 99);
    }

    #[test]
    fn completion_timeout_scales_with_guest_size() {
        let o = ConvergeOptions {
            completion_timeout_per_gib: Some(Duration::from_secs(8)),
            ..ConvergeOptions::default()
        };
        let gib = (1u64 << 30) / crate::page::PAGE_SIZE as u64;
        assert_eq!(o.completion_timeout(gib), Some(Duration::from_secs(8)));
        assert_eq!(o.completion_timeout(gib / 4), Some(Duration::from_secs(2)));
        assert_eq!(ConvergeOptions::default().completion_timeout(gib), None);
    }

    #[test]
    fn notices_read_as_the_operator_sees_them() {
        let n = CompletionNotice {
            action: CompletionAction::Abort,
            cause: CompletionCause::Timeout,
            in_ms: Some(11_200),
            iterations_left: None,
            applied: false,
        };
        assert_eq!(n.to_string(), "completion timeout in 12 s: will abort");
        let n = CompletionNotice {
            applied: true,
            action: CompletionAction::Force,
            ..n
        };
        assert_eq!(
            n.to_string(),
            "completion timeout reached: forced the pause"
        );
        assert_eq!("force".parse(), Ok(CompletionAction::Force));
        assert!("kill".parse::<CompletionAction>().is_err());
    }
}

//! When to stop iterating (CloudNet, IV-B3: Smart Stop).
//!
//! Sans-IO: the driver reports each finished iteration, the policy answers continue or stop.
//!
//! - `xen-default`: stop after 30 iterations, after sending 3x guest memory, or with fewer
//!   than 50 pages left (Xen's rules, the paper's baseline).
//! - `smart`: once an iteration dirties at least as many pages as it sent (the working set is
//!   rewritten faster than it can be sent), look for a local minimum: stop at the first
//!   iteration whose remaining pages are fewer than in every earlier iteration of the sliding
//!   window. Xen's limits stay as a backstop, and the search gives up after one window.
//! - `--downtime-limit` (either policy): stop as soon as what remains, at the effective rate
//!   measured so far, can be sent within the limit.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Duration;

/// Xen: maximum iterations.
pub const XEN_MAX_ITERATIONS: u32 = 30;
/// Xen: stop after sending this many times guest memory.
pub const XEN_MAX_FACTOR: u64 = 3;
/// Xen: stop with fewer pages left than this.
pub const XEN_MIN_REMAINING: u64 = 50;
/// Smart Stop's default sliding window, in iterations.
pub const SMART_WINDOW: usize = 5;

/// The stop policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Xen's default rules.
    XenDefault,
    /// CloudNet's Smart Stop.
    Smart,
}

impl Policy {
    /// The name operators type.
    pub fn name(self) -> &'static str {
        match self {
            Policy::XenDefault => "xen-default",
            Policy::Smart => "smart",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "xen-default" => Ok(Policy::XenDefault),
            "smart" => Ok(Policy::Smart),
            other => Err(format!(
                "unknown stop policy {other:?}; use smart or xen-default"
            )),
        }
    }
}

/// What one iteration did, as the driver measured it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IterationReport {
    /// 1-based iteration number.
    pub iteration: u32,
    /// Pages sent in this iteration.
    pub sent: u64,
    /// Pages dirtied while it ran: what the next iteration (or the final copy) must send.
    pub dirtied: u64,
    /// Bytes that went on the wire for it.
    pub wire_bytes: u64,
    /// How long it took.
    pub duration: Duration,
}

/// Why pre-copy ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// Fewer than 50 pages left.
    FewPagesLeft,
    /// 30 iterations done.
    MaxIterations,
    /// 3x guest memory sent.
    MaxData,
    /// Smart Stop found a local minimum of remaining pages.
    LocalMinimum,
    /// Smart Stop searched a whole window after the crossover without a new minimum.
    WindowExhausted,
    /// What remains fits in the downtime limit.
    DowntimeFits,
    /// The coordinator or operator asked to stop now.
    Requested,
}

/// The decision after an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run another iteration.
    Continue,
    /// Pause the guest and send what remains.
    Stop(StopReason),
}

/// Stop policy state for one migration.
#[derive(Debug, Clone)]
pub struct StopDecider {
    policy: Policy,
    downtime_limit: Option<Duration>,
    window: usize,
    guest_pages: u64,
    sent_total: u64,
    wire_total: u64,
    time_total: Duration,
    /// Set once an iteration dirtied at least as many pages as it sent.
    crossed_at: Option<u32>,
    /// Remaining pages of the last `window` iterations.
    recent: VecDeque<u64>,
}

impl StopDecider {
    /// A decider for a guest of `guest_pages` pages.
    pub fn new(policy: Policy, downtime_limit: Option<Duration>, guest_pages: u64) -> Self {
        StopDecider {
            policy,
            downtime_limit,
            window: SMART_WINDOW,
            guest_pages,
            sent_total: 0,
            wire_total: 0,
            time_total: Duration::ZERO,
            crossed_at: None,
            recent: VecDeque::new(),
        }
    }

    /// Effective rate so far, in bytes per second of wire data (0 before any data).
    pub fn rate(&self) -> f64 {
        let t = self.time_total.as_secs_f64();
        if t > 0.0 {
            self.wire_total as f64 / t
        } else {
            0.0
        }
    }

    /// Wire bytes per page sent so far (a page's average cost after the codec).
    pub fn bytes_per_page(&self) -> f64 {
        if self.sent_total > 0 {
            self.wire_total as f64 / self.sent_total as f64
        } else {
            crate::page::PAGE_SIZE as f64
        }
    }

    /// Estimated time to send `pages` at the measured rate and cost per page.
    pub fn estimate(&self, pages: u64) -> Option<Duration> {
        let rate = self.rate();
        (rate > 0.0).then(|| Duration::from_secs_f64(pages as f64 * self.bytes_per_page() / rate))
    }

    /// The iteration at which the dirtied-at-least-sent phase began, if it has.
    pub fn crossed_at(&self) -> Option<u32> {
        self.crossed_at
    }

    /// Takes one iteration's report and decides.
    pub fn after_iteration(&mut self, r: &IterationReport) -> Decision {
        self.sent_total += r.sent;
        self.wire_total += r.wire_bytes;
        self.time_total += r.duration;
        let remaining = r.dirtied;

        if remaining < XEN_MIN_REMAINING {
            return Decision::Stop(StopReason::FewPagesLeft);
        }
        if let Some(limit) = self.downtime_limit
            && self.estimate(remaining).is_some_and(|t| t <= limit)
        {
            return Decision::Stop(StopReason::DowntimeFits);
        }
        if r.iteration >= XEN_MAX_ITERATIONS {
            return Decision::Stop(StopReason::MaxIterations);
        }
        if self.sent_total >= XEN_MAX_FACTOR * self.guest_pages {
            return Decision::Stop(StopReason::MaxData);
        }
        if self.policy == Policy::Smart
            && let Some(decision) = self.smart(r, remaining)
        {
            return decision;
        }
        Decision::Continue
    }

    fn smart(&mut self, r: &IterationReport, remaining: u64) -> Option<Decision> {
        // Iteration 1 sends everything, so it says nothing about the working set.
        let crossed = r.iteration > 1 && r.dirtied >= r.sent;
        if self.crossed_at.is_none() && crossed {
            self.crossed_at = Some(r.iteration);
            self.recent.clear();
            self.recent.push_back(remaining);
            return None;
        }
        let start = self.crossed_at?;
        if self.recent.iter().all(|&p| remaining < p) {
            return Some(Decision::Stop(StopReason::LocalMinimum));
        }
        self.recent.push_back(remaining);
        if self.recent.len() > self.window {
            self.recent.pop_front();
        }
        (r.iteration - start >= u32::try_from(self.window).unwrap_or(u32::MAX))
            .then_some(Decision::Stop(StopReason::WindowExhausted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        policy: Policy,
        limit: Option<Duration>,
        pages: u64,
        seq: &[(u64, u64)],
    ) -> (u32, Decision) {
        let mut d = StopDecider::new(policy, limit, pages);
        for (i, &(sent, dirtied)) in seq.iter().enumerate() {
            let r = IterationReport {
                iteration: u32::try_from(i + 1).unwrap(),
                sent,
                dirtied,
                wire_bytes: sent * 4096,
                duration: Duration::from_millis(sent),
            };
            match d.after_iteration(&r) {
                Decision::Continue => {}
                stop => return (r.iteration, stop),
            }
        }
        (0, Decision::Continue)
    }

    #[test]
    fn xen_stops_at_few_pages_30_iterations_or_3x() {
        assert_eq!(
            run(Policy::XenDefault, None, 1000, &[(1000, 400), (400, 49)]),
            (2, Decision::Stop(StopReason::FewPagesLeft))
        );
        let plateau = vec![(500, 500); 40];
        assert_eq!(
            run(Policy::XenDefault, None, 100_000, &plateau),
            (30, Decision::Stop(StopReason::MaxIterations))
        );
        let heavy = vec![(1000, 1000); 40];
        assert_eq!(
            run(Policy::XenDefault, None, 1000, &heavy),
            (3, Decision::Stop(StopReason::MaxData))
        );
    }

    #[test]
    fn smart_waits_for_the_crossover_then_takes_a_local_minimum() {
        // Converging (dirtied < sent) until iteration 4; crossover at 4; then 300, 280: 280
        // is below everything since the crossover.
        let seq = [
            (10_000, 2000),
            (2000, 800),
            (800, 400),
            (400, 420),
            (420, 430),
            (430, 280),
        ];
        assert_eq!(
            run(Policy::Smart, None, 10_000, &seq),
            (6, Decision::Stop(StopReason::LocalMinimum))
        );
        // Xen keeps going on the same trace.
        assert_eq!(
            run(Policy::XenDefault, None, 10_000, &seq),
            (0, Decision::Continue)
        );
    }

    #[test]
    fn smart_gives_up_after_a_window_without_a_new_minimum() {
        let mut seq = vec![(10_000, 2000), (2000, 2100)];
        seq.extend([(2100, 2200); 10]);
        let (at, d) = run(Policy::Smart, None, 10_000, &seq);
        assert_eq!(d, Decision::Stop(StopReason::WindowExhausted));
        assert_eq!(at, 2 + u32::try_from(SMART_WINDOW).unwrap());
    }

    #[test]
    fn downtime_limit_stops_when_the_rest_fits() {
        // 1 page per ms: 300 pages take 300 ms.
        let seq = [(10_000, 2000), (2000, 900), (900, 300)];
        assert_eq!(
            run(
                Policy::Smart,
                Some(Duration::from_millis(350)),
                10_000,
                &seq
            ),
            (3, Decision::Stop(StopReason::DowntimeFits))
        );
        assert_eq!(
            run(
                Policy::Smart,
                Some(Duration::from_millis(250)),
                10_000,
                &seq
            ),
            (0, Decision::Continue)
        );
    }

    #[test]
    fn names_round_trip() {
        for p in [Policy::XenDefault, Policy::Smart] {
            assert_eq!(p.name().parse::<Policy>(), Ok(p));
        }
        assert!(
            "fast"
                .parse::<Policy>()
                .unwrap_err()
                .contains("smart or xen-default")
        );
    }
}

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
//! - `max_downtime` (either policy; `downtime_limit` is its old name): a ceiling on the
//!   pause. Pre-copy stops as soon as the predicted pause (what remains at the effective rate
//!   measured so far, plus the pause overhead the driver reports: state blob, verification)
//!   fits under it, and any other stop whose predicted pause exceeds it is refused: the
//!   guest keeps running, iterations go on (auto-converge throttles it, if on) until the
//!   pause fits, the completion timeout applies its action, or
//!   [`MAX_ITERATIONS_OVER_CEILING`] iterations after the first refused stop have passed (then
//!   the completion action applies too). So the ceiling wins over Smart Stop's choice of
//!   moment, and the bound on iterations still holds.
//! - The completion timeout (per GiB of guest) applies its action, `abort` or `force`,
//!   whatever the policy and the ceiling say; `force` pauses over the ceiling.

use std::collections::VecDeque;
use std::str::FromStr;
use std::time::Duration;

use super::converge::{
    CompletionAction, CompletionCause, CompletionNotice, ConvergeOptions,
    MAX_ITERATIONS_OVER_CEILING, Throttle,
};

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

/// What the pause costs besides the measured rate, as the driver estimates it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct PauseCosts {
    /// Wire bytes per remaining page. The pages left are the guest's hottest, often
    /// rewritten whole, so the average so far (iteration 1's zero pages, the deltas of
    /// cold pages) says too little; `None`: that average.
    pub page_bytes: Option<f64>,
    /// Bytes sealed but still queued before the link, and the state blob: they go out in
    /// the pause too.
    pub queued_bytes: u64,
    /// Time the pause costs besides sending (verification).
    pub time: Duration,
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
    /// Bytes that went on the wire while it ran (the measured rate's numerator).
    pub wire_bytes: u64,
    /// How long it took.
    pub duration: Duration,
    /// Time since the migration started, at its end.
    pub elapsed: Duration,
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
    /// The completion action `force` paused the guest, whatever the ceiling.
    Forced,
}

/// The decision after an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Run another iteration.
    Continue,
    /// Pause the guest and send what remains.
    Stop(StopReason),
    /// The completion action `abort` applies: the guest stays at the source.
    GiveUp(CompletionCause),
}

/// Stop policy state for one migration.
#[derive(Debug, Clone)]
pub struct StopDecider {
    policy: Policy,
    max_downtime: Option<Duration>,
    /// What the pause costs, as the driver estimates it.
    pause: PauseCosts,
    converge: ConvergeOptions,
    completion_timeout: Option<Duration>,
    /// The iteration whose stop the ceiling first refused.
    refused_at: Option<u32>,
    throttle: Throttle,
    /// The completion action, once it applied.
    applied: Option<CompletionNotice>,
    window: usize,
    guest_pages: u64,
    sent_total: u64,
    wire_total: u64,
    time_total: Duration,
    /// Set once an iteration dirtied at least as many pages as it sent.
    crossed_at: Option<u32>,
    /// Remaining pages of the last `window` iterations.
    recent: VecDeque<u64>,
    /// The last iteration reported.
    last_iteration: u32,
}

impl StopDecider {
    /// A decider for a guest of `guest_pages` pages.
    pub fn new(policy: Policy, max_downtime: Option<Duration>, guest_pages: u64) -> Self {
        StopDecider {
            policy,
            max_downtime,
            pause: PauseCosts::default(),
            converge: ConvergeOptions::default(),
            completion_timeout: None,
            refused_at: None,
            throttle: Throttle::default(),
            applied: None,
            window: SMART_WINDOW,
            guest_pages,
            sent_total: 0,
            wire_total: 0,
            time_total: Duration::ZERO,
            crossed_at: None,
            recent: VecDeque::new(),
            last_iteration: 0,
        }
    }

    /// With the operator's choices for a migration that does not converge.
    pub fn with_converge(mut self, converge: ConvergeOptions) -> Self {
        self.completion_timeout = converge.completion_timeout(self.guest_pages);
        self.converge = converge;
        self
    }

    /// What the pause will cost, as the driver now estimates it.
    pub fn set_pause_costs(&mut self, costs: PauseCosts) {
        self.pause = costs;
    }

    /// The pause predicted if the guest stopped with `pages` left: sending them (at
    /// [`PauseCosts::page_bytes`] each, else the average so far) and the queued bytes at the
    /// measured rate, plus the time besides. `None` before anything was measured.
    pub fn predicted_pause(&self, pages: u64) -> Option<Duration> {
        let rate = self.rate();
        let per_page = self
            .pause
            .page_bytes
            .unwrap_or_else(|| self.bytes_per_page());
        (rate > 0.0).then(|| {
            let bytes = pages as f64 * per_page + self.pause.queued_bytes as f64;
            Duration::from_secs_f64(bytes / rate) + self.pause.time
        })
    }

    /// Auto-converge's throttle now, percent (0: none).
    pub fn throttle_percent(&self) -> u8 {
        self.throttle.percent()
    }

    /// Stops throttling for good (the backend cannot).
    pub fn disable_throttle(&mut self) {
        self.converge.auto_converge = false;
        self.throttle = Throttle::default();
    }

    /// What `status` announces of the completion action at `elapsed` into the migration:
    /// the timeout's countdown, or the iterations left over the ceiling; after it applied,
    /// what it did.
    pub fn notice(&self, elapsed: Duration) -> Option<CompletionNotice> {
        if self.applied.is_some() {
            return self.applied;
        }
        let action = self.converge.completion_action;
        let over = self.refused_at.map(|_| CompletionNotice {
            action,
            cause: CompletionCause::OverCeiling,
            in_ms: None,
            iterations_left: Some(self.iterations_left_over_ceiling()),
            applied: false,
        });
        let timeout = self.completion_timeout.map(|t| CompletionNotice {
            action,
            cause: CompletionCause::Timeout,
            in_ms: Some(u64::try_from(t.saturating_sub(elapsed).as_millis()).unwrap_or(u64::MAX)),
            iterations_left: None,
            applied: false,
        });
        over.or(timeout)
    }

    fn iterations_left_over_ceiling(&self) -> u32 {
        self.refused_at.map_or(MAX_ITERATIONS_OVER_CEILING, |at| {
            (at + MAX_ITERATIONS_OVER_CEILING).saturating_sub(self.last_iteration)
        })
    }

    fn apply(&mut self, cause: CompletionCause) -> Decision {
        let action = self.converge.completion_action;
        self.applied = Some(CompletionNotice {
            action,
            cause,
            in_ms: None,
            iterations_left: None,
            applied: true,
        });
        match action {
            CompletionAction::Abort => Decision::GiveUp(cause),
            CompletionAction::Force => Decision::Stop(StopReason::Forced),
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

    /// True once the ceiling has refused a stop: pre-copy goes on only to bring the pause
    /// under it.
    pub fn over_ceiling(&self) -> bool {
        self.refused_at.is_some() && self.applied.is_none()
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
        self.last_iteration = r.iteration;
        // Iteration 1 sends everything, so it says nothing about the dirtying rate.
        if self.converge.auto_converge && r.iteration > 1 {
            self.throttle.after_iteration(r.sent, r.dirtied);
        }
        if self.completion_timeout.is_some_and(|t| r.elapsed >= t) {
            return self.apply(CompletionCause::Timeout);
        }
        let own = self.own_decision(r);
        let Some(ceiling) = self.max_downtime else {
            return own;
        };
        if let Decision::Stop(_) = own {
            if self
                .predicted_pause(r.dirtied)
                .is_some_and(|t| t <= ceiling)
            {
                return own;
            }
            self.refused_at.get_or_insert(r.iteration);
        }
        match self.refused_at {
            Some(first) if r.iteration >= first + MAX_ITERATIONS_OVER_CEILING => {
                self.apply(CompletionCause::OverCeiling)
            }
            _ => Decision::Continue,
        }
    }

    /// The policy's own decision, before the ceiling's say.
    fn own_decision(&mut self, r: &IterationReport) -> Decision {
        let remaining = r.dirtied;
        if remaining < XEN_MIN_REMAINING {
            return Decision::Stop(StopReason::FewPagesLeft);
        }
        if let Some(limit) = self.max_downtime
            && self.predicted_pause(remaining).is_some_and(|t| t <= limit)
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
                elapsed: Duration::ZERO,
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

    /// Feeds `seq` (sent, dirtied) with 1 page per ms, `step` of wall time per iteration.
    fn feed(d: &mut StopDecider, seq: &[(u64, u64)], step: Duration) -> (u32, Decision) {
        feed_from(d, 1, seq, step)
    }

    /// [`feed`], numbering iterations from `first`.
    fn feed_from(
        d: &mut StopDecider,
        first: u32,
        seq: &[(u64, u64)],
        step: Duration,
    ) -> (u32, Decision) {
        for (i, &(sent, dirtied)) in seq.iter().enumerate() {
            let iteration = first + u32::try_from(i).unwrap();
            let r = IterationReport {
                iteration,
                sent,
                dirtied,
                wire_bytes: sent * 4096,
                duration: Duration::from_millis(sent),
                elapsed: step * iteration,
            };
            match d.after_iteration(&r) {
                Decision::Continue => {}
                stop => return (iteration, stop),
            }
        }
        (0, Decision::Continue)
    }

    fn with(
        ceiling: Option<u64>,
        timeout_per_gib: Option<u64>,
        action: CompletionAction,
        pages: u64,
    ) -> StopDecider {
        StopDecider::new(Policy::Smart, ceiling.map(Duration::from_millis), pages).with_converge(
            ConvergeOptions {
                completion_timeout_per_gib: timeout_per_gib.map(Duration::from_secs),
                completion_action: action,
                auto_converge: true,
            },
        )
    }

    /// 1 GiB of pages.
    const GIB: u64 = (1 << 30) / 4096;

    #[test]
    fn the_ceiling_refuses_smart_stops_that_do_not_fit_then_stops_when_one_does() {
        // Smart Stop alone stops at 6 with 280 pages (280 ms at 1 page per ms).
        let mut seq = vec![
            (10_000, 2000),
            (2000, 800),
            (800, 400),
            (400, 420),
            (420, 430),
            (430, 280),
        ];
        let mut d = with(Some(200), None, CompletionAction::Abort, GIB);
        assert_eq!(feed(&mut d, &seq, Duration::ZERO), (0, Decision::Continue));
        // Still over at 7, then 150 pages fit under 200 ms.
        seq.extend([(280, 260), (260, 150)]);
        let mut d = with(Some(200), None, CompletionAction::Abort, GIB);
        assert_eq!(
            feed(&mut d, &seq, Duration::ZERO),
            (8, Decision::Stop(StopReason::DowntimeFits))
        );
        // The pause overhead counts: 150 ms of pages, 30 ms of queued bytes and 30 ms of
        // verification do not fit.
        let mut d = with(Some(200), None, CompletionAction::Abort, GIB);
        d.set_pause_costs(PauseCosts {
            page_bytes: None,
            queued_bytes: 4096 * 30,
            time: Duration::from_millis(30),
        });
        assert_eq!(feed(&mut d, &seq, Duration::ZERO), (0, Decision::Continue));
        assert_eq!(
            d.notice(Duration::ZERO).map(|n| n.cause),
            Some(CompletionCause::OverCeiling)
        );
    }

    #[test]
    fn the_ceiling_keeps_the_bound_on_iterations_by_applying_the_action() {
        // Never converges; Smart Stop gives up after its window at iteration 2 + 5 = 7, the
        // ceiling refuses, and 30 iterations later the completion action applies.
        let mut seq = vec![(10_000, 2000), (2000, 2100)];
        seq.extend([(2100, 2200); 100]);
        let refused = 2 + u32::try_from(SMART_WINDOW).unwrap();
        let bound = refused + MAX_ITERATIONS_OVER_CEILING;
        let mut d = with(Some(100), None, CompletionAction::Abort, GIB);
        assert_eq!(
            feed(&mut d, &seq, Duration::ZERO),
            (bound, Decision::GiveUp(CompletionCause::OverCeiling))
        );
        assert!(d.notice(Duration::ZERO).unwrap().applied);
        let mut d = with(Some(100), None, CompletionAction::Force, GIB);
        assert_eq!(
            feed(&mut d, &seq, Duration::ZERO),
            (bound, Decision::Stop(StopReason::Forced))
        );
        // Without a ceiling Smart Stop's own bound stands.
        assert_eq!(
            run(Policy::Smart, None, GIB, &seq),
            (refused, Decision::Stop(StopReason::WindowExhausted))
        );
    }

    #[test]
    fn the_completion_timeout_is_announced_then_applies_its_action() {
        // 2 s per GiB on a quarter-GiB guest: 500 ms; 100 ms per iteration.
        let seq = vec![(10_000, 9000); 20];
        let mut d = with(Some(1), Some(2), CompletionAction::Abort, GIB / 4);
        let before = d.notice(Duration::from_millis(100)).unwrap();
        assert_eq!(before.cause, CompletionCause::Timeout);
        assert_eq!(before.in_ms, Some(400));
        assert!(!before.applied);
        assert_eq!(
            feed(&mut d, &seq, Duration::from_millis(100)),
            (5, Decision::GiveUp(CompletionCause::Timeout))
        );
        assert!(d.notice(Duration::from_secs(1)).unwrap().applied);
        let mut d = with(Some(1), Some(2), CompletionAction::Force, GIB / 4);
        assert_eq!(
            feed(&mut d, &seq, Duration::from_millis(100)),
            (5, Decision::Stop(StopReason::Forced))
        );
        // No ceiling and no timeout: Xen's 3x memory bound still ends it.
        let mut d = with(None, None, CompletionAction::Abort, 10_000);
        assert_eq!(
            feed(&mut d, &seq, Duration::from_millis(100)),
            (3, Decision::Stop(StopReason::MaxData))
        );
        assert_eq!(d.notice(Duration::ZERO), None);
    }

    #[test]
    fn auto_converge_throttles_while_dirtying_outpaces_sending() {
        let mut d = with(Some(1), None, CompletionAction::Abort, GIB);
        let seq = [(10_000, 3000), (3000, 3000), (3000, 3100), (3100, 3000)];
        feed(&mut d, &seq, Duration::ZERO);
        assert_eq!(d.throttle_percent(), 20);
        feed_from(&mut d, 5, &[(3000, 3000); 2], Duration::ZERO);
        assert_eq!(d.throttle_percent(), 30);
        d.disable_throttle();
        assert_eq!(d.throttle_percent(), 0);
        // Off: never.
        let mut d = StopDecider::new(Policy::Smart, None, GIB);
        feed(&mut d, &seq, Duration::ZERO);
        assert_eq!(d.throttle_percent(), 0);
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

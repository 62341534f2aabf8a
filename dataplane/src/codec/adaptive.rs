//! `compression = "auto"`: compress only while the link, not the CPU, is the bottleneck.
//!
//! CloudNet measured (VI-K, Fig. 18) that a compressed tunnel sends the least data but
//! finishes later than CBR, because compression ate the CPU the migration needed. Whether
//! compression pays depends on which resource is short, and that changes as a migration runs
//! (iteration 1 is bulk literal data, later ones deltas; neighbours come and go). So the
//! source measures, in windows of a fraction of a second:
//!
//! - the **send stage**: time spent waiting for the link (rate limiter, full socket) against
//!   time spent with nothing to send (starved: the stages before it are slower);
//! - the **compress step**: its CPU time, bytes in and bytes out (its cost and ratio);
//! - the **CPU**: how busy the busiest source pipeline thread was, and how many cores of the
//!   host stood idle (or ran only others' niced background work);
//! - **goodput**: guest bytes sent per second.
//!
//! and climbs a ladder `off -> lz4 -> zstd1 -> zstd3`, as many rungs at once as fit, while the
//! send stage waits on the link and the predicted extra CPU fits in what is idle; it steps
//! down one rung when the send stage starves with the CPU busy and goodput fell below what
//! the rung below achieved, and to off when compression saves too little. Each step down for CPU doubles the
//! wait before the next climb (2 s up to 60 s), so a wrong guess costs little.
//!
//! This module is sans-IO: [`Controller::observe`] takes a [`Window`] of measurements and
//! returns the level to run; a thread in the source pipeline feeds it. [`Dial`] is where the
//! decision and the compress step's own counters meet between threads.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use super::compress::{Compressed, Level};

/// The level in force and the compress step's counters, shared by the controller's thread and
/// every stream's encoder (atomics: one load per frame on the hot path, three adds when a
/// frame is compressed).
#[derive(Debug, Default)]
pub struct Dial {
    /// 0: off; otherwise 1 + the index in [`Level::ALL`].
    level: AtomicU8,
    compress_in: AtomicU64,
    compress_out: AtomicU64,
    compress_ns: AtomicU64,
}

/// The compress step's counters since the start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompressTotals {
    /// Body bytes offered to the compressor.
    pub bytes_in: u64,
    /// Bytes that went on (the compressed size, or the original when it did not shrink).
    pub bytes_out: u64,
    /// Time spent compressing, summed over streams.
    pub nanos: u64,
}

impl Dial {
    /// The level frames get now (`None`: off).
    pub fn level(&self) -> Option<Level> {
        match self.level.load(Ordering::Relaxed) {
            0 => None,
            n => Level::ALL.get(usize::from(n) - 1).copied(),
        }
    }

    /// Sets the level frames get from now on.
    pub fn set(&self, level: Option<Level>) {
        let n = level.map_or(0, |l| u8::try_from(l.index() + 1).expect("three levels"));
        self.level.store(n, Ordering::Relaxed);
    }

    /// Records one frame's compression and what it cost.
    pub fn record(&self, c: Compressed, took: Duration) {
        self.compress_in
            .fetch_add(c.before as u64, Ordering::Relaxed);
        self.compress_out
            .fetch_add(c.after as u64, Ordering::Relaxed);
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.compress_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Counters since the start.
    pub fn totals(&self) -> CompressTotals {
        CompressTotals {
            bytes_in: self.compress_in.load(Ordering::Relaxed),
            bytes_out: self.compress_out.load(Ordering::Relaxed),
            nanos: self.compress_ns.load(Ordering::Relaxed),
        }
    }
}

/// What happened during one window, as differences of the counters at its ends.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    /// Length of the window.
    pub elapsed: Duration,
    /// Time the send stage waited for the link: for the rate limit, or for a socket to take
    /// bytes.
    pub link_wait: Duration,
    /// Time the send stage had no frame to send.
    pub starved: Duration,
    /// Bytes written to the sockets.
    pub wire_bytes: u64,
    /// Guest memory read for sending (pages x 4 KiB).
    pub guest_bytes: u64,
    /// Body bytes offered to the compressor.
    pub compress_in: u64,
    /// Bytes that came out of it.
    pub compress_out: u64,
    /// CPU time spent compressing, summed over streams.
    pub compress_time: Duration,
    /// CPU share (0..=1) of the busiest source pipeline thread.
    pub busiest_thread: f64,
    /// Host cores the migration could have had, on average (e.g. 1.4 of 2): idle, or running
    /// other processes' niced background work.
    pub idle_cpus: f64,
}

/// The controller's thresholds. The defaults are reasoned, not fitted: see each field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tuning {
    /// Link-bound: the send stage waits on the link at least this share of the window...
    pub link_wait_min: f64,
    /// ...and starves at most this share (otherwise it is waiting for the CPU stages).
    pub starved_max: f64,
    /// CPU-bound: the send stage starves at least this share of the window, while...
    pub cpu_starved_min: f64,
    /// ...the busiest stage thread runs at least this share (one stage is saturated), or
    /// fewer than `idle_min` cores are idle (the machine is).
    pub busy_max: f64,
    /// See `busy_max`.
    pub idle_min: f64,
    /// A climb must leave the busiest thread at most this busy...
    pub busy_after_max: f64,
    /// ...and find idle cores for at least this multiple of its extra CPU (the destination
    /// decompresses too, and measurements are noisy).
    pub headroom: f64,
    /// Below this saving (1 - out/in) compression is not worth its CPU: back to off.
    pub min_saving: f64,
    /// Step down when goodput falls below this share of the rung below's.
    pub goodput_margin: f64,
    /// First wait before climbing again after a step down for CPU.
    pub backoff_min: Duration,
    /// Longest such wait.
    pub backoff_max: Duration,
    /// Windows ignored after a change (frames already queued still carry the old level).
    pub settle_windows: u32,
    /// Windows shorter than this, or with less compressor input than `min_sample` bytes,
    /// teach nothing about cost and ratio.
    pub min_window: Duration,
    /// See `min_window`.
    pub min_sample: u64,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            link_wait_min: 0.5,
            starved_max: 0.2,
            cpu_starved_min: 0.25,
            busy_max: 0.9,
            idle_min: 0.2,
            busy_after_max: 0.8,
            headroom: 1.5,
            min_saving: 0.03,
            goodput_margin: 0.97,
            backoff_min: Duration::from_secs(2),
            backoff_max: Duration::from_secs(60),
            settle_windows: 1,
            min_window: Duration::from_millis(50),
            min_sample: 256 << 10,
        }
    }
}

/// Priors for a level never run yet: CPU seconds per input byte and out/in ratio, measured
/// on skyferry's frames of the `kernel` model's memory with `skyferry-bench compress --quick
/// --levels-only` (2 vCPU AMD EPYC, shared and loaded; thread CPU time: lz4 0.24-0.29 GB/s,
/// zstd1 0.18-0.19, zstd3 0.12-0.15; ratios 0.607, 0.471, 0.433). They only decide the first
/// climb to each rung; measured values replace them.
const PRIOR_COST: [f64; 3] = [1.0 / 0.25e9, 1.0 / 0.18e9, 1.0 / 0.13e9];
/// See [`PRIOR_COST`].
const PRIOR_RATIO: [f64; 3] = [0.61, 0.47, 0.43];

/// Why the controller changed level (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The link is the bottleneck and the CPU has room for the next rung.
    LinkBound,
    /// Compression saves too little to be worth its CPU.
    SavesTooLittle,
    /// The CPU became the bottleneck and goodput fell below the rung below's.
    CpuBound,
}

/// A change of level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    /// The level from now on.
    pub level: Option<Level>,
    /// Why.
    pub reason: Reason,
}

/// The adaptive controller; one per migration (the link and the CPU are shared by its
/// streams).
#[derive(Debug, Clone)]
pub struct Controller {
    tuning: Tuning,
    streams: f64,
    level: Option<Level>,
    /// Measured CPU seconds per input byte, per level.
    cost: [Option<f64>; 3],
    /// Measured out/in, per level.
    ratio: [Option<f64>; 3],
    /// Goodput (guest bytes/s) while link-bound, per rung (0: off).
    goodput: [Option<f64>; 4],
    clock: Duration,
    hold_until: Duration,
    backoff: Duration,
    last_cpu_step: Duration,
    settle: u32,
}

fn ewma(old: Option<f64>, new: f64) -> f64 {
    old.map_or(new, |o| 0.7 * o + 0.3 * new)
}

fn rung(level: Option<Level>) -> usize {
    level.map_or(0, |l| l.index() + 1)
}

impl Controller {
    /// A controller for a migration of `streams` streams, starting with compression off.
    pub fn new(streams: usize, tuning: Tuning) -> Self {
        Controller {
            streams: streams.max(1) as f64,
            level: None,
            cost: [None; 3],
            ratio: [None; 3],
            goodput: [None; 4],
            clock: Duration::ZERO,
            hold_until: Duration::ZERO,
            backoff: tuning.backoff_min,
            last_cpu_step: Duration::ZERO,
            settle: 0,
            tuning,
        }
    }

    /// The level in force.
    pub fn level(&self) -> Option<Level> {
        self.level
    }

    /// Measured cost (CPU seconds per input byte) and ratio of `level`, once it has run.
    pub fn measured(&self, level: Level) -> (Option<f64>, Option<f64>) {
        (self.cost[level.index()], self.ratio[level.index()])
    }

    /// Takes one window's measurements; returns a step when the level changes.
    pub fn observe(&mut self, w: &Window) -> Option<Step> {
        let t = &self.tuning;
        self.clock += w.elapsed;
        // An idle window (between iterations, or a stall) says nothing about bottlenecks.
        if w.elapsed < t.min_window || (w.wire_bytes == 0 && w.guest_bytes == 0) {
            return None;
        }
        let secs = w.elapsed.as_secs_f64();
        if let Some(l) = self.level
            && w.compress_in >= t.min_sample
        {
            let i = l.index();
            let cost = w.compress_time.as_secs_f64() / w.compress_in as f64;
            let ratio = w.compress_out as f64 / w.compress_in as f64;
            self.cost[i] = Some(ewma(self.cost[i], cost));
            self.ratio[i] = Some(ewma(self.ratio[i], ratio));
        }
        if self.settle > 0 {
            self.settle -= 1;
            return None;
        }
        let link = w.link_wait.as_secs_f64() / secs;
        let starved = w.starved.as_secs_f64() / secs;
        let goodput = w.guest_bytes as f64 / secs;
        let link_bound = link >= t.link_wait_min && starved <= t.starved_max;
        let cpu_bound = starved >= t.cpu_starved_min
            && (w.busiest_thread >= t.busy_max || w.idle_cpus < t.idle_min);
        let r = rung(self.level);
        if link_bound {
            self.goodput[r] = Some(ewma(self.goodput[r], goodput));
        }
        if self.clock.saturating_sub(self.last_cpu_step) > 15 * self.tuning.backoff_min {
            // Long enough without trouble: forget the old penalties.
            self.backoff = self.tuning.backoff_min;
        }

        if let Some(level) = self.level {
            if self.ratio[level.index()].is_some_and(|r| 1.0 - r < t.min_saving) {
                return Some(self.step_down(None, Reason::SavesTooLittle));
            }
            // Against the nearest rung below that ran link-bound (off always has, before
            // the first climb).
            let below = self.goodput[..r].iter().rev().flatten().next();
            if cpu_bound && below.is_none_or(|&b| goodput < b * t.goodput_margin) {
                let below = Level::ALL[..level.index()].last().copied();
                return Some(self.step_down(below, Reason::CpuBound));
            }
        }
        if !link_bound || self.clock < self.hold_until {
            return None;
        }
        // As high as the CPU affords in one step: every window spent below the right rung
        // sends bytes that compression would have saved.
        let top = Level::ALL[r..]
            .iter()
            .take_while(|&&l| self.affordable(l, w))
            .last()
            .copied()?;
        self.level = Some(top);
        self.settle = self.tuning.settle_windows;
        Some(Step {
            level: self.level,
            reason: Reason::LinkBound,
        })
    }

    /// Would running `next` instead of the current level fit in the CPU that is idle?
    fn affordable(&self, next: Level, w: &Window) -> bool {
        let t = &self.tuning;
        let secs = w.elapsed.as_secs_f64();
        let i = next.index();
        let ratio = self.ratio[i].unwrap_or(PRIOR_RATIO[i]).clamp(0.05, 1.0);
        let cost = self.cost[i].unwrap_or(PRIOR_COST[i]);
        // Still link-bound after the climb, the link carries what it carries now, so the
        // compressor must take in wire rate / ratio.
        let wire_rate = w.wire_bytes as f64 / secs;
        let need_next = wire_rate / ratio * cost;
        let need_now = w.compress_time.as_secs_f64() / secs;
        let extra = (need_next - need_now).max(0.0);
        w.busiest_thread + extra / self.streams <= t.busy_after_max
            && w.idle_cpus >= t.headroom * extra
    }

    fn step_down(&mut self, to: Option<Level>, reason: Reason) -> Step {
        self.level = to;
        self.settle = self.tuning.settle_windows;
        if reason == Reason::CpuBound {
            self.last_cpu_step = self.clock;
        }
        self.hold_until = self.clock + self.backoff;
        self.backoff = (self.backoff * 2).min(self.tuning.backoff_max);
        Step { level: to, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS250: Duration = Duration::from_millis(250);

    /// A 100 Mb/s link, saturated, with an idle CPU: the send stage waits on the limiter.
    fn link_bound(level: Option<Level>, ratio: f64) -> Window {
        let wire = 12_500_000 / 4; // a quarter second at 12.5 MB/s
        let input = if level.is_some() {
            crate::guest::workload::round_u64(wire as f64 / ratio)
        } else {
            0
        };
        let cost = level.map_or(0.0, |l| PRIOR_COST[l.index()]);
        Window {
            elapsed: MS250,
            link_wait: Duration::from_millis(220),
            starved: Duration::from_millis(5),
            wire_bytes: wire,
            guest_bytes: if level.is_some() { input } else { wire } * 2,
            compress_in: input,
            compress_out: wire,
            compress_time: Duration::from_secs_f64(input as f64 * cost),
            busiest_thread: 0.1,
            idle_cpus: 1.6,
        }
    }

    /// An unconstrained link on a saturated host: the destination is slow, so the socket
    /// fills and the send stage waits on it, but no core is idle.
    fn fast_link_busy_host() -> Window {
        Window {
            elapsed: MS250,
            link_wait: Duration::from_millis(150),
            starved: Duration::from_millis(60),
            wire_bytes: 300_000_000,
            guest_bytes: 400_000_000,
            busiest_thread: 0.85,
            idle_cpus: 0.05,
            ..Window::default()
        }
    }

    fn run(c: &mut Controller, w: impl Fn(Option<Level>) -> Window, n: usize) -> Vec<Step> {
        (0..n).filter_map(|_| c.observe(&w(c.level()))).collect()
    }

    #[test]
    fn a_saturated_link_with_idle_cpu_climbs_to_the_top_rung() {
        let mut c = Controller::new(1, Tuning::default());
        let steps = run(&mut c, |l| link_bound(l, 0.5), 20);
        // In one step: every rung fits in the idle CPU.
        assert_eq!(
            steps,
            [Step {
                level: Some(Level::Zstd3),
                reason: Reason::LinkBound
            }]
        );
    }

    #[test]
    fn a_cpu_bound_run_never_turns_compression_on() {
        let mut c = Controller::new(2, Tuning::default());
        assert!(run(&mut c, |_| fast_link_busy_host(), 200).is_empty());
        assert_eq!(c.level(), None);
    }

    #[test]
    fn a_starved_send_stage_is_not_link_bound() {
        // The encoder is the bottleneck: the send stage waits for frames, the link idles.
        let mut c = Controller::new(1, Tuning::default());
        let w = Window {
            link_wait: Duration::from_millis(20),
            starved: Duration::from_millis(200),
            busiest_thread: 1.0,
            idle_cpus: 1.0,
            ..link_bound(None, 1.0)
        };
        assert!(run(&mut c, |_| w, 50).is_empty());
    }

    #[test]
    fn no_climb_when_the_next_rung_would_saturate_a_thread() {
        // A 1 Gb/s link: the stream thread has room for lz4 but not for zstd1 on top.
        let rate = 125e6;
        let need = |i: usize| rate / PRIOR_RATIO[i] * PRIOR_COST[i];
        let busy_off = 0.8 - need(0) - 0.01;
        assert!(
            busy_off + need(1) > 0.8,
            "zstd1 must cost more than lz4 for this test"
        );
        let mut c = Controller::new(1, Tuning::default());
        let steps = run(
            &mut c,
            |l| {
                let mut w = link_bound(l, PRIOR_RATIO[l.map_or(0, |l| l.index())]);
                let scale = 10; // from 100 Mb/s to 1 Gb/s
                w.wire_bytes *= scale;
                w.guest_bytes *= scale;
                w.compress_in *= scale;
                w.compress_out *= scale;
                w.compress_time *= 10;
                w.busiest_thread = busy_off + l.map_or(0.0, |l| need(l.index()));
                w
            },
            40,
        );
        assert_eq!(steps.len(), 1, "{steps:?}");
        assert_eq!(c.level(), Some(Level::Lz4));
    }

    #[test]
    fn no_climb_without_idle_cores() {
        let mut c = Controller::new(1, Tuning::default());
        let steps = run(
            &mut c,
            |l| Window {
                idle_cpus: 0.01,
                ..link_bound(l, 0.5)
            },
            40,
        );
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn incompressible_data_turns_it_off_and_waits_before_trying_again() {
        let mut c = Controller::new(1, Tuning::default());
        let mut steps = Vec::new();
        for _ in 0..8 {
            steps.extend(c.observe(&link_bound(c.level(), 0.99)));
        }
        assert!(steps[0].level.is_some());
        assert_eq!(
            steps[1],
            Step {
                level: None,
                reason: Reason::SavesTooLittle
            }
        );
        // Held off for the backoff (2 s = 8 windows) after the first try...
        assert_eq!(steps.len(), 2, "{steps:?}");
        // ...then it tries again, and backs off longer each time it fails.
        let more = run(&mut c, |l| link_bound(l, 0.99), 80);
        let tries = more.iter().filter(|s| s.level.is_some()).count();
        assert!((2..=4).contains(&tries), "{more:?}");
    }

    #[test]
    fn cpu_trouble_steps_down_one_rung_when_goodput_drops() {
        let mut c = Controller::new(1, Tuning::default());
        run(&mut c, |l| link_bound(l, 0.5), 20);
        assert_eq!(c.level(), Some(Level::Zstd3));
        // Neighbours take the CPU: the stream thread saturates, the send stage starves and
        // goodput falls below what zstd1 achieved.
        let squeezed = Window {
            link_wait: Duration::from_millis(30),
            starved: Duration::from_millis(150),
            busiest_thread: 0.98,
            idle_cpus: 0.0,
            guest_bytes: 5_000_000,
            ..link_bound(Some(Level::Zstd3), 0.45)
        };
        let step = c.observe(&squeezed).expect("steps down");
        assert_eq!(
            step,
            Step {
                level: Some(Level::Zstd1),
                reason: Reason::CpuBound
            }
        );
    }

    #[test]
    fn cpu_bound_but_still_ahead_of_the_rung_below_stays() {
        let mut c = Controller::new(1, Tuning::default());
        run(&mut c, |l| link_bound(l, 0.3), 20);
        assert_eq!(c.level(), Some(Level::Zstd3));
        let busy_but_fast = Window {
            starved: Duration::from_millis(100),
            busiest_thread: 0.95,
            idle_cpus: 0.1,
            // Well above the ~zstd1 goodput recorded while link-bound.
            guest_bytes: 60_000_000,
            ..link_bound(Some(Level::Zstd3), 0.3)
        };
        assert!(run(&mut c, |_| busy_but_fast, 20).is_empty());
    }

    #[test]
    fn after_a_cpu_step_down_the_measured_cost_keeps_it_down() {
        let mut c = Controller::new(1, Tuning::default());
        // zstd3 turns out ten times dearer than its prior: the stream thread saturates.
        let w = |l: Option<Level>| {
            let mut w = link_bound(l, 0.5);
            if l == Some(Level::Zstd3) {
                w.compress_time *= 10;
                w.busiest_thread = 0.99;
                w.starved = Duration::from_millis(120);
                w.link_wait = Duration::from_millis(50);
                w.idle_cpus = 0.9;
                w.guest_bytes /= 3;
            }
            w
        };
        let steps = run(&mut c, w, 400);
        let downs = steps
            .iter()
            .filter(|s| s.reason == Reason::CpuBound)
            .count();
        assert_eq!(downs, 1, "{steps:?}");
        assert_eq!(c.level(), Some(Level::Zstd1));
        assert!(c.measured(Level::Zstd3).0.unwrap() > 5.0 * PRIOR_COST[2]);
    }

    #[test]
    fn idle_windows_teach_nothing() {
        let mut c = Controller::new(1, Tuning::default());
        let idle = Window {
            elapsed: MS250,
            idle_cpus: 2.0,
            ..Window::default()
        };
        assert!(run(&mut c, |_| idle, 100).is_empty());
        let short = Window {
            elapsed: Duration::from_millis(10),
            ..link_bound(None, 0.5)
        };
        assert!(run(&mut c, |_| short, 100).is_empty());
    }

    #[test]
    fn the_dial_carries_levels_and_counts() {
        let d = Dial::default();
        assert_eq!(d.level(), None);
        for l in Level::ALL {
            d.set(Some(l));
            assert_eq!(d.level(), Some(l));
        }
        d.set(None);
        assert_eq!(d.level(), None);
        d.record(
            Compressed {
                before: 100,
                after: 40,
            },
            Duration::from_nanos(7),
        );
        d.record(
            Compressed {
                before: 10,
                after: 10,
            },
            Duration::from_nanos(3),
        );
        assert_eq!(
            d.totals(),
            CompressTotals {
                bytes_in: 110,
                bytes_out: 50,
                nanos: 10
            }
        );
    }
}

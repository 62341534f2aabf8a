//! The thread behind `compression = "auto"`: every quarter second it reads what the send
//! stage, the compress step, the source's pipeline threads and the host did, and lets the
//! controller (`codec::adaptive`, sans-IO) set the level every encoder follows.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::PipelineError;
use crate::codec::adaptive::{Controller, Dial, Tuning, Window};
use crate::page::PAGE_SIZE;
use crate::transport::SendMeter;

/// Window length: long enough for the 10 ms resolution of thread CPU times, short enough to
/// follow an iteration's phases.
const TICK: Duration = Duration::from_millis(250);

/// Names of the source pipeline's threads (`/proc` shows 15 bytes of a name).
const SOURCE_THREADS: [&str; 3] = ["sf-scan", "sf-encode", "sf-send"];

/// Linux reports CPU times in /proc in USER_HZ ticks, 100 per second on every architecture
/// it runs on (a fixed ABI value, unlike the kernel's HZ).
const TICKS_PER_SEC: f64 = 100.0;

/// The counters the controller's windows are differences of.
#[derive(Debug, Clone)]
pub(super) struct Probes {
    /// Where the level is set and compression is accounted.
    pub dial: Arc<Dial>,
    /// The send stage's waits.
    pub meter: Arc<SendMeter>,
    /// Bytes written to the sockets.
    pub wire: Arc<AtomicU64>,
    /// Pages read from the guest.
    pub scanned: Arc<AtomicU64>,
}

struct Snapshot {
    at: Instant,
    link_wait_ns: u64,
    starved_ns: u64,
    wire: u64,
    scanned: u64,
    compress: crate::codec::adaptive::CompressTotals,
}

impl Snapshot {
    fn take(p: &Probes) -> Self {
        Snapshot {
            at: Instant::now(),
            link_wait_ns: p.meter.link_wait_ns.load(Ordering::Relaxed),
            starved_ns: p.meter.starved_ns.load(Ordering::Relaxed),
            wire: p.wire.load(Ordering::Relaxed),
            scanned: p.scanned.load(Ordering::Relaxed),
            compress: p.dial.totals(),
        }
    }
}

/// Runs the controller until `stop` is dropped.
pub(super) fn run(
    probes: &Probes,
    streams: usize,
    stop: &Receiver<()>,
) -> Result<(), PipelineError> {
    let mut controller = Controller::new(streams, Tuning::default());
    let mut cpu = CpuSampler::default();
    cpu.sample();
    let mut last = Snapshot::take(probes);
    loop {
        match stop.recv_timeout(TICK) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return Ok(()),
        }
        let now = Snapshot::take(probes);
        let (busiest_thread, idle_cpus) = cpu.sample();
        let ns = |a: u64, b: u64| Duration::from_nanos(a.saturating_sub(b));
        let window = Window {
            elapsed: now.at - last.at,
            link_wait: ns(now.link_wait_ns, last.link_wait_ns),
            starved: ns(now.starved_ns, last.starved_ns),
            wire_bytes: now.wire - last.wire,
            guest_bytes: (now.scanned - last.scanned) * PAGE_SIZE as u64,
            compress_in: now.compress.bytes_in - last.compress.bytes_in,
            compress_out: now.compress.bytes_out - last.compress.bytes_out,
            compress_time: ns(now.compress.nanos, last.compress.nanos),
            busiest_thread,
            idle_cpus,
        };
        if let Some(step) = controller.observe(&window) {
            probes.dial.set(step.level);
            tracing::info!(
                level = step.level.map_or("off", |l| l.setting().name()),
                reason = ?step.reason,
                "auto compression"
            );
        }
        tracing::debug!(?window, "auto compression window");
        last = now;
    }
}

/// CPU use since the previous sample, from /proc: the busiest source pipeline thread (share
/// of one core) and the host cores a normal-priority migration could have: idle, or running
/// niced background work (which the scheduler gives way to us at weight 1024 against 15 for
/// nice 19), but never our own work when this process is niced itself.
#[derive(Debug, Default)]
struct CpuSampler {
    at: Option<Instant>,
    /// (tid, user + system ticks) at the previous sample.
    threads: Vec<(u32, u64)>,
    /// Host (available, total) jiffies and this process's ticks at the previous sample.
    host: Option<(HostJiffies, u64)>,
}

impl CpuSampler {
    fn sample(&mut self) -> (f64, f64) {
        let now = Instant::now();
        let secs = self.at.map(|t| (now - t).as_secs_f64());
        self.at = Some(now);

        let threads = source_threads();
        let mut busiest = 0.0f64;
        if let Some(secs) = secs.filter(|s| *s > 0.0) {
            for (tid, ticks) in &threads {
                if let Some((_, before)) = self.threads.iter().find(|(t, _)| t == tid) {
                    let share = ticks.saturating_sub(*before) as f64 / TICKS_PER_SEC / secs;
                    busiest = busiest.max(share.min(1.0));
                }
            }
        }
        self.threads = threads;

        let own = std::fs::read_to_string("/proc/self/stat").ok();
        let own_ticks = own.as_deref().and_then(cpu_ticks).unwrap_or(0);
        let niced = own.as_deref().and_then(nice_value).unwrap_or(0) > 0;
        let host = host_jiffies().map(|h| (h, own_ticks));
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        let idle = match (self.host, host) {
            (Some((h0, o0)), Some((h1, o1))) if h1.total > h0.total => {
                let mut free = (h1.idle - h0.idle) + (h1.nice - h0.nice);
                if niced {
                    // Our own niced work shows as nice time: it is not spare.
                    free = free.saturating_sub(o1.saturating_sub(o0));
                }
                free as f64 / (h1.total - h0.total) as f64 * cpus
            }
            // Unknown: claim nothing idle, so `auto` never compresses on a guess.
            _ => 0.0,
        };
        self.host = host;
        (busiest, idle.min(cpus))
    }
}

/// (tid, user + system ticks) of this process's source pipeline threads.
fn source_threads() -> Vec<(u32, u64)> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let tid: u32 = e.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        if !SOURCE_THREADS
            .iter()
            .any(|p| comm.trim_end().starts_with(p))
        {
            return None;
        }
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        Some((tid, cpu_ticks(&stat)?))
    })
    .collect()
}

/// utime + stime from a /proc/.../stat line (fields 14 and 15; the name in field 2 may
/// hold spaces, so count from its closing parenthesis).
fn cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Jiffies summed over all CPUs since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HostJiffies {
    /// Idle and iowait.
    idle: u64,
    /// Running niced processes.
    nice: u64,
    /// Everything.
    total: u64,
}

/// The first line of /proc/stat.
fn host_jiffies() -> Option<HostJiffies> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_host(stat.lines().next()?)
}

fn parse_host(line: &str) -> Option<HostJiffies> {
    let mut f = line.split_whitespace();
    if f.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let v: Vec<u64> = f.take(8).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    Some(HostJiffies {
        idle: v.get(3)? + v.get(4)?,
        nice: *v.get(1)?,
        total: v.iter().sum(),
    })
}

/// The nice value from a /proc/.../stat line (field 19).
fn nice_value(stat: &str) -> Option<i64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(16)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_lines_parse() {
        let stat = "1234 (sf-encode 0) R 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 19 1";
        assert_eq!(cpu_ticks(stat), Some(281));
        assert_eq!(nice_value(stat), Some(19));
        assert_eq!(cpu_ticks("garbage"), None);
        let host = "cpu  1149466 9679 111640 780522 105369 0 6103 81314 0 0";
        assert_eq!(
            parse_host(host),
            Some(HostJiffies {
                idle: 780522 + 105369,
                nice: 9679,
                total: 1149466 + 9679 + 111640 + 780522 + 105369 + 6103 + 81314
            })
        );
        assert_eq!(parse_host("cpu0 1 2 3 4 5 6 7 8"), None);
    }

    #[test]
    fn this_thread_is_seen_when_named_like_a_stage() {
        let t = std::thread::Builder::new()
            .name("sf-encode-9".into())
            .spawn(|| {
                let mine = source_threads();
                assert!(!mine.is_empty(), "the stage-named thread itself is listed");
            })
            .unwrap();
        t.join().unwrap();
        let mut s = CpuSampler::default();
        s.sample();
        let (busiest, idle) = s.sample();
        assert!((0.0..=1.0).contains(&busiest));
        assert!(idle >= 0.0);
    }
}

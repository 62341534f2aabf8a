//! What a process costs: CPU time (getrusage) and resident memory (sampled from /proc).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::resource::{UsageWho, getrusage};

/// CPU seconds (user + system) this process has used so far, all threads.
pub fn cpu_seconds() -> f64 {
    let u = getrusage(UsageWho::RUSAGE_SELF).expect("getrusage(RUSAGE_SELF) cannot fail");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// One reading of /proc/PID/status, in KiB.
#[derive(Debug, Default, Clone, Copy)]
struct Rss {
    total: u64,
    shmem: u64,
    hwm: u64,
}

fn read_rss(pid: u32) -> Option<Rss> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let mut r = Rss::default();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(key), Some(v)) = (it.next(), it.next().and_then(|v| v.parse().ok())) else {
            continue;
        };
        match key {
            "VmRSS:" => r.total = v,
            "RssShmem:" => r.shmem = v,
            "VmHWM:" => r.hwm = v,
            _ => {}
        }
    }
    Some(r)
}

/// Peak memory of a child, as far as sampling saw it.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct PeakRss {
    /// Peak of resident memory minus shared memory, MiB: the process's own memory. Guest
    /// memory lives in shared memory (a memfd, like a hypervisor's guest RAM), so this is
    /// what skyferry itself holds, whatever the guest's size.
    pub own_mib: f64,
    /// The kernel's high-water mark of all resident memory (guest memory included), MiB.
    pub hwm_mib: f64,
}

/// Samples a process's /proc/PID/status every 10 ms until stopped.
#[derive(Debug)]
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<PeakRss>,
}

impl RssSampler {
    /// Starts sampling `pid`.
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut own, mut hwm) = (0u64, 0u64);
            loop {
                let done = flag.load(Ordering::Relaxed);
                if let Some(r) = read_rss(pid) {
                    own = own.max(r.total.saturating_sub(r.shmem));
                    hwm = hwm.max(r.hwm);
                }
                if done {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            PeakRss {
                own_mib: own as f64 / 1024.0,
                hwm_mib: hwm as f64 / 1024.0,
            }
        });
        RssSampler { stop, thread }
    }

    /// Takes a last reading (call before reaping the process) and returns the peaks.
    pub fn finish(self) -> PeakRss {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("sampler thread")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let r = read_rss(std::process::id()).expect("/proc/self/status");
        assert!(r.total > 0 && r.hwm >= r.total);
        assert!(cpu_seconds() >= 0.0);
    }
}

//! The test guest's host half: the program binary (assembled from `guest.S` at build time),
//! how its memory starts, how fast it writes, and the port protocol it speaks.
//!
//! The host paces the program: each time it asks on [`layout::PORT_CMD`] the host answers how
//! many operations are due at the model's rate (waiting up to [`MAX_WAIT`] when none is), or
//! asks for a sweep. Waits are short so the guest's clock ticks often: its measure of its own
//! downtime is off by at most one wait (or one operation, if it paused in the middle of one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_segment;
use kvm_ioctls::VcpuFd;

use super::layout::*;
use super::pages;
use super::vm::{GuestRam, PortIo, Waiter};
use super::{BACKEND, err};
use crate::guest::GuestError;
use crate::guest::workload::Workload;
use crate::page::Page;

/// The program, assembled from `guest.S` by `build.rs`.
pub const BINARY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kvm-guest.bin"));

/// Smallest guest: 1 MiB.
pub const MIN_PAGES: u64 = 256;
/// Largest guest: 4 GiB, all a flat 32-bit program without paging can address.
pub const MAX_PAGES: u64 = 1 << 20;

/// Longest the host holds the program in one `in` (see the module docs).
pub const MAX_WAIT: Duration = Duration::from_millis(2);
/// Most operations granted per `in`.
const MAX_BATCH: u64 = 64;

/// `SKYK` in the parameter page.
const MAGIC: u32 = u32::from_le_bytes(*b"SKYK");
/// Layout version in the parameter page.
const LAYOUT_VERSION: u32 = 2;

/// How the program writes: the synthetic models' shapes (hot set, scattered writes, full
/// and partial rewrites, zero pages) at rates a guest under instruction emulation sustains.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteModel {
    /// Hot set, per mille of the data pages (at least one page).
    pub hot_permille: u32,
    /// Percent of operations in the hot set.
    pub hot_pct: u32,
    /// Percent of operations that rewrite a page whole.
    pub full_pct: u32,
    /// Percent that change `partial_words` words (the rest zero a page).
    pub partial_pct: u32,
    /// Words a partial rewrite changes.
    pub partial_words: u32,
    /// Operations per second.
    pub rate: u32,
    /// Percent of data pages that start as zero pages.
    pub zero_pct: u32,
}

impl WriteModel {
    /// The model that follows `workload`, its rate times `speed` (0: the guest never writes).
    pub fn of(workload: Workload, speed: f64) -> Self {
        let m = match workload {
            // A hot compiler tier rewritten whole, small edits elsewhere, some zeroing.
            Workload::Kernel => WriteModel {
                hot_permille: 100,
                hot_pct: 70,
                full_pct: 55,
                partial_pct: 40,
                partial_words: 64,
                rate: 100,
                zero_pct: 6,
            },
            // Writes spread over a buffer pool; about half rewrite pages almost completely.
            Workload::Tpcw => WriteModel {
                hot_permille: 250,
                hot_pct: 50,
                full_pct: 45,
                partial_pct: 55,
                partial_words: 32,
                rate: 80,
                zero_pct: 3,
            },
            // A small eden rewritten fast; much memory zero.
            Workload::Specjbb => WriteModel {
                hot_permille: 20,
                hot_pct: 95,
                full_pct: 90,
                partial_pct: 5,
                partial_words: 16,
                rate: 150,
                zero_pct: 45,
            },
            Workload::Idle => WriteModel {
                hot_permille: 10,
                hot_pct: 100,
                full_pct: 0,
                partial_pct: 100,
                partial_words: 4,
                rate: 4,
                zero_pct: 60,
            },
        };
        WriteModel {
            rate: scaled(m.rate, speed),
            ..m
        }
    }
}

/// `rate * speed`, rounded, within u32.
fn scaled(rate: u32, speed: f64) -> u32 {
    let r = (f64::from(rate) * speed.max(0.0)).round();
    if r >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        // In range and non-negative: checked just above and by `max(0.0)`.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let r = r as u32;
        r
    }
}

/// First data page of a guest of `pages` pages: after the generation table.
pub fn data_first(pages: u64) -> u32 {
    let table_pages = (pages * 4).div_ceil(u64::from(PAGE));
    u32::try_from(u64::from(TABLE / PAGE) + table_pages).expect("at most 4 GiB")
}

/// End (exclusive) of the data pages of a guest of `pages` pages: its last page, or the
/// first of the interrupt-controller range ([`MMIO_FIRST_PAGE`]) if it reaches that far.
pub fn data_end(pages: u64) -> u32 {
    u32::try_from(pages.min(u64::from(MMIO_FIRST_PAGE))).expect("below 2^32")
}

/// Refuses a size the program cannot run in.
pub fn check_size(pages: u64) -> Result<(), GuestError> {
    if !(MIN_PAGES..=MAX_PAGES).contains(&pages) {
        return Err(err(
            "size the guest",
            format!(
                "{} KiB: the micro-VM's guest needs 1 MiB to 4 GiB (a flat 32-bit program)",
                pages * 4
            ),
        ));
    }
    Ok(())
}

/// splitmix64: the host's generator for the initial memory.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).expect("masked")
}

/// Writes the program, its parameters and the initial memory into fresh `ram`, and points
/// the vCPU at the program's first instruction in flat 32-bit protected mode.
pub fn boot(
    ram: &GuestRam,
    vcpu: &VcpuFd,
    model: &WriteModel,
    seed: u64,
) -> Result<(), GuestError> {
    let pages = ram.pages();
    check_size(pages)?;
    let first = data_first(pages);
    let pages32 = u32::try_from(pages).expect("checked size");
    let end = data_end(pages);
    let data = end - first;
    let tsc_khz = vcpu
        .get_tsc_khz()
        .map_err(|e| err("read the TSC rate", e.to_string()))?;
    let mut code = Page::zeroed();
    for (i, chunk) in BINARY.chunks(crate::page::PAGE_SIZE).enumerate() {
        code.0.fill(0);
        code.0[..chunk.len()].copy_from_slice(chunk);
        ram.store(u64::from(CODE / PAGE) + i as u64, &code);
    }
    let hot = (u64::from(data) * u64::from(model.hot_permille) / 1000).max(1);
    let params = [
        (P_MAGIC, MAGIC),
        (P_VERSION, LAYOUT_VERSION),
        (P_PAGES, pages32),
        (P_DATA_FIRST, first),
        (P_DATA_END, end),
        (P_HOT_PAGES, u32::try_from(hot).expect("below pages")),
        (P_HOT_PCT, model.hot_pct.min(100)),
        (P_PCT_FULL, model.full_pct.min(100)),
        (
            P_PCT_PARTIAL,
            model.partial_pct.min(100 - model.full_pct.min(100)),
        ),
        (P_PARTIAL_WORDS, model.partial_words.clamp(1, BODY_WORDS)),
        (P_RATE, model.rate),
        (P_TSC_KHZ, tsc_khz),
    ];
    for (at, v) in params {
        ram.write_u32(at, v);
    }
    // The initial memory: written pages and zero pages, as the program would leave them.
    let mut rng = seed;
    let mut generation = 0u32;
    let mut page = Page::zeroed();
    for pfn in first..end {
        if splitmix(&mut rng) % 100 < u64::from(model.zero_pct) {
            continue; // zero, and recorded as zero (the table starts zeroed)
        }
        generation += 1;
        let r = splitmix(&mut rng);
        pages::write_full(&mut page, pfn, generation, low32(r), low32(r >> 32) | 1);
        ram.store(u64::from(pfn), &page);
        ram.write_u32(TABLE + pfn * 4, generation);
    }
    ram.write_u32(ST_GEN, generation);
    ram.write_u32(ST_RNG, low32(splitmix(&mut rng)) | 1);
    ram.write_u32(ST_CUR_PFN, NO_PFN);
    ram.write_u32(ST_ARRIVED, 1);

    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let kvm = |op: &'static str| move |e: kvm_ioctls::Error| err(op, e.to_string());
    let mut sregs = vcpu.get_sregs().map_err(kvm("read special registers"))?;
    sregs.cs = flat(0x08, 0xb); // code, execute/read, accessed
    let data_seg = flat(0x10, 0x3); // data, read/write, accessed
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) =
        (data_seg, data_seg, data_seg, data_seg, data_seg);
    sregs.cr0 = 0x11; // PE, ET: protected mode, paging off
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(kvm("enter protected mode"))?;
    let mut regs = vcpu.get_regs().map_err(kvm("read registers"))?;
    regs.rip = u64::from(CODE);
    regs.rsp = u64::from(STACK_TOP);
    regs.rflags = 2;
    vcpu.set_regs(&regs).map_err(kvm("set registers"))
}

/// The program's status words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Operations completed.
    pub progress: u64,
    /// Sweeps done.
    pub sweeps: u32,
    /// Bad pages found by the last sweep.
    pub sweep_bad: u32,
    /// The program has measured its arrival since the host last set `ST_ARRIVED` to 0.
    pub arrived: bool,
    /// TSC ticks between the last tick before the move and the first after it.
    pub arrival_gap: u64,
    /// Moves seen.
    pub arrivals: u32,
    /// Page of the operation under way, if one is.
    pub current: Option<u32>,
}

impl Status {
    /// Reads it (a word at a time: consistent only while paused).
    pub fn read(ram: &GuestRam) -> Self {
        let cur = ram.read_u32(ST_CUR_PFN);
        Status {
            progress: ram.read_u64(ST_PROGRESS),
            sweeps: ram.read_u32(ST_SWEEPS),
            sweep_bad: ram.read_u32(ST_SWEEP_BAD),
            arrived: ram.read_u32(ST_ARRIVED) != 0,
            arrival_gap: ram.read_u64(ST_ARRIVAL_GAP),
            arrivals: ram.read_u32(ST_ARRIVALS),
            current: (cur != NO_PFN).then_some(cur),
        }
    }
}

/// Checks that `ram` holds this program, and returns its write rate.
pub fn check_params(ram: &GuestRam) -> Result<u32, GuestError> {
    let (magic, version) = (ram.read_u32(P_MAGIC), ram.read_u32(P_VERSION));
    if magic != MAGIC || version != LAYOUT_VERSION {
        return Err(GuestError::BadState(format!(
            "{BACKEND}: guest memory does not hold the skyferry test guest (magic {magic:#x}, \
             layout {version}; expected {MAGIC:#x}, layout {LAYOUT_VERSION})"
        )));
    }
    if u64::from(ram.read_u32(P_PAGES)) != ram.pages() {
        return Err(GuestError::BadState(format!(
            "{BACKEND}: the guest's parameters say {} pages, its memory has {}",
            ram.read_u32(P_PAGES),
            ram.pages()
        )));
    }
    if ram.read_u32(P_DATA_END) != data_end(ram.pages()) {
        return Err(GuestError::BadState(format!(
            "{BACKEND}: the guest's data pages end at {}, not at {}",
            ram.read_u32(P_DATA_END),
            data_end(ram.pages())
        )));
    }
    Ok(ram.read_u32(P_RATE))
}

/// Who swept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Sweeper {
    /// The program, in the guest.
    #[default]
    Guest,
    /// The host, by the same rules, while the program waited between two operations.
    Host,
}

impl Sweeper {
    /// Its name in status.
    pub fn name(self) -> &'static str {
        match self {
            Sweeper::Guest => "guest",
            Sweeper::Host => "host",
        }
    }
}

/// A sweep's outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Bad pages.
    pub bad: u32,
    /// Their numbers (the first [`REPORTED_PAGES`]).
    pub pages: Vec<u32>,
    /// Who swept.
    pub by: Sweeper,
}

/// Bad pages a report names (it counts them all).
pub const REPORTED_PAGES: usize = 64;

#[derive(Debug, Default)]
struct Pacing {
    rate: u32,
    since: Option<Instant>,
    issued: u64,
}

impl Pacing {
    /// Operations due now (at most `MAX_BATCH`), counted as issued; a backlog beyond a
    /// tenth of a second is forgotten (a guest that paused does not catch up in a burst).
    fn take_due(&mut self, now: Instant) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        let since = *self.since.get_or_insert(now);
        let rate = u128::from(self.rate);
        let target =
            u64::try_from((now - since).as_micros() * rate / 1_000_000).unwrap_or(u64::MAX);
        let backlog = u64::from(self.rate / 10).max(1);
        self.issued = self.issued.max(target.saturating_sub(backlog));
        let due = target.saturating_sub(self.issued).min(MAX_BATCH);
        self.issued += due;
        due
    }
}

#[derive(Debug, Default)]
struct Sweeps {
    /// Bad page numbers reported by the sweep under way.
    pending: Vec<u32>,
    last: Option<SweepReport>,
}

/// The host half of the port protocol.
#[derive(Default)]
pub struct ProgramHost {
    pacing: Mutex<Pacing>,
    sweep_wanted: AtomicBool,
    host_sweep_wanted: AtomicBool,
    sweeps: Mutex<Sweeps>,
    swept: Condvar,
    /// Test hook: corrupt one page just before the next sweep (see `target.rs`).
    corrupt_before_sweep: AtomicBool,
    ram: OnceLock<Arc<GuestRam>>,
}

impl std::fmt::Debug for ProgramHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProgramHost").finish_non_exhaustive()
    }
}

impl ProgramHost {
    /// Gives the host half the guest's RAM (once the VM exists).
    pub fn attach(&self, ram: Arc<GuestRam>) {
        let _ = self.ram.set(ram);
    }

    /// Paces the program at `rate` operations per second, counting from its next request.
    pub fn set_rate(&self, rate: u32) {
        *self.pacing.lock().expect("pacing lock") = Pacing {
            rate,
            ..Pacing::default()
        };
    }

    /// Asks for a sweep at the program's next request (wake the vCPU to hurry it): by the
    /// program, or by the host while the program waits in that port exit, between two
    /// operations, when every page must be as its table says.
    pub fn request_sweep(&self, by: Sweeper) {
        match by {
            Sweeper::Guest => &self.sweep_wanted,
            Sweeper::Host => &self.host_sweep_wanted,
        }
        .store(true, Ordering::Release);
    }

    /// Corrupts one page right before the next sweep, so that sweep must find it.
    pub fn corrupt_before_next_sweep(&self) {
        self.corrupt_before_sweep.store(true, Ordering::Release);
    }

    /// The last sweep's report, if one came.
    pub fn last_sweep(&self) -> Option<SweepReport> {
        self.sweeps.lock().expect("sweep lock").last.clone()
    }

    /// Waits up to `timeout` for a sweep report newer than `after` sweeps.
    pub fn wait_sweep(&self, timeout: Duration) -> Option<SweepReport> {
        let deadline = Instant::now() + timeout;
        let mut s = self.sweeps.lock().expect("sweep lock");
        loop {
            if s.last.is_some() {
                return s.last.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .swept
                .wait_timeout(s, deadline - now)
                .expect("sweep lock")
                .0;
        }
    }

    /// Forgets the last report, so [`wait_sweep`](Self::wait_sweep) waits for a new one.
    pub fn clear_sweep(&self) {
        self.sweeps.lock().expect("sweep lock").last = None;
    }

    /// Flips one byte of a data page the program is not writing, before a sweep.
    fn corrupt_one_page(&self) {
        let Some(ram) = self.ram.get() else { return };
        let status = Status::read(ram);
        let last = data_end(ram.pages()) - 1;
        let pfn = if status.current == Some(last) {
            last - 1
        } else {
            last
        };
        // Flip a body byte; for a zero page, write one.
        let at = pfn * PAGE + PAGE / 2;
        let word = ram.read_u32(at);
        ram.write_u32(at, word ^ 0x5a);
        tracing::warn!(
            backend = BACKEND,
            page = pfn,
            "test hook: corrupted one page before the guest's sweep"
        );
    }
}

impl PortIo for ProgramHost {
    fn port_in(&self, port: u16, data: &mut [u8], waiter: &Waiter<'_>) {
        let reply = if u32::from(port) == PORT_CMD {
            self.command(waiter)
        } else {
            tracing::warn!(backend = BACKEND, port, "guest read an unknown port");
            0
        };
        let bytes = reply.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    fn port_out(&self, port: u16, data: &[u8]) {
        let mut word = [0u8; 4];
        let n = data.len().min(4);
        word[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(word);
        match u32::from(port) {
            PORT_BAD_PAGE => {
                let mut s = self.sweeps.lock().expect("sweep lock");
                if s.pending.len() < REPORTED_PAGES {
                    s.pending.push(value);
                }
            }
            PORT_REPORT => {
                let mut s = self.sweeps.lock().expect("sweep lock");
                let pages = std::mem::take(&mut s.pending);
                if value != 0 {
                    tracing::warn!(backend = BACKEND, bad = value, ?pages, "guest sweep");
                }
                s.last = Some(SweepReport {
                    bad: value,
                    pages,
                    by: Sweeper::Guest,
                });
                self.swept.notify_all();
            }
            _ => tracing::warn!(
                backend = BACKEND,
                port,
                value,
                "guest wrote an unknown port"
            ),
        }
    }
}

impl ProgramHost {
    /// The host's sweep, on the vCPU thread inside the program's `PORT_CMD` exit: the
    /// program is between operations (no page in flight) and cannot run until it is done.
    fn host_sweep(&self) {
        let Some(ram) = self.ram.get() else { return };
        if self.corrupt_before_sweep.swap(false, Ordering::AcqRel) {
            self.corrupt_one_page();
        }
        let started = Instant::now();
        let bad = pages::bad_pages(ram, data_first(ram.pages())..data_end(ram.pages()), None);
        let count = u32::try_from(bad.len()).expect("at most 2^20 pages");
        let report = SweepReport {
            bad: count,
            pages: bad
                .iter()
                .take(REPORTED_PAGES)
                .map(|&(pfn, _)| pfn)
                .collect(),
            by: Sweeper::Host,
        };
        if count == 0 {
            tracing::info!(
                backend = BACKEND,
                pages = ram.pages(),
                took = ?started.elapsed(),
                "host sweep: every page intact"
            );
        } else {
            let first: Vec<_> = bad.iter().take(8).collect();
            tracing::warn!(backend = BACKEND, bad = count, ?first, "host sweep");
        }
        let mut s = self.sweeps.lock().expect("sweep lock");
        s.last = Some(report);
        self.swept.notify_all();
    }

    /// The answer to a `PORT_CMD` request.
    fn command(&self, waiter: &Waiter<'_>) -> u32 {
        if self.host_sweep_wanted.swap(false, Ordering::AcqRel) {
            self.host_sweep();
        }
        for attempt in 0..2 {
            if self.sweep_wanted.swap(false, Ordering::AcqRel) {
                if self.corrupt_before_sweep.swap(false, Ordering::AcqRel) {
                    self.corrupt_one_page();
                }
                self.sweeps.lock().expect("sweep lock").pending.clear();
                return CMD_SWEEP;
            }
            let now = Instant::now();
            let due = self.pacing.lock().expect("pacing lock").take_due(now);
            if due > 0 {
                return u32::try_from(due).expect("at most MAX_BATCH");
            }
            if attempt == 1 || !waiter.wait_until(now + MAX_WAIT) {
                break;
            }
        }
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_built_and_fits() {
        assert!(!BINARY.is_empty());
        assert!(BINARY.len() <= usize::try_from(CODE_MAX).unwrap());
        assert_eq!(BINARY[0], 0xfc, "starts with cld");
    }

    #[test]
    fn layout_leaves_room_for_data() {
        assert_eq!(data_first(256), 9);
        assert_eq!(data_first(MAX_PAGES), 8 + 1024);
        assert_eq!(data_end(256), 256);
        assert_eq!(data_end(MAX_PAGES), 0xfec00);
        assert_eq!(data_end(MAX_PAGES - 1), 0xfec00);
        assert!(check_size(MIN_PAGES - 1).is_err());
        assert!(check_size(MAX_PAGES + 1).is_err());
        assert!(check_size(MAX_PAGES).is_ok());
    }

    #[test]
    fn pacing_grants_the_rate_without_bursts() {
        let t0 = Instant::now();
        let mut p = Pacing {
            rate: 100,
            ..Pacing::default()
        };
        assert_eq!(p.take_due(t0), 0);
        assert_eq!(p.take_due(t0 + Duration::from_millis(50)), 5);
        assert_eq!(p.take_due(t0 + Duration::from_millis(55)), 0);
        // After a long pause, at most a tenth of a second's worth.
        assert_eq!(p.take_due(t0 + Duration::from_secs(60)), 10);
        let mut idle = Pacing::default();
        assert_eq!(idle.take_due(t0 + Duration::from_secs(1)), 0);
    }

    #[test]
    fn rates_scale_with_speed() {
        assert_eq!(WriteModel::of(Workload::Tpcw, 0.0).rate, 0);
        assert_eq!(WriteModel::of(Workload::Tpcw, 2.0).rate, 160);
        assert_eq!(WriteModel::of(Workload::Tpcw, 1e12).rate, u32::MAX);
    }
}

//! The destination side: a micro-VM of the source's size, filled page by page, started on
//! the commit. Once it runs, the guest checks its own memory (if asked) and measures the
//! gap it saw on its own clock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::layout::ST_ARRIVED;
use super::program::{self, ProgramHost, Status, Sweeper};
use super::state::{self, VcpuState};
use super::vm::{GuestRam, MicroVm};
use super::{BACKEND, err};
use crate::codec::PageSink;
use crate::guest::claims::WriterClaims;
use crate::guest::{DestGuest, GuestCheck, GuestError, PageWriter, memory_digest_known};
use crate::page::{Page, Pfn};

/// Test hook: `SKYFERRY_KVM_CORRUPT=1` makes a destination corrupt one page of every KVM
/// guest it starts, just before its arrival check (the guest's or the host's), so the check
/// must report exactly one bad page. Unset (always, in production), it does nothing.
pub const CORRUPT_VAR: &str = "SKYFERRY_KVM_CORRUPT";

/// Who checks an arriving guest's memory, as soon as it runs at the destination and before
/// it writes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ArrivalCheck {
    /// The guest sweeps every page itself (the oracle the tests rely on). On a host that
    /// emulates guest instructions it sweeps about 1.5 MiB/s: minutes for a large guest.
    #[default]
    Guest,
    /// The host checks every page by the guest's rules (`pages.rs`) while the guest waits
    /// in a port exit between two of its operations: native speed at any size.
    Host,
    /// Nobody checks.
    Off,
}

impl ArrivalCheck {
    /// Its name in configs, flags and status.
    pub fn name(self) -> &'static str {
        match self {
            ArrivalCheck::Guest => "guest",
            ArrivalCheck::Host => "host",
            ArrivalCheck::Off => "off",
        }
    }
}

impl std::fmt::Display for ArrivalCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ArrivalCheck {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [ArrivalCheck::Guest, ArrivalCheck::Host, ArrivalCheck::Off]
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| format!("{s:?}: the arrival check is guest, host or off"))
    }
}

/// How the destination treats an arriving guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvmTargetOptions {
    /// Who checks its memory once it runs here.
    pub arrival_check: ArrivalCheck,
}

/// What happened at the switch.
#[derive(Debug, Default)]
struct Arrival {
    state: Option<VcpuState>,
    /// The progress counter as the guest arrived.
    progress_at_start: Option<u64>,
    tsc_khz: u32,
}

/// The micro-VM being filled here.
pub struct KvmTarget {
    vm: MicroVm,
    host: Arc<ProgramHost>,
    claims: Arc<WriterClaims>,
    options: KvmTargetOptions,
    arrival: Mutex<Arrival>,
    started: AtomicBool,
}

impl std::fmt::Debug for KvmTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmTarget")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl KvmTarget {
    /// A micro-VM of `pages` pages, its vCPU parked until [`DestGuest::start`].
    pub fn new(pages: u64, options: KvmTargetOptions) -> Result<Self, GuestError> {
        program::check_size(pages)?;
        let host = Arc::new(ProgramHost::default());
        let vm = MicroVm::new(GuestRam::new(pages)?, host.clone(), "kvm-destination")?;
        host.attach(vm.ram().clone());
        if std::env::var_os(CORRUPT_VAR).is_some_and(|v| v == "1") {
            host.corrupt_before_next_sweep();
        }
        Ok(KvmTarget {
            vm,
            host,
            claims: Arc::new(WriterClaims::new(pages)),
            options,
            arrival: Mutex::default(),
            started: AtomicBool::new(false),
        })
    }

    /// The program's status words.
    pub fn status(&self) -> Status {
        Status::read(self.vm.ram())
    }

    /// The arrival check's report: waits up to `timeout` for it.
    pub fn wait_arrival_sweep(&self, timeout: std::time::Duration) -> Option<program::SweepReport> {
        self.host.wait_sweep(timeout)
    }
}

/// Writes one stream's pages into the destination's guest RAM.
struct KvmWriter {
    ram: Arc<GuestRam>,
    claims: Arc<WriterClaims>,
    id: u32,
    owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
}

impl PageSink for KvmWriter {
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
        assert!(
            pfn < self.ram.pages() && (self.owns)(pfn),
            "{BACKEND}: page {pfn} is beyond the guest or not this stream's"
        );
        self.claims.claim(pfn, self.id, BACKEND);
        // SAFETY: the page is inside the RAM `self.ram` keeps alive, page-aligned as `Page`
        // needs, and any bytes are a valid `Page`. The reference is exclusive: the claim
        // makes this writer the page's only writer for good, `&mut self` keeps it from
        // handing the page out twice at once, the vCPU does not run before every writer is
        // gone (`start` checks), and the digest reads only once they are.
        unsafe { &mut *self.ram.page_ptr(pfn).as_ptr() }
    }

    fn zero_page(&mut self, pfn: Pfn) {
        let page = self.page_mut(pfn);
        if !page.is_zero() {
            page.0.fill(0);
        }
    }
}

impl PageWriter for KvmWriter {}

impl Drop for KvmWriter {
    fn drop(&mut self) {
        self.claims.close();
    }
}

impl DestGuest for KvmTarget {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.vm.ram().pages()
    }

    fn writer(
        &self,
        owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    ) -> Result<Box<dyn PageWriter>, GuestError> {
        if self.started.load(Ordering::Acquire) {
            return Err(err("open a page writer", "the guest already runs here"));
        }
        Ok(Box::new(KvmWriter {
            ram: self.vm.ram().clone(),
            claims: self.claims.clone(),
            id: self.claims.open(),
            owns,
        }))
    }

    fn set_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        if self.started.load(Ordering::Acquire) {
            return Err(err("install the state", "the guest already runs here"));
        }
        let state = VcpuState::decode(blob, self.page_count())?;
        program::check_params(self.vm.ram())?;
        self.vm
            .with_vcpu("install the state", |vcpu| state.restore(vcpu))?;
        let mut a = self.arrival.lock().expect("arrival lock");
        a.tsc_khz = state.tsc_khz;
        a.state = Some(state);
        Ok(())
    }

    fn memory_digest(&self) -> u64 {
        self.memory_digest_with(&|_| None)
    }

    fn memory_digest_with(&self, known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> u64 {
        let live = self.claims.live();
        assert_eq!(
            live, 0,
            "{BACKEND}: digest requested with {live} writers open"
        );
        // SAFETY: the vCPU has not started (it starts only after the digest, in `start`),
        // and every page writer is dropped (asserted above): nothing writes the RAM.
        memory_digest_known(unsafe { self.vm.ram().as_slice() }, known)
    }

    fn start(&self) -> Result<(), GuestError> {
        let live = self.claims.live();
        if live != 0 {
            return Err(err("start", format!("{live} page writers are still open")));
        }
        if self.started.swap(true, Ordering::AcqRel) {
            return Err(err("start", "the guest already runs here"));
        }
        let mut a = self.arrival.lock().expect("arrival lock");
        let Some(state) = a.state.clone() else {
            return Err(err("start", "no state was installed"));
        };
        let rate = program::check_params(self.vm.ram())?;
        a.progress_at_start = Some(self.status().progress);
        // The guest's clock runs on through the pause, as wall time did.
        let elapsed_ns = state::wall_ns().saturating_sub(state.wall_ns);
        let tsc = state.tsc.wrapping_add(
            u64::try_from(u128::from(elapsed_ns) * u128::from(state.tsc_khz) / 1_000_000)
                .unwrap_or(u64::MAX),
        );
        self.vm.with_vcpu("set the guest's clock", |vcpu| {
            state::write_tsc(vcpu, tsc)?;
            // Some hosts (nested PVM) ignore a host's TSC write: the guest then reads this
            // host's TSC, which on the same host is the same clock.
            let now = state::read_tsc(vcpu)?;
            if now.abs_diff(tsc) > u64::from(state.tsc_khz) * 1000 {
                tracing::warn!(
                    backend = BACKEND,
                    wanted = tsc,
                    got = now,
                    "KVM did not take the guest's TSC; its clock is this host's"
                );
            }
            Ok(())
        })?;
        // The guest measures the gap at its next clock tick.
        self.vm.ram().write_u32(ST_ARRIVED, 0);
        self.host.set_rate(rate);
        match self.options.arrival_check {
            ArrivalCheck::Guest => self.host.request_sweep(Sweeper::Guest),
            ArrivalCheck::Host => self.host.request_sweep(Sweeper::Host),
            ArrivalCheck::Off => {}
        }
        drop(a);
        self.vm.resume()
    }

    fn self_check(&self) -> Option<GuestCheck> {
        let a = self.arrival.lock().expect("arrival lock");
        let st = self.status();
        let started = self.started.load(Ordering::Acquire);
        let downtime_ms = (started && st.arrived && a.tsc_khz > 0).then(|| {
            // Ticks / kHz = ms; f64 is exact far beyond any gap seen.
            #[allow(clippy::cast_precision_loss)]
            let ms = st.arrival_gap as f64 / f64::from(a.tsc_khz);
            ms
        });
        let sweep = self.host.last_sweep();
        Some(GuestCheck {
            progress_at_switch: a.progress_at_start,
            progress: st.progress,
            resumed: started
                && (st.arrived
                    || a.progress_at_start.is_some_and(|p| st.progress > p)
                    || sweep.is_some()),
            bad_pages: sweep.as_ref().map(|s| u64::from(s.bad)),
            checked_by: sweep.map(|s| s.by.name().to_string()),
            downtime_ms,
            failure: self.vm.failure(),
        })
    }
}

//! One micro-VM: a KVM VM with one memory slot over guest RAM and one vCPU on a thread of
//! its own.
//!
//! Pause means the vCPU thread is out of `KVM_RUN` and parked. To get it out, [`MicroVm::pause`]
//! asks, then kicks the thread with a signal (an ioctl interrupted by a signal returns
//! `EINTR`) until it parks; a kick that lands just before the thread enters `KVM_RUN` is lost,
//! so it kicks again every millisecond. Before parking, the thread re-enters `KVM_RUN` once
//! with `immediate_exit` set: that completes an `in` the guest is in the middle of (KVM
//! writes the value into the guest's registers only on the next `KVM_RUN`), so the state
//! taken while parked is whole. While parked, the vCPU's descriptor waits in the shared
//! control block, where [`MicroVm::with_vcpu`] reaches it to read or install state.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::{BACKEND, err};
use crate::guest::GuestError;
use crate::guest::shm::SharedMemory;
use crate::page::{PAGE_SIZE, Page, Pfn};

/// Guest RAM: a memfd mapping that KVM and the host both reach. Host code touches it only
/// through atomic word views or raw page pointers, never as a plain slice while the vCPU may
/// run, since the guest writes it behind Rust's back.
pub struct GuestRam {
    /// Owns the mapping; `base` points into it.
    _mem: SharedMemory,
    base: *mut u8,
    pages: u64,
}

// SAFETY: `base` points into the mapping that `_mem` owns for as long as `self` lives, and
// every access through it is either atomic or to pages the caller has exclusive use of (see
// `page_ptr`), so sharing the pointer between threads adds no data race of its own.
unsafe impl Send for GuestRam {}
// SAFETY: as for `Send`.
unsafe impl Sync for GuestRam {}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Fresh zeroed RAM of `pages` pages.
    pub fn new(pages: u64) -> Result<Self, GuestError> {
        let len = usize::try_from(pages * PAGE_SIZE as u64)
            .map_err(|_| err("allocate guest memory", "too large for this host"))?;
        let mut mem = SharedMemory::new("skyferry-kvm", len, false)?;
        let base = mem.as_mut_ptr();
        Ok(GuestRam {
            _mem: mem,
            base,
            pages,
        })
    }

    /// Pages of RAM.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes of RAM.
    pub fn len(&self) -> usize {
        usize::try_from(self.pages).expect("sized at creation") * PAGE_SIZE
    }

    /// Whether there is no RAM (never: a VM has at least one page).
    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    fn host_address(&self) -> u64 {
        self.base as u64
    }

    /// Page `pfn`'s words, atomically accessible while the guest runs.
    fn words(&self, pfn: Pfn) -> &[AtomicU64] {
        assert!(pfn < self.pages, "page {pfn} beyond {} pages", self.pages);
        let at = usize::try_from(pfn).expect("below pages") * PAGE_SIZE;
        // SAFETY: the page lies inside the mapping (checked above), which lives as long as
        // `self`; the mapping is page-aligned, so the words are 8-byte aligned; every bit
        // pattern is a valid AtomicU64, and all host access to guest RAM is atomic or
        // exclusive, so these views never race with a non-atomic host access.
        unsafe {
            std::slice::from_raw_parts(
                self.base.add(at).cast::<AtomicU64>(),
                PAGE_SIZE / size_of::<u64>(),
            )
        }
    }

    /// A copy of page `pfn` (the guest may be writing it: a torn copy is dirty again and
    /// sent later).
    pub fn load(&self, pfn: Pfn, out: &mut Page) {
        let (dst, _) = out.0.as_chunks_mut::<8>();
        for (d, w) in dst.iter_mut().zip(self.words(pfn)) {
            *d = w.load(Ordering::Relaxed).to_ne_bytes();
        }
    }

    /// Overwrites page `pfn` with `data`.
    pub fn store(&self, pfn: Pfn, data: &Page) {
        let (src, _) = data.0.as_chunks::<8>();
        for (s, w) in src.iter().zip(self.words(pfn)) {
            w.store(u64::from_ne_bytes(*s), Ordering::Relaxed);
        }
    }

    fn word32(&self, gpa: u32) -> &AtomicU32 {
        let at = usize::try_from(gpa).expect("32-bit address");
        assert!(
            gpa.is_multiple_of(4) && at + 4 <= self.len(),
            "guest word {gpa:#x} misaligned or beyond RAM"
        );
        // SAFETY: in bounds and 4-byte aligned (checked above) inside the live mapping; see
        // `words` for why an atomic view is sound.
        unsafe { AtomicU32::from_ptr(self.base.add(at).cast::<u32>()) }
    }

    /// The 32-bit word at guest-physical `gpa`.
    pub fn read_u32(&self, gpa: u32) -> u32 {
        self.word32(gpa).load(Ordering::Acquire)
    }

    /// The 64-bit value at `gpa` (two words, low first; read while the guest may write it, so
    /// a caller that needs both halves consistent reads while the vCPU is paused).
    pub fn read_u64(&self, gpa: u32) -> u64 {
        u64::from(self.read_u32(gpa)) | (u64::from(self.read_u32(gpa + 4)) << 32)
    }

    /// Writes the 32-bit word at `gpa`.
    pub fn write_u32(&self, gpa: u32, value: u32) {
        self.word32(gpa).store(value, Ordering::Release);
    }

    /// Page `pfn` for a caller that has it to itself: the vCPU does not run, and no other
    /// host thread writes or reads this page meanwhile.
    pub fn page_ptr(&self, pfn: Pfn) -> std::ptr::NonNull<Page> {
        assert!(pfn < self.pages, "page {pfn} beyond {} pages", self.pages);
        let at = usize::try_from(pfn).expect("below pages") * PAGE_SIZE;
        // SAFETY: in bounds of the live mapping, whose base is not null.
        std::ptr::NonNull::new(unsafe { self.base.add(at) })
            .expect("mapping is not null")
            .cast()
    }

    /// All of RAM as bytes.
    ///
    /// # Safety
    ///
    /// Nothing may write guest RAM while the slice lives: the vCPU is paused (or never ran)
    /// and no host thread writes.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`; the caller
        // guarantees no writer while the slice lives.
        unsafe { std::slice::from_raw_parts(self.base, self.len()) }
    }
}

/// What the guest program's host half does with port I/O (the program's protocol).
pub trait PortIo: Send + Sync {
    /// The guest reads `data.len()` bytes from `port`: fill `data`. May wait through
    /// `waiter`, which returns early when the vCPU must stop.
    fn port_in(&self, port: u16, data: &mut [u8], waiter: &Waiter<'_>);
    /// The guest writes `data` to `port`.
    fn port_out(&self, port: u16, data: &[u8]);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Control {
    want: Want,
    /// The thread is out of `KVM_RUN` and waits (or has ended): the vCPU is in `vcpu`.
    parked: bool,
    vcpu: Option<VcpuFd>,
    /// Why the vCPU stopped for good (the guest crashed, or KVM failed).
    failed: Option<String>,
    /// Set by [`MicroVm::wake`]: a `port_in` wait should end and look again.
    woken: bool,
    /// The vCPU thread's kernel thread id, once it runs.
    tid: Option<u32>,
}

struct Shared {
    ctl: Mutex<Control>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.ctl.lock().expect("vCPU control lock")
    }
}

/// Lets a `port_in` handler wait without holding up a pause.
#[allow(missing_debug_implementations)] // a borrowed lock, nothing to show
pub struct Waiter<'a> {
    shared: &'a Shared,
}

impl Waiter<'_> {
    /// Waits until `deadline`, or until the vCPU must stop or [`MicroVm::wake`] is called.
    /// False when the vCPU must stop.
    pub fn wait_until(&self, deadline: Instant) -> bool {
        let mut c = self.shared.lock();
        loop {
            if c.want != Want::Run {
                return false;
            }
            if c.woken {
                c.woken = false;
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return true;
            }
            c = self
                .shared
                .cv
                .wait_timeout(c, deadline - now)
                .expect("vCPU control lock")
                .0;
        }
    }
}

/// The signal that kicks the vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int) {}

/// Installs the kick's no-op handler once, without `SA_RESTART`, so `KVM_RUN` returns
/// `EINTR` instead of being restarted.
fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // an `extern "C"` function that does nothing, so it is async-signal-safe; and the
        // signal is a real-time one this process uses for nothing else.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_kick as *const () as libc::sighandler_t;
            libc::sigemptyset(&raw mut act.sa_mask);
            let rc = libc::sigaction(kick_signal(), &raw const act, std::ptr::null_mut());
            assert_eq!(rc, 0, "installing the vCPU kick handler");
        }
    });
}

/// The VM, its RAM and its vCPU thread.
pub struct MicroVm {
    _kvm: Kvm,
    vm: VmFd,
    ram: Arc<GuestRam>,
    shared: Arc<Shared>,
    io: Arc<dyn PortIo>,
    thread: Mutex<Option<JoinHandle<()>>>,
    label: String,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("label", &self.label)
            .field("pages", &self.ram.pages)
            .finish_non_exhaustive()
    }
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> GuestError {
    move |e| err(op, e.to_string())
}

/// Whether this host can run micro-VMs; the error says why not.
pub fn available() -> Result<(), String> {
    Kvm::new()
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

impl MicroVm {
    /// A VM with `ram` as its only memory slot (guest-physical 0 up) and one vCPU, parked:
    /// it runs from [`resume`](Self::resume) on.
    pub fn new(ram: GuestRam, io: Arc<dyn PortIo>, label: &str) -> Result<Self, GuestError> {
        let kvm = Kvm::new().map_err(|e| {
            err(
                "open /dev/kvm",
                format!("{e} (this host needs KVM, and read-write access to /dev/kvm)"),
            )
        })?;
        let vm = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        let vm_fd = MicroVm {
            _kvm: kvm,
            vm,
            ram: Arc::new(ram),
            shared: Arc::new(Shared {
                ctl: Mutex::new(Control {
                    want: Want::Pause,
                    parked: true,
                    vcpu: None,
                    failed: None,
                    woken: false,
                    tid: None,
                }),
                cv: Condvar::new(),
            }),
            io,
            thread: Mutex::new(None),
            label: label.to_string(),
        };
        vm_fd.set_slot(false)?;
        let vcpu = vm_fd
            .vm
            .create_vcpu(0)
            .map_err(kvm_err("create the vCPU"))?;
        let cpuid = vm_fd
            ._kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read the supported CPUID"))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_err("set the vCPU's CPUID"))?;
        vm_fd.shared.lock().vcpu = Some(vcpu);
        Ok(vm_fd)
    }

    /// (Re)registers the memory slot, with or without KVM's dirty log.
    fn set_slot(&self, dirty_log: bool) -> Result<(), GuestError> {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: 0,
            memory_size: self.ram.len() as u64,
            userspace_addr: self.ram.host_address(),
        };
        // SAFETY: the region is the mapping `self.ram` owns, which outlives the VM: fields
        // drop in declaration order, `vm` (closing the VM and its slots) before `ram`, and
        // the vCPU thread holding another `ram` reference is joined in `Drop` first.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(kvm_err(if dirty_log {
            "turn the dirty log on"
        } else {
            "register guest memory"
        }))
    }

    /// Turns KVM's dirty log on (a clean log: writes from now on) or off.
    pub fn set_dirty_log(&self, on: bool) -> Result<(), GuestError> {
        self.set_slot(on)
    }

    /// Fetches and clears the dirty log: one bit per page written since the last fetch.
    pub fn fetch_dirty(&self) -> Result<Vec<u64>, GuestError> {
        self.vm
            .get_dirty_log(0, self.ram.len())
            .map_err(kvm_err("fetch the dirty log"))
    }

    /// The guest's RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Runs `f` on the parked vCPU (reading or installing state). Fails if it runs.
    pub fn with_vcpu<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&VcpuFd) -> Result<T, GuestError>,
    ) -> Result<T, GuestError> {
        let c = self.shared.lock();
        match (&c.vcpu, c.parked) {
            (Some(v), true) => f(v),
            _ => Err(err(op, "the vCPU is running; pause it first")),
        }
    }

    /// The vCPU thread's kernel thread id, once it has started.
    pub fn vcpu_tid(&self) -> Option<u32> {
        self.shared.lock().tid
    }

    /// Why the vCPU stopped for good, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failed.clone()
    }

    /// Whether the vCPU thread runs the guest now.
    pub fn running(&self) -> bool {
        let c = self.shared.lock();
        c.want == Want::Run && c.failed.is_none()
    }

    /// Starts the vCPU (first time: its thread) or lets it run again.
    pub fn resume(&self) -> Result<(), GuestError> {
        let mut thread = self.thread.lock().expect("vCPU thread lock");
        let mut c = self.shared.lock();
        if let Some(why) = &c.failed {
            return Err(err("resume", format!("the vCPU stopped for good: {why}")));
        }
        if c.want == Want::Stop {
            return Err(err("resume", "the VM was handed over or shut down"));
        }
        c.want = Want::Run;
        self.shared.cv.notify_all();
        if thread.is_none() {
            install_kick_handler();
            let vcpu = c.vcpu.take().expect("a parked vCPU holds its descriptor");
            c.parked = false;
            drop(c);
            let (shared, io) = (self.shared.clone(), self.io.clone());
            *thread = Some(
                std::thread::Builder::new()
                    .name("sf-kvm-vcpu0".into())
                    .spawn(move || vcpu_thread(&shared, io.as_ref(), vcpu))
                    .map_err(|e| err("start the vCPU thread", e.to_string()))?,
            );
        }
        Ok(())
    }

    /// Stops the vCPU outside `KVM_RUN`; returns once it is parked (nothing in flight).
    pub fn pause(&self) -> Result<(), GuestError> {
        self.stop(Want::Pause)
    }

    /// Stops the vCPU for good (it never runs again).
    pub fn shut_down(&self) -> Result<(), GuestError> {
        self.stop(Want::Stop)
    }

    fn stop(&self, want: Want) -> Result<(), GuestError> {
        let thread = self.thread.lock().expect("vCPU thread lock");
        let mut c = self.shared.lock();
        if c.want != Want::Stop {
            c.want = want;
        }
        self.shared.cv.notify_all();
        let Some(handle) = thread.as_ref() else {
            return Ok(()); // never started: parked from birth
        };
        let tid = std::os::unix::thread::JoinHandleExt::as_pthread_t(handle);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.parked {
            // SAFETY: `tid` is the vCPU thread, which has not been joined (its handle is in
            // `self.thread`, locked here), so the id is still valid; the signal's handler
            // was installed before the thread started and does nothing.
            unsafe { libc::pthread_kill(tid, kick_signal()) };
            c = self
                .shared
                .cv
                .wait_timeout(c, Duration::from_millis(1))
                .expect("vCPU control lock")
                .0;
            if Instant::now() > deadline {
                return Err(err("pause", "the vCPU did not stop within 10 s"));
            }
        }
        Ok(())
    }

    /// Ends a [`Waiter`] wait of the vCPU thread early (new work for it).
    pub fn wake(&self) {
        self.shared.lock().woken = true;
        self.shared.cv.notify_all();
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        if let Err(e) = self.shut_down() {
            tracing::error!(vm = %self.label, "{e}");
        }
        if let Some(t) = self.thread.lock().expect("vCPU thread lock").take()
            && t.join().is_err()
        {
            tracing::error!(vm = %self.label, "the vCPU thread panicked");
        }
    }
}

/// The vCPU thread: runs the guest while wanted, parks when asked.
fn vcpu_thread(shared: &Shared, io: &dyn PortIo, mut vcpu: VcpuFd) {
    let waiter = Waiter { shared };
    shared.lock().tid = u32::try_from(nix::unistd::gettid().as_raw()).ok();
    loop {
        {
            let want = shared.lock().want;
            if want != Want::Run {
                // Finish an `in` or `out` the guest is in the middle of before parking.
                vcpu.set_kvm_immediate_exit(1);
                let done = match vcpu.run() {
                    Err(e) if e.errno() == libc::EINTR => Ok(()),
                    Err(e) => Err(e.to_string()),
                    Ok(exit) => Err(format!("unexpected exit while pausing: {exit:?}")),
                };
                vcpu.set_kvm_immediate_exit(0);
                let mut c = shared.lock();
                c.vcpu = Some(vcpu);
                c.parked = true;
                if let Err(why) = done {
                    c.failed = Some(why);
                }
                shared.cv.notify_all();
                while c.want == Want::Pause {
                    c = shared.cv.wait(c).expect("vCPU control lock");
                }
                if c.want == Want::Stop || c.failed.is_some() {
                    return;
                }
                vcpu = c.vcpu.take().expect("parked with its descriptor");
                c.parked = false;
            }
        }
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                io.port_in(port, data, &waiter);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                io.port_out(port, data);
                None
            }
            Ok(exit) => Some(format!("the guest stopped: unexpected exit {exit:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(why) = failure {
            tracing::error!(backend = BACKEND, "{why}");
            let mut c = shared.lock();
            c.failed = Some(why);
            c.vcpu = Some(vcpu);
            c.parked = true;
            shared.cv.notify_all();
            return;
        }
    }
}

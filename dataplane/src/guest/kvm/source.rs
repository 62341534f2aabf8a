//! The source side: a micro-VM this daemon hosts, running the test guest, migrated away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::program::{self, ProgramHost, Status, SweepReport, Sweeper, WriteModel};
use super::state::VcpuState;
use super::vm::MicroVm;
use super::{BACKEND, err};
use crate::guest::workload::Workload;
use crate::guest::{DirtyBitmap, GuestCheck, GuestError, SourceGuest, memory_digest_known};
use crate::page::{PAGE_SIZE, PageBatch, Pfn};

/// What to boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvmGuestConfig {
    /// Guest pages (256 to 2^20: 1 MiB to 4 GiB).
    pub pages: u64,
    /// The synthetic model the program's writes follow.
    pub workload: Workload,
    /// Seed of the initial memory and of the program's choices.
    pub seed: u64,
    /// Multiplies the model's write rate (0: the guest never writes).
    pub speed: f64,
}

/// A running micro-VM with the test guest.
pub struct KvmGuest {
    vm: MicroVm,
    host: Arc<ProgramHost>,
    /// The progress counter when the guest last paused.
    paused_at: Mutex<Option<u64>>,
    handed_over: AtomicBool,
    /// Auto-converge's cgroup, while it throttles the vCPU thread.
    cgroup: Mutex<Option<crate::guest::cpu_cgroup::CpuCgroup>>,
}

impl std::fmt::Debug for KvmGuest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmGuest")
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl KvmGuest {
    /// Creates the micro-VM, loads the program and its initial memory, and starts it.
    pub fn boot(config: &KvmGuestConfig) -> Result<Self, GuestError> {
        program::check_size(config.pages)?;
        let model = WriteModel::of(config.workload, config.speed);
        let host = Arc::new(ProgramHost::default());
        let vm = MicroVm::new(
            super::vm::GuestRam::new(config.pages)?,
            host.clone(),
            "kvm-source",
        )?;
        host.attach(vm.ram().clone());
        vm.with_vcpu("boot", |vcpu| {
            program::boot(vm.ram(), vcpu, &model, config.seed)
        })?;
        host.set_rate(model.rate);
        vm.resume()?;
        Ok(KvmGuest {
            vm,
            host,
            paused_at: Mutex::new(None),
            handed_over: AtomicBool::new(false),
            cgroup: Mutex::new(None),
        })
    }

    /// The program's status words.
    pub fn status(&self) -> Status {
        Status::read(self.vm.ram())
    }

    /// Has every page checked, by the running program or by the host while the program
    /// waits, and waits for the report.
    pub fn sweep(&self, by: Sweeper, timeout: Duration) -> Result<SweepReport, GuestError> {
        self.host.clear_sweep();
        self.host.request_sweep(by);
        self.vm.wake();
        self.host.wait_sweep(timeout).ok_or_else(|| {
            err(
                "sweep",
                format!(
                    "no report within {timeout:?}{}",
                    self.vm
                        .failure()
                        .map_or_else(String::new, |f| format!(" ({f})"))
                ),
            )
        })
    }

    /// Corrupts one page right before the next sweep (tests of the oracle).
    pub fn corrupt_before_next_sweep(&self) {
        self.host.corrupt_before_next_sweep();
    }

    /// Data pages the host's own check finds bad (paused guest only).
    pub fn host_check(&self) -> Result<Vec<(u32, super::pages::Verdict)>, GuestError> {
        if self.vm.running() {
            return Err(err("check memory", "pause the guest first"));
        }
        Ok(super::pages::bad_pages(
            self.vm.ram(),
            program::data_first(self.vm.ram().pages())..program::data_end(self.vm.ram().pages()),
            self.status().current,
        ))
    }
}

impl SourceGuest for KvmGuest {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.vm.ram().pages()
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        self.vm.set_dirty_log(true)
    }

    fn collect_dirty(&self, bitmap: &mut DirtyBitmap) -> Result<(), GuestError> {
        let log = self.vm.fetch_dirty()?;
        for (w, l) in bitmap.words_mut().iter_mut().zip(log) {
            *w |= l;
        }
        Ok(())
    }

    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError> {
        let ram = self.vm.ram();
        if let Some(&pfn) = pfns.iter().find(|&&p| p >= ram.pages()) {
            return Err(GuestError::PageOutOfRange {
                pfn,
                page_count: ram.pages(),
            });
        }
        for &pfn in pfns {
            ram.load(pfn, batch.push(pfn, &[0; PAGE_SIZE]));
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        self.vm.pause()?;
        *self.paused_at.lock().expect("pause lock") = Some(self.status().progress);
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err(err(
                "resume",
                "the guest was handed over: it runs elsewhere",
            ));
        }
        self.vm.resume()
    }

    fn state(&self) -> Result<Vec<u8>, GuestError> {
        let pages = self.page_count();
        self.vm
            .with_vcpu("save state", |vcpu| VcpuState::capture(vcpu, pages))
            .map(|s| s.encode())
    }

    fn memory_digest(&self) -> Result<u64, GuestError> {
        self.memory_digest_with(&|_| None)
    }

    fn memory_digest_with(
        &self,
        known: &(dyn Fn(usize) -> Option<u64> + Sync),
    ) -> Result<u64, GuestError> {
        if self.vm.running() {
            return Err(err("digest memory", "the guest runs; pause it first"));
        }
        // SAFETY: the vCPU is parked (checked above; only this migration resumes it, and
        // not while it digests), and no host thread writes a source guest's RAM.
        Ok(memory_digest_known(
            unsafe { self.vm.ram().as_slice() },
            known,
        ))
    }

    /// Caps the vCPU thread (a thread of skyferryd) through a cgroup v1 `cpu` group of its
    /// own; 0 moves it back.
    fn throttle(&self, percent: u8) -> Result<(), GuestError> {
        let mut cgroup = self.cgroup.lock().expect("cgroup lock");
        if percent == 0 {
            return match cgroup.take() {
                Some(g) => g.release().map_err(|e| err("release the throttle", e)),
                None => Ok(()),
            };
        }
        if cgroup.is_none() {
            let tid = self
                .vm
                .vcpu_tid()
                .ok_or_else(|| err("throttle", "the vCPU thread has not started"))?;
            let g = crate::guest::cpu_cgroup::CpuCgroup::create_for_thread(
                &format!("kvm-vcpu-{tid}"),
                tid,
            )
            .map_err(|e| err("throttle", e))?;
            *cgroup = Some(g);
        }
        cgroup
            .as_ref()
            .expect("created above")
            .set(percent)
            .map_err(|e| err("throttle", e))
    }

    fn release(&self) {
        if let Some(g) = self.cgroup.lock().expect("cgroup lock").take()
            && let Err(e) = g.release()
        {
            tracing::warn!("releasing the vCPU thread's CPU cgroup: {e}");
        }
    }

    fn hand_over(&self) -> Result<(), GuestError> {
        self.handed_over.store(true, Ordering::Release);
        self.vm.shut_down()?;
        self.vm.set_dirty_log(false)
    }

    fn self_check(&self) -> Option<GuestCheck> {
        Some(GuestCheck {
            progress_at_switch: *self.paused_at.lock().expect("pause lock"),
            progress: self.status().progress,
            resumed: false,
            bad_pages: None,
            checked_by: None,
            downtime_ms: None,
            failure: self.vm.failure(),
        })
    }
}

//! The source side: a running HVM domain, read from dom0.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::state::{Holes, MAX_CONTEXT, XenState};
use super::xen_ffi::{Access, ForeignMemory, Libraries, LibraryPaths, Xc};
use super::{BACKEND, MAP_BATCH, err, holes_of, xen_err};
use crate::guest::{DIGEST_CHUNK, DirtyBitmap, GuestError, SourceGuest, memory_digest_by_chunks};
use crate::page::{PAGE_SIZE, PageBatch, Pfn};

/// Which domain to migrate, and where Xen's libraries are.
#[derive(Debug, Clone)]
pub struct XenSourceConfig {
    /// libxenctrl and libxenforeignmemory (default: Xen 4.17's sonames).
    pub libraries: LibraryPaths,
    /// The domain.
    pub domid: u32,
    /// The paused domain the destination's toolstack created for it.
    pub dest_domid: u32,
}

/// A running HVM domain at the source.
#[derive(Debug)]
pub struct XenGuest {
    config: XenSourceConfig,
    xc: Xc,
    fmem: ForeignMemory,
    frames: u64,
    logdirty: AtomicBool,
    /// Set by `pause` (the next dirty round is the final one); cleared by `resume`.
    paused: AtomicBool,
    handed_over: AtomicBool,
    /// Serialises pause/resume/hand-over so the pause count stays balanced.
    control: Mutex<()>,
}

impl XenGuest {
    /// Opens Xen's interfaces and checks the domain: it must exist, be HVM, and be alive.
    pub fn open(config: XenSourceConfig) -> Result<Self, GuestError> {
        let libs = Libraries::load(&config.libraries).map_err(xen_err("load Xen's libraries"))?;
        let xc = Xc::open(&libs).map_err(xen_err("open the hypervisor interface"))?;
        let fmem = ForeignMemory::open(&libs).map_err(xen_err("open foreign memory"))?;
        let domid = config.domid;
        let info = xc
            .domain_info(domid)
            .map_err(xen_err("find the source domain"))?;
        if !info.hvm {
            return Err(err(
                "find the source domain",
                format!("domain {domid} is a PV guest; the xen backend migrates HVM guests"),
            ));
        }
        if info.shutdown_or_dying {
            return Err(err(
                "find the source domain",
                format!("domain {domid} is shut down or dying"),
            ));
        }
        let frames = xc
            .nr_gpfns(domid)
            .map_err(xen_err("size the source domain"))?;
        if frames == 0 {
            return Err(err(
                "size the source domain",
                format!("domain {domid} has no memory"),
            ));
        }
        Ok(XenGuest {
            config,
            xc,
            fmem,
            frames,
            logdirty: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            control: Mutex::new(()),
        })
    }

    fn domid(&self) -> u32 {
        self.config.domid
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.control
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Copies `pfns` (in order) into `out`, which the caller zeroed: memory through one
    /// mapped batch; holes stay zero.
    fn copy_batch(&self, pfns: &[Pfn], out: &mut [crate::page::Page]) -> Result<(), GuestError> {
        let types = self
            .xc
            .frame_types(self.domid(), pfns)
            .map_err(xen_err("read frame types"))?;
        let ram: Vec<u64> = pfns
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == super::xen_ffi::FrameType::Ram)
            .map(|(p, _)| *p)
            .collect();
        let batch = self
            .fmem
            .map(self.domid(), &ram, Access::Read)
            .and_then(|b| b.complete(self.domid()))
            .map_err(xen_err("map guest frames"))?;
        let ram_pages = out
            .iter_mut()
            .zip(&types)
            .filter(|(_, t)| **t == super::xen_ffi::FrameType::Ram);
        for (i, (page, _)) in ram_pages.enumerate() {
            batch
                .page(i)
                .expect("complete() checked every frame")
                .copy_to(&mut page.0);
        }
        Ok(())
    }

    fn check_pfns(&self, pfns: &[Pfn]) -> Result<(), GuestError> {
        match pfns.iter().find(|&&p| p >= self.frames) {
            Some(&pfn) => Err(GuestError::PageOutOfRange {
                pfn,
                page_count: self.frames,
            }),
            None => Ok(()),
        }
    }
}

impl SourceGuest for XenGuest {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.frames
    }

    fn destination(&self) -> Option<String> {
        Some(self.config.dest_domid.to_string())
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        let domid = self.domid();
        if let Err(first) = self.xc.enable_logdirty(domid) {
            // Log-dirty may already be on: left by a migration that crashed, or used by the
            // device model to track video RAM. Xen's own save code turns it off and on again.
            if first.errno() != Some(libc::EINVAL) && first.errno() != Some(libc::EBUSY) {
                return Err(xen_err("enable log-dirty mode")(first));
            }
            tracing::warn!(
                domid,
                "log-dirty mode was already on ({first}); restarting it"
            );
            self.xc
                .disable_logdirty(domid)
                .and_then(|()| self.xc.enable_logdirty(domid))
                .map_err(xen_err("enable log-dirty mode"))?;
        }
        self.logdirty.store(true, Ordering::Release);
        Ok(())
    }

    fn collect_dirty(&self, bitmap: &mut DirtyBitmap) -> Result<(), GuestError> {
        let mut buf = self
            .xc
            .dirty_buffer(self.frames)
            .map_err(xen_err("allocate the dirty bitmap"))?;
        let final_round = self.paused.load(Ordering::Acquire);
        self.xc
            .logdirty_clean(self.domid(), &mut buf, final_round)
            .map_err(xen_err("read the dirty log"))?;
        let tail = self.frames % 64;
        let last = bitmap.words().len().saturating_sub(1);
        for (i, (w, d)) in bitmap.words_mut().iter_mut().zip(buf.words()).enumerate() {
            // Bits past the last frame are not frames.
            let mask = if i == last && tail != 0 {
                (1u64 << tail) - 1
            } else {
                u64::MAX
            };
            *w |= d & mask;
        }
        Ok(())
    }

    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError> {
        self.check_pfns(pfns)?;
        for chunk in pfns.chunks(MAP_BATCH) {
            let out = batch.push_zeroed(chunk);
            self.copy_batch(chunk, out)?;
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        let _g = self.lock();
        if self.paused.load(Ordering::Acquire) {
            return Ok(());
        }
        self.xc
            .pause(self.domid())
            .map_err(xen_err("pause the source domain"))?;
        self.paused.store(true, Ordering::Release);
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        let _g = self.lock();
        if self.handed_over.load(Ordering::Acquire) {
            return Err(err(
                "resume the source domain",
                "the migration committed: the guest runs at the destination",
            ));
        }
        if self.paused.load(Ordering::Acquire) {
            self.xc
                .unpause(self.domid())
                .map_err(xen_err("resume the source domain"))?;
            self.paused.store(false, Ordering::Release);
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<u8>, GuestError> {
        let context = self
            .xc
            .hvm_context(self.domid())
            .map_err(xen_err("save the HVM context"))?;
        if context.len() > MAX_CONTEXT {
            return Err(err(
                "save the HVM context",
                format!("{} bytes is more than skyferry carries", context.len()),
            ));
        }
        let holes = holes_of(&self.xc, self.domid(), self.frames)?;
        Ok(XenState {
            frames: self.frames,
            holes: Holes::of(&holes),
            context,
        }
        .encode())
    }

    fn memory_digest(&self) -> Result<u64, GuestError> {
        self.memory_digest_with(&|_| None)
    }

    fn memory_digest_with(
        &self,
        known: &(dyn Fn(usize) -> Option<u64> + Sync),
    ) -> Result<u64, GuestError> {
        let per_chunk = (DIGEST_CHUNK / PAGE_SIZE) as u64;
        let chunks = usize::try_from(self.frames.div_ceil(per_chunk)).expect("fits");
        let hash = |c: usize| -> Result<u64, GuestError> {
            let first = c as u64 * per_chunk;
            let pfns: Vec<Pfn> = (first..(first + per_chunk).min(self.frames)).collect();
            let mut pages = vec![crate::page::Page::default(); pfns.len()];
            self.copy_batch(&pfns, &mut pages)?;
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for p in &pages {
                h.update(&p.0);
            }
            Ok(h.digest())
        };
        memory_digest_by_chunks(chunks, known, &hash)
    }

    fn hand_over(&self) -> Result<(), GuestError> {
        let _g = self.lock();
        self.handed_over.store(true, Ordering::Release);
        // The domain stays paused for good: the toolstack destroys it. Log-dirty mode is
        // only tidied up; a failure here cannot undo the commit.
        if self.logdirty.swap(false, Ordering::AcqRel)
            && let Err(e) = self.xc.disable_logdirty(self.domid())
        {
            tracing::warn!(domid = self.domid(), "turning log-dirty mode off: {e}");
        }
        Ok(())
    }

    fn release(&self) {
        if self.logdirty.swap(false, Ordering::AcqRel)
            && let Err(e) = self.xc.disable_logdirty(self.domid())
        {
            tracing::warn!(domid = self.domid(), "turning log-dirty mode off: {e}");
        }
    }
}

//! The destination side: a domain the toolstack created paused, filled from dom0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::state::{Holes, XenState};
use super::xen_ffi::{Access, ForeignMemory, Libraries, LibraryPaths, MappedBatch, Xc};
use super::{BACKEND, err, holes_of, xen_err};
use crate::codec::PageSink;
use crate::guest::claims::WriterClaims;
use crate::guest::{
    DIGEST_CHUNK, DestGuest, DirtyBitmap, GuestError, PageWriter, memory_digest_by_chunks,
};
use crate::page::{PAGE_SIZE, Page, Pfn};

/// Frames per mapping of the destination domain (1 GiB): the whole domain stays mapped for
/// the migration, in ranges of this size.
const MAP_RANGE: u64 = 1 << 18;

struct Inner {
    xc: Xc,
    domid: u32,
    frames: u64,
    /// The whole domain, mapped for writing, `MAP_RANGE` frames per batch.
    maps: Vec<MappedBatch>,
    holes: DirtyBitmap,
    claims: WriterClaims,
    /// Non-zero pages the source sent for frames that are holes here.
    into_holes: AtomicU64,
    started: AtomicBool,
}

impl Inner {
    fn frame_ptr(&self, pfn: Pfn) -> Option<std::ptr::NonNull<u8>> {
        let map = &self.maps[usize::try_from(pfn / MAP_RANGE).expect("fits")];
        map.page(usize::try_from(pfn % MAP_RANGE).expect("fits"))
            .map(|p| p.as_ptr())
    }
}

/// The domain being filled at the destination.
pub struct XenTarget {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for XenTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenTarget")
            .field("domid", &self.inner.domid)
            .field("frames", &self.inner.frames)
            .finish_non_exhaustive()
    }
}

impl XenTarget {
    /// Takes over domain `domid`, which the toolstack created paused with the source's
    /// configuration, for a guest of `pages` frames, and maps all its memory for writing.
    pub fn prepare(libraries: &LibraryPaths, domid: u32, pages: u64) -> Result<Self, GuestError> {
        let libs = Libraries::load(libraries).map_err(xen_err("load Xen's libraries"))?;
        let xc = Xc::open(&libs).map_err(xen_err("open the hypervisor interface"))?;
        let fmem = ForeignMemory::open(&libs).map_err(xen_err("open foreign memory"))?;
        let info = xc
            .domain_info(domid)
            .map_err(xen_err("find the destination domain"))?;
        if !info.hvm {
            return Err(err(
                "find the destination domain",
                format!("domain {domid} is a PV guest; the xen backend migrates HVM guests"),
            ));
        }
        if !info.paused || info.shutdown_or_dying {
            return Err(err(
                "find the destination domain",
                format!(
                    "domain {domid} is {}; the toolstack must create it paused (xl create -p) \
                     and leave it to skyferry",
                    if info.paused {
                        "shut down or dying"
                    } else {
                        "running"
                    }
                ),
            ));
        }
        let frames = xc
            .nr_gpfns(domid)
            .map_err(xen_err("size the destination domain"))?;
        if frames != pages {
            return Err(GuestError::SizeMismatch {
                source_pages: pages,
                dest_pages: frames,
            });
        }
        let holes = holes_of(&xc, domid, frames)?;
        let mut maps = Vec::new();
        for start in (0..frames).step_by(usize::try_from(MAP_RANGE).expect("fits")) {
            let range: Vec<u64> = (start..(start + MAP_RANGE).min(frames)).collect();
            let map = fmem
                .map(domid, &range, Access::Write)
                .map_err(xen_err("map the destination domain"))?;
            // Holes cannot be mapped; memory must be.
            if let Some((frame, errno)) = map.failures().find(|(f, _)| !holes.get(*f)) {
                return Err(xen_err("map the destination domain")(
                    super::xen_ffi::XenError::MapFrames {
                        domid,
                        requested: range.len(),
                        failed: map.failures().filter(|(f, _)| !holes.get(*f)).count(),
                        frame,
                        errno,
                    },
                ));
            }
            maps.push(map);
        }
        Ok(XenTarget {
            inner: Arc::new(Inner {
                xc,
                domid,
                frames,
                maps,
                holes,
                claims: WriterClaims::new(frames),
                into_holes: AtomicU64::new(0),
                started: AtomicBool::new(false),
            }),
        })
    }

    /// Refuses unless the domain is still paused and not started by us: if anyone else
    /// unpaused it, the guest could run on two hosts.
    fn check_still_paused(&self, op: &'static str) -> Result<(), GuestError> {
        let i = &self.inner;
        if i.started.load(Ordering::Acquire) {
            return Err(err(op, "the guest already runs here"));
        }
        let info =
            i.xc.domain_info(i.domid)
                .map_err(xen_err("check the destination domain"))?;
        if !info.paused {
            return Err(err(
                op,
                format!(
                    "domain {} was unpaused by someone else during the migration",
                    i.domid
                ),
            ));
        }
        Ok(())
    }
}

/// Writes one stream's pages into the destination domain.
struct XenWriter {
    inner: Arc<Inner>,
    id: u32,
    owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    /// Where pages for holes go (they should all be zero; non-zero ones are counted).
    scratch: Box<Page>,
    scratch_pfn: Option<Pfn>,
}

impl XenWriter {
    fn check(&self, pfn: Pfn) {
        assert!(
            pfn < self.inner.frames,
            "{BACKEND}: page {pfn} is beyond the guest's {} pages",
            self.inner.frames
        );
        assert!(
            (self.owns)(pfn),
            "{BACKEND}: page {pfn} arrived on a stream whose writer does not own it"
        );
    }

    /// Counts a page written into a hole that was not zero.
    fn settle_scratch(&mut self) {
        if self.scratch_pfn.take().is_some() && !self.scratch.is_zero() {
            self.inner.into_holes.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl PageSink for XenWriter {
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
        self.check(pfn);
        self.settle_scratch();
        let Some(ptr) = self.inner.frame_ptr(pfn) else {
            self.scratch_pfn = Some(pfn);
            return &mut self.scratch;
        };
        self.inner.claims.claim(pfn, self.id, BACKEND);
        // SAFETY: the frame is mapped writable (it is not a hole) in `inner.maps`, which
        // `self.inner` keeps alive; foreign mappings are page-aligned, meeting `Page`'s
        // alignment, and any 4096 bytes are a valid `Page`. The reference is exclusive: the
        // claim above makes this writer the frame's only writer for good, `&mut self` keeps
        // it from handing the frame out twice at once, the domain is paused (checked at
        // prepare and again before start), and the digest reads frames only once every
        // writer is dropped.
        unsafe { &mut *ptr.as_ptr().cast::<Page>() }
    }

    fn zero_page(&mut self, pfn: Pfn) {
        self.check(pfn);
        if self.inner.holes.get(pfn) {
            return; // a hole here too: nothing to write
        }
        let page = self.page_mut(pfn);
        if !page.is_zero() {
            page.0.fill(0);
        }
    }
}

impl PageWriter for XenWriter {}

impl Drop for XenWriter {
    fn drop(&mut self) {
        self.settle_scratch();
        self.inner.claims.close();
    }
}

impl DestGuest for XenTarget {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.inner.frames
    }

    fn writer(
        &self,
        owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    ) -> Result<Box<dyn PageWriter>, GuestError> {
        if self.inner.started.load(Ordering::Acquire) {
            return Err(err("open a page writer", "the guest already runs here"));
        }
        let id = self.inner.claims.open();
        Ok(Box::new(XenWriter {
            inner: self.inner.clone(),
            id,
            owns,
            scratch: Box::default(),
            scratch_pfn: None,
        }))
    }

    fn set_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let state = XenState::decode(blob)?;
        let i = &self.inner;
        if state.frames != i.frames {
            return Err(GuestError::SizeMismatch {
                source_pages: state.frames,
                dest_pages: i.frames,
            });
        }
        let ours = Holes::of(&i.holes);
        let into_holes = i.into_holes.load(Ordering::Relaxed);
        if state.holes != ours || into_holes != 0 {
            return Err(GuestError::BadState(format!(
                "{BACKEND}: the destination domain's physmap differs from the source's: {} \
                 holes there, {} here, {into_holes} pages with content sent into holes here \
                 (create it with the source's configuration)",
                state.holes.count, ours.count
            )));
        }
        self.check_still_paused("load the HVM context")?;
        i.xc.set_hvm_context(i.domid, &state.context)
            .map_err(xen_err("load the HVM context"))
    }

    fn memory_digest(&self) -> u64 {
        self.memory_digest_with(&|_| None)
    }

    fn memory_digest_with(&self, known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> u64 {
        let i = &self.inner;
        let live = i.claims.live();
        assert_eq!(
            live, 0,
            "{BACKEND}: digest requested with {live} writers open"
        );
        let per_chunk = (DIGEST_CHUNK / PAGE_SIZE) as u64;
        let chunks = usize::try_from(i.frames.div_ceil(per_chunk)).expect("fits");
        let zero = [0u8; PAGE_SIZE];
        let hash = |c: usize| -> Result<u64, std::convert::Infallible> {
            let first = c as u64 * per_chunk;
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            for pfn in first..(first + per_chunk).min(i.frames) {
                let map = &i.maps[usize::try_from(pfn / MAP_RANGE).expect("fits")];
                match map.page(usize::try_from(pfn % MAP_RANGE).expect("fits")) {
                    // SAFETY: the domain is paused and every writer of this process is
                    // dropped (asserted above), so nothing writes the frame meanwhile.
                    Some(p) => h.update(unsafe { p.as_slice() }),
                    None => h.update(&zero),
                }
            }
            Ok(h.digest())
        };
        match memory_digest_by_chunks(chunks, known, &hash) {
            Ok(d) => d,
        }
    }

    fn start(&self) -> Result<(), GuestError> {
        let i = &self.inner;
        let live = i.claims.live();
        if live != 0 {
            return Err(err("start", format!("{live} page writers are still open")));
        }
        self.check_still_paused("start")?;
        i.xc.unpause(i.domid)
            .map_err(xen_err("unpause the destination domain"))?;
        i.started.store(true, Ordering::Release);
        Ok(())
    }
}

//! A guest that is a fixed memory image: nothing writes it while it migrates.
//!
//! For benchmarks and tests that need exact, chosen content (a page mix) rather than a
//! workload model: pre-copy sends every page once and finds nothing dirty after. It lands in
//! a [`SyntheticTarget`](super::synthetic::SyntheticTarget) as a synthetic guest that runs
//! nothing.

use std::sync::atomic::{AtomicBool, Ordering};

use super::shm::SharedMemory;
use super::{DirtyBitmap, GuestError, SourceGuest, memory_digest, memory_digest_known};
use crate::page::{PAGE_SIZE, PageBatch, Pfn};

/// A source guest over a memory image built once and never written again.
#[derive(Debug)]
pub struct ImageGuest {
    mem: SharedMemory,
    pages: u64,
    handed_over: AtomicBool,
}

impl ImageGuest {
    /// A `pages`-page guest; `fill(pfn, page)` writes each page's content (pages start zeroed,
    /// so a fill that leaves a page alone leaves it zero and unallocated).
    pub fn new(pages: u64, mut fill: impl FnMut(Pfn, &mut [u8])) -> Result<Self, GuestError> {
        let len = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| usize::try_from(b).ok())
            .filter(|&b| b > 0)
            .ok_or_else(|| GuestError::Backend {
                backend: "image",
                op: "create",
                message: format!("{pages} pages is not a usable guest size"),
            })?;
        let mut mem = SharedMemory::new("skyferry-image-guest", len, false)?;
        for (pfn, page) in (0..).zip(mem.as_mut_slice().chunks_exact_mut(PAGE_SIZE)) {
            fill(pfn, page);
        }
        // Zero pages too are memory the guest has: reading them must not allocate them.
        mem.populate()?;
        Ok(ImageGuest {
            mem,
            pages,
            handed_over: AtomicBool::new(false),
        })
    }

    /// The image.
    pub fn memory(&self) -> &[u8] {
        self.mem.as_slice()
    }
}

impl SourceGuest for ImageGuest {
    fn backend(&self) -> &'static str {
        "image"
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn collect_dirty(&self, _bitmap: &mut DirtyBitmap) -> Result<(), GuestError> {
        Ok(()) // nothing ever writes the image
    }

    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError> {
        for &pfn in pfns {
            let at = usize::try_from(pfn)
                .ok()
                .filter(|_| pfn < self.pages)
                .ok_or(GuestError::PageOutOfRange {
                    pfn,
                    page_count: self.pages,
                })?
                * PAGE_SIZE;
            let page = self.mem.as_slice()[at..at + PAGE_SIZE]
                .try_into()
                .expect("PAGE_SIZE bytes");
            batch.push(pfn, page);
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err(GuestError::Backend {
                backend: "image",
                op: "resume",
                message: "the guest was handed over to the destination".into(),
            });
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<u8>, GuestError> {
        Ok(super::synthetic::stopped_state(self.pages))
    }

    fn memory_digest(&self) -> Result<u64, GuestError> {
        Ok(memory_digest(self.mem.as_slice()))
    }

    fn memory_digest_with(
        &self,
        known: &(dyn Fn(usize) -> Option<u64> + Sync),
    ) -> Result<u64, GuestError> {
        Ok(memory_digest_known(self.mem.as_slice(), known))
    }

    fn hand_over(&self) -> Result<(), GuestError> {
        self.handed_over.store(true, Ordering::Release);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_filled_and_refuses_out_of_range() {
        let g = ImageGuest::new(4, |pfn, page| page.fill(u8::try_from(pfn).unwrap())).unwrap();
        let mut b = PageBatch::with_capacity(2);
        g.read_pages(&[3, 1], &mut b).unwrap();
        let got: Vec<_> = b.iter().map(|(pfn, p)| (pfn, p.0[17])).collect();
        assert_eq!(got, vec![(3, 3), (1, 1)]);
        assert!(matches!(
            g.read_pages(&[4], &mut b),
            Err(GuestError::PageOutOfRange { pfn: 4, .. })
        ));
        assert_eq!(g.memory_digest().unwrap(), memory_digest(g.memory()));
        g.hand_over().unwrap();
        assert!(g.resume().is_err(), "never resumed after the hand-over");
        assert!(ImageGuest::new(0, |_, _| {}).is_err());
    }
}

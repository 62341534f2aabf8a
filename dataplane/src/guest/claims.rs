//! Which page writer owns each destination page: the rule that lets a backend hand out
//! `&mut Page` into shared guest memory (a QEMU RAM file, a Xen foreign mapping).
//!
//! The destination driver gives each writer a disjoint set of pages; the first write of a
//! page claims it for its writer for good, and a second writer touching it is a bug that
//! must stop the migration, not corrupt memory.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::page::Pfn;

/// Per-page owners and the writers alive.
#[derive(Debug)]
pub struct WriterClaims {
    /// Per page, the writer that wrote it (0: none yet).
    owner: Box<[AtomicU32]>,
    live: AtomicUsize,
    next: AtomicU32,
}

impl WriterClaims {
    /// Claims for `pages` pages, none written.
    pub fn new(pages: u64) -> Self {
        WriterClaims {
            owner: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            live: AtomicUsize::new(0),
            next: AtomicU32::new(1),
        }
    }

    /// A new writer's id, counted alive until [`close`](Self::close).
    pub fn open(&self) -> u32 {
        self.live.fetch_add(1, Ordering::AcqRel);
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A writer is gone.
    pub fn close(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// Writers alive.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Makes writer `id` the owner of `pfn` for good (or confirms it). Panics if another
    /// writer owns it: the ownership sets given to `DestGuest::writer` overlap.
    pub fn claim(&self, pfn: Pfn, id: u32, backend: &str) {
        let slot = &self.owner[usize::try_from(pfn).expect("page number range-checked")];
        match slot.compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {}
            Err(other) if other == id => {}
            Err(other) => panic!(
                "{backend}: page {pfn} written by writers {other} and {id}: the ownership sets \
                 given to DestGuest::writer overlap"
            ),
        }
    }

    /// Whether any writer has written `pfn`.
    pub fn written(&self, pfn: Pfn) -> bool {
        self.owner[usize::try_from(pfn).expect("page number range-checked")].load(Ordering::Acquire)
            != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_belongs_to_its_first_writer() {
        let c = WriterClaims::new(4);
        let (a, b) = (c.open(), c.open());
        assert_ne!(a, b);
        assert_eq!(c.live(), 2);
        assert!(!c.written(1));
        c.claim(1, a, "t");
        c.claim(1, a, "t");
        assert!(c.written(1));
        c.claim(2, b, "t");
        let overlap = std::panic::catch_unwind(|| c.claim(1, b, "t"));
        assert!(overlap.is_err());
        c.close();
        c.close();
        assert_eq!(c.live(), 0);
    }
}

//! Which page writer owns each destination page: the rule that lets a backend hand out
//! `&mut Page` into shared guest memory (a QEMU RAM file, a Xen foreign mapping).
//!
//! The destination driver gives each writer a disjoint set of pages; the first write of a
//! page claims it for its writer for good, and a second writer touching it is a bug that
//! must stop the migration, not corrupt memory.
//!
//! A resumed migration (its link broke in pre-copy) opens a new set of writers once every
//! writer of the broken session is closed: a page owned by a closed writer passes to the
//! first new writer that writes it, and still counts as written.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use crate::page::Pfn;

/// Per-page owners and the writers alive.
#[derive(Debug)]
pub struct WriterClaims {
    /// Per page, the writer that wrote it (0: none yet).
    owner: Box<[AtomicU32]>,
    live: AtomicUsize,
    /// The next writer's id.
    next: Mutex<u32>,
    /// The first id of the current set of writers: every writer below it was closed when the
    /// set opened.
    floor: AtomicU32,
}

impl WriterClaims {
    /// Claims for `pages` pages, none written.
    pub fn new(pages: u64) -> Self {
        WriterClaims {
            owner: (0..pages).map(|_| AtomicU32::new(0)).collect(),
            live: AtomicUsize::new(0),
            next: Mutex::new(1),
            floor: AtomicU32::new(1),
        }
    }

    /// A new writer's id, counted alive until [`close`](Self::close). The first writer opened
    /// while none is alive starts a new set.
    pub fn open(&self) -> u32 {
        let mut next = self.next.lock().expect("claims lock");
        let id = *next;
        if self.live.fetch_add(1, Ordering::AcqRel) == 0 {
            self.floor.store(id, Ordering::Release);
        }
        *next = id.checked_add(1).expect("fewer than 2^32 page writers");
        id
    }

    /// A writer is gone.
    pub fn close(&self) {
        self.live.fetch_sub(1, Ordering::AcqRel);
    }

    /// Writers alive.
    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Makes writer `id` the owner of `pfn` (or confirms it), taking it over from a writer
    /// of an earlier, closed set. Panics if a writer of the current set owns it: the
    /// ownership sets given to `DestGuest::writer` overlap.
    pub fn claim(&self, pfn: Pfn, id: u32, backend: &str) {
        let slot = &self.owner[usize::try_from(pfn).expect("page number range-checked")];
        let mut seen = 0;
        loop {
            match slot.compare_exchange(seen, id, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(other) if other == id => return,
                // Its set closed before ours opened: no reference of it is alive.
                Err(other) if other < self.floor.load(Ordering::Acquire) => seen = other,
                Err(other) => panic!(
                    "{backend}: page {pfn} written by writers {other} and {id}: the ownership \
                     sets given to DestGuest::writer overlap"
                ),
            }
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
        // A resumed session's writers take the pages over; they still count as written.
        let (d, e) = (c.open(), c.open());
        c.claim(1, e, "t");
        c.claim(2, d, "t");
        assert!(c.written(1) && c.written(2));
        let overlap = std::panic::catch_unwind(|| c.claim(1, d, "t"));
        assert!(overlap.is_err());
    }
}

//! Memory-digest chunks hashed as pages stream past, so the switchover rehashes only the
//! chunks that changed since.
//!
//! The digest both ends compare ([`memory_digest`](super::memory_digest)) is a hash of 1 MiB
//! chunk hashes. A chunk whose 256 pages go by in order on one stream (every chunk, in
//! iteration 1) is hashed then, from pages already in the core's cache. A chunk hash stays
//! valid until the chunk may have changed: at the source, until a dirty log reports one of
//! its pages; at the destination, until a later write lands in it. With the guest paused,
//! only invalid chunks are read again, so a guest that dirtied little pauses briefly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use xxhash_rust::xxh3::Xxh3;

use super::{DIGEST_CHUNK, DirtyBitmap};
use crate::page::{PAGE_SIZE, Page, Pfn, is_zero};

/// Pages per digest chunk.
pub const PAGES_PER_CHUNK: u64 = (DIGEST_CHUNK / PAGE_SIZE) as u64;

/// The chunk holding page `pfn`.
pub fn chunk_of(pfn: Pfn) -> usize {
    usize::try_from(pfn / PAGES_PER_CHUNK).expect("chunk index fits in usize")
}

/// Chunk hashes known so far, shared by the threads that stream pages and the driver.
#[derive(Debug)]
pub struct ChunkDigests {
    hashes: Box<[AtomicU64]>,
    valid: Box<[AtomicBool]>,
    pages: u64,
}

impl ChunkDigests {
    /// Nothing known yet, for a guest of `pages` pages.
    pub fn new(pages: u64) -> Self {
        let chunks = usize::try_from(pages.div_ceil(PAGES_PER_CHUNK)).expect("fits in memory");
        ChunkDigests {
            hashes: (0..chunks).map(|_| AtomicU64::new(0)).collect(),
            valid: (0..chunks).map(|_| AtomicBool::new(false)).collect(),
            pages,
        }
    }

    /// Chunk `chunk`'s hash, if known and still valid.
    pub fn known(&self, chunk: usize) -> Option<u64> {
        // Acquire pairs with `store`'s Release: a valid flag implies its hash is visible.
        (self.valid.get(chunk)?.load(Ordering::Acquire))
            .then(|| self.hashes[chunk].load(Ordering::Relaxed))
    }

    fn store(&self, chunk: usize, hash: u64) {
        self.hashes[chunk].store(hash, Ordering::Relaxed);
        self.valid[chunk].store(true, Ordering::Release);
    }

    /// Chunk `chunk` may have changed.
    pub fn invalidate(&self, chunk: usize) {
        if let Some(v) = self.valid.get(chunk) {
            v.store(false, Ordering::Release);
        }
    }

    /// Every chunk with a page in `dirty` may have changed.
    pub fn invalidate_dirty(&self, dirty: &DirtyBitmap) {
        let words_per_chunk = usize::try_from(PAGES_PER_CHUNK / 64).expect("small");
        for (i, w) in dirty.words().chunks(words_per_chunk).enumerate() {
            if w.iter().any(|&w| w != 0) {
                self.invalidate(i);
            }
        }
    }

    /// Chunks with a valid hash.
    pub fn valid_chunks(&self) -> usize {
        self.valid
            .iter()
            .filter(|v| v.load(Ordering::Relaxed))
            .count()
    }

    /// Chunks in all.
    pub fn chunks(&self) -> usize {
        self.valid.len()
    }
}

/// One stream's running hash of the chunk whose pages it is passing, in order.
pub struct ChunkHasher {
    state: Box<Xxh3>,
    /// The chunk being hashed and the page expected next, while the run is unbroken.
    current: Option<(usize, Pfn)>,
    /// Zero pages seen since the last non-zero one and not yet fed to `state`: a chunk of
    /// zero pages (common) is never hashed, its digest is known.
    zeros: u64,
}

/// The digest of a whole chunk of zeros.
fn zero_chunk_digest() -> u64 {
    static DIGEST: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *DIGEST.get_or_init(|| xxhash_rust::xxh3::xxh3_64(&[0u8; DIGEST_CHUNK]))
}

static ZERO_PAGE: Page = Page([0; PAGE_SIZE]);

impl std::fmt::Debug for ChunkHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkHasher")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Default for ChunkHasher {
    fn default() -> Self {
        ChunkHasher {
            state: Box::new(Xxh3::new()),
            current: None,
            zeros: 0,
        }
    }
}

impl ChunkHasher {
    /// Page `pfn` now holds `page`. `invalidate`: mark its chunk changed first (the
    /// destination, where every write changes memory; the source learns of changes from
    /// its dirty log instead).
    pub fn feed(
        &mut self,
        digests: &ChunkDigests,
        pfn: Pfn,
        page: &[u8; PAGE_SIZE],
        invalidate: bool,
    ) {
        let chunk = chunk_of(pfn);
        if invalidate {
            digests.invalidate(chunk);
        }
        if pfn.is_multiple_of(PAGES_PER_CHUNK) {
            self.state.reset();
            self.current = Some((chunk, pfn));
            self.zeros = 0;
        }
        match self.current {
            Some((c, next)) if c == chunk && next == pfn => {}
            _ => {
                self.current = None; // out of order: this chunk is hashed at the switchover
                return;
            }
        }
        if is_zero(page) {
            self.zeros += 1;
        } else {
            self.feed_zeros();
            self.state.update(page);
        }
        let next = pfn + 1;
        if next.is_multiple_of(PAGES_PER_CHUNK) || next == digests.pages {
            let digest = if self.zeros == PAGES_PER_CHUNK {
                zero_chunk_digest()
            } else {
                self.feed_zeros();
                self.state.digest()
            };
            digests.store(chunk, digest);
            self.current = None;
        } else {
            self.current = Some((chunk, next));
        }
    }
}

impl ChunkHasher {
    fn feed_zeros(&mut self) {
        for _ in 0..std::mem::take(&mut self.zeros) {
            self.state.update(&ZERO_PAGE.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::memory_digest_known;

    fn page(pfn: Pfn, version: u8) -> Page {
        let mut p = Page::zeroed();
        p.0[..8].copy_from_slice(&pfn.to_le_bytes());
        p.0[100] = version;
        p
    }

    #[test]
    fn streamed_chunks_match_the_memory_digest_and_breaks_are_left_unknown() {
        let pages = 3 * PAGES_PER_CHUNK + 10; // a short last chunk
        let mut mem = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        let digests = ChunkDigests::new(pages);
        let mut h = ChunkHasher::default();
        for pfn in 0..pages {
            let p = page(pfn, 1);
            let at = usize::try_from(pfn).unwrap() * PAGE_SIZE;
            mem[at..at + PAGE_SIZE].copy_from_slice(&p.0);
            // Chunk 1 arrives with a gap: it cannot be streamed.
            if pfn != PAGES_PER_CHUNK + 5 {
                h.feed(&digests, pfn, &p.0, true);
            }
        }
        assert_eq!(digests.chunks(), 4);
        assert_eq!(digests.valid_chunks(), 3);
        assert!(digests.known(1).is_none());
        let known = |c| digests.known(c);
        assert_eq!(
            memory_digest_known(&mem, &known),
            crate::guest::memory_digest(&mem)
        );

        // A later write invalidates its chunk at the destination...
        h.feed(&digests, 7, &page(7, 2).0, true);
        assert!(digests.known(0).is_none());
        // ...and a dirty log does at the source.
        let mut dirty = DirtyBitmap::new(pages);
        dirty.set(2 * PAGES_PER_CHUNK + 3);
        digests.invalidate_dirty(&dirty);
        assert!(digests.known(2).is_none());
        assert!(digests.known(3).is_some());
    }

    #[test]
    fn zero_runs_hash_like_any_content() {
        // Chunks all zero, zero then data, data then zero, and a short last chunk of zeros.
        let pages = 3 * PAGES_PER_CHUNK + 3;
        let mut mem = vec![0u8; usize::try_from(pages).unwrap() * PAGE_SIZE];
        let digests = ChunkDigests::new(pages);
        let mut h = ChunkHasher::default();
        for pfn in 0..pages {
            let p = if (PAGES_PER_CHUNK + 200..2 * PAGES_PER_CHUNK + 10).contains(&pfn) {
                page(pfn, 1)
            } else {
                Page::zeroed()
            };
            let at = usize::try_from(pfn).unwrap() * PAGE_SIZE;
            mem[at..at + PAGE_SIZE].copy_from_slice(&p.0);
            h.feed(&digests, pfn, &p.0, true);
        }
        assert_eq!(digests.valid_chunks(), 4);
        for c in 0..4 {
            let bytes = &mem[c * DIGEST_CHUNK..((c + 1) * DIGEST_CHUNK).min(mem.len())];
            assert_eq!(
                digests.known(c),
                Some(xxhash_rust::xxh3::xxh3_64(bytes)),
                "chunk {c}"
            );
        }
    }

    #[test]
    fn a_rewritten_chunk_streamed_again_is_valid_again() {
        let digests = ChunkDigests::new(PAGES_PER_CHUNK);
        let mut h = ChunkHasher::default();
        let mut mem = vec![0u8; DIGEST_CHUNK];
        for round in 1..=2u8 {
            for pfn in 0..PAGES_PER_CHUNK {
                let p = page(pfn, round);
                let at = usize::try_from(pfn).unwrap() * PAGE_SIZE;
                mem[at..at + PAGE_SIZE].copy_from_slice(&p.0);
                h.feed(&digests, pfn, &p.0, true);
            }
            assert_eq!(digests.known(0), Some(xxhash_rust::xxh3::xxh3_64(&mem)));
        }
    }
}

//! The block cache both ends keep in lock-step (paper IV-B1/B2, V-C).
//!
//! One FIFO store of 1 KiB blocks. Every block is named by a sequence number that counts
//! insertions since the stream began; it lives in slot `seq % capacity` until `capacity`
//! later insertions overwrite it, so "is this block still cached" is the same arithmetic at
//! both ends. The wire carries the 32-bit slot, never the sequence number.
//!
//! The page index (the delta's "second index, by page number") maps a page to the four
//! blocks it had when last sent. Its blocks may be shared with other pages (a CBR reference
//! points at whatever slot held that content), so a delta never edits a slot in place: the
//! blocks it touched are inserted anew, the untouched ones keep their old slot.
//!
//! Both ends apply every record through [`CacheState::commit`], so they cannot disagree about
//! what to insert, where, or what a page's base is.

use xxhash_rust::xxh3::xxh3_64;

use super::page_index::PageIndex;
use crate::page::{
    BLOCK_SIZE, BLOCKS_PER_PAGE, Block, Pfn, copy_streaming_unfenced, store_fence, streamable,
};

/// Page-index marker for a block known to be zero (never stored).
pub const ZERO_SEQ: u64 = u64::MAX;

static ZERO_BLOCK: Block = [0; BLOCK_SIZE];

/// What a record does with one block of its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// The block's content is new to the cache: store it at the next FIFO slot.
    Insert,
    /// The block's content is already cached under this sequence number (or is zero).
    Keep(u64),
}

/// One slot of the store: a block on its own cache lines, so non-temporal stores fill whole
/// lines and meet the vector stores' alignment.
#[derive(Clone, zerocopy::FromZeros)]
#[repr(C, align(64))]
struct Slot(Block);

/// The FIFO block store.
///
/// Blocks are written with non-temporal stores ([`crate::page::copy_streaming`]): the store is far larger
/// than the CPU caches and a block is read back rarely (a confirmed CBR hit, a delta base),
/// so an ordinary store would first read every line it writes from memory and then push out
/// of the cache the frame and the page being encoded. Measured with `skyferry-bench pipeline`
/// (perf/RESULTS.md, "What changed, measured").
pub struct BlockStore {
    blocks: Box<[Slot]>,
    next_seq: u64,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore")
            .field("capacity", &self.blocks.len())
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl BlockStore {
    /// A store of `capacity` blocks (at least 1, at most 2^32). The memory is requested
    /// zeroed, so the kernel maps it lazily as the cache fills.
    pub fn new(capacity: usize) -> Self {
        assert!(
            (1..=1 << 32).contains(&capacity),
            "cache capacity {capacity}"
        );
        // Zeroed by the allocator (calloc): the kernel maps the pages as the cache fills.
        let blocks = <[Slot] as zerocopy::FromZeros>::new_box_zeroed_with_elems(capacity)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<Slot>()));
        BlockStore {
            blocks,
            next_seq: 0,
        }
    }

    /// Slots in the store.
    pub fn capacity(&self) -> usize {
        self.blocks.len()
    }

    fn cap(&self) -> u64 {
        self.blocks.len() as u64
    }

    /// Index into `blocks` of block `seq`.
    fn index(&self, seq: u64) -> usize {
        // The remainder is below the capacity, which is a usize.
        usize::try_from(seq % self.cap()).expect("slot below capacity")
    }

    /// Sequence number the next insertion gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// True while block `seq` is still in the store.
    pub fn is_live(&self, seq: u64) -> bool {
        seq < self.next_seq && self.next_seq - seq <= self.cap()
    }

    /// The wire slot of a live block.
    pub fn slot(&self, seq: u64) -> u32 {
        debug_assert!(self.is_live(seq));
        // The capacity is at most 2^32, so the remainder fits.
        u32::try_from(seq % self.cap()).expect("slot below capacity")
    }

    /// The sequence number of the block in `slot`, if that slot has been filled.
    pub fn seq_at(&self, slot: u32) -> Option<u64> {
        let slot = u64::from(slot);
        if slot >= self.cap() || slot >= self.next_seq {
            return None;
        }
        // The newest insertion that landed in `slot`.
        let newest = self.next_seq - 1;
        let back = (newest % self.cap() + self.cap() - slot) % self.cap();
        Some(newest - back)
    }

    /// The content of a live block (or of the zero marker).
    pub fn get(&self, seq: u64) -> &Block {
        if seq == ZERO_SEQ {
            return &ZERO_BLOCK;
        }
        debug_assert!(self.is_live(seq));
        &self.blocks[self.index(seq)].0
    }

    /// Forgets every block, keeping the memory (already faulted in) for reuse.
    pub fn clear(&mut self) {
        self.next_seq = 0;
    }

    /// Stores `block` at the next slot; returns its sequence number and the one it evicted.
    pub fn push(&mut self, block: &Block) -> (u64, Option<u64>) {
        let r = self.push_unfenced(block);
        store_fence();
        r
    }

    /// [`push`](Self::push) without the closing fence: the caller must call [`store_fence`]
    /// before the store is read or leaves this thread (`&mut self` until then keeps
    /// everyone else out).
    fn push_unfenced(&mut self, block: &Block) -> (u64, Option<u64>) {
        let seq = self.next_seq;
        let evicted = seq.checked_sub(self.cap());
        let slot = self.index(seq);
        let dst = &mut self.blocks[slot].0;
        debug_assert!(streamable(dst) || !cfg!(target_arch = "x86_64"));
        if streamable(dst) {
            // SAFETY: `dst` is streamable (a whole 64-byte-aligned `Slot` of 1 KiB) and as long
            // as `block`; every caller fences before the store is read again (`push` at once,
            // `CacheState::commit` after the page's blocks, holding `&mut self` until then).
            unsafe { copy_streaming_unfenced(dst, block) };
        } else {
            *dst = *block;
        }
        self.next_seq += 1;
        (seq, evicted)
    }
}

/// The cache state of one stream at one end.
#[derive(Debug)]
pub struct CacheState {
    /// The FIFO store.
    pub store: BlockStore,
    /// Page number -> the page's blocks as last sent; `None` when deltas are off.
    pages: Option<PageIndex>,
    /// Running digest of every insertion, when the self-check is on.
    digest: Option<u64>,
    evictions: u64,
}

impl CacheState {
    /// A cache of `capacity` blocks, with a page index when `page_index` is set and a running
    /// digest when `verify` is set.
    pub fn new(capacity: usize, page_index: bool, verify: bool) -> Self {
        CacheState {
            store: BlockStore::new(capacity),
            pages: page_index.then(|| PageIndex::new(capacity)),
            digest: verify.then_some(0),
            evictions: 0,
        }
    }

    /// Empties the cache (both ends must do it at the same point of the stream), keeping
    /// its memory.
    pub fn reset(&mut self) {
        self.store.clear();
        if let Some(pages) = &mut self.pages {
            pages.clear();
        }
        if let Some(d) = &mut self.digest {
            *d = 0;
        }
    }

    /// Blocks evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// The running digest of all insertions, when the self-check is on.
    pub fn digest(&self) -> Option<u64> {
        self.digest
    }

    /// Starts loading what [`base`](Self::base) will read for `pfn` into the CPU cache.
    pub fn prefetch_base(&self, pfn: Pfn) {
        if let Some(pages) = &self.pages {
            pages.prefetch(pfn);
        }
    }

    /// The blocks page `pfn` had when last sent, if all of them are still cached.
    pub fn base(&self, pfn: Pfn) -> Option<[u64; BLOCKS_PER_PAGE]> {
        let seqs = self.pages.as_ref()?.get(pfn)?;
        seqs.iter()
            .all(|&s| s == ZERO_SEQ || self.store.is_live(s))
            .then_some(seqs)
    }

    /// Records that a page with `blocks` was just sent (or received) as page `pfn`, block `i` meeting
    /// `fates[i]`. `on_insert(i, seq)` is told of each insertion, in block order.
    /// `xxh3(i)` returns block `i`'s XXH3-64 if the caller already has it (the digest needs
    /// it), else `None`.
    pub fn commit(
        &mut self,
        pfn: Pfn,
        blocks: &[Block; BLOCKS_PER_PAGE],
        fates: &[Fate; BLOCKS_PER_PAGE],
        xxh3: impl Fn(usize) -> Option<u64>,
        mut on_insert: impl FnMut(usize, u64),
    ) {
        let mut seqs = [ZERO_SEQ; BLOCKS_PER_PAGE];
        let mut streamed = false;
        for (i, (fate, block)) in fates.iter().zip(blocks).enumerate() {
            seqs[i] = match *fate {
                Fate::Keep(seq) => seq,
                Fate::Insert => {
                    let (seq, evicted) = self.store.push_unfenced(block);
                    streamed = true;
                    self.evictions += u64::from(evicted.is_some());
                    if let Some(d) = &mut self.digest {
                        // Order-dependent mix: equal only if both ends inserted the same
                        // blocks in the same order.
                        let h = xxh3(i).unwrap_or_else(|| xxh3_64(block));
                        *d = (*d ^ h ^ seq)
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                            .rotate_left(23);
                    }
                    on_insert(i, seq);
                    seq
                }
            };
        }
        if streamed {
            // One fence for the page's blocks, before anything can read them.
            store_fence();
        }
        if let Some(pages) = &mut self.pages {
            // A zero page stays a base (sparse writes to it make small deltas); as its
            // newest block counts as oldest, it is the first to go from a full bucket.
            let store = &self.store;
            pages.insert(pfn, seqs, |s| s == ZERO_SEQ || store.is_live(s));
        }
    }

    /// A digest of the whole observable state (every live block, the insertion count, the
    /// page index restricted to live bases). O(cache size): for tests and debugging, to show
    /// two ends hold the same cache.
    pub fn state_digest(&self) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let s = &self.store;
        h.update(&s.next_seq.to_le_bytes());
        let first = s.next_seq.saturating_sub(s.cap());
        for seq in first..s.next_seq {
            h.update(s.get(seq));
        }
        if let Some(pages) = &self.pages {
            let mut live: Vec<_> = pages
                .iter()
                .filter_map(|(p, _)| Some((p, self.base(p)?)))
                .collect();
            live.sort_unstable();
            for (pfn, seqs) in live {
                h.update(&pfn.to_le_bytes());
                for seq in seqs {
                    h.update(&seq.to_le_bytes());
                }
            }
        }
        h.digest()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::page::Page;

    fn block(b: u8) -> Block {
        [b; BLOCK_SIZE]
    }

    #[test]
    fn fifo_evicts_oldest_and_slots_wrap() {
        let mut s = BlockStore::new(3);
        assert_eq!(s.seq_at(0), None);
        for i in 0..3u8 {
            assert_eq!(s.push(&block(i)), (u64::from(i), None));
        }
        assert_eq!(s.push(&block(3)), (3, Some(0)));
        assert!(!s.is_live(0));
        assert!((1..4).all(|q| s.is_live(q)));
        assert!(!s.is_live(4));
        assert_eq!(s.slot(3), 0);
        assert_eq!(s.seq_at(0), Some(3));
        assert_eq!(s.seq_at(1), Some(1));
        assert_eq!(s.seq_at(2), Some(2));
        assert_eq!(s.seq_at(3), None);
        assert_eq!(s.get(3), &block(3));
        for q in 1..4 {
            assert_eq!(s.seq_at(s.slot(q)), Some(q));
        }
    }

    #[test]
    fn base_dies_with_any_of_its_blocks() {
        let mut c = CacheState::new(5, true, false);
        let mut page = Page::zeroed();
        for (b, v) in page.blocks_mut().iter_mut().zip(1..) {
            *b = block(v);
        }
        let fates = [
            Fate::Insert,
            Fate::Keep(ZERO_SEQ),
            Fate::Insert,
            Fate::Insert,
        ];
        c.commit(7, page.blocks(), &fates, |_| None, |_, _| {});
        assert_eq!(c.base(7), Some([0, ZERO_SEQ, 1, 2]));
        assert_eq!(c.base(8), None);
        c.store.push(&block(9));
        c.store.push(&block(9));
        assert!(c.base(7).is_some());
        c.store.push(&block(9)); // evicts seq 0
        assert_eq!(c.base(7), None);
    }
}

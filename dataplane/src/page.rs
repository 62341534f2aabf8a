//! Guest pages as the codec sees them: 4 KiB, split into four 1 KiB blocks.
//!
//! Pages live in 64-byte-aligned, fixed-size arrays so that the zero check, the XOR of the
//! delta and the block compares compile to wide vector loads with no bounds checks.

/// Bytes in a guest page.
pub const PAGE_SIZE: usize = 4096;
/// Bytes in one CBR block (the paper's "four blocks per page", IV-B1).
pub const BLOCK_SIZE: usize = 1024;
/// CBR blocks in a page.
pub const BLOCKS_PER_PAGE: usize = PAGE_SIZE / BLOCK_SIZE;

/// One 1 KiB block of a page.
pub type Block = [u8; BLOCK_SIZE];

/// A guest page frame number (guest-physical address / 4 KiB).
pub type Pfn = u64;

/// One 4 KiB page, aligned for vector loads. Plain bytes without padding, so a run of pages
/// can be read into as one byte slice (`zerocopy`).
#[derive(Clone, PartialEq, Eq, zerocopy::FromBytes, zerocopy::IntoBytes, zerocopy::KnownLayout)]
#[repr(C, align(64))]
pub struct Page(pub [u8; PAGE_SIZE]);

impl Page {
    /// A page of zeros.
    pub const fn zeroed() -> Self {
        Page([0; PAGE_SIZE])
    }

    /// The page's four blocks.
    pub fn blocks(&self) -> &[Block; BLOCKS_PER_PAGE] {
        blocks_of(&self.0)
    }

    /// The page's four blocks, mutably.
    pub fn blocks_mut(&mut self) -> &mut [Block; BLOCKS_PER_PAGE] {
        let (blocks, _) = self.0.as_chunks_mut::<BLOCK_SIZE>();
        blocks.try_into().expect("a page is exactly four blocks")
    }

    /// True when every byte is zero.
    pub fn is_zero(&self) -> bool {
        is_zero(&self.0)
    }
}

impl Default for Page {
    fn default() -> Self {
        Page::zeroed()
    }
}

impl std::fmt::Debug for Page {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // 4 KiB of hex helps nobody; the first bytes and a digest identify a page.
        let digest = xxhash_rust::xxh3::xxh3_64(&self.0);
        write!(f, "Page({:02x?}.. xxh3={digest:016x})", &self.0[..8])
    }
}

/// A page's bytes as its four blocks (for pages that are not a [`Page`], such as one inside
/// a frame).
pub fn blocks_of(page: &[u8; PAGE_SIZE]) -> &[Block; BLOCKS_PER_PAGE] {
    // `as_chunks` on an exact multiple leaves no remainder; the array conversion cannot fail.
    let (blocks, _) = page.as_chunks::<BLOCK_SIZE>();
    blocks.try_into().expect("a page is exactly four blocks")
}

/// Copies `src` into `dst` with non-temporal (streaming) stores, for memory written once and
/// not read again soon (guest memory at the destination, the block cache): the lines go to
/// memory without first being read from it, and without pushing out of the CPU caches what
/// the pipeline works on. Ends with a store fence, so `dst` may be used at once.
///
/// # Panics
/// If the lengths differ.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming: lengths differ");
    if !streamable(dst) {
        dst.copy_from_slice(src);
        return;
    }
    // SAFETY: `dst` passed `streamable`, and the fence follows before `dst` is used again.
    unsafe { copy_streaming_unfenced(dst, src) };
    store_fence();
}

/// True when [`copy_streaming_unfenced`] may write `dst`: 16-byte aligned, a multiple of 16
/// bytes long, on a CPU with streaming stores.
pub(crate) fn streamable(dst: &[u8]) -> bool {
    cfg!(target_arch = "x86_64")
        && dst.as_ptr().addr().is_multiple_of(16)
        && dst.len().is_multiple_of(16)
}

/// [`copy_streaming`] without the closing fence, so that several copies share one.
///
/// # Safety
/// `dst` must pass [`streamable`] and be as long as `src`, and the caller must run
/// [`store_fence`] before `dst` is read or written again, by this thread or any other: until
/// then Rust counts the streamed stores as still in flight.
#[cfg(target_arch = "x86_64")]
pub(crate) unsafe fn copy_streaming_unfenced(dst: &mut [u8], src: &[u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
    debug_assert!(streamable(dst) && dst.len() == src.len());
    let d = dst.as_mut_ptr().cast::<__m128i>();
    let s = src.as_ptr().cast::<__m128i>();
    for i in 0..dst.len() / 16 {
        // SAFETY: SSE2 is part of x86_64. Both slices hold `len` bytes and `i * 16 + 16 <=
        // len`, so each 16-byte access is in bounds; the load is unaligned (`loadu`), the
        // store's 16-byte alignment holds (the caller checked `streamable`, offsets are
        // multiples of 16). `dst` is borrowed mutably, so nothing else accesses it until the
        // caller's fence.
        unsafe { _mm_stream_si128(d.add(i), _mm_loadu_si128(s.add(i))) };
    }
}

/// Elsewhere nothing is streamable; never called.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn copy_streaming_unfenced(dst: &mut [u8], src: &[u8]) {
    dst.copy_from_slice(src);
}

/// Orders streamed stores before every later memory access (`sfence`).
pub(crate) fn store_fence() {
    // SAFETY: `sfence` needs SSE, which every x86_64 CPU has; it accesses no memory.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        std::arch::x86_64::_mm_sfence();
    }
}

/// Asks the CPU to start loading the cache lines of `value`, so that a lookup into a table
/// far larger than the CPU caches finds them there later. A hint only: it changes no memory
/// and cannot fault.
pub(crate) fn prefetch<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = std::ptr::from_ref(value).cast::<i8>();
        let len = size_of::<T>().max(1);
        // Every line the value touches: one address per 64 bytes, and its last byte.
        for at in (0..len).step_by(64).chain([len - 1]) {
            // SAFETY: `prefetch` needs SSE, which every x86_64 CPU has. It is a hint that
            // accesses no memory architecturally and never faults; the address lies inside
            // `value` (`at < len`), which the reference keeps alive.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// True when every byte of `bytes` is zero.
///
/// ORs 256-byte chunks into one word before testing, so the inner loop vectorises and the
/// early exit costs one branch per chunk rather than per byte.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (chunks, tail) = bytes.as_chunks::<256>();
    chunks.iter().all(|chunk| {
        let (words, _) = chunk.as_chunks::<8>();
        words
            .iter()
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w))
            == 0
    }) && tail.iter().all(|&b| b == 0)
}

/// A batch of staged pages: the stable copies the encoder reads, never guest memory the
/// guest may be writing. Page numbers and contents are parallel arrays so contents stay contiguous.
#[derive(Debug, Default)]
pub struct PageBatch {
    pfns: Vec<Pfn>,
    pages: Vec<Page>,
}

impl PageBatch {
    /// An empty batch with room for `capacity` pages, allocated once and then reused.
    pub fn with_capacity(capacity: usize) -> Self {
        PageBatch {
            pfns: Vec::with_capacity(capacity),
            pages: Vec::with_capacity(capacity),
        }
    }

    /// Appends a copy of `data` as page `pfn` and returns the staged copy.
    pub fn push(&mut self, pfn: Pfn, data: &[u8; PAGE_SIZE]) -> &mut Page {
        self.pfns.push(pfn);
        self.pages.push(Page(*data));
        self.pages.last_mut().expect("just pushed")
    }

    /// Appends zeroed pages for `pfns` and returns them, contiguous, to be filled in place
    /// (a backend that reads a run of pages with one system call).
    pub fn push_zeroed(&mut self, pfns: &[Pfn]) -> &mut [Page] {
        let start = self.pages.len();
        self.pfns.extend_from_slice(pfns);
        self.pages.resize_with(start + pfns.len(), Page::zeroed);
        &mut self.pages[start..]
    }

    /// Empties the batch, keeping its allocation.
    pub fn clear(&mut self) {
        self.pfns.clear();
        self.pages.clear();
    }

    /// Number of staged pages.
    pub fn len(&self) -> usize {
        self.pfns.len()
    }

    /// True when no page is staged.
    pub fn is_empty(&self) -> bool {
        self.pfns.is_empty()
    }

    /// Staged pages in order, with their numbers.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (Pfn, &Page)> {
        self.pfns.iter().copied().zip(self.pages.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_check_sees_every_byte() {
        let mut page = Page::zeroed();
        assert!(page.is_zero());
        for i in [0, 1, 255, 256, 1023, 1024, 4095] {
            page.0[i] = 1;
            assert!(!page.is_zero(), "byte {i} missed");
            page.0[i] = 0;
        }
        assert!(is_zero(&[0u8; 13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7]));
    }

    #[test]
    fn streaming_copy_matches_an_ordinary_one_aligned_or_not() {
        let src: Vec<u8> = (0..=250u8).cycle().take(PAGE_SIZE + 64).collect();
        let mut page = Page::zeroed();
        copy_streaming(&mut page.0, &src[3..3 + PAGE_SIZE]);
        assert_eq!(&page.0[..], &src[3..3 + PAGE_SIZE]);
        // Unaligned and odd-sized destinations fall back to an ordinary copy.
        let mut buf = [0u8; 100];
        copy_streaming(&mut buf[1..38], &src[..37]);
        assert_eq!(&buf[1..38], &src[..37]);
        assert!(buf[0] == 0 && buf[38..].iter().all(|&b| b == 0));
        assert!(!streamable(&buf[1..17]) || !cfg!(target_arch = "x86_64"));
    }

    #[test]
    fn prefetch_is_only_a_hint() {
        prefetch(&());
        prefetch(&0u8);
        let table = vec![[7u64; 20]; 3];
        prefetch(&table[2]);
        prefetch(&Page::zeroed());
        assert_eq!(table[2], [7; 20]);
    }

    #[test]
    fn blocks_cover_the_page_in_order() {
        let mut page = Page::zeroed();
        for (block, v) in page.blocks_mut().iter_mut().zip(0u8..) {
            block.fill(v);
        }
        // Block i must be bytes i*1 KiB .. (i+1)*1 KiB of the page, by both accessors.
        for (offset, &b) in page.0.iter().enumerate() {
            assert_eq!(usize::from(b), offset / BLOCK_SIZE);
        }
        for (i, block) in page.blocks().iter().enumerate() {
            assert_eq!(block.as_ptr(), page.0[i * BLOCK_SIZE..].as_ptr());
        }
    }
}

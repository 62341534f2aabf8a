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
        // `as_chunks` on an exact multiple leaves no remainder; the array conversion cannot fail.
        let (blocks, _) = self.0.as_chunks::<BLOCK_SIZE>();
        blocks.try_into().expect("a page is exactly four blocks")
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

/// A batch of staged pages: the stable copies the encoder reads (DESIGN.md, "Encode from a
/// stable copy"). Page numbers and contents are parallel arrays so contents stay contiguous.
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

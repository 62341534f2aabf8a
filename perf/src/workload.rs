//! Page mixes for the codec benchmark, generated from a seed so runs repeat.

use dataplane::page::{BLOCK_SIZE, PAGE_SIZE, Page, PageBatch};

/// Deterministic pseudo-random numbers (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below a usize")
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// A page mix: what is sent, in order. `warmup` is sent first, untimed, to fill the caches
/// the way an earlier iteration would.
pub struct Mix {
    pub name: &'static str,
    pub about: &'static str,
    pub warmup: Option<PageBatch>,
    pub pages: PageBatch,
}

/// Changes `len` bytes at a random place of `page`.
fn edit(rng: &mut Rng, page: &mut Page, len: usize) {
    let at = rng.below(PAGE_SIZE - len + 1);
    rng.fill(&mut page.0[at..at + len]);
}

/// The mixes, `n` pages each.
pub fn mixes(n: usize, seed: u64) -> Vec<Mix> {
    let mut rng = Rng(seed);
    let mut unique = PageBatch::with_capacity(n);
    let mut zero = PageBatch::with_capacity(n);
    let mut page = Page::zeroed();
    for pfn in 0..n as u64 {
        rng.fill(&mut page.0);
        unique.push(pfn, &page.0);
        zero.push(pfn, &[0; PAGE_SIZE]);
    }

    // Blocks seen earlier: a pool of distinct blocks (sent first, as pages), then pages built
    // from four pool blocks each, one in two with a small edit (8..64 bytes).
    let pool_pages = (n / 8).max(1);
    let mut pool = PageBatch::with_capacity(pool_pages);
    for i in 0..pool_pages as u64 {
        rng.fill(&mut page.0);
        pool.push(n as u64 + i, &page.0);
    }
    let pool_blocks: Vec<[u8; BLOCK_SIZE]> = pool
        .iter()
        .flat_map(|(_, p)| p.blocks().iter().copied())
        .collect();
    let mut redundant = PageBatch::with_capacity(n);
    for pfn in 0..n as u64 {
        for b in page.blocks_mut() {
            *b = pool_blocks[rng.below(pool_blocks.len())];
        }
        if pfn % 2 == 0 {
            let len = 8 + rng.below(57);
            edit(&mut rng, &mut page, len);
        }
        redundant.push(pfn, &page.0);
    }

    // Re-sent with small edits: iteration 2 of the unique pages, each with 1..4 edits of
    // 1..32 bytes (the kernel-compile side of Fig. 6): the delta path.
    let mut resent = PageBatch::with_capacity(n);
    for (pfn, p) in unique.iter() {
        let mut q = p.clone();
        for _ in 0..1 + rng.below(4) {
            let len = 1 + rng.below(32);
            edit(&mut rng, &mut q, len);
        }
        resent.push(pfn, &q.0);
    }
    let mut unique_again = PageBatch::with_capacity(n);
    for (pfn, p) in unique.iter() {
        unique_again.push(pfn, &p.0);
    }

    vec![
        Mix {
            name: "unique",
            about: "distinct random pages (incompressible)",
            warmup: None,
            pages: unique,
        },
        Mix {
            name: "zero",
            about: "all-zero pages",
            warmup: None,
            pages: zero,
        },
        Mix {
            name: "redundant",
            about: "pages of blocks sent earlier, half with an 8-64 byte edit",
            warmup: Some(pool),
            pages: redundant,
        },
        Mix {
            name: "resent",
            about: "pages sent before, now with 1-4 edits of 1-32 bytes (deltas)",
            warmup: Some(unique_again),
            pages: resent,
        },
    ]
}

/// Re-sent pages whose changes follow the shape of the paper's Fig. 6: `small` of them get a
/// few short edits, `medium` a run of 256..1536 bytes, the rest are rewritten almost entirely.
/// Returns (first version, second version).
pub fn fig6_rewrites(n: usize, seed: u64, small: f64, medium: f64) -> (PageBatch, PageBatch) {
    let mut rng = Rng(seed);
    let mut first = PageBatch::with_capacity(n);
    let mut second = PageBatch::with_capacity(n);
    let mut page = Page::zeroed();
    for pfn in 0..n as u64 {
        rng.fill(&mut page.0);
        first.push(pfn, &page.0);
        let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        if u < small {
            for _ in 0..1 + rng.below(6) {
                let len = 1 + rng.below(48);
                edit(&mut rng, &mut page, len);
            }
        } else if u < small + medium {
            let len = 256 + rng.below(1280);
            edit(&mut rng, &mut page, len);
        } else {
            let keep = rng.below(PAGE_SIZE / 10);
            rng.fill(&mut page.0[keep..]);
        }
        second.push(pfn, &page.0);
    }
    (first, second)
}

//! Property tests: any sequence of page versions survives encoder -> seal -> open -> decoder
//! exactly, and both ends' caches stay identical, whatever the optimizations and cache size.

mod common;

use common::{Link, Rng};
use dataplane::codec::{BlockHasher, CodecConfig, Compression, RecordKind, Xxh3};
use dataplane::frame::MIN_FRAME_SIZE;
use dataplane::page::{BLOCK_SIZE, Block, PAGE_SIZE, Page, PageBatch};
use proptest::prelude::*;

const PAGES: usize = 12;

/// How the next version of a page is made.
#[derive(Debug, Clone)]
enum Op {
    Zero,
    Random(u64),
    /// Four blocks picked from every block the source has produced so far.
    FromSeenBlocks([usize; 4]),
    /// A few bytes changed.
    SmallEdit {
        at: usize,
        len: usize,
        seed: u64,
    },
    /// Most of the page changed.
    LargeEdit {
        keep: usize,
        seed: u64,
    },
    /// Sent again unchanged.
    Same,
    /// Some blocks zeroed, the rest kept.
    ZeroBlocks(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Zero),
        2 => any::<u64>().prop_map(Op::Random),
        3 => any::<[usize; 4]>().prop_map(Op::FromSeenBlocks),
        4 => (0..PAGE_SIZE, 1..24usize, any::<u64>())
            .prop_map(|(at, len, seed)| Op::SmallEdit { at, len, seed }),
        2 => (0..512usize, any::<u64>()).prop_map(|(keep, seed)| Op::LargeEdit { keep, seed }),
        1 => Just(Op::Same),
        1 => (1..15u8).prop_map(Op::ZeroBlocks),
    ]
}

fn config() -> impl Strategy<Value = CodecConfig> {
    (
        any::<[bool; 4]>(),
        prop_oneof![Just(1u64), Just(3), Just(4), Just(9), Just(64), Just(4096)],
        prop_oneof![Just(1usize), Just(24), Just(700), Just(1536), Just(4095)],
        // Fixed levels only: `auto` without a controller compresses nothing.
        prop_oneof![
            2 => Just(Compression::Off),
            1 => Just(Compression::Lz4),
            1 => Just(Compression::Zstd1),
            1 => Just(Compression::Zstd3),
        ],
    )
        .prop_map(
            |([zero, cbr, delta, verify], blocks, threshold, compression)| CodecConfig {
                zero_pages: zero,
                cbr,
                delta,
                cache_bytes: blocks * BLOCK_SIZE as u64,
                delta_threshold: threshold,
                verify_caches: verify,
                compression,
            },
        )
}

/// The source's memory and every block it has ever produced.
struct Source {
    mem: Vec<Page>,
    seen: Vec<Block>,
}

impl Source {
    fn apply(&mut self, pfn: usize, op: &Op) {
        let page = &mut self.mem[pfn];
        match *op {
            Op::Zero => *page = Page::zeroed(),
            Op::Random(seed) => Rng(seed).fill(&mut page.0),
            Op::FromSeenBlocks(picks) => {
                if !self.seen.is_empty() {
                    for (b, pick) in page.blocks_mut().iter_mut().zip(picks) {
                        *b = self.seen[pick % self.seen.len()];
                    }
                }
            }
            Op::SmallEdit { at, len, seed } => {
                let end = (at + len).min(PAGE_SIZE);
                Rng(seed).fill(&mut page.0[at..end]);
            }
            Op::LargeEdit { keep, seed } => Rng(seed).fill(&mut page.0[keep..]),
            Op::Same => {}
            Op::ZeroBlocks(mask) => {
                for (i, b) in page.blocks_mut().iter_mut().enumerate() {
                    if mask & (1 << i) != 0 {
                        b.fill(0);
                    }
                }
            }
        }
        self.seen.extend_from_slice(page.blocks());
    }
}

fn run<H: BlockHasher>(
    config: CodecConfig,
    hasher: H,
    frame_size: usize,
    batches: &[Vec<(usize, Op)>],
) -> Link<H> {
    let mut src = Source {
        mem: vec![Page::zeroed(); PAGES],
        seen: Vec::new(),
    };
    let mut link = Link::new(config, hasher, PAGES, frame_size);
    let mut batch = PageBatch::with_capacity(64);
    for steps in batches {
        batch.clear();
        for (pfn, op) in steps {
            src.apply(*pfn, op);
            batch.push(*pfn as u64, &src.mem[*pfn].0);
        }
        link.send(&batch);
        for &(pfn, _) in steps {
            assert_eq!(link.dest[pfn], src.mem[pfn], "page {pfn} differs");
        }
        assert!(link.caches_agree(), "caches diverged");
    }
    link
}

fn batches() -> impl Strategy<Value = Vec<Vec<(usize, Op)>>> {
    prop::collection::vec(prop::collection::vec((0..PAGES, op()), 1..40), 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 384, ..ProptestConfig::default() })]

    #[test]
    fn every_page_arrives_exactly(
        config in config(),
        frame_extra in 0..3 * PAGE_SIZE,
        batches in batches(),
    ) {
        run(config, Xxh3, MIN_FRAME_SIZE + frame_extra, &batches);
    }
}

/// Fingerprints that collide all the time: only the byte compare keeps pages right.
#[derive(Debug, Clone, Copy)]
struct Colliding;

impl BlockHasher for Colliding {
    fn fingerprint(&self, block: &Block) -> u64 {
        u64::from(block[0] & 1)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn colliding_fingerprints_still_reproduce_pages(batches in batches()) {
        let config = CodecConfig { cache_bytes: 64 * BLOCK_SIZE as u64, ..CodecConfig::default() };
        run(config, Colliding, 64 << 10, &batches);
    }
}

#[test]
fn forced_collisions_are_counted_and_harmless() {
    // Two distinct blocks with the same fingerprint, then each sent again.
    let a = [2u8; BLOCK_SIZE];
    let mut b = [4u8; BLOCK_SIZE];
    b[1] = 9;
    let mut ops = vec![];
    for (i, blk) in [a, b, a, b].iter().enumerate() {
        let mut seed = Page::zeroed();
        for x in seed.blocks_mut() {
            *x = *blk;
        }
        ops.push((i, seed));
    }
    let mut link = Link::new(CodecConfig::default(), Colliding, 4, 64 << 10);
    let mut batch = PageBatch::with_capacity(4);
    for (pfn, page) in &ops {
        batch.push(*pfn as u64, &page.0);
    }
    link.send(&batch);
    for (pfn, page) in &ops {
        assert_eq!(&link.dest[*pfn], page);
    }
    let stats = link.enc.stats();
    assert!(stats.fingerprint_collisions > 0, "{stats:?}");
    assert!(link.caches_agree());
}

#[test]
fn all_off_sends_full_pages_only() {
    let mut rng = Rng(5);
    let mut batch = PageBatch::with_capacity(8);
    for pfn in 0..8u64 {
        let mut p = Page::zeroed();
        if pfn % 2 == 0 {
            rng.fill(&mut p.0);
        }
        batch.push(pfn, &p.0);
    }
    let mut link = Link::new(CodecConfig::baseline(), Xxh3, 8, 64 << 10);
    link.send(&batch);
    link.send(&batch);
    let s = link.enc.stats();
    assert_eq!(s.pages_of(RecordKind::Full), 16, "{s:?}");
    assert_eq!(s.bytes_out, 16 * (PAGE_SIZE as u64 + 2));
    assert_eq!(link.enc.cache_state_digest(), None);
}

#[test]
fn each_optimization_does_its_job() {
    let mut rng = Rng(9);
    let base: Vec<Page> = (0..16).map(|_| common::page_from(&mut rng)).collect();
    let mut batch = PageBatch::with_capacity(64);
    // Iteration 1: 16 random pages, 8 zero pages, 8 copies of the random ones.
    for (i, p) in base.iter().enumerate() {
        batch.push(i as u64, &p.0);
    }
    for i in 16..24 {
        batch.push(i, &[0; PAGE_SIZE]);
    }
    for (i, p) in (24..32).zip(&base) {
        batch.push(i, &p.0);
    }
    let mut link = Link::new(CodecConfig::default(), Xxh3, 32, 64 << 10);
    link.send(&batch);
    let s = link.enc.stats().clone();
    assert_eq!(s.pages_of(RecordKind::Zero), 8);
    assert_eq!(s.pages_of(RecordKind::Full), 16);
    assert_eq!(s.pages_of(RecordKind::Blocks), 8);
    assert_eq!(s.cache_hits, 32);
    // Iteration 2: each random page gets a 10-byte edit.
    batch.clear();
    for (i, p) in base.iter().enumerate() {
        let mut p = p.clone();
        p.0[100 + i..110 + i].fill(0xee);
        batch.push(i as u64, &p.0);
    }
    link.send(&batch);
    let s = link.enc.stats();
    assert_eq!(s.pages_of(RecordKind::Delta), 16, "{s:?}");
    assert!(s.saved_delta > 16 * 4000, "{s:?}");
    assert_eq!(link.dec.stats().pages, s.pages);
    assert_eq!(link.dec.stats().bytes_out, s.bytes_out);
}

#[test]
fn both_ends_may_reset_their_caches_between_frames() {
    let mut rng = Rng(11);
    let pages: Vec<Page> = (0..8).map(|_| common::page_from(&mut rng)).collect();
    let mut batch = PageBatch::with_capacity(8);
    for (i, p) in pages.iter().enumerate() {
        batch.push(i as u64, &p.0);
    }
    let mut link = Link::new(CodecConfig::default(), Xxh3, 8, 64 << 10);
    link.send(&batch);
    link.enc.reset_cache();
    link.dec.reset_cache();
    assert!(link.caches_agree());
    // After the reset nothing is cached: the same pages go in full again, not as references.
    link.send(&batch);
    assert_eq!(link.enc.stats().pages_of(RecordKind::Full), 16);
    assert!(link.caches_agree());
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(&link.dest[i], p);
    }
}

#[test]
fn compression_shrinks_text_and_keeps_pages_exact() {
    // Text-like pages: every block distinct (CBR finds nothing), but compressible.
    let mut rng = Rng(21);
    let words: [&[u8]; 6] = [
        b"return ", b"struct ", b"int ", b"if (x) ", b"{\n\t", b"};\n",
    ];
    let pages: Vec<Page> = (0..64)
        .map(|_| {
            let mut p = Page::zeroed();
            let mut at = 0;
            while at < PAGE_SIZE {
                let w = words[rng.below(words.len())];
                let n = w.len().min(PAGE_SIZE - at);
                p.0[at..at + n].copy_from_slice(&w[..n]);
                at += n;
            }
            p.0[..8].copy_from_slice(&rng.next().to_le_bytes());
            p
        })
        .collect();
    let mut batch = PageBatch::with_capacity(64);
    for (i, p) in pages.iter().enumerate() {
        batch.push(i as u64, &p.0);
    }
    let mut wire = Vec::new();
    for compression in [
        Compression::Off,
        Compression::Lz4,
        Compression::Zstd1,
        Compression::Zstd3,
    ] {
        let config = CodecConfig {
            compression,
            ..CodecConfig::default()
        };
        let mut link = Link::new(config, Xxh3, 64, 64 << 10);
        link.send(&batch);
        assert_eq!(link.dest, pages, "{compression}");
        assert!(link.caches_agree());
        let (enc, dec) = (link.enc.stats(), link.dec.stats());
        assert_eq!(
            enc.frames_compressed, dec.frames_compressed,
            "{compression}"
        );
        assert_eq!(enc.saved_compress, dec.saved_compress, "{compression}");
        wire.push(link.wire_bytes);
    }
    assert!(wire[1] < wire[0] / 2, "{wire:?}");
    assert!(wire[3] <= wire[2] && wire[2] < wire[1], "{wire:?}");
}

//! After warm-up, encode -> seal -> open -> decode allocates nothing.
//!
//! A counting global allocator watches this thread only (the test harness's own threads
//! allocate as they please).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::{Rng, sealer_opener};
use dataplane::codec::{CodecConfig, Compression, Decoder, Encoder};
use dataplane::frame::{DEFAULT_FRAME_SIZE, FrameBuf};
use dataplane::page::{Page, PageBatch};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; the counter is a
// thread-local Cell, which never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: the caller's layout obligations pass straight through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, i.e. from `System`, with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        ALLOCS.with(|a| a.set(a.get() + 1));
        // SAFETY: as for `dealloc`; `new` is the caller's valid new size.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCS.with(Cell::get)
}

#[test]
fn steady_state_allocates_nothing() {
    for compression in [
        Compression::Off,
        Compression::Lz4,
        Compression::Zstd1,
        Compression::Zstd3,
    ] {
        steady_state(compression);
    }
}

/// Counts Rust allocations only: zstd's contexts keep their workspace through C's malloc,
/// reused from frame to frame.
fn steady_state(compression: Compression) {
    const PAGES: usize = 256;
    let mut rng = Rng(1);
    let mut mem: Vec<Page> = (0..PAGES).map(|_| common::page_from(&mut rng)).collect();
    for p in mem.iter_mut().step_by(5) {
        *p = Page::zeroed();
    }
    // Half of every other page repeats a pattern, so compression has something to do.
    for (i, p) in mem.iter_mut().enumerate().step_by(2) {
        for (j, b) in p.0[2048..].iter_mut().enumerate() {
            *b = b"page text "[(i + j) % 10];
        }
    }
    let mut batch = PageBatch::with_capacity(PAGES);
    let config = CodecConfig {
        cache_bytes: 1 << 20,
        compression,
        ..CodecConfig::default()
    };
    let mut enc = Encoder::new(config.clone()).unwrap();
    let mut dec = Decoder::new(config, PAGES as u64).unwrap();
    let (mut sealer, mut opener) = sealer_opener(3, 3, DEFAULT_FRAME_SIZE);
    opener.allow_compression(compression);
    let mut dest = vec![Page::zeroed(); PAGES];
    let mut frame = FrameBuf::new(DEFAULT_FRAME_SIZE);
    let mut wire = vec![0u8; DEFAULT_FRAME_SIZE];

    let mut iteration = |mem: &[Page], batch: &mut PageBatch| {
        batch.clear();
        for (pfn, p) in (0..).zip(mem) {
            batch.push(pfn, &p.0);
        }
        let mut ship = |f: &mut FrameBuf| {
            let sealed = sealer.seal(f);
            let n = sealed.len();
            wire[..n].copy_from_slice(sealed);
            f.clear();
            let o = opener.open(&mut wire[..n]).unwrap();
            dec.decode_compressed(
                o.body,
                o.compression,
                o.records,
                o.cache_digest,
                dest.as_mut_slice(),
            )
            .unwrap();
        };
        enc.encode_batch(batch, &mut frame, &mut ship);
        enc.finish_frame(&mut frame);
        ship(&mut frame);
    };

    // The counter counts.
    let start = allocations();
    std::hint::black_box(vec![0u8; 1]);
    assert!(
        allocations() > start,
        "the counting allocator must see allocations"
    );
    // Iteration 1: the indexes are sized from the cache up front, so even this one does not
    // allocate.
    let start = allocations();
    iteration(&mem, &mut batch);
    assert_eq!(allocations(), start, "iteration 1 allocated");
    // Iteration 2: small edits (deltas), one page copied from another (CBR), zero pages.
    for (i, p) in mem.iter_mut().enumerate().skip(1).step_by(3) {
        p.0[i % 4000..i % 4000 + 9].fill(0x77);
    }
    mem[2] = mem[7].clone();
    let before = allocations();
    iteration(&mem, &mut batch);
    let during = allocations() - before;
    assert_eq!(
        during, 0,
        "{compression}: steady state allocated {during} times"
    );
    assert_eq!(dest, mem);
    assert_eq!(
        enc.stats().frames_compressed > 0,
        compression != Compression::Off,
        "{compression}: {:?}",
        enc.stats()
    );
    assert!(
        enc.stats().pages[3] > 0,
        "deltas exercised: {:?}",
        enc.stats()
    );
}

//! `skyferry-bench codec`: the sans-IO core's speed and savings.
//!
//! For each page mix: encode GB/s (guest bytes in per second), decode GB/s (guest bytes out),
//! seal and open GB/s (frame bytes), and wire bytes per guest byte, beside memcpy of the same
//! amount in the same run. Also the block-fingerprint candidates, and with
//! `--threshold-sweep` the delta-size distribution and what each delta threshold costs.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use dataplane::codec::delta;
use dataplane::codec::{CodecConfig, CodecStats, Decoder, Encoder};
use dataplane::crypto::{Direction, HandshakeNonce, MigrationKeys, Opener, PreSharedKey, Sealer};
use dataplane::frame::{DEFAULT_FRAME_SIZE, FrameBuf};
use dataplane::page::{BLOCK_SIZE, PAGE_SIZE, Page, PageBatch};
use serde::Serialize;

use crate::measure::{best_of, gbps, memcpy_gbps};
use crate::workload::{Mix, fig6_rewrites, mixes};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// MiB of guest pages per mix.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Runs per figure; the best is kept.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Seed for the page contents.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Turn zero-page elimination off.
    #[arg(long)]
    no_zero: bool,
    /// Turn content-based redundancy elimination off.
    #[arg(long)]
    no_cbr: bool,
    /// Turn page deltas off.
    #[arg(long)]
    no_delta: bool,
    /// Turn the cache self-check off.
    #[arg(long)]
    no_verify: bool,
    /// Block cache size per stream, MiB.
    #[arg(long, default_value_t = 100)]
    cache_mib: u64,
    /// Delta threshold, bytes.
    #[arg(long, default_value_t = dataplane::codec::DEFAULT_DELTA_THRESHOLD)]
    delta_threshold: usize,
    /// Also print the delta-size distribution and the cost of each delta threshold.
    #[arg(long)]
    threshold_sweep: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct MixResult {
    mix: &'static str,
    about: &'static str,
    pages: usize,
    encode_gbps: f64,
    decode_gbps: f64,
    seal_gbps: f64,
    open_gbps: f64,
    /// Sealed frame bytes per guest byte.
    wire_ratio: f64,
    frames: usize,
    stats: CodecStats,
}

#[derive(Serialize)]
struct HashResult {
    name: &'static str,
    gbps: f64,
}

#[derive(Serialize)]
struct SweepRow {
    distribution: &'static str,
    threshold: usize,
    encode_gbps: f64,
    wire_ratio: f64,
    delta_pages: u64,
    delta_overflows: u64,
}

#[derive(Serialize)]
struct Histogram {
    distribution: &'static str,
    /// Upper bounds of the buckets, bytes; the last bucket is "does not fit in a page".
    bounds: Vec<usize>,
    counts: Vec<u64>,
}

#[derive(Serialize)]
struct Report {
    config: CodecConfig,
    mib: usize,
    reps: usize,
    memcpy_gbps: f64,
    mixes: Vec<MixResult>,
    fingerprints: Vec<HashResult>,
    delta_sizes: Vec<Histogram>,
    threshold_sweep: Vec<SweepRow>,
}

fn keys() -> MigrationKeys {
    MigrationKeys::derive(
        &PreSharedKey::from_bytes([0x42; 32]),
        &[1; 32],
        &HandshakeNonce([1; 32]),
        &HandshakeNonce([2; 32]),
    )
}

/// Encodes `batch` into frames drawn from `spare`, returning the frames filled.
fn encode_into(enc: &mut Encoder, batch: &PageBatch, spare: &mut Vec<FrameBuf>) -> Vec<FrameBuf> {
    let mut done = Vec::with_capacity(spare.len());
    let mut frame = spare.pop().expect("frame pool sized for the batch");
    enc.encode_batch(batch, &mut frame, |f| {
        let next = spare.pop().expect("frame pool sized for the batch");
        done.push(std::mem::replace(f, next));
    });
    if !frame.is_empty() {
        enc.finish_frame(&mut frame);
        done.push(frame);
    }
    done
}

/// Returns frames to the pool, emptied.
fn recycle(pool: &mut Vec<FrameBuf>, frames: Vec<FrameBuf>) {
    for mut f in frames {
        f.clear();
        pool.push(f);
    }
}

/// Counters accumulated since `before`.
fn diff(now: &CodecStats, before: &CodecStats) -> CodecStats {
    let d = |a: u64, b: u64| a - b;
    CodecStats {
        pages: std::array::from_fn(|i| d(now.pages[i], before.pages[i])),
        bytes_in: d(now.bytes_in, before.bytes_in),
        bytes_out: d(now.bytes_out, before.bytes_out),
        saved_zero: d(now.saved_zero, before.saved_zero),
        saved_cbr: d(now.saved_cbr, before.saved_cbr),
        saved_delta: d(now.saved_delta, before.saved_delta),
        cache_hits: d(now.cache_hits, before.cache_hits),
        cache_misses: d(now.cache_misses, before.cache_misses),
        fingerprint_collisions: d(now.fingerprint_collisions, before.fingerprint_collisions),
        cache_evictions: d(now.cache_evictions, before.cache_evictions),
        delta_overflows: d(now.delta_overflows, before.delta_overflows),
        frames_compressed: d(now.frames_compressed, before.frames_compressed),
        saved_compress: d(now.saved_compress, before.saved_compress),
    }
}

fn frame_pool(pages: usize) -> Vec<FrameBuf> {
    // A 64 KiB frame holds 15 full pages; one spare for the partial frame.
    (0..pages / 15 + 2)
        .map(|_| {
            let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
            // Fault the buffer in now rather than inside a timed run.
            f.append_raw_records(&[0; DEFAULT_FRAME_SIZE], 0);
            f.clear();
            f
        })
        .collect()
}

/// Plaintext bodies of frames, to restore before each sealing run and to decode.
struct Body {
    bytes: Vec<u8>,
    records: u32,
    digest: Option<u64>,
}

fn snapshot(frames: &[FrameBuf]) -> Vec<Body> {
    frames
        .iter()
        .map(|f| Body {
            bytes: f.body().to_vec(),
            records: f.records(),
            digest: f.cache_digest(),
        })
        .collect()
}

fn restore(frame: &mut FrameBuf, body: &Body) {
    frame.clear();
    frame.append_raw_records(&body.bytes, body.records);
    frame.set_cache_digest(body.digest);
}

fn max_pfn(b: &PageBatch) -> u64 {
    b.iter().map(|(p, _)| p).max().unwrap_or(0)
}

fn run_mix(mix: &Mix, config: &CodecConfig, reps: usize) -> MixResult {
    let n = mix.pages.len();
    let guest_bytes = (n * PAGE_SIZE) as u64;

    // Encode: one encoder whose cache is reset before each run (so its memory is already
    // faulted in, as in a migration's later iterations), warmed up untimed as an earlier
    // iteration would. Frames come from one pool, reused.
    let mut enc = Encoder::new(config.clone()).expect("valid config");
    let mut pool = frame_pool(n + mix.warmup.as_ref().map_or(0, PageBatch::len));
    let mut encode_time = Duration::MAX;
    let mut out = None;
    for _ in 0..reps.max(1) {
        if let Some((_, frames, _)) = out.take() {
            recycle(&mut pool, frames);
        }
        enc.reset_cache();
        let warm = mix.warmup.as_ref().map(|w| {
            let frames = encode_into(&mut enc, w, &mut pool);
            let bodies = snapshot(&frames);
            recycle(&mut pool, frames);
            bodies
        });
        let before = enc.stats().clone();
        let t = Instant::now();
        let frames = encode_into(&mut enc, &mix.pages, &mut pool);
        encode_time = encode_time.min(t.elapsed());
        out = Some((warm, frames, diff(enc.stats(), &before)));
    }
    let (warm, mut frames, stats) = out.expect("at least one run");
    let bodies = snapshot(&frames);

    // Seal: the same plaintext each run, restored untimed.
    let keys = keys();
    let key = keys.stream_key(0, Direction::SourceToDest);
    let mut seal_time = Duration::MAX;
    let mut wire: Vec<Vec<u8>> = Vec::new();
    for _ in 0..reps.max(1) {
        for (f, b) in frames.iter_mut().zip(&bodies) {
            restore(f, b);
        }
        let mut sealer = Sealer::new(&key);
        let t = Instant::now();
        for f in &mut frames {
            black_box(sealer.seal(f));
        }
        seal_time = seal_time.min(t.elapsed());
    }
    let mut sealer = Sealer::new(&key);
    for (f, b) in frames.iter_mut().zip(&bodies) {
        restore(f, b);
        wire.push(sealer.seal(f).to_vec());
    }
    let wire_bytes: u64 = wire.iter().map(|w| w.len() as u64).sum();

    // Open: decrypts in place, so each run opens fresh copies (made untimed).
    let mut open_time = Duration::MAX;
    let mut work = wire.clone();
    for _ in 0..reps.max(1) {
        for (w, orig) in work.iter_mut().zip(&wire) {
            w.copy_from_slice(orig);
        }
        let mut opener = Opener::new(&key, DEFAULT_FRAME_SIZE);
        let t = Instant::now();
        for w in &mut work {
            black_box(opener.open(w).expect("own frames open"));
        }
        open_time = open_time.min(t.elapsed());
    }
    for (w, b) in work.iter().zip(&bodies) {
        assert_eq!(
            &w[dataplane::frame::HEADER_LEN..][..b.bytes.len()],
            &b.bytes[..]
        );
    }

    // Decode: a fresh decoder each run, fed the warm-up frames first (untimed).
    let pages = usize::try_from(max_pfn(&mix.pages).max(mix.warmup.as_ref().map_or(0, max_pfn)))
        .expect("page count fits memory")
        + 1;
    let mut mem = vec![Page::zeroed(); pages];
    let mut decode_time = Duration::MAX;
    let mut dec = Decoder::new(config.clone(), pages as u64).expect("valid config");
    for _ in 0..reps.max(1) {
        dec.reset_cache();
        for b in warm.iter().flatten() {
            dec.decode(&b.bytes, b.records, b.digest, mem.as_mut_slice())
                .expect("warm-up decodes");
        }
        let t = Instant::now();
        for b in &bodies {
            dec.decode(&b.bytes, b.records, b.digest, mem.as_mut_slice())
                .expect("own frames decode");
        }
        decode_time = decode_time.min(t.elapsed());
    }
    // The figures only count if the pages arrived.
    for (pfn, page) in mix.pages.iter() {
        let got = &mem.as_slice()[usize::try_from(pfn).expect("page in memory")];
        assert!(got == page, "{}: page {pfn} differs", mix.name);
    }

    let frame_bytes = wire_bytes;
    MixResult {
        mix: mix.name,
        about: mix.about,
        pages: n,
        encode_gbps: gbps(guest_bytes, encode_time),
        decode_gbps: gbps(guest_bytes, decode_time),
        seal_gbps: gbps(frame_bytes, seal_time),
        open_gbps: gbps(frame_bytes, open_time),
        wire_ratio: wire_bytes as f64 / guest_bytes as f64,
        frames: wire.len(),
        stats,
    }
}

fn fingerprints(mib: usize, reps: usize) -> Vec<HashResult> {
    let mut buf = vec![0u8; mib << 20];
    crate::workload::Rng(7).fill(&mut buf);
    let (blocks, _) = buf.as_chunks::<BLOCK_SIZE>();
    let bytes = (blocks.len() * BLOCK_SIZE) as u64;
    let ahash = ahash::RandomState::with_seeds(1, 2, 3, 4);
    let run = |name, f: &dyn Fn(&[u8; BLOCK_SIZE]) -> u64| {
        let d = best_of(reps, || {
            let mut acc = 0u64;
            for b in blocks {
                acc ^= f(b);
            }
            black_box(acc);
        });
        HashResult {
            name,
            gbps: gbps(bytes, d),
        }
    };
    vec![
        run("xxh3_64", &|b| xxhash_rust::xxh3::xxh3_64(b)),
        run("ahash", &|b| ahash.hash_one(b)),
    ]
}

/// Delta sizes of `second` against `first`, bucketed.
fn histogram(name: &'static str, first: &PageBatch, second: &PageBatch) -> Histogram {
    let bounds = vec![16, 64, 256, 512, 1024, 1536, 2048, 3072, 4095];
    let mut counts = vec![0u64; bounds.len() + 1];
    let mut xor = Page::zeroed();
    let mut out = vec![0u8; PAGE_SIZE - 1];
    for ((_, a), (_, b)) in first.iter().zip(second.iter()) {
        let base = a.blocks();
        let base = [&base[0], &base[1], &base[2], &base[3]];
        let bucket = match delta::encode(b, &base, &mut xor, &mut out) {
            Some((len, _)) => bounds.iter().position(|&u| len <= u).expect("len < 4095"),
            None => bounds.len(),
        };
        counts[bucket] += 1;
    }
    Histogram {
        distribution: name,
        bounds,
        counts,
    }
}

fn sweep(
    config: &CodecConfig,
    mib: usize,
    reps: usize,
    seed: u64,
) -> (Vec<Histogram>, Vec<SweepRow>) {
    let n = (mib << 20) / PAGE_SIZE;
    let mut hists = Vec::new();
    let mut rows = Vec::new();
    // Fig. 6: a kernel compile mostly makes small changes; TPC-W rewrites over half its
    // pages almost completely.
    for (name, small, medium) in [("kernel", 0.8, 0.1), ("tpcw", 0.35, 0.1)] {
        let (first, second) = fig6_rewrites(n, seed, small, medium);
        hists.push(histogram(name, &first, &second));
        for threshold in [64, 256, 512, 1024, 1536, 2048, 3072, 4095] {
            let cfg = CodecConfig {
                delta_threshold: threshold,
                delta: true,
                ..config.clone()
            };
            let mut stats = None;
            let d = {
                let mut best = Duration::MAX;
                let mut enc = Encoder::new(cfg.clone()).expect("valid config");
                let mut pool = frame_pool(2 * n);
                for _ in 0..reps.max(1) {
                    enc.reset_cache();
                    let frames = encode_into(&mut enc, &first, &mut pool);
                    recycle(&mut pool, frames);
                    let before = enc.stats().clone();
                    let t = Instant::now();
                    let frames = encode_into(&mut enc, &second, &mut pool);
                    best = best.min(t.elapsed());
                    recycle(&mut pool, frames);
                    let after = diff(enc.stats(), &before);
                    stats = Some((after.bytes_out, after.pages[3], after.delta_overflows));
                }
                best
            };
            let (out, deltas, overflows) = stats.expect("ran");
            rows.push(SweepRow {
                distribution: name,
                threshold,
                encode_gbps: gbps((n * PAGE_SIZE) as u64, d),
                wire_ratio: out as f64 / (n * PAGE_SIZE) as f64,
                delta_pages: deltas,
                delta_overflows: overflows,
            });
        }
    }
    (hists, rows)
}

pub fn run(args: &Args) {
    let config = CodecConfig {
        zero_pages: !args.no_zero,
        cbr: !args.no_cbr,
        delta: !args.no_delta,
        cache_bytes: args.cache_mib << 20,
        delta_threshold: args.delta_threshold,
        verify_caches: !args.no_verify,
        // Compression has its own benchmark (`compress`).
        compression: dataplane::codec::Compression::Off,
    };
    if let Err(e) = config.validate() {
        eprintln!("skyferry-bench: {e}");
        std::process::exit(2);
    }
    let n = ((args.mib << 20) / PAGE_SIZE).max(1);
    let memcpy = memcpy_gbps(n * PAGE_SIZE, args.reps);
    let results: Vec<MixResult> = mixes(n, args.seed)
        .iter()
        .map(|m| run_mix(m, &config, args.reps))
        .collect();
    let hashes = fingerprints(args.mib, args.reps);
    let (hists, rows) = if args.threshold_sweep {
        sweep(&config, args.mib, args.reps, args.seed)
    } else {
        (Vec::new(), Vec::new())
    };
    let report = Report {
        config,
        mib: args.mib,
        reps: args.reps,
        memcpy_gbps: memcpy,
        mixes: results,
        fingerprints: hashes,
        delta_sizes: hists,
        threshold_sweep: rows,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("report serialises")
        );
    } else {
        print_tables(&report);
    }
}

fn print_tables(r: &Report) {
    let c = &r.config;
    println!(
        "codec: {} MiB per mix, best of {}; zero={} cbr={} delta={} (threshold {} B) verify={} cache={} MiB",
        r.mib,
        r.reps,
        c.zero_pages,
        c.cbr,
        c.delta,
        c.delta_threshold,
        c.verify_caches,
        c.cache_bytes >> 20
    );
    println!("memcpy reference: {:.2} GB/s\n", r.memcpy_gbps);
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>9} {:>9}  {:>7} {:>7} {:>7} {:>7}  pages zero/full/blocks/delta",
        "mix",
        "encode",
        "decode",
        "seal",
        "open",
        "wire/in",
        "enc/cpy",
        "dec/cpy",
        "seal/cpy",
        "open/cpy"
    );
    for m in &r.mixes {
        let rel = |x: f64| x / r.memcpy_gbps;
        println!(
            "{:<10} {:>7.2}GB {:>7.2}GB {:>7.2}GB {:>7.2}GB {:>9.4}  {:>7.3} {:>7.3} {:>8.3} {:>8.3}  {:?}",
            m.mix,
            m.encode_gbps,
            m.decode_gbps,
            m.seal_gbps,
            m.open_gbps,
            m.wire_ratio,
            rel(m.encode_gbps),
            rel(m.decode_gbps),
            rel(m.seal_gbps),
            rel(m.open_gbps),
            m.stats.pages
        );
    }
    println!(
        "(GB = GB/s; encode/decode count guest bytes, seal/open count frame bytes; x/cpy = ratio to memcpy)\n"
    );
    println!("block fingerprints over 1 KiB blocks:");
    for h in &r.fingerprints {
        println!(
            "  {:<8} {:>7.2} GB/s  ({:.2}x memcpy)",
            h.name,
            h.gbps,
            h.gbps / r.memcpy_gbps
        );
    }
    for h in &r.delta_sizes {
        println!(
            "\ndelta sizes, {} rewrites (pages per bucket, bytes <=):",
            h.distribution
        );
        for (i, count) in h.counts.iter().enumerate() {
            let label = h
                .bounds
                .get(i)
                .map_or("> page".to_string(), |b| b.to_string());
            println!("  {label:>7}: {count}");
        }
    }
    if !r.threshold_sweep.is_empty() {
        println!("\ndelta threshold sweep (second version of re-sent pages):");
        println!(
            "  {:<7} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "dist", "threshold", "encode", "out/in", "deltas", "overflows"
        );
        for s in &r.threshold_sweep {
            println!(
                "  {:<7} {:>9} {:>7.2}GB {:>9.4} {:>9} {:>9}",
                s.distribution,
                s.threshold,
                s.encode_gbps,
                s.wire_ratio,
                s.delta_pages,
                s.delta_overflows
            );
        }
    }
}

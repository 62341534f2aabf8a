//! `skyferry-bench cipher`: AES-256-GCM implementations and block hashing, one core, beside
//! memcpy of the same bytes in the same run.
//!
//! The figures choose the cipher and the build's CPU features: each implementation seals
//! (and opens) one frame-sized buffer in place with the frame header as associated data,
//! exactly as `crypto::seal` does.

use std::hint::black_box;

use aes_gcm::aead::{AeadInOut, KeyInit};
use clap::Args as ClapArgs;
use dataplane::frame::DEFAULT_FRAME_SIZE;
use serde::Serialize;

use crate::measure::{best_of, gbps, memcpy_gbps};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Buffer (frame) size in bytes.
    #[arg(long, default_value_t = DEFAULT_FRAME_SIZE)]
    buf: usize,
    /// MiB processed per run.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Runs per figure; the best is kept.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    name: &'static str,
    seal_gbps: f64,
    open_gbps: f64,
    /// seal GB/s over memcpy GB/s.
    seal_vs_memcpy: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    buf: usize,
    memcpy_gbps: f64,
    /// CPU features this binary was compiled to assume (the rest are detected at run time).
    compiled_features: Vec<&'static str>,
    aes_hardware: bool,
    ciphers: Vec<Row>,
    xxh3_1k_gbps: f64,
    ahash_1k_gbps: f64,
}

const AAD: [u8; 40] = [7; 40];

/// Times `f` over `total` bytes in `buf`-sized calls.
fn rate(total: usize, buf: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    let calls = (total / buf).max(1);
    let d = best_of(reps, || {
        for _ in 0..calls {
            f();
        }
    });
    gbps((calls * buf) as u64, d)
}

fn aes_gcm_row(args: &Args, total: usize) -> Row {
    let cipher = aes_gcm::Aes256Gcm::new(&[3u8; 32].into());
    let nonce = [9u8; 12].into();
    let mut buf = vec![0x5au8; args.buf];
    let seal = rate(total, args.buf, args.reps, || {
        let tag = cipher
            .encrypt_inout_detached(&nonce, &AAD, buf.as_mut_slice().into())
            .expect("in range");
        black_box(tag);
    });
    // Open needs a valid tag: seal once, then decrypt-and-re-encrypt is not the same work,
    // so open the same ciphertext each time (decryption is in place: restore it).
    let sealed = buf.clone();
    let tag = cipher
        .encrypt_inout_detached(&nonce, &AAD, buf.as_mut_slice().into())
        .expect("in range");
    let ct = buf.clone();
    let open = rate(total, args.buf, args.reps, || {
        buf.copy_from_slice(&ct);
        cipher
            .decrypt_inout_detached(&nonce, &AAD, buf.as_mut_slice().into(), &tag)
            .expect("authentic");
    });
    black_box(sealed);
    Row {
        name: "aes-gcm 0.11 (RustCrypto)",
        seal_gbps: seal,
        open_gbps: open,
        seal_vs_memcpy: 0.0,
    }
}

macro_rules! ring_like_row {
    ($krate:ident, $name:expr, $args:expr, $total:expr) => {{
        use $krate::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[3u8; 32]).expect("key"));
        let mut buf = vec![0x5au8; $args.buf];
        let seal = rate($total, $args.buf, $args.reps, || {
            let tag = key
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([9; 12]),
                    Aad::from(&AAD),
                    &mut buf,
                )
                .expect("seal");
            black_box(&tag);
        });
        let mut ct = buf.clone();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([9; 12]),
                Aad::from(&AAD),
                &mut ct,
            )
            .expect("seal");
        ct.extend_from_slice(tag.as_ref());
        let mut work = ct.clone();
        let open = rate($total, $args.buf, $args.reps, || {
            work.copy_from_slice(&ct);
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key([9; 12]),
                    Aad::from(&AAD),
                    &mut work,
                )
                .expect("authentic");
            black_box(plain);
        });
        Row {
            name: $name,
            seal_gbps: seal,
            open_gbps: open,
            seal_vs_memcpy: 0.0,
        }
    }};
}

fn compiled_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    macro_rules! check {
        ($($feat:tt),*) => {$(
            if cfg!(target_feature = $feat) {
                f.push($feat);
            }
        )*};
    }
    check!(
        "sse4.2",
        "avx",
        "avx2",
        "aes",
        "pclmulqdq",
        "vaes",
        "vpclmulqdq",
        "avx512f"
    );
    f
}

fn hash_rate(total: usize, reps: usize, f: impl Fn(&[u8]) -> u64) -> f64 {
    // Cold memory, as the encoder sees it: a buffer far larger than the caches.
    let data = vec![0x3cu8; total];
    let d = best_of(reps, || {
        let mut acc = 0u64;
        for block in data.chunks_exact(1024) {
            acc ^= f(block);
        }
        black_box(acc);
    });
    gbps(total as u64, d)
}

pub fn run(args: &Args) {
    let total = args.mib << 20;
    let memcpy = memcpy_gbps(args.buf, (total / args.buf).max(1) * args.reps);
    let mut ciphers = vec![
        aes_gcm_row(args, total),
        ring_like_row!(ring, "ring 0.17", args, total),
        ring_like_row!(aws_lc_rs, "aws-lc-rs 1", args, total),
    ];
    for c in &mut ciphers {
        c.seal_vs_memcpy = c.seal_gbps / memcpy;
    }
    let ahash = ahash::RandomState::with_seeds(1, 2, 3, 4);
    let report = Report {
        buf: args.buf,
        memcpy_gbps: memcpy,
        compiled_features: compiled_features(),
        aes_hardware: aes_gcm::aes::hardware_accelerated(),
        ciphers,
        xxh3_1k_gbps: hash_rate(total, args.reps, xxhash_rust::xxh3::xxh3_64),
        ahash_1k_gbps: hash_rate(total, args.reps, |b| ahash.hash_one(b)),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
        return;
    }
    println!(
        "cipher: {} KiB buffers, one core; compiled for: {}; AES hardware: {}",
        args.buf >> 10,
        report.compiled_features.join(" "),
        report.aes_hardware
    );
    println!(
        "memcpy {:.2} GB/s (warm, same buffer size)",
        report.memcpy_gbps
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "AES-256-GCM", "seal GB/s", "open GB/s", "seal/memcpy"
    );
    for c in &report.ciphers {
        println!(
            "{:<28} {:>10.2} {:>10.2} {:>12.2}",
            c.name, c.seal_gbps, c.open_gbps, c.seal_vs_memcpy
        );
    }
    println!(
        "1 KiB block hashes over {} MiB (cold): xxh3 {:.2} GB/s, ahash {:.2} GB/s",
        args.mib, report.xxh3_1k_gbps, report.ahash_1k_gbps
    );
}

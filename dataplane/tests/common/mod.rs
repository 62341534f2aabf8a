//! A stream in a box: encoder -> sealer -> wire bytes -> opener -> decoder -> page array.
#![allow(dead_code)]

use dataplane::codec::{BlockHasher, CodecConfig, Decoder, Encoder};
use dataplane::crypto::{Direction, HandshakeNonce, MigrationKeys, Opener, PreSharedKey, Sealer};
use dataplane::frame::FrameBuf;
use dataplane::page::{PAGE_SIZE, Page, PageBatch};

/// Deterministic pseudo-random bytes (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("below a usize")
    }
}

pub fn keys(psk: u8) -> MigrationKeys {
    MigrationKeys::derive(
        &PreSharedKey::from_bytes([psk; 32]),
        &[42; 32],
        &HandshakeNonce([1; 32]),
        &HandshakeNonce([2; 32]),
    )
}

/// Seals frames with one key and opens them with another (equal unless a test says not).
pub fn sealer_opener(psk_src: u8, psk_dst: u8, max_frame: usize) -> (Sealer, Opener) {
    let s = Sealer::new(&keys(psk_src).stream_key(0, Direction::SourceToDest));
    let o = Opener::new(
        &keys(psk_dst).stream_key(0, Direction::SourceToDest),
        max_frame,
    );
    (s, o)
}

pub struct Link<H: BlockHasher> {
    pub enc: Encoder<H>,
    pub dec: Decoder,
    pub sealer: Sealer,
    pub opener: Opener,
    pub frame: FrameBuf,
    pub dest: Vec<Page>,
    pub frames: u64,
    pub wire_bytes: u64,
}

impl<H: BlockHasher> Link<H> {
    pub fn new(config: CodecConfig, hasher: H, pages: usize, frame_size: usize) -> Self {
        let (sealer, mut opener) = sealer_opener(7, 7, frame_size);
        opener.allow_compression(config.compression);
        Link {
            enc: Encoder::with_hasher(config.clone(), hasher).unwrap(),
            dec: Decoder::with_frame_size(config, pages as u64, frame_size).unwrap(),
            sealer,
            opener,
            frame: FrameBuf::new(frame_size),
            dest: vec![Page::zeroed(); pages],
            frames: 0,
            wire_bytes: 0,
        }
    }

    /// Sends a batch and flushes the last partial frame (the end of an iteration).
    pub fn send(&mut self, batch: &PageBatch) {
        let Link {
            enc,
            dec,
            sealer,
            opener,
            frame,
            dest,
            frames,
            wire_bytes,
        } = self;
        let mut ship = |f: &mut FrameBuf| {
            let mut wire = sealer.seal(f).to_vec();
            f.clear();
            *frames += 1;
            *wire_bytes += wire.len() as u64;
            let opened = opener.open(&mut wire).expect("open");
            dec.decode_compressed(
                opened.body,
                opened.compression,
                opened.records,
                opened.cache_digest,
                dest.as_mut_slice(),
            )
            .expect("decode");
        };
        enc.encode_batch(batch, frame, &mut ship);
        if !frame.is_empty() {
            enc.finish_frame(frame);
            ship(frame);
        }
    }

    pub fn caches_agree(&self) -> bool {
        self.enc.cache_state_digest() == self.dec.cache_state_digest()
    }
}

pub fn page_from(rng: &mut Rng) -> Page {
    let mut p = Page::zeroed();
    rng.fill(&mut p.0);
    p
}

pub const PAGE: usize = PAGE_SIZE;

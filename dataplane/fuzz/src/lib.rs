//! The harness behind the fuzz targets, kept in a library so the seed generator
//! (`examples/seeds.rs`) and the regression test (`tests/regressions.rs`) run exactly the code
//! the fuzzer runs. The `open_decode` target's harness is this module's top level; the
//! `handshake` and `control` targets' are in [`handshake`] and [`control`].
//!
//! # `open_decode` input format
//!
//! ```text
//! byte 0        control: bit 0 = mode (0 raw frame, 1 sealed body), other bits below
//! raw frame:    bytes 1..  the frame as it arrives from the wire, given to Opener::open
//! sealed body:  bytes 1..3  records count the header claims, u16 LE
//!               bytes 3..11 cache digest, u64 LE (used when CONTROL_DIGEST is set)
//!               bytes 11..  frame body (record bytes), cut to the frame's body capacity
//! ```
//!
//! Inputs shorter than the 11-byte header are padded with zeros. Control bits 2..=6 pick the
//! codec config of both ends (see [`config`]) and whether the warm-up runs. Control bit 7 has
//! both ends agree on `compression = auto`; in sealed-body mode the first body byte then
//! picks how the rest is flagged (bit 0: 0 lz4, 1 zstd) and the rest goes out as that
//! compressed body (a body of fewer than two bytes goes out uncompressed).
//!
//! In sealed-body mode the body is sealed with the fixed stream key and opened, so the decoder
//! sees arbitrary records behind valid crypto. Before that, a warm-up encodes, seals, opens
//! and decodes a few deterministic frames (zero pages, repeated pages, edited pages, enough
//! literal blocks to wrap the 16-block cache), so cache references and deltas in the fuzzed
//! body meet filled, wrapped slots and live page bases.

pub mod control;
pub mod handshake;

use std::cell::RefCell;
use std::sync::OnceLock;

use dataplane::codec::{Algorithm, CodecConfig, Compression, DecodeError, Decoder, Encoder};
use dataplane::crypto::{
    Direction, HandshakeNonce, MigrationKeys, OpenError, Opener, PreSharedKey, Sealer, StreamKey,
};
use dataplane::frame::{DEFAULT_FRAME_SIZE, FrameBuf, HEADER_LEN};
use dataplane::page::{BLOCK_SIZE, PAGE_SIZE, Page, Pfn};

/// Pages in the destination guest.
pub const PAGE_COUNT: u64 = 64;
/// Block cache per end: 16 blocks, so the warm-up wraps it.
pub const CACHE_BYTES: u64 = 16 * BLOCK_SIZE as u64;
/// Frame size of every frame (and the opener's limit).
pub const FRAME_SIZE: usize = DEFAULT_FRAME_SIZE;
/// Stream the fixed key belongs to.
pub const STREAM: u32 = 0;
/// Bytes before the body in sealed-body mode (control, records, digest).
pub const SEALED_HEADER_LEN: usize = 11;

/// Control bit 0: sealed-body mode (clear: raw-frame mode).
pub const CONTROL_SEALED: u8 = 1 << 0;
/// Control bit 1: the fuzzed frame's header carries the digest from the input.
pub const CONTROL_DIGEST: u8 = 1 << 1;
/// Control bit 2: CBR off.
pub const CONTROL_NO_CBR: u8 = 1 << 2;
/// Control bit 3: deltas off (with CBR off too, the stream keeps no cache).
pub const CONTROL_NO_DELTA: u8 = 1 << 3;
/// Control bit 4: cache verification (running digest) off.
pub const CONTROL_NO_VERIFY: u8 = 1 << 4;
/// Control bit 5: zero pages and blocks are not special-cased by the encoder.
pub const CONTROL_NO_ZERO_PAGES: u8 = 1 << 5;
/// Control bit 6: skip the warm-up (the fuzzed frame is the stream's first).
pub const CONTROL_NO_WARM_UP: u8 = 1 << 6;
/// Control bit 7: both ends agree on compression; the sealed body is flagged compressed.
pub const CONTROL_COMPRESSED: u8 = 1 << 7;

/// What happened to one input (the fuzz target ignores it; tests check seeds with it).
#[derive(Debug)]
pub enum Outcome {
    /// The opener refused the frame.
    Refused(OpenError),
    /// The frame opened; the decoder's verdict.
    Decoded(Result<(), DecodeError>),
}

/// The fixed stream key every frame is sealed with (derived once).
pub fn stream_key() -> &'static StreamKey {
    static KEY: OnceLock<StreamKey> = OnceLock::new();
    KEY.get_or_init(|| {
        MigrationKeys::derive(
            &PreSharedKey::from_bytes([0x5a; 32]),
            &[1; 32],
            &HandshakeNonce([1; 32]),
            &HandshakeNonce([2; 32]),
        )
        .stream_key(STREAM, Direction::SourceToDest)
    })
}

thread_local! {
    /// The destination guest's memory, reused across inputs: zeroing 256 KiB for every input
    /// cost more than everything else together. Reuse cannot make runs depend on earlier
    /// inputs: the decoder never reads a page it is about to write (`PageSink::page_mut`),
    /// and the warm-up check only compares pages the warm-up itself wrote.
    static MEM: RefCell<Vec<Page>> = RefCell::new(vec![Page::zeroed(); PAGE_COUNT as usize]);
}

/// The codec config both ends run for `control`.
pub fn config(control: u8) -> CodecConfig {
    CodecConfig {
        zero_pages: control & CONTROL_NO_ZERO_PAGES == 0,
        cbr: control & CONTROL_NO_CBR == 0,
        delta: control & CONTROL_NO_DELTA == 0,
        cache_bytes: CACHE_BYTES,
        verify_caches: control & CONTROL_NO_VERIFY == 0,
        compression: if control & CONTROL_COMPRESSED != 0 {
            Compression::Auto
        } else {
            Compression::Off
        },
        ..CodecConfig::default()
    }
}

/// The `open_decode` target: must not panic on any input.
pub fn open_decode(data: &[u8]) {
    let _ = run(data);
}

/// [`open_decode`], telling what happened.
pub fn run(data: &[u8]) -> Outcome {
    let Some((&control, rest)) = data.split_first() else {
        return Outcome::Refused(OpenError::Truncated { need: 1, got: 0 });
    };
    MEM.with_borrow_mut(|mem| {
        if control & CONTROL_SEALED == 0 {
            raw_frame(control, rest, mem)
        } else {
            sealed_body(control, rest, mem)
        }
    })
}

/// Mode 0: the bytes as they come off the wire.
fn raw_frame(control: u8, wire: &[u8], mem: &mut [Page]) -> Outcome {
    let mut session = Session::new(control, mem);
    let mut buf = wire.to_vec();
    // A receiver checks the header alone before it reads the body; that must cope too.
    let _ = session
        .opener
        .check_header(&buf[..buf.len().min(HEADER_LEN)]);
    match session.opener.open(&mut buf) {
        Ok(frame) => Outcome::Decoded(session.decoder.decode_compressed(
            frame.body,
            frame.compression,
            frame.records,
            frame.cache_digest,
            session.mem,
        )),
        Err(e) => Outcome::Refused(e),
    }
}

/// Mode 1: the bytes become the body of an authentic frame, after the warm-up.
fn sealed_body(control: u8, rest: &[u8], mem: &mut [Page]) -> Outcome {
    let mut head = [0u8; SEALED_HEADER_LEN - 1];
    let n = rest.len().min(head.len());
    head[..n].copy_from_slice(&rest[..n]);
    let body = &rest[n..];
    let records = u16::from_le_bytes([head[0], head[1]]);
    let digest = u64::from_le_bytes(head[2..10].try_into().expect("8 bytes"));

    let mut session = Session::new(control, mem);
    if control & CONTROL_NO_WARM_UP == 0 {
        session.warm_up();
    }

    let mut frame = FrameBuf::new(FRAME_SIZE);
    // The body is cut to the frame's capacity; the header claims `records` whatever it holds.
    match body.split_first() {
        Some((&pick, packed)) if control & CONTROL_COMPRESSED != 0 && !packed.is_empty() => {
            let packed = &packed[..packed.len().min(frame.body_capacity() - 1)];
            // Room first, then the fuzzed bytes in its place as the compressed body.
            frame.append_raw_records(&vec![0; packed.len() + 1], u32::from(records));
            let algorithm = if pick & 1 == 0 {
                Algorithm::Lz4
            } else {
                Algorithm::Zstd
            };
            frame.set_compressed_body(algorithm, packed);
        }
        _ => {
            frame.append_raw_records(body, u32::from(records));
        }
    }
    frame.set_cache_digest((control & CONTROL_DIGEST != 0).then_some(digest));
    session.transfer(&mut frame)
}

/// One stream, both ends.
struct Session<'m> {
    sealer: Sealer,
    opener: Opener,
    encoder: Encoder,
    decoder: Decoder,
    /// The destination guest's memory.
    mem: &'m mut [Page],
}

impl<'m> Session<'m> {
    fn new(control: u8, mem: &'m mut [Page]) -> Self {
        let key = stream_key();
        let config = config(control);
        let mut opener = Opener::new(key, FRAME_SIZE);
        opener.allow_compression(config.compression);
        Session {
            sealer: Sealer::new(key),
            opener,
            encoder: Encoder::new(config.clone()).expect("fuzz config is valid"),
            decoder: Decoder::new(config, PAGE_COUNT).expect("fuzz config is valid"),
            mem,
        }
    }

    /// Seals `frame`, opens it, decodes it.
    fn transfer(&mut self, frame: &mut FrameBuf) -> Outcome {
        let (records, digest) = (frame.records(), frame.cache_digest());
        let body = frame.body().to_vec();
        let mut wire = self.sealer.seal(frame).to_vec();
        let opened = match self.opener.open(&mut wire) {
            Ok(opened) => opened,
            Err(e) => panic!("a frame this stream sealed was refused: {e}"),
        };
        assert_eq!(opened.records, records, "record count changed in transit");
        assert_eq!(
            opened.cache_digest, digest,
            "cache digest changed in transit"
        );
        assert!(opened.body == body, "body changed in transit");
        Outcome::Decoded(self.decoder.decode_compressed(
            opened.body,
            opened.compression,
            opened.records,
            opened.cache_digest,
            self.mem,
        ))
    }

    /// Encodes `pages` (in order) into as many frames as they need and sends each, then
    /// checks the destination holds what was sent.
    fn send_pages(&mut self, pages: &[(Pfn, Page)]) {
        let mut frame = FrameBuf::new(FRAME_SIZE);
        for (pfn, page) in pages {
            if !frame.has_room() {
                self.flush(&mut frame);
            }
            self.encoder.encode_page(*pfn, page, &mut frame);
        }
        if !frame.is_empty() {
            self.flush(&mut frame);
        }
        for (i, (pfn, page)) in pages.iter().enumerate() {
            let last = pages[i + 1..].iter().all(|(p, _)| p != pfn);
            assert!(
                !last || self.mem[*pfn as usize] == *page,
                "warm-up: page {pfn} decoded differently from what was sent"
            );
        }
    }

    fn flush(&mut self, frame: &mut FrameBuf) {
        self.encoder.finish_frame(frame);
        if let Outcome::Decoded(Err(e)) = self.transfer(frame) {
            panic!("warm-up frame from the real encoder refused by the decoder: {e}");
        }
        frame.clear();
    }

    /// Deterministic traffic that leaves the cache full and wrapped, with some live and some
    /// evicted page bases.
    fn warm_up(&mut self) {
        static FRAMES: OnceLock<Vec<Vec<(Pfn, Page)>>> = OnceLock::new();
        for frame in FRAMES.get_or_init(warm_up_frames) {
            self.send_pages(frame);
        }
    }
}

/// A page of pseudo-random bytes (distinct blocks for distinct seeds).
pub fn pattern(seed: u64) -> Page {
    let mut page = Page::zeroed();
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in page.0.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
    page
}

/// `page` with the bytes at the given offsets XORed with the given values.
pub fn edit(page: &Page, edits: &[(usize, u8)]) -> Page {
    let mut out = page.clone();
    for &(at, x) in edits {
        out.0[at % PAGE_SIZE] ^= x;
    }
    out
}

/// The warm-up's frames, each a list of (page number, content).
///
/// With the default 16-block cache: frame 1 fills it (five pages of literals, so page 1's
/// blocks are evicted again); frame 2 has a repeated page (references), a page mixing zero,
/// referenced and literal blocks, small edits of cached pages and of the zero page (deltas)
/// and a rewritten page.
fn warm_up_frames() -> Vec<Vec<(Pfn, Page)>> {
    let p: Vec<Page> = (0..8).map(pattern).collect();
    let mut mixed = Page::zeroed();
    mixed.blocks_mut()[1] = p[4].blocks()[1];
    mixed.blocks_mut()[2] = p[7].blocks()[2];
    vec![
        vec![
            (0, Page::zeroed()),
            (1, p[1].clone()),
            (2, p[2].clone()),
            (3, p[3].clone()),
            (4, p[4].clone()),
            (5, p[5].clone()),
        ],
        vec![
            (6, p[5].clone()),
            (7, mixed),
            (
                5,
                edit(&p[5], &[(10, 0xff), (2000, 1), (3000, 7), (3001, 7)]),
            ),
            (4, edit(&p[4], &[(1023, 0x10), (1024, 0x20)])),
            (0, edit(&Page::zeroed(), &[(4095, 1)])),
            (3, p[6].clone()),
            (8, Page::zeroed()),
        ],
    ]
}

/// Seed inputs for the corpus: (file name, bytes). Each one opens and decodes cleanly.
///
/// Sealed-body seeds are real encoder output for the traffic after the warm-up, so the
/// fuzzer starts from valid records (with the right digest) for each config. Raw-frame seeds
/// are real sealed frames (sequence number 0), which open.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let controls = [
        CONTROL_DIGEST,
        CONTROL_DIGEST | CONTROL_NO_CBR,
        CONTROL_DIGEST | CONTROL_NO_DELTA,
        CONTROL_NO_VERIFY,
        CONTROL_NO_CBR | CONTROL_NO_DELTA,
        CONTROL_DIGEST | CONTROL_NO_ZERO_PAGES,
    ];
    let p5 = pattern(5);
    let small: Vec<(Pfn, Page)> = vec![
        (9, Page::zeroed()),
        (5, edit(&p5, &[(11, 3), (4000, 9)])),
        (10, p5.clone()),
        (7, edit(&Page::zeroed(), &[(0, 1), (2047, 2)])),
        (63, Page::zeroed()),
    ];
    let mut large = small.clone();
    large.push((11, pattern(8)));
    large.push((12, pattern(9)));

    let mut out = compressed_seeds();
    for control in controls {
        for (name, pages) in [("small", &small), ("large", &large)] {
            // Sealed body: the next frame after the warm-up.
            let mut mem = vec![Page::zeroed(); PAGE_COUNT as usize];
            let mut s = Session::new(control | CONTROL_SEALED, &mut mem);
            s.warm_up();
            let mut frame = FrameBuf::new(FRAME_SIZE);
            for (pfn, page) in pages {
                s.encoder.encode_page(*pfn, page, &mut frame);
            }
            s.encoder.finish_frame(&mut frame);
            let control = if frame.cache_digest().is_some() {
                control
            } else {
                control & !CONTROL_DIGEST
            };
            let mut input = vec![control | CONTROL_SEALED];
            let records = u16::try_from(frame.records()).expect("a few records");
            input.extend_from_slice(&records.to_le_bytes());
            input.extend_from_slice(&frame.cache_digest().unwrap_or(0).to_le_bytes());
            input.extend_from_slice(frame.body());
            out.push((format!("sealed-{control:02x}-{name}"), input));

            // Raw frame: the same pages as a stream's first frame, sealed.
            let mut s = Session::new(control, &mut mem);
            let mut frame = FrameBuf::new(FRAME_SIZE);
            for (pfn, page) in pages {
                s.encoder.encode_page(*pfn, page, &mut frame);
            }
            s.encoder.finish_frame(&mut frame);
            let mut input = vec![control & !CONTROL_SEALED];
            input.extend_from_slice(s.sealer.seal(&mut frame));
            out.push((format!("raw-{control:02x}-{name}"), input));
        }
    }
    out
}

/// Sealed-body seeds whose body is the real encoder's records after the warm-up, compressed
/// with each algorithm (control bit 7).
fn compressed_seeds() -> Vec<(String, Vec<u8>)> {
    use dataplane::codec::Level;
    use dataplane::codec::compress::Compressor;
    let text = |seed: u8| {
        let mut p = Page::zeroed();
        for (i, b) in p.0.iter_mut().enumerate() {
            *b = b"static int page_text(void);\n"[i % 28];
        }
        p.0[..8].fill(seed);
        p
    };
    let pages = [(20, text(1)), (21, text(2)), (9, Page::zeroed())];
    let control = CONTROL_DIGEST | CONTROL_COMPRESSED;
    let mut out = Vec::new();
    for (pick, level) in [(0u8, Level::Lz4), (1, Level::Zstd1)] {
        let mut mem = vec![Page::zeroed(); PAGE_COUNT as usize];
        let mut s = Session::new(control | CONTROL_SEALED, &mut mem);
        s.warm_up();
        let mut frame = FrameBuf::new(FRAME_SIZE);
        for (pfn, page) in &pages {
            s.encoder.encode_page(*pfn, page, &mut frame);
        }
        s.encoder.finish_frame(&mut frame);
        let mut c = Compressor::new(frame.body_capacity());
        let packed = c
            .compress(level, frame.body())
            .expect("text pages compress")
            .to_vec();
        let mut input = vec![control | CONTROL_SEALED];
        let records = u16::try_from(frame.records()).expect("a few records");
        input.extend_from_slice(&records.to_le_bytes());
        input.extend_from_slice(&frame.cache_digest().unwrap_or(0).to_le_bytes());
        input.push(pick);
        input.extend_from_slice(&packed);
        out.push((format!("sealed-{control:02x}-{level}"), input));
    }
    out
}

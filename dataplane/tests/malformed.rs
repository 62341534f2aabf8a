//! Authentic frames with malformed records: each is refused with its own error, no panic,
//! and the decoder refuses to go on afterwards.

mod common;

use common::sealer_opener;
use dataplane::codec::delta::DeltaError;
use dataplane::codec::wire::{BlockCode, RecordKind, RecordWriter, WireError};
use dataplane::codec::{Algorithm, CodecConfig, CompressError, Compression, DecodeError, Decoder};
use dataplane::crypto::OpenError;
use dataplane::frame::{DEFAULT_FRAME_SIZE, FLAG_LZ4, FrameBuf, HEADER_LEN, TAG_LEN};
use dataplane::page::{BLOCK_SIZE, PAGE_SIZE, Page};

const PAGES: u64 = 16;
const PAGES_USIZE: usize = 16;

fn body(write: impl FnOnce(&mut RecordWriter<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 3 * PAGE_SIZE];
    let mut w = RecordWriter::resume(&mut buf, 0, 0);
    write(&mut w);
    let n = w.len();
    buf.truncate(n);
    buf
}

/// Seals `body` claiming `records` records, opens it, decodes it with a fresh decoder.
fn decode(config: CodecConfig, frames: &[(Vec<u8>, u32, Option<u64>)]) -> Result<(), DecodeError> {
    let (mut sealer, mut opener) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let mut dec = Decoder::new(config, PAGES).unwrap();
    let mut mem = vec![Page::zeroed(); PAGES_USIZE];
    for (body, records, digest) in frames {
        let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
        f.append_raw_records(body, *records);
        f.set_cache_digest(*digest);
        let mut wire = sealer.seal(&mut f).to_vec();
        let opened = opener.open(&mut wire).unwrap();
        dec.decode(
            opened.body,
            opened.records,
            opened.cache_digest,
            mem.as_mut_slice(),
        )?;
    }
    Ok(())
}

fn one(config: CodecConfig, body: Vec<u8>) -> Result<(), DecodeError> {
    decode(config, &[(body, 1, None)])
}

fn no_verify() -> CodecConfig {
    CodecConfig {
        verify_caches: false,
        cache_bytes: 8 * BLOCK_SIZE as u64,
        ..CodecConfig::default()
    }
}

#[test]
fn page_beyond_the_guest() {
    let b = body(|w| w.header(RecordKind::Zero, PAGES));
    assert_eq!(
        one(no_verify(), b),
        Err(DecodeError::PageOutOfRange {
            pfn: PAGES,
            page_count: PAGES
        })
    );
}

#[test]
fn unknown_kind_and_truncated_records() {
    assert!(matches!(
        one(no_verify(), vec![9, 0]),
        Err(DecodeError::Wire(WireError::UnknownKind { kind: 9, .. }))
    ));
    let full = body(|w| {
        w.header(RecordKind::Full, 1);
        w.bytes(&[5; 100]);
    });
    assert!(matches!(
        one(no_verify(), full),
        Err(DecodeError::Wire(WireError::Truncated { .. }))
    ));
    assert!(matches!(
        one(no_verify(), vec![0, 0x80]),
        Err(DecodeError::Wire(WireError::Truncated { .. }))
    ));
}

#[test]
fn reserved_block_code() {
    let b = body(|w| {
        w.header(RecordKind::Blocks, 0);
        w.byte(0b11);
    });
    assert!(matches!(
        one(no_verify(), b),
        Err(DecodeError::Wire(WireError::BadMask { .. }))
    ));
}

fn blocks_ref(slot: u32) -> Vec<u8> {
    body(|w| {
        w.header(RecordKind::Blocks, 2);
        w.byte(BlockCode::mask(&[
            BlockCode::Ref,
            BlockCode::Zero,
            BlockCode::Zero,
            BlockCode::Zero,
        ]));
        w.u32(slot);
    })
}

#[test]
fn slots_outside_or_not_yet_filled() {
    // Empty cache: slot 0 is not filled yet.
    assert!(matches!(
        one(no_verify(), blocks_ref(0)),
        Err(DecodeError::BadSlot { slot: 0, .. })
    ));
    assert!(matches!(
        one(no_verify(), blocks_ref(u32::MAX)),
        Err(DecodeError::BadSlot { .. })
    ));
    // After one full page (4 blocks inserted), slot 3 is valid and slot 4 is not.
    let full = body(|w| {
        w.header(RecordKind::Full, 0);
        w.bytes(&[3; PAGE_SIZE]);
    });
    assert_eq!(
        decode(
            no_verify(),
            &[(full.clone(), 1, None), (blocks_ref(3), 1, None)]
        ),
        Ok(())
    );
    assert!(matches!(
        decode(no_verify(), &[(full, 1, None), (blocks_ref(4), 1, None)]),
        Err(DecodeError::BadSlot { slot: 4, .. })
    ));
}

#[test]
fn references_without_a_cache() {
    assert!(matches!(
        one(CodecConfig::baseline(), blocks_ref(0)),
        Err(DecodeError::NoCache { .. })
    ));
    let delta = body(|w| {
        w.header(RecordKind::Delta, 0);
        w.varint(0);
    });
    assert!(matches!(
        one(CodecConfig::baseline(), delta),
        Err(DecodeError::NoCache { .. })
    ));
}

#[test]
fn deltas_without_base_or_overrunning() {
    let delta = |gap: u64, len: u64| {
        body(move |w| {
            w.header(RecordKind::Delta, 5);
            let mut runs = vec![0u8; 32];
            let mut r = RecordWriter::resume(&mut runs, 0, 0);
            r.varint(gap);
            r.varint(len);
            r.bytes(&vec![1u8; len.min(8) as usize]);
            let n = r.len();
            w.varint(n as u64);
            w.bytes(&runs[..n]);
        })
    };
    assert_eq!(
        one(no_verify(), delta(0, 1)),
        Err(DecodeError::DeltaWithoutBase { pfn: 5 })
    );
    // Page 5 zero first: its base is the zero page, so a delta applies...
    let zero = body(|w| w.header(RecordKind::Zero, 5));
    assert_eq!(
        decode(
            no_verify(),
            &[(zero.clone(), 1, None), (delta(4000, 8), 1, None)]
        ),
        Ok(())
    );
    // ...unless it runs off the end of the page.
    assert!(matches!(
        decode(
            no_verify(),
            &[(zero.clone(), 1, None), (delta(4090, 8), 1, None)]
        ),
        Err(DecodeError::BadDelta {
            pfn: 5,
            source: DeltaError::Overrun { .. }
        })
    ));
    // A length field larger than a page is refused before anything is read.
    let long = body(|w| {
        w.header(RecordKind::Delta, 5);
        w.varint(1 << 40);
    });
    assert!(matches!(
        decode(no_verify(), &[(zero, 1, None), (long, 1, None)]),
        Err(DecodeError::BadDelta { .. })
    ));
}

#[test]
fn record_count_must_match() {
    let two = body(|w| {
        w.header(RecordKind::Zero, 0);
        w.header(RecordKind::Zero, 1);
    });
    assert_eq!(
        decode(no_verify(), &[(two.clone(), 3, None)]),
        Err(DecodeError::RecordCount {
            expected: 3,
            found: 2
        })
    );
    assert_eq!(
        decode(no_verify(), &[(two, 1, None)]),
        Err(DecodeError::RecordCount {
            expected: 1,
            found: 2
        })
    );
}

#[test]
fn a_diverged_cache_is_caught_and_poisons_the_stream() {
    let verify = CodecConfig {
        verify_caches: true,
        ..no_verify()
    };
    let full = body(|w| {
        w.header(RecordKind::Full, 0);
        w.bytes(&[3; PAGE_SIZE]);
    });
    let zero = body(|w| w.header(RecordKind::Zero, 1));
    let r = decode(
        verify.clone(),
        &[(full, 1, Some(0xdead_beef)), (zero.clone(), 1, None)],
    );
    assert!(
        matches!(
            r,
            Err(DecodeError::CacheDiverged {
                sender: 0xdead_beef,
                ..
            })
        ),
        "{r:?}"
    );
    // A digest sent to a decoder that keeps none: the ends disagree on the config.
    assert_eq!(
        decode(no_verify(), &[(zero, 1, Some(1))]),
        Err(DecodeError::UnexpectedDigest)
    );
}

#[test]
fn decoder_refuses_to_continue_after_an_error() {
    let (mut sealer, mut opener) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let mut dec = Decoder::new(no_verify(), PAGES).unwrap();
    let mut mem = vec![Page::zeroed(); PAGES_USIZE];
    let mut run = |b: Vec<u8>| {
        let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
        f.append_raw_records(&b, 1);
        let mut wire = sealer.seal(&mut f).to_vec();
        let o = opener.open(&mut wire).unwrap();
        dec.decode(o.body, o.records, o.cache_digest, mem.as_mut_slice())
    };
    assert!(run(vec![9]).is_err());
    assert_eq!(
        run(body(|w| w.header(RecordKind::Zero, 0))),
        Err(DecodeError::Poisoned)
    );
}

/// Fuzzing regression (delta-len-4095-saved-delta-underflow): a delta as long as a page used
/// to underflow the savings counter (a panic in debug builds).
#[test]
fn page_sized_delta_does_not_panic() {
    let zero = body(|w| w.header(RecordKind::Zero, 0));
    let delta = body(|w| {
        w.header(RecordKind::Delta, 0);
        w.varint(4095);
        w.varint(0); // gap
        w.varint(4092); // run length
        w.bytes(&[1; 4092]);
    });
    assert_eq!(
        decode(no_verify(), &[(zero, 1, None), (delta, 1, None)]),
        Ok(())
    );
}

#[test]
fn pages_of_another_stream_are_refused() {
    let (mut sealer, mut opener) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let mut dec = Decoder::new(no_verify(), PAGES).unwrap();
    dec.restrict_to(|pfn| pfn % 2 == 0);
    let mut mem = vec![Page::zeroed(); PAGES_USIZE];
    mem[3].0[0] = 9;
    let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
    f.append_raw_records(&body(|w| w.header(RecordKind::Zero, 3)), 1);
    let mut wire = sealer.seal(&mut f).to_vec();
    let o = opener.open(&mut wire).unwrap();
    assert_eq!(
        dec.decode(o.body, o.records, o.cache_digest, mem.as_mut_slice()),
        Err(DecodeError::NotThisStream { pfn: 3 })
    );
    assert_eq!(mem[3].0[0], 9, "nothing written");
}

/// An authentic frame whose body is `packed`, flagged as compressed with `algorithm`.
fn compressed_wire(
    algorithm: Algorithm,
    packed: &[u8],
    records: u32,
    agreed: Compression,
) -> (Vec<u8>, dataplane::crypto::Opener) {
    let (mut sealer, mut opener) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    opener.allow_compression(agreed);
    let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
    // Room first, then the hostile bytes in its place (a real sender only ever shrinks).
    f.append_raw_records(&vec![0; packed.len() + 1], records);
    f.set_compressed_body(algorithm, packed);
    (sealer.seal(&mut f).to_vec(), opener)
}

fn decode_packed(
    algorithm: Algorithm,
    packed: &[u8],
    records: u32,
    agreed: Compression,
) -> Result<(), DecodeError> {
    let (mut wire, mut opener) = compressed_wire(algorithm, packed, records, agreed);
    let o = opener.open(&mut wire).unwrap();
    assert_eq!(o.compression, Some(algorithm));
    let config = CodecConfig {
        compression: agreed,
        ..no_verify()
    };
    let mut dec = Decoder::new(config, PAGES).unwrap();
    let mut mem = vec![Page::zeroed(); PAGES_USIZE];
    let r = dec.decode_compressed(
        o.body,
        o.compression,
        o.records,
        o.cache_digest,
        mem.as_mut_slice(),
    );
    if r.is_err() {
        // Like any refused frame, it poisons the stream.
        let zero = body(|w| w.header(RecordKind::Zero, 0));
        assert_eq!(
            dec.decode(&zero, 1, None, mem.as_mut_slice()),
            Err(DecodeError::Poisoned)
        );
    }
    r
}

#[test]
fn compressed_records_decode_like_plain_ones() {
    let pages = body(|w| {
        for pfn in 0..2 {
            w.header(RecordKind::Full, pfn);
            w.bytes(&[0x61; PAGE_SIZE]);
        }
    });
    let lz4 = lz4_flex::block::compress(&pages);
    assert_eq!(
        decode_packed(Algorithm::Lz4, &lz4, 2, Compression::Lz4),
        Ok(())
    );
    let zstd = zstd::bulk::compress(&pages, 3).unwrap();
    assert_eq!(
        decode_packed(Algorithm::Zstd, &zstd, 2, Compression::Auto),
        Ok(())
    );
    // Decompression only restores the bytes: bad records inside are refused as usual.
    let garbage = lz4_flex::block::compress(&[9, 0, 0, 0]);
    assert!(matches!(
        decode_packed(Algorithm::Lz4, &garbage, 1, Compression::Lz4),
        Err(DecodeError::Wire(WireError::UnknownKind { kind: 9, .. }))
    ));
}

/// Regression: a few hundred bytes that would expand past a frame (a decompression bomb)
/// are refused without writing more than one frame body.
#[test]
fn decompression_bombs_are_refused() {
    let huge = vec![0u8; 4 * DEFAULT_FRAME_SIZE];
    let lz4 = lz4_flex::block::compress(&huge);
    assert!(lz4.len() < 2048);
    let limit = DEFAULT_FRAME_SIZE - HEADER_LEN - TAG_LEN;
    assert_eq!(
        decode_packed(Algorithm::Lz4, &lz4, 1, Compression::Auto),
        Err(DecodeError::Decompress(CompressError::TooLarge {
            algorithm: Algorithm::Lz4,
            limit
        }))
    );
    let zstd = zstd::bulk::compress(&huge, 1).unwrap();
    assert_eq!(
        decode_packed(Algorithm::Zstd, &zstd, 1, Compression::Zstd1),
        Err(DecodeError::Decompress(CompressError::TooLarge {
            algorithm: Algorithm::Zstd,
            limit
        }))
    );
}

#[test]
fn corrupt_compressed_bodies_are_typed_errors() {
    let records = body(|w| {
        w.header(RecordKind::Full, 1);
        w.bytes(&[0x42; PAGE_SIZE]);
    });
    let mut lz4 = lz4_flex::block::compress(&records);
    let last = lz4.len() - 1;
    lz4.truncate(last);
    assert!(matches!(
        decode_packed(Algorithm::Lz4, &lz4, 1, Compression::Lz4),
        Err(DecodeError::Decompress(CompressError::Malformed {
            algorithm: Algorithm::Lz4,
            ..
        }))
    ));
    // lz4 bytes under the zstd flag.
    assert!(matches!(
        decode_packed(Algorithm::Zstd, &lz4, 1, Compression::Auto),
        Err(DecodeError::Decompress(CompressError::Malformed {
            algorithm: Algorithm::Zstd,
            ..
        }))
    ));
}

#[test]
fn compression_the_ends_did_not_agree_on_is_refused() {
    let records = body(|w| {
        w.header(RecordKind::Full, 1);
        w.bytes(&[0x42; PAGE_SIZE]);
    });
    let lz4 = lz4_flex::block::compress(&records);
    // The opener refuses it from the header alone...
    for agreed in [Compression::Off, Compression::Zstd1, Compression::Zstd3] {
        let (wire, opener) = compressed_wire(Algorithm::Lz4, &lz4, 1, agreed);
        assert_eq!(
            opener.check_header(&wire),
            Err(OpenError::CompressionNotAgreed {
                flags: FLAG_LZ4,
                agreed
            })
        );
    }
    // ...and a decoder asked to take it anyway refuses too.
    let mut dec = Decoder::new(no_verify(), PAGES).unwrap();
    let mut mem = vec![Page::zeroed(); PAGES_USIZE];
    assert_eq!(
        dec.decode_compressed(&lz4, Some(Algorithm::Lz4), 1, None, mem.as_mut_slice()),
        Err(DecodeError::CompressionNotAgreed {
            algorithm: Algorithm::Lz4,
            agreed: Compression::Off
        })
    );
}

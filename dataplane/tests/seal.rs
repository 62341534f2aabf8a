//! Sealed frames: every kind of damage is refused with its own error, and never panics.

mod common;

use common::{Rng, sealer_opener};
use dataplane::crypto::{OpenError, Sealer};
use dataplane::frame::{DEFAULT_FRAME_SIZE, FrameBuf, HEADER_LEN, TAG_LEN};

fn frame_with(body: &[u8], digest: Option<u64>) -> FrameBuf {
    let mut f = FrameBuf::new(DEFAULT_FRAME_SIZE);
    f.append_raw_records(body, 1);
    f.set_cache_digest(digest);
    f
}

fn sealed(sealer: &mut Sealer, body: &[u8]) -> Vec<u8> {
    let mut f = frame_with(body, Some(0x1234));
    sealer.seal(&mut f).to_vec()
}

#[test]
fn sealed_frames_open_in_order() {
    let (mut s, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    for i in 0..5u8 {
        let body = vec![i; 100 * usize::from(i)];
        let mut wire = sealed(&mut s, &body);
        assert_eq!(wire.len(), HEADER_LEN + body.len() + TAG_LEN);
        // Ciphertext must not show the plaintext.
        assert!(body.is_empty() || wire[HEADER_LEN..HEADER_LEN + body.len()] != body[..]);
        let f = o.open(&mut wire).unwrap();
        assert_eq!(
            (f.seq, f.records, f.cache_digest),
            (u64::from(i), 1, Some(0x1234))
        );
        assert_eq!(f.body, &body[..]);
    }
}

#[test]
fn wrong_key_is_named_as_such() {
    let (mut s, mut o) = sealer_opener(1, 2, DEFAULT_FRAME_SIZE);
    let mut wire = sealed(&mut s, b"hello");
    assert!(matches!(o.open(&mut wire), Err(OpenError::WrongKey { .. })));
}

#[test]
fn every_bit_flip_is_refused() {
    let (mut s, _) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let mut rng = Rng(3);
    let mut body = vec![0u8; 300];
    rng.fill(&mut body);
    let wire = sealed(&mut s, &body);
    for bit in 0..wire.len() * 8 {
        let (_, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
        let mut bad = wire.clone();
        bad[bit / 8] ^= 1 << (bit % 8);
        let err = o.open(&mut bad).expect_err("flipped bit accepted");
        // Where the flip lands decides which check fires first; the body and tag can only
        // be caught by authentication.
        if bit / 8 >= HEADER_LEN {
            assert!(
                matches!(err, OpenError::Tampered { .. }),
                "bit {bit}: {err}"
            );
        }
        // Refusal leaves the opener ready for the genuine frame.
        let mut good = wire.clone();
        o.open(&mut good).unwrap();
    }
}

#[test]
fn every_truncation_is_refused() {
    let (mut s, _) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let wire = sealed(&mut s, &[7u8; 200]);
    for len in 0..wire.len() {
        let (_, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
        let mut cut = wire[..len].to_vec();
        assert!(
            matches!(o.open(&mut cut), Err(OpenError::Truncated { .. })),
            "length {len}"
        );
    }
    let (_, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let mut long = wire.clone();
    long.push(0);
    assert_eq!(
        o.open(&mut long).unwrap_err(),
        OpenError::TrailingBytes { extra: 1 }
    );
}

#[test]
fn replay_and_reordering_are_refused() {
    let (mut s, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let f0 = sealed(&mut s, b"zero");
    let f1 = sealed(&mut s, b"one");
    let f2 = sealed(&mut s, b"two");
    assert_eq!(
        o.open(&mut f1.clone()).unwrap_err(),
        OpenError::OutOfOrder {
            seq: 1,
            expected: 0
        }
    );
    o.open(&mut f0.clone()).unwrap();
    assert_eq!(
        o.open(&mut f0.clone()).unwrap_err(),
        OpenError::Replayed {
            seq: 0,
            expected: 1
        }
    );
    assert_eq!(
        o.open(&mut f2.clone()).unwrap_err(),
        OpenError::OutOfOrder {
            seq: 2,
            expected: 1
        }
    );
    o.open(&mut f1.clone()).unwrap();
    o.open(&mut f2.clone()).unwrap();
}

#[test]
fn header_fields_are_checked_before_the_body_is_read() {
    let (mut s, o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let wire = sealed(&mut s, &[1u8; 64]);
    assert_eq!(o.check_header(&wire[..HEADER_LEN]), Ok(wire.len()));

    let mut v = wire.clone();
    v[4] = 2; // version 2
    assert_eq!(
        o.check_header(&v),
        Err(OpenError::UnsupportedVersion { got: 2 })
    );
    let mut m = wire.clone();
    m[0] = b'X';
    assert!(matches!(o.check_header(&m), Err(OpenError::BadMagic(_))));
    let mut f = wire.clone();
    f[6] = 0x80; // unknown flag
    assert_eq!(o.check_header(&f), Err(OpenError::UnknownFlags(0x80)));
    let mut st = wire.clone();
    st[8] = 9; // stream 9
    assert!(matches!(
        o.check_header(&st),
        Err(OpenError::WrongStream { got: 9, .. })
    ));
    let mut huge = wire.clone();
    huge[24..28].copy_from_slice(&u32::MAX.to_le_bytes()); // body_len
    assert!(matches!(
        o.check_header(&huge),
        Err(OpenError::TooLong { .. })
    ));
}

#[test]
fn frames_of_another_stream_or_direction_do_not_open() {
    use dataplane::crypto::{Direction, Opener};
    let (mut s, _) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    let wire = sealed(&mut s, b"x");
    let keys = common::keys(1);
    let mut back = Opener::new(
        &keys.stream_key(0, Direction::DestToSource),
        DEFAULT_FRAME_SIZE,
    );
    assert!(matches!(
        back.open(&mut wire.clone()),
        Err(OpenError::WrongKey { .. })
    ));
    let mut other = Opener::new(
        &keys.stream_key(1, Direction::SourceToDest),
        DEFAULT_FRAME_SIZE,
    );
    assert!(matches!(
        other.open(&mut wire.clone()),
        Err(OpenError::WrongStream { .. })
    ));
}

#[test]
fn compressed_frames_carry_their_flag_and_it_is_authenticated() {
    use dataplane::codec::{Algorithm, Compression};
    use dataplane::frame::{FLAG_LZ4, FLAG_ZSTD};
    let (mut s, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    o.allow_compression(Compression::Auto);
    let mut f = frame_with(&[5u8; 300], None);
    f.set_compressed_body(Algorithm::Zstd, &[1, 2, 3]);
    let wire = s.seal(&mut f).to_vec();
    assert_eq!(wire.len(), HEADER_LEN + 3 + TAG_LEN);
    assert_eq!(u16::from_le_bytes([wire[6], wire[7]]), FLAG_ZSTD);
    let mut copy = wire.clone();
    let opened = o.open(&mut copy).unwrap();
    assert_eq!(opened.compression, Some(Algorithm::Zstd));
    assert_eq!(opened.body, &[1, 2, 3]);

    // Swapping the algorithm flag passes the header check (both are agreed) but not the tag.
    let (_, mut o) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    o.allow_compression(Compression::Auto);
    let mut swapped = wire.clone();
    swapped[6..8].copy_from_slice(&FLAG_LZ4.to_le_bytes());
    assert!(matches!(
        o.open(&mut swapped),
        Err(OpenError::Tampered { .. })
    ));
    // Both algorithms at once is no sender's frame.
    let mut both = wire.clone();
    both[6..8].copy_from_slice(&(FLAG_LZ4 | FLAG_ZSTD).to_le_bytes());
    assert!(matches!(
        o.check_header(&both),
        Err(OpenError::CompressionNotAgreed { .. })
    ));
    // An opener that agreed on none refuses it before reading the body.
    let (_, plain) = sealer_opener(1, 1, DEFAULT_FRAME_SIZE);
    assert_eq!(
        plain.check_header(&wire),
        Err(OpenError::CompressionNotAgreed {
            flags: FLAG_ZSTD,
            agreed: Compression::Off
        })
    );
}

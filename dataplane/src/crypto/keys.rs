//! Key material: the pre-shared key, and the per-migration, per-stream keys derived from it.
//!
//! ```text
//! prk        = HKDF-Extract(salt = "skyferry/1" | migration id | source nonce | dest nonce,
//!                           ikm  = pre-shared key)
//! frame key  = HKDF-Expand(prk, "skyferry/1 frame key" | direction | stream, 32)
//! key id     = HKDF-Expand(prk, "skyferry/1 key id"    | direction | stream, 4)
//! ```
//!
//! Both ends contribute a fresh random nonce, so a migration's keys are new even if the
//! other end replays an old handshake; each (stream, direction) has its own key, and frame
//! sequence numbers (the GCM nonces) never repeat within one, so no key/nonce pair repeats.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

/// Bytes in the pre-shared key.
pub const PSK_LEN: usize = 32;
/// Bytes in each end's handshake nonce.
pub const NONCE_LEN: usize = 32;

/// A problem with key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// the key text is not 64 hex digits
    #[error("pre-shared key must be {} hex digits (32 bytes), found {found} characters", 2 * PSK_LEN)]
    BadLength {
        /// Characters found (after trimming whitespace).
        found: usize,
    },
    /// a character that is not a hex digit
    #[error("pre-shared key has a non-hex character at position {0}")]
    NotHex(usize),
    /// the OS random source failed
    #[error("cannot read the system random source: {0}")]
    Random(String),
}

/// The secret both hosts share, from which every migration key is derived.
#[derive(Clone)]
pub struct PreSharedKey(Zeroizing<[u8; PSK_LEN]>);

impl std::fmt::Debug for PreSharedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PreSharedKey(..)")
    }
}

impl PreSharedKey {
    /// A key from raw bytes.
    pub fn from_bytes(bytes: [u8; PSK_LEN]) -> Self {
        PreSharedKey(Zeroizing::new(bytes))
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, KeyError> {
        let mut k = Zeroizing::new([0u8; PSK_LEN]);
        getrandom::fill(&mut k[..]).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(PreSharedKey(k))
    }

    /// Parses the key file format: 64 hex digits, surrounding whitespace ignored.
    pub fn from_hex(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        if text.len() != 2 * PSK_LEN {
            return Err(KeyError::BadLength {
                found: text.chars().count(),
            });
        }
        let mut k = Zeroizing::new([0u8; PSK_LEN]);
        let digits = text.as_bytes();
        for (i, byte) in k.iter_mut().enumerate() {
            let hi = hex_digit(digits[2 * i]).ok_or(KeyError::NotHex(2 * i))?;
            let lo = hex_digit(digits[2 * i + 1]).ok_or(KeyError::NotHex(2 * i + 1))?;
            *byte = hi << 4 | lo;
        }
        Ok(PreSharedKey(k))
    }

    /// The key file format: 64 lower-case hex digits and a newline.
    pub fn to_hex(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(String::with_capacity(2 * PSK_LEN + 1));
        for b in self.0.iter() {
            s.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            s.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        s.push('\n');
        s
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// One end's fresh contribution to a migration's keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeNonce(pub [u8; NONCE_LEN]);

impl HandshakeNonce {
    /// A fresh random nonce.
    pub fn random() -> Result<Self, KeyError> {
        let mut n = [0u8; NONCE_LEN];
        getrandom::fill(&mut n).map_err(|e| KeyError::Random(e.to_string()))?;
        Ok(HandshakeNonce(n))
    }
}

/// Which way frames flow on a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    /// Source to destination: guest memory.
    SourceToDest = 1,
    /// Destination to source: acknowledgements.
    DestToSource = 2,
}

/// The keys of one migration.
pub struct MigrationKeys {
    hkdf: Hkdf<Sha256>,
}

impl std::fmt::Debug for MigrationKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MigrationKeys(..)")
    }
}

/// Proof that a peer of the Synchronized Arrival coordinator holds the pre-shared key: HKDF
/// of the key over both sides' fresh nonces, with a label per role, so neither side's proof
/// can be replayed as the other's or in another session.
pub fn coordinator_proof(
    psk: &PreSharedKey,
    server: &HandshakeNonce,
    client: &HandshakeNonce,
    role: &[u8],
) -> [u8; 32] {
    let mut salt = Vec::with_capacity(22 + 2 * NONCE_LEN);
    salt.extend_from_slice(b"skyferry/coordinator/1");
    salt.extend_from_slice(&server.0);
    salt.extend_from_slice(&client.0);
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(&salt), &psk.0[..])
        .expand(role, &mut out)
        .expect("32 bytes of HKDF output is always valid");
    out
}

/// HMAC-SHA256 over a connection's opening (protocol 7), keyed by HKDF of the pre-shared key
/// under its own label (so it is never a frame or key-id key), fed `parts` in order: the
/// destination's greeting with its fresh challenge, then the opening message.
fn opening_hmac(psk: &PreSharedKey, parts: &[&[u8]]) -> hmac::Hmac<Sha256> {
    use hmac::{KeyInit, Mac};
    let mut key = Zeroizing::new([0u8; 32]);
    Hkdf::<Sha256>::new(Some(b"skyferry/7 opening"), &psk.0[..])
        .expand(b"opening mac key", &mut key[..])
        .expect("32 bytes of HKDF output is always valid");
    let mut mac =
        hmac::Hmac::<Sha256>::new_from_slice(&key[..]).expect("HMAC takes a key of any length");
    for p in parts {
        mac.update(p);
    }
    mac
}

/// The MAC that proves a connection's opening comes from a holder of the pre-shared key.
pub fn opening_mac(psk: &PreSharedKey, parts: &[&[u8]]) -> [u8; 32] {
    use hmac::Mac;
    opening_hmac(psk, parts).finalize().into_bytes().into()
}

/// Whether `tag` is [`opening_mac`] of `parts` (compared in constant time).
pub fn opening_mac_matches(psk: &PreSharedKey, parts: &[&[u8]], tag: &[u8]) -> bool {
    use hmac::Mac;
    opening_hmac(psk, parts).verify_slice(tag).is_ok()
}

impl MigrationKeys {
    /// Derives a migration's key material from the pre-shared key, the Hello's `transcript`
    /// (a hash of it as sent, which names the migration) and both ends' nonces.
    pub fn derive(
        psk: &PreSharedKey,
        transcript: &[u8; 32],
        source: &HandshakeNonce,
        dest: &HandshakeNonce,
    ) -> Self {
        let mut salt = Vec::with_capacity(10 + 32 + 2 * NONCE_LEN);
        salt.extend_from_slice(b"skyferry/2");
        salt.extend_from_slice(transcript);
        salt.extend_from_slice(&source.0);
        salt.extend_from_slice(&dest.0);
        MigrationKeys {
            hkdf: Hkdf::<Sha256>::new(Some(&salt), &psk.0[..]),
        }
    }

    fn expand(&self, label: &[u8], direction: Direction, stream: u32, out: &mut [u8]) {
        let (dir, stream) = ([direction as u8], stream.to_le_bytes());
        self.hkdf
            .expand_multi_info(&[label, &dir, &stream], out)
            .expect("HKDF output of 32 bytes or fewer is always valid");
    }

    /// The key for one stream in one direction.
    pub fn stream_key(&self, stream: u32, direction: Direction) -> StreamKey {
        let mut key = Zeroizing::new([0u8; 32]);
        self.expand(b"skyferry/1 frame key", direction, stream, &mut key[..]);
        let mut id = [0u8; 4];
        self.expand(b"skyferry/1 key id", direction, stream, &mut id);
        StreamKey {
            key,
            key_id: u32::from_le_bytes(id),
            stream,
            direction,
        }
    }
}

/// The AES-256-GCM key of one stream in one direction.
pub struct StreamKey {
    pub(crate) key: Zeroizing<[u8; 32]>,
    /// Public identifier of the key, carried in frame headers.
    pub key_id: u32,
    /// The stream it belongs to.
    pub stream: u32,
    /// The direction it seals.
    pub direction: Direction,
}

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamKey")
            .field("key_id", &format_args!("{:08x}", self.key_id))
            .field("stream", &self.stream)
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(psk: u8, id: u8, a: u8, b: u8) -> MigrationKeys {
        MigrationKeys::derive(
            &PreSharedKey::from_bytes([psk; 32]),
            &[id; 32],
            &HandshakeNonce([a; 32]),
            &HandshakeNonce([b; 32]),
        )
    }

    #[test]
    fn every_input_changes_the_key() {
        let base = keys(1, 7, 2, 3).stream_key(0, Direction::SourceToDest);
        let variants = [
            keys(9, 7, 2, 3).stream_key(0, Direction::SourceToDest),
            keys(1, 8, 2, 3).stream_key(0, Direction::SourceToDest),
            keys(1, 7, 9, 3).stream_key(0, Direction::SourceToDest),
            keys(1, 7, 2, 9).stream_key(0, Direction::SourceToDest),
            keys(1, 7, 2, 3).stream_key(1, Direction::SourceToDest),
            keys(1, 7, 2, 3).stream_key(0, Direction::DestToSource),
        ];
        for v in &variants {
            assert_ne!(v.key[..], base.key[..]);
            assert_ne!(v.key_id, base.key_id);
        }
        let again = keys(1, 7, 2, 3).stream_key(0, Direction::SourceToDest);
        assert_eq!(again.key[..], base.key[..]);
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let k = PreSharedKey::generate().unwrap();
        let text = k.to_hex();
        assert_eq!(text.len(), 65);
        let back = PreSharedKey::from_hex(&text).unwrap();
        assert_eq!(back.0[..], k.0[..]);
        assert_eq!(
            PreSharedKey::from_hex("abcd").unwrap_err(),
            KeyError::BadLength { found: 4 }
        );
        let mut bad = "0".repeat(64);
        bad.replace_range(5..6, "g");
        assert_eq!(
            PreSharedKey::from_hex(&bad).unwrap_err(),
            KeyError::NotHex(5)
        );
        assert!(!format!("{k:?}").contains(&text[..8]));
    }
}

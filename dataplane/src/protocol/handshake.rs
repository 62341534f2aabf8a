//! The opening exchange (protocol 7): the destination's greeting, the source's Hello or
//! StreamHello with its key proof, and the Welcome. `docs/handshake.md` gives every field.
//!
//! ```text
//! destination, on every accepted connection, before reading anything:
//!   Greeting  = legacy refusal (old sources read it as a Welcome refusing them)
//!             | "SKYFGRET" | min version u16 | max version u16 | challenge [32]
//! source (its first bytes, control or data):
//!   Opening   = "SKYFHELO" or "SKYFSTRM" | version u16 | body length u32
//!             | body (Hello, postcard; or migration id u64 | stream u32)
//!             | HMAC-SHA256(key from the PSK, Greeting | everything before the MAC) [32]
//! destination, to a control opening whose MAC verified:
//!   Welcome   = "SKYFWELC" | length u32 | Accept{key check} / Refuse{why} / KeyMismatch
//! ```
//!
//! Why this shape: the destination checks the MAC over its own fresh challenge before it
//! parses the body, holds a slot, writes a status row or starts anything; a keyless peer
//! costs one small fixed record in the acceptor (`daemon::acceptor`) and nothing else, and
//! an opening recorded from a real source cannot be replayed (the challenge differs). The
//! version sits in fixed headers ahead of any variable body, so a peer of another version
//! is told plainly which versions each side speaks. The transcript (Greeting and Opening)
//! is mixed into the migration's keys, with the source's nonce and the challenge as the
//! destination's nonce, so a Hello altered on the way leaves the two ends with different
//! keys and the Welcome's key check fails.
//!
//! The functions take any reader or writer (callers pass a `TcpStream`), and parsing is
//! separate from I/O ([`opening`], [`verify_opening`], [`Greeting::parse`]), so the acceptor
//! can run it over peeked bytes and the fuzz target in `dataplane/fuzz` over a slice.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::{CONTROL_STREAM, MAX_HELLO, MIN_VERSION, ProtocolError, VERSION};
use crate::codec::CodecConfig;
use crate::crypto::{
    Direction, HandshakeNonce, MigrationKeys, PreSharedKey, opening_mac, opening_mac_matches,
};

/// What a source of protocol 6 or earlier reads as the Welcome refusing it. Frozen: every
/// later version sends the same bytes first, so the fields after it keep their offsets.
const LEGACY_REFUSAL: &str =
    "this destination speaks a newer skyferry protocol (7 or later) than this source: upgrade it";
/// A protocol 6 (and earlier) control connection's magic.
const LEGACY_CONTROL_MAGIC: [u8; 8] = *b"SKYFCTL1";
/// A protocol 6 (and earlier) data stream's magic.
const LEGACY_DATA_MAGIC: [u8; 8] = *b"SKYFDAT1";
const GREETING_MAGIC: [u8; 8] = *b"SKYFGRET";
const HELLO_MAGIC: [u8; 8] = *b"SKYFHELO";
const STREAM_MAGIC: [u8; 8] = *b"SKYFSTRM";
const WELCOME_MAGIC: [u8; 8] = *b"SKYFWELC";

/// Bytes of the legacy refusal: magic, length, variant 1 (`Refuse`), string length, text.
const LEGACY_LEN: usize = 8 + 4 + 1 + 1 + LEGACY_REFUSAL.len();
/// Bytes in the destination's greeting.
pub const GREETING_LEN: usize = LEGACY_LEN + 8 + 2 + 2 + 32;
/// Bytes in an opening's fixed header: magic, version, body length.
pub const HEADER_LEN: usize = 8 + 2 + 4;
/// Bytes in the MAC that ends an opening.
pub const MAC_LEN: usize = 32;
/// Bytes in a StreamHello's body: migration id, stream.
const STREAM_BODY: usize = 12;
/// Largest opening (a Hello of [`MAX_HELLO`] bytes).
pub const MAX_OPENING: usize = HEADER_LEN + MAX_HELLO + MAC_LEN;
/// Largest Welcome body (a refusal's reason).
const MAX_WELCOME: usize = 4096;

/// What a connection to the migration port carries, told by its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A migration's control connection: a Hello.
    Control,
    /// A data stream: a StreamHello.
    Data,
}

/// How far the first bytes of a connection go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Not enough yet: at least this many bytes are needed.
    Incomplete(usize),
    /// The whole opening is there: its kind and its length in bytes (the bytes after it
    /// are not part of it).
    Complete(ConnectionKind, usize),
    /// Not something this side reads (the reason is written for the operator).
    Refused(String),
}

/// The destination's first bytes on a connection: its versions and a fresh challenge.
#[derive(Clone, PartialEq, Eq)]
pub struct Greeting([u8; GREETING_LEN]);

impl std::fmt::Debug for Greeting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Greeting({:02x?})", self.challenge())
    }
}

impl Greeting {
    /// A greeting with this challenge.
    pub fn with_challenge(challenge: [u8; 32]) -> Self {
        let mut b = [0u8; GREETING_LEN];
        b[..8].copy_from_slice(&LEGACY_CONTROL_MAGIC);
        let body = u32::try_from(2 + LEGACY_REFUSAL.len()).expect("a short text");
        b[8..12].copy_from_slice(&body.to_le_bytes());
        b[12] = 1;
        b[13] = u8::try_from(LEGACY_REFUSAL.len()).expect("shorter than 128 bytes");
        b[14..LEGACY_LEN].copy_from_slice(LEGACY_REFUSAL.as_bytes());
        let mut at = LEGACY_LEN;
        b[at..at + 8].copy_from_slice(&GREETING_MAGIC);
        at += 8;
        b[at..at + 2].copy_from_slice(&MIN_VERSION.to_le_bytes());
        b[at + 2..at + 4].copy_from_slice(&VERSION.to_le_bytes());
        b[at + 4..].copy_from_slice(&challenge);
        Greeting(b)
    }

    /// A greeting with a fresh random challenge.
    pub fn random() -> Result<Self, ProtocolError> {
        let n = HandshakeNonce::random().map_err(|e| ProtocolError::Io {
            context: "making a challenge",
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(Self::with_challenge(n.0))
    }

    /// The bytes on the wire.
    pub fn as_bytes(&self) -> &[u8; GREETING_LEN] {
        &self.0
    }

    /// The fresh challenge (also the destination's nonce in the keys).
    pub fn challenge(&self) -> [u8; 32] {
        self.0[GREETING_LEN - 32..].try_into().expect("32 bytes")
    }

    /// The versions the destination speaks.
    fn versions(&self) -> (u16, u16) {
        let at = LEGACY_LEN + 8;
        let v = |i: usize| u16::from_le_bytes([self.0[i], self.0[i + 1]]);
        (v(at), v(at + 2))
    }

    /// Source: reads a destination's greeting, refusing one that shares no version with us.
    pub fn parse(bytes: &[u8; GREETING_LEN]) -> Result<Self, ProtocolError> {
        let g = Greeting(*bytes);
        let expected = Greeting::with_challenge(g.challenge());
        if g.0[..LEGACY_LEN] != expected.0[..LEGACY_LEN]
            || g.0[LEGACY_LEN..LEGACY_LEN + 8] != GREETING_MAGIC
        {
            return Err(ProtocolError::NotSkyferry(format!(
                "its greeting begins {:02x?}",
                &g.0[..16]
            )));
        }
        let (min, max) = g.versions();
        if max < MIN_VERSION || min > VERSION || min > max {
            return Err(ProtocolError::NotSkyferry(format!(
                "the destination speaks protocol {min}..={max}, this host speaks \
                 {MIN_VERSION}..={VERSION}: upgrade the older one"
            )));
        }
        Ok(g)
    }
}

/// Where the connection that begins with `bytes` (peeked, not consumed) stands: told by the
/// fixed header alone, before any body is parsed or authenticated.
pub fn opening(bytes: &[u8]) -> Opening {
    if bytes.len() < 8 {
        return Opening::Incomplete(8);
    }
    let magic = &bytes[..8];
    if magic == LEGACY_CONTROL_MAGIC || magic == LEGACY_DATA_MAGIC {
        return Opening::Refused(format!(
            "a source of skyferry protocol 6 or earlier (it opened with {:?}); this host speaks \
             {MIN_VERSION}..={VERSION}: upgrade the source",
            String::from_utf8_lossy(magic)
        ));
    }
    let kind = if magic == HELLO_MAGIC {
        ConnectionKind::Control
    } else if magic == STREAM_MAGIC {
        ConnectionKind::Data
    } else {
        return Opening::Refused(format!(
            "not a skyferry connection (first bytes {magic:02x?}); the migration port takes \
             only migrations, the CLI talks to the control socket"
        ));
    };
    if bytes.len() < HEADER_LEN {
        return Opening::Incomplete(HEADER_LEN);
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Opening::Refused(format!(
            "the peer speaks skyferry protocol {version}, this host speaks \
             {MIN_VERSION}..={VERSION}"
        ));
    }
    let len = usize::try_from(u32::from_le_bytes(
        bytes[10..14].try_into().expect("4 bytes"),
    ))
    .unwrap_or(usize::MAX);
    match kind {
        ConnectionKind::Control if len > MAX_HELLO => {
            return Opening::Refused(format!("a Hello of {len} bytes (at most {MAX_HELLO})"));
        }
        ConnectionKind::Data if len != STREAM_BODY => {
            return Opening::Refused(format!(
                "a StreamHello of {len} bytes (it has {STREAM_BODY})"
            ));
        }
        _ => {}
    }
    let total = HEADER_LEN + len + MAC_LEN;
    if bytes.len() < total {
        Opening::Incomplete(total)
    } else {
        Opening::Complete(kind, total)
    }
}

/// Source -> destination: what is about to be migrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Identifies the migration (random).
    pub migration_id: u64,
    /// The source's fresh nonce.
    pub source_nonce: [u8; 32],
    /// Pages of guest memory.
    pub guest_pages: u64,
    /// Data streams that will connect.
    pub streams: u32,
    /// The codec both ends must run.
    pub codec: CodecConfig,
    /// Size of data frames.
    pub frame_size: u32,
    /// Guest backend at the source (the destination must offer the same kind).
    pub backend: String,
    /// Operator's label for the guest (status displays).
    pub guest: String,
    /// Where the guest lands, if the operator chose (see `SourceGuest::destination`).
    pub destination: Option<String>,
    /// 0 for a new migration; n > 0 for the source's n-th reconnection of a migration whose
    /// link broke in pre-copy (the destination holds what it received and goes on).
    pub resume: u32,
}

/// Opens a data connection: which migration and stream it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHello {
    /// The migration.
    pub migration_id: u64,
    /// Data stream number, 1..=N.
    pub stream: u32,
}

/// A Hello whose MAC verified, with what binds it into the migration's keys.
#[derive(Debug, Clone)]
pub struct AuthHello {
    /// The Hello.
    pub hello: Hello,
    /// SHA-256 of the greeting and the opening, as exchanged.
    transcript: [u8; 32],
    /// The greeting's challenge: the destination's nonce.
    challenge: [u8; 32],
}

impl AuthHello {
    /// The migration's keys, at the destination.
    pub fn keys(&self, psk: &PreSharedKey) -> MigrationKeys {
        MigrationKeys::derive(
            psk,
            &self.transcript,
            &HandshakeNonce(self.hello.source_nonce),
            &HandshakeNonce(self.challenge),
        )
    }
}

/// An opening whose MAC verified.
#[derive(Debug, Clone)]
pub enum Proven {
    /// A control connection's Hello.
    Control(Box<AuthHello>),
    /// A data stream's StreamHello.
    Data(StreamHello),
}

/// Destination -> source, answering a Hello whose MAC verified (or one whose MAC did not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Welcome {
    /// Go ahead.
    Accept {
        /// Key id of the destination's control key towards the source.
        key_check: u32,
    },
    /// Not possible.
    Refuse {
        /// Why.
        reason: String,
    },
    /// The Hello's MAC did not verify: the two hosts' pre-shared keys differ (or the Hello
    /// was altered on the way). Nothing else was done.
    KeyMismatch,
}

fn transcript(greeting: &Greeting, opening: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(greeting.as_bytes());
    h.update(opening);
    h.finalize().into()
}

/// Checks the MAC of the complete opening `bytes` (exactly its length, as [`opening`] told)
/// against `greeting`, and only then parses its body.
pub fn verify_opening(
    psk: &PreSharedKey,
    greeting: &Greeting,
    bytes: &[u8],
) -> Result<Proven, ProtocolError> {
    let kind = match opening(bytes) {
        Opening::Complete(kind, len) if len == bytes.len() => kind,
        Opening::Complete(_, len) => {
            return Err(ProtocolError::Malformed {
                what: "opening",
                detail: format!("{} bytes given, the opening has {len}", bytes.len()),
            });
        }
        Opening::Incomplete(n) => {
            return Err(ProtocolError::Malformed {
                what: "opening",
                detail: format!("{} bytes given, at least {n} needed", bytes.len()),
            });
        }
        Opening::Refused(why) => return Err(ProtocolError::NotSkyferry(why)),
    };
    let (signed, tag) = bytes.split_at(bytes.len() - MAC_LEN);
    if !opening_mac_matches(psk, &[greeting.as_bytes(), signed], tag) {
        return Err(ProtocolError::WrongKey);
    }
    let body = &signed[HEADER_LEN..];
    match kind {
        ConnectionKind::Data => Ok(Proven::Data(StreamHello {
            migration_id: u64::from_le_bytes(body[..8].try_into().expect("8 bytes")),
            stream: u32::from_le_bytes(body[8..12].try_into().expect("4 bytes")),
        })),
        ConnectionKind::Control => {
            let hello = postcard::from_bytes(body).map_err(|e| ProtocolError::Malformed {
                what: "hello",
                detail: e.to_string(),
            })?;
            Ok(Proven::Control(Box::new(AuthHello {
                hello,
                transcript: transcript(greeting, bytes),
                challenge: greeting.challenge(),
            })))
        }
    }
}

fn signed_opening(
    psk: &PreSharedKey,
    greeting: &Greeting,
    magic: &[u8; 8],
    body: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + MAC_LEN);
    out.extend_from_slice(magic);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(
        &u32::try_from(body.len())
            .expect("bodies are bounded")
            .to_le_bytes(),
    );
    out.extend_from_slice(body);
    let mac = opening_mac(psk, &[greeting.as_bytes(), &out]);
    out.extend_from_slice(&mac);
    out
}

/// Source: the opening of a control connection, answering `greeting`.
pub fn hello_opening(
    psk: &PreSharedKey,
    greeting: &Greeting,
    hello: &Hello,
) -> Result<Vec<u8>, ProtocolError> {
    let body = postcard::to_allocvec(hello).map_err(|e| ProtocolError::Malformed {
        what: "outgoing hello",
        detail: e.to_string(),
    })?;
    if body.len() > MAX_HELLO {
        return Err(ProtocolError::TooLarge(body.len()));
    }
    Ok(signed_opening(psk, greeting, &HELLO_MAGIC, &body))
}

/// Source: the opening of a data stream, answering `greeting`.
pub fn stream_opening(psk: &PreSharedKey, greeting: &Greeting, hello: StreamHello) -> Vec<u8> {
    let mut body = [0u8; STREAM_BODY];
    body[..8].copy_from_slice(&hello.migration_id.to_le_bytes());
    body[8..].copy_from_slice(&hello.stream.to_le_bytes());
    signed_opening(psk, greeting, &STREAM_MAGIC, &body)
}

/// Source: reads the destination's greeting.
pub fn read_greeting(s: &mut (impl Read + ?Sized)) -> Result<Greeting, ProtocolError> {
    let mut b = [0u8; GREETING_LEN];
    s.read_exact(&mut b).map_err(|e| {
        ProtocolError::io(
            "waiting for the destination's greeting (a destination of protocol 6 or earlier \
             sends none)",
            e,
        )
    })?;
    Greeting::parse(&b)
}

/// Source: reads the greeting, sends the Hello and waits for the Welcome; returns the
/// migration's keys.
pub fn send_hello(
    s: &mut (impl Read + Write + ?Sized),
    psk: &PreSharedKey,
    hello: &Hello,
) -> Result<MigrationKeys, ProtocolError> {
    let greeting = read_greeting(s)?;
    let wire = hello_opening(psk, &greeting, hello)?;
    s.write_all(&wire)
        .map_err(|e| ProtocolError::io("sending the hello", e))?;
    read_welcome(s, psk, hello, &greeting, &wire)
}

/// Source: reads the Welcome that answers `hello` (sent as `wire` after `greeting`);
/// returns the migration's keys.
pub fn read_welcome(
    s: &mut (impl Read + ?Sized),
    psk: &PreSharedKey,
    hello: &Hello,
    greeting: &Greeting,
    wire: &[u8],
) -> Result<MigrationKeys, ProtocolError> {
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| ProtocolError::io("reading the welcome", e))?;
    if head[..8] != WELCOME_MAGIC {
        return Err(ProtocolError::NotSkyferry(format!(
            "expected a welcome, got {:02x?}",
            &head[..8]
        )));
    }
    let len = usize::try_from(u32::from_le_bytes(head[8..].try_into().expect("4 bytes")))
        .unwrap_or(usize::MAX);
    if len > MAX_WELCOME {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| ProtocolError::io("reading the welcome", e))?;
    let welcome: Welcome = postcard::from_bytes(&body).map_err(|e| ProtocolError::Malformed {
        what: "welcome",
        detail: e.to_string(),
    })?;
    match welcome {
        Welcome::Refuse { reason } => Err(ProtocolError::Refused(super::text::from_peer(&reason))),
        Welcome::KeyMismatch => Err(ProtocolError::WrongKey),
        Welcome::Accept { key_check } => {
            let keys = MigrationKeys::derive(
                psk,
                &transcript(greeting, wire),
                &HandshakeNonce(hello.source_nonce),
                &HandshakeNonce(greeting.challenge()),
            );
            if keys
                .stream_key(CONTROL_STREAM, Direction::DestToSource)
                .key_id
                != key_check
            {
                return Err(ProtocolError::WrongKey);
            }
            Ok(keys)
        }
    }
}

/// Source: reads the greeting and announces a data stream.
pub fn open_stream(
    s: &mut (impl Read + Write + ?Sized),
    psk: &PreSharedKey,
    hello: StreamHello,
) -> Result<(), ProtocolError> {
    let greeting = read_greeting(s)?;
    s.write_all(&stream_opening(psk, &greeting, hello))
        .map_err(|e| ProtocolError::io("opening a data stream", e))
}

/// Destination, blocking (the demo's and benchmarks' listener; the daemon's acceptor does
/// the same over many connections at once): greets the peer, reads its opening and checks
/// its MAC. A control opening whose MAC fails is answered `KeyMismatch`.
pub fn accept_opening(
    s: &mut (impl Read + Write + ?Sized),
    psk: &PreSharedKey,
) -> Result<Proven, ProtocolError> {
    let greeting = Greeting::random()?;
    s.write_all(greeting.as_bytes())
        .map_err(|e| ProtocolError::io("sending the greeting", e))?;
    // Fixed size: nothing here is sized by the peer.
    let mut buf = [0u8; MAX_OPENING];
    let mut have = 0;
    let len = loop {
        match opening(&buf[..have]) {
            Opening::Complete(_, len) => break len,
            Opening::Refused(why) => return Err(ProtocolError::NotSkyferry(why)),
            Opening::Incomplete(need) => {
                s.read_exact(&mut buf[have..need])
                    .map_err(|e| ProtocolError::io("reading the opening", e))?;
                have = need;
            }
        }
    };
    let proven = verify_opening(psk, &greeting, &buf[..len]);
    if matches!(proven, Err(ProtocolError::WrongKey)) && buf[..8] == HELLO_MAGIC {
        let _ = send_key_mismatch(s);
    }
    proven
}

fn write_welcome(s: &mut (impl Write + ?Sized), w: &Welcome) -> Result<(), ProtocolError> {
    let body = postcard::to_allocvec(w).map_err(|e| ProtocolError::Malformed {
        what: "outgoing welcome",
        detail: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(&WELCOME_MAGIC);
    out.extend_from_slice(
        &u32::try_from(body.len())
            .map_err(|_| ProtocolError::TooLarge(body.len()))?
            .to_le_bytes(),
    );
    out.extend_from_slice(&body);
    s.write_all(&out)
        .map_err(|e| ProtocolError::io("sending the welcome", e))
}

/// Destination: tells a peer whose Hello's MAC failed that the keys differ.
pub fn send_key_mismatch(s: &mut (impl Write + ?Sized)) -> Result<(), ProtocolError> {
    write_welcome(s, &Welcome::KeyMismatch)
}

/// Destination: answers an authenticated Hello. With `Ok(())` accepted, returns the
/// migration's keys.
pub fn send_welcome(
    s: &mut (impl Write + ?Sized),
    psk: &PreSharedKey,
    auth: &AuthHello,
    verdict: Result<(), String>,
) -> Result<Option<MigrationKeys>, ProtocolError> {
    if let Err(mut reason) = verdict {
        super::text::truncate(&mut reason, MAX_WELCOME - 8);
        write_welcome(s, &Welcome::Refuse { reason })?;
        return Ok(None);
    }
    let keys = auth.keys(psk);
    let key_check = keys
        .stream_key(CONTROL_STREAM, Direction::DestToSource)
        .key_id;
    write_welcome(s, &Welcome::Accept { key_check })?;
    Ok(Some(keys))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Compression;

    fn hello() -> Hello {
        Hello {
            migration_id: 9,
            source_nonce: [4; 32],
            guest_pages: 1 << 18,
            streams: 2,
            codec: CodecConfig::default(),
            frame_size: 65536,
            backend: "synthetic".into(),
            guest: "g".into(),
            destination: None,
            resume: 0,
        }
    }

    fn psk() -> PreSharedKey {
        PreSharedKey::from_bytes([5; 32])
    }

    #[test]
    fn openings_are_told_apart_by_their_header_only_once_whole() {
        let g = Greeting::with_challenge([1; 32]);
        let data = stream_opening(
            &psk(),
            &g,
            StreamHello {
                migration_id: 3,
                stream: 1,
            },
        );
        assert_eq!(data.len(), HEADER_LEN + STREAM_BODY + MAC_LEN);
        assert_eq!(opening(b""), Opening::Incomplete(8));
        assert_eq!(opening(&data[..7]), Opening::Incomplete(8));
        assert_eq!(opening(&data[..9]), Opening::Incomplete(HEADER_LEN));
        assert_eq!(
            opening(&data[..HEADER_LEN]),
            Opening::Incomplete(data.len())
        );
        assert_eq!(
            opening(&[data.as_slice(), b"more"].concat()),
            Opening::Complete(ConnectionKind::Data, data.len())
        );
        let control = hello_opening(&psk(), &g, &hello()).unwrap();
        assert_eq!(
            opening(&control),
            Opening::Complete(ConnectionKind::Control, control.len())
        );
        let mut huge = control[..HEADER_LEN].to_vec();
        huge[10..14].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(opening(&huge), Opening::Refused(w) if w.contains("4294967295 bytes")));
        assert!(matches!(
            opening(b"GET / HTTP/1.1"),
            Opening::Refused(w) if w.contains("not a skyferry connection")
        ));
    }

    #[test]
    fn another_version_is_told_from_the_header() {
        let g = Greeting::with_challenge([1; 32]);
        let mut h = hello_opening(&psk(), &g, &hello()).unwrap();
        h[8..10].copy_from_slice(&(VERSION + 1).to_le_bytes());
        let Opening::Refused(why) = opening(&h) else {
            panic!("{:?}", opening(&h))
        };
        assert!(
            why.contains(&format!("speaks skyferry protocol {}", VERSION + 1)),
            "{why}"
        );
        // A source of protocol 6 opens with its old magic, and is told so.
        let Opening::Refused(why) = opening(b"SKYFCTL1\x10\0\0\0\x06") else {
            panic!()
        };
        assert!(why.contains("protocol 6 or earlier"), "{why}");
        // A greeting naming only later versions is refused by the source, with both ranges.
        let mut b = *Greeting::with_challenge([2; 32]).as_bytes();
        b[LEGACY_LEN + 8..LEGACY_LEN + 12].copy_from_slice(&[9, 0, 12, 0]);
        let e = Greeting::parse(&b).unwrap_err().to_string();
        assert!(e.contains("protocol 9..=12"), "{e}");
        assert!(Greeting::parse(Greeting::with_challenge([2; 32]).as_bytes()).is_ok());
    }

    #[test]
    fn an_old_source_reads_the_greeting_as_a_refusal() {
        // Protocol 6's Welcome, as a source of that version reads it.
        #[derive(Deserialize)]
        enum OldWelcome {
            Accept {
                _dest_nonce: [u8; 32],
                _key_check: u32,
            },
            Refuse {
                reason: String,
            },
        }
        let g = Greeting::with_challenge([3; 32]);
        let b = g.as_bytes();
        // The layout docs/handshake.md gives.
        assert_eq!((LEGACY_LEN, GREETING_LEN), (105, 149));
        assert_eq!(&b[105..113], b"SKYFGRET");
        assert_eq!(&b[..8], b"SKYFCTL1");
        let len = usize::try_from(u32::from_le_bytes(b[8..12].try_into().unwrap())).unwrap();
        match postcard::from_bytes::<OldWelcome>(&b[12..12 + len]).unwrap() {
            OldWelcome::Refuse { reason } => assert!(reason.contains("newer skyferry protocol")),
            OldWelcome::Accept { .. } => panic!("accepted"),
        }
    }

    #[test]
    fn the_mac_binds_key_challenge_and_every_byte() {
        let g = Greeting::with_challenge([7; 32]);
        let wire = hello_opening(&psk(), &g, &hello()).unwrap();
        match verify_opening(&psk(), &g, &wire) {
            Ok(Proven::Control(a)) => assert_eq!(a.hello, hello()),
            other => panic!("{other:?}"),
        }
        // Another key.
        let other = PreSharedKey::from_bytes([6; 32]);
        assert!(matches!(
            verify_opening(&other, &g, &wire),
            Err(ProtocolError::WrongKey)
        ));
        // Replayed on another connection (another challenge).
        let g2 = Greeting::with_challenge([8; 32]);
        assert!(matches!(
            verify_opening(&psk(), &g2, &wire),
            Err(ProtocolError::WrongKey)
        ));
        // Any byte after the header altered (the header's own bytes change its length or
        // version, which `opening` reads first).
        for i in HEADER_LEN..wire.len() {
            let mut w = wire.clone();
            w[i] ^= 0x40;
            assert!(
                matches!(verify_opening(&psk(), &g, &w), Err(ProtocolError::WrongKey)),
                "byte {i}"
            );
        }
        // Data streams prove the key the same way.
        let sh = StreamHello {
            migration_id: 5,
            stream: 2,
        };
        let d = stream_opening(&psk(), &g, sh);
        assert!(matches!(verify_opening(&psk(), &g, &d), Ok(Proven::Data(s)) if s == sh));
        assert!(matches!(
            verify_opening(&psk(), &g2, &d),
            Err(ProtocolError::WrongKey)
        ));
    }

    #[test]
    fn both_ends_derive_the_same_keys_and_a_mismatch_is_named() {
        for compression in [Compression::Off, Compression::Zstd3, Compression::Auto] {
            let mut h = hello();
            h.codec.compression = compression;
            let g = Greeting::with_challenge([9; 32]);
            let wire = hello_opening(&psk(), &g, &h).unwrap();
            let Ok(Proven::Control(auth)) = verify_opening(&psk(), &g, &wire) else {
                panic!()
            };
            assert_eq!(auth.hello, h);
            let mut answer = Vec::new();
            send_welcome(&mut answer, &psk(), &auth, Ok(())).unwrap();
            assert!(read_welcome(&mut answer.as_slice(), &psk(), &h, &g, &wire).is_ok());
        }
        let mut answer = Vec::new();
        send_key_mismatch(&mut answer).unwrap();
        let g = Greeting::with_challenge([9; 32]);
        let r = read_welcome(&mut answer.as_slice(), &psk(), &hello(), &g, &[]);
        assert!(matches!(r, Err(ProtocolError::WrongKey)), "{r:?}");
    }

    /// The blocking destination and source, over a socket pair.
    #[test]
    fn a_source_and_a_destination_complete_the_exchange() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dest = std::thread::spawn(move || {
            let mut results = Vec::new();
            for _ in 0..2 {
                let (mut c, _) = l.accept().unwrap();
                let r = accept_opening(&mut c, &psk());
                if let Ok(Proven::Control(a)) = &r {
                    send_welcome(&mut c, &psk(), a, Ok(())).unwrap();
                }
                results.push(r.map(|p| matches!(p, Proven::Control(_))));
            }
            results
        });
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        assert!(send_hello(&mut c, &psk(), &hello()).is_ok());
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        let wrong = PreSharedKey::from_bytes([1; 32]);
        let r = send_hello(&mut c, &wrong, &hello());
        assert!(matches!(r, Err(ProtocolError::WrongKey)), "{r:?}");
        let results = dest.join().unwrap();
        assert!(matches!(results[0], Ok(true)), "{:?}", results[0]);
        assert!(
            matches!(results[1], Err(ProtocolError::WrongKey)),
            "{:?}",
            results[1]
        );
    }
}

//! The cleartext part: Hello, Welcome and the data streams' StreamHello.
//!
//! Nothing here is secret (nonces are public inputs to HKDF). The Welcome carries a key
//! check, the key id of the destination's control key, so a source whose pre-shared key
//! differs learns it at once with a clear error, and the destination learns the same when
//! the first sealed frame fails to open.
//!
//! The functions take any reader or writer (callers pass a `TcpStream`), so the fuzz target
//! in `dataplane/fuzz` can feed them bytes from a slice.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

use super::{CONTROL_STREAM, MAX_HANDSHAKE, ProtocolError, VERSION};
use crate::codec::CodecConfig;
use crate::crypto::{Direction, HandshakeNonce, MigrationKeys};

const CONTROL_MAGIC: [u8; 8] = *b"SKYFCTL1";
const DATA_MAGIC: [u8; 8] = *b"SKYFDAT1";

/// What a connection to the migration port carries, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionKind {
    /// A migration's control connection: a Hello follows.
    Control,
    /// A data stream: a StreamHello.
    Data,
}

/// How far the first bytes of a connection go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opening {
    /// Not enough yet: at least this many bytes are needed.
    Incomplete(usize),
    /// The whole opening message is there (a Hello, or a StreamHello), so reading it
    /// cannot block.
    Complete(ConnectionKind),
    /// Not something skyferry reads.
    Refused(String),
}

/// Where the connection that begins with `bytes` (peeked, not consumed) stands.
pub fn opening(bytes: &[u8]) -> Opening {
    if bytes.len() < 8 {
        return Opening::Incomplete(8);
    }
    if bytes[..8] == DATA_MAGIC {
        return if bytes.len() >= 20 {
            Opening::Complete(ConnectionKind::Data)
        } else {
            Opening::Incomplete(20)
        };
    }
    if bytes[..8] != CONTROL_MAGIC {
        return Opening::Refused(format!(
            "not a skyferry connection (first bytes {:02x?}); the migration port takes only \
             migrations, the CLI talks to the control socket",
            &bytes[..8]
        ));
    }
    if bytes.len() < 12 {
        return Opening::Incomplete(12);
    }
    let len = usize::try_from(u32::from_le_bytes(
        bytes[8..12].try_into().expect("4 bytes"),
    ))
    .unwrap_or(usize::MAX);
    if len > MAX_HANDSHAKE {
        return Opening::Refused(format!("a Hello of {len} bytes (at most {MAX_HANDSHAKE})"));
    }
    if bytes.len() < 12 + len {
        Opening::Incomplete(12 + len)
    } else {
        Opening::Complete(ConnectionKind::Control)
    }
}

/// Source -> destination: what is about to be migrated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version.
    pub version: u16,
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

impl Hello {
    /// SHA-256 of the Hello as sent: both ends mix it into the migration's keys, so a Hello
    /// altered on the way (its size, codec or resume fields) leaves the two ends with
    /// different keys, and the first sealed message fails to open.
    pub fn transcript(&self) -> [u8; 32] {
        use sha2::Digest;
        let bytes = postcard::to_allocvec(self).expect("a Hello always serializes");
        sha2::Sha256::digest(bytes).into()
    }
}

/// Destination -> source: accepted (with its nonce) or refused (with why).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Welcome {
    /// Go ahead.
    Accept {
        /// The destination's fresh nonce.
        dest_nonce: [u8; 32],
        /// Key id of the destination's control key towards the source.
        key_check: u32,
    },
    /// Not possible.
    Refuse {
        /// Why.
        reason: String,
    },
}

fn write_message<T: Serialize>(
    s: &mut (impl Write + ?Sized),
    magic: &[u8; 8],
    msg: &T,
) -> Result<(), ProtocolError> {
    let body = postcard::to_allocvec(msg).map_err(|e| ProtocolError::Malformed {
        what: "outgoing handshake",
        detail: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(12 + body.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(
        &u32::try_from(body.len())
            .map_err(|_| ProtocolError::TooLarge(body.len()))?
            .to_le_bytes(),
    );
    out.extend_from_slice(&body);
    s.write_all(&out)
        .map_err(|e| ProtocolError::io("sending handshake", e))
}

fn read_message<T: for<'de> Deserialize<'de>>(
    s: &mut (impl Read + ?Sized),
    magic: &[u8; 8],
    what: &'static str,
) -> Result<T, ProtocolError> {
    let mut head = [0u8; 12];
    s.read_exact(&mut head)
        .map_err(|e| ProtocolError::io("reading handshake", e))?;
    if head[..8] != magic[..] {
        return Err(ProtocolError::NotSkyferry(format!(
            "expected {:?}, got {:02x?}",
            String::from_utf8_lossy(magic),
            &head[..8]
        )));
    }
    let len = usize::try_from(u32::from_le_bytes(head[8..].try_into().expect("4 bytes")))
        .unwrap_or(usize::MAX);
    if len > MAX_HANDSHAKE {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
        .map_err(|e| ProtocolError::io("reading handshake", e))?;
    postcard::from_bytes(&body).map_err(|e| ProtocolError::Malformed {
        what,
        detail: e.to_string(),
    })
}

/// Source: sends Hello and waits for the Welcome; returns the migration's keys.
pub fn send_hello(
    s: &mut (impl Read + Write + ?Sized),
    psk: &crate::crypto::PreSharedKey,
    hello: &Hello,
) -> Result<MigrationKeys, ProtocolError> {
    write_message(s, &CONTROL_MAGIC, hello)?;
    read_welcome(s, psk, hello)
}

/// Source: reads the Welcome that answers `hello`; returns the migration's keys.
pub fn read_welcome(
    s: &mut (impl Read + ?Sized),
    psk: &crate::crypto::PreSharedKey,
    hello: &Hello,
) -> Result<MigrationKeys, ProtocolError> {
    match read_message::<Welcome>(s, &CONTROL_MAGIC, "welcome")? {
        Welcome::Refuse { reason } => Err(ProtocolError::Refused(reason)),
        Welcome::Accept {
            dest_nonce,
            key_check,
        } => {
            let keys = MigrationKeys::derive(
                psk,
                &hello.transcript(),
                &HandshakeNonce(hello.source_nonce),
                &HandshakeNonce(dest_nonce),
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

/// Destination: reads a Hello (any version is read; the caller refuses unsupported ones).
pub fn read_hello(s: &mut (impl Read + ?Sized)) -> Result<Hello, ProtocolError> {
    read_message(s, &CONTROL_MAGIC, "hello")
}

/// Destination: answers a Hello. With `Ok(())` accepted, returns the migration's keys.
pub fn send_welcome(
    s: &mut (impl Write + ?Sized),
    psk: &crate::crypto::PreSharedKey,
    hello: &Hello,
    verdict: Result<(), String>,
) -> Result<Option<MigrationKeys>, ProtocolError> {
    if let Err(reason) = verdict {
        write_message(s, &CONTROL_MAGIC, &Welcome::Refuse { reason })?;
        return Ok(None);
    }
    let dest_nonce = HandshakeNonce::random().map_err(|e| ProtocolError::Io {
        context: "making a nonce",
        source: std::io::Error::other(e.to_string()),
    })?;
    let keys = MigrationKeys::derive(
        psk,
        &hello.transcript(),
        &HandshakeNonce(hello.source_nonce),
        &dest_nonce,
    );
    let key_check = keys
        .stream_key(CONTROL_STREAM, Direction::DestToSource)
        .key_id;
    write_message(
        s,
        &CONTROL_MAGIC,
        &Welcome::Accept {
            dest_nonce: dest_nonce.0,
            key_check,
        },
    )?;
    Ok(Some(keys))
}

/// Opens a data connection: which migration and stream it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHello {
    /// The migration.
    pub migration_id: u64,
    /// Data stream number, 1..=N.
    pub stream: u32,
}

/// Source: announces a data connection.
pub fn open_stream(s: &mut (impl Write + ?Sized), hello: StreamHello) -> Result<(), ProtocolError> {
    let mut b = [0u8; 20];
    b[..8].copy_from_slice(&DATA_MAGIC);
    b[8..16].copy_from_slice(&hello.migration_id.to_le_bytes());
    b[16..].copy_from_slice(&hello.stream.to_le_bytes());
    s.write_all(&b)
        .map_err(|e| ProtocolError::io("opening a data stream", e))
}

/// Destination: reads a data connection's announcement.
pub fn accept_stream(s: &mut (impl Read + ?Sized)) -> Result<StreamHello, ProtocolError> {
    let mut b = [0u8; 20];
    s.read_exact(&mut b)
        .map_err(|e| ProtocolError::io("reading a data stream's hello", e))?;
    if b[..8] != DATA_MAGIC {
        return Err(ProtocolError::NotSkyferry(
            "data stream without SKYFDAT1".into(),
        ));
    }
    Ok(StreamHello {
        migration_id: u64::from_le_bytes(b[8..16].try_into().expect("8 bytes")),
        stream: u32::from_le_bytes(b[16..].try_into().expect("4 bytes")),
    })
}

/// The version check a destination applies to a Hello.
pub fn check_version(hello: &Hello) -> Result<(), String> {
    if hello.version == VERSION {
        Ok(())
    } else {
        Err(format!(
            "protocol version {} is not supported (this host speaks {VERSION})",
            hello.version
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Compression;

    #[test]
    fn openings_are_told_apart_only_once_whole() {
        assert_eq!(opening(b""), Opening::Incomplete(8));
        assert_eq!(opening(b"SKYFDAT"), Opening::Incomplete(8));
        assert_eq!(opening(b"SKYFDAT1\0\0"), Opening::Incomplete(20));
        assert_eq!(
            opening(&[b"SKYFDAT1".as_slice(), &[0; 12]].concat()),
            Opening::Complete(ConnectionKind::Data)
        );
        assert_eq!(opening(b"SKYFCTL1\x05"), Opening::Incomplete(12));
        let head = [b"SKYFCTL1".as_slice(), &5u32.to_le_bytes()].concat();
        assert_eq!(opening(&head), Opening::Incomplete(17));
        assert_eq!(
            opening(&[head.as_slice(), b"hello"].concat()),
            Opening::Complete(ConnectionKind::Control)
        );
        let huge = [b"SKYFCTL1".as_slice(), &u32::MAX.to_le_bytes()].concat();
        assert!(matches!(opening(&huge), Opening::Refused(w) if w.contains("4294967295 bytes")));
        assert!(matches!(
            opening(b"GET / HTTP/1.1"),
            Opening::Refused(w) if w.contains("not a skyferry connection")
        ));
    }

    #[test]
    fn the_hello_carries_the_compression_setting() {
        for compression in [Compression::Off, Compression::Zstd3, Compression::Auto] {
            let hello = Hello {
                version: VERSION,
                migration_id: 7,
                source_nonce: [3; 32],
                guest_pages: 1 << 18,
                streams: 2,
                codec: CodecConfig {
                    compression,
                    ..CodecConfig::default()
                },
                frame_size: 65536,
                backend: "synthetic".into(),
                guest: "g".into(),
                destination: None,
                resume: 0,
            };
            let bytes = postcard::to_allocvec(&hello).unwrap();
            let back: Hello = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, hello);
        }
    }

    #[test]
    fn a_hello_altered_on_the_way_fails_the_key_check() {
        let psk = crate::crypto::PreSharedKey::from_bytes([5; 32]);
        let sent = Hello {
            version: VERSION,
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
        };
        let welcome_for = |received: &Hello| {
            let mut wire = Vec::new();
            send_welcome(&mut wire, &psk, received, Ok(())).unwrap();
            wire
        };
        // Untouched: the source accepts the Welcome.
        assert!(read_welcome(&mut welcome_for(&sent).as_slice(), &psk, &sent).is_ok());
        // Each field a man in the middle might change: the two ends' keys differ.
        let altered = [
            Hello {
                guest_pages: 1 << 19,
                ..sent.clone()
            },
            Hello {
                resume: 1,
                ..sent.clone()
            },
            Hello {
                codec: CodecConfig::baseline(),
                ..sent.clone()
            },
            Hello {
                destination: Some("7".into()),
                ..sent.clone()
            },
        ];
        for a in &altered {
            let r = read_welcome(&mut welcome_for(a).as_slice(), &psk, &sent);
            assert!(matches!(r, Err(ProtocolError::WrongKey)), "{a:?}: {r:?}");
        }
    }
}

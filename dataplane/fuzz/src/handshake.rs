//! The `handshake` target: the cleartext bytes a peer sends on a new connection.
//!
//! # Input format
//!
//! ```text
//! byte 0     mode: bit 0 = side (0 destination, 1 source)
//! bytes 1..  what the peer sends on the connection
//! ```
//!
//! **Destination** (bit 0 clear): what the migration port does with a new connection.
//! `opening` classifies every prefix of the bytes up to 32 and the whole input (the acceptor
//! peeks as they trickle in); then, whatever it said, `read_hello` and `accept_stream` each
//! read the bytes from the start. Their verdicts must agree with `opening`'s: a `Complete`
//! opening reads without running out of bytes, an oversized Hello is refused by both. A Hello
//! that reads goes through `check_version` and `check_hello` (the destination's checks, with
//! [`dest_options`]), and one both accept gets what `SinkPipeline::start` builds for each data
//! stream from it: an `Opener` and a `Decoder` for the Hello's codec and frame size. So what a
//! Hello makes the destination allocate is exercised too (libFuzzer reports a `malloc` beyond
//! `-malloc_limit_mb`, by default 2048, as a crash).
//!
//! **Source** (bit 0 set): the bytes are the destination's answer to [`hello`]: `read_welcome`
//! reads the Welcome and checks its key check.

use std::sync::OnceLock;

use dataplane::codec::{CodecConfig, Compression, Decoder};
use dataplane::crypto::{Direction, MigrationKeys, Opener, PreSharedKey};
use dataplane::migrate::dest::{DestOptions, check_hello};
use dataplane::protocol::handshake::check_version;
use dataplane::protocol::{
    ConnectionKind, Hello, Opening, ProtocolError, StreamHello, VERSION, accept_stream,
    open_stream, opening, read_hello, read_welcome, send_hello, send_welcome,
};

/// Mode bit 0: source side (reads a Welcome).
pub const MODE_SOURCE: u8 = 1 << 0;

/// What happened to one input (the target ignores it; tests check seeds with it).
#[derive(Debug)]
pub enum Outcome {
    /// Destination: a Hello was read and accepted (both checks passed, decoder built).
    HelloAccepted,
    /// Destination: a Hello was read and refused with this reason.
    HelloRefused(String),
    /// Destination: a StreamHello was read.
    Stream(StreamHello),
    /// Destination: neither a Hello nor a StreamHello.
    Unreadable {
        /// `read_hello`'s error.
        hello: String,
        /// `accept_stream`'s error.
        stream: String,
    },
    /// Source: the Welcome accepted and the key check matched.
    Welcomed,
    /// Source: `read_welcome` failed.
    NotWelcomed(String),
}

/// The pre-shared key both ends hold.
pub fn psk() -> PreSharedKey {
    PreSharedKey::from_bytes([0x5a; 32])
}

/// The Hello the source side has sent (the one the Welcome answers).
pub fn hello() -> &'static Hello {
    static HELLO: OnceLock<Hello> = OnceLock::new();
    HELLO.get_or_init(|| Hello {
        version: VERSION,
        migration_id: 0x5eed,
        source_nonce: [7; 32],
        guest_pages: 1 << 18,
        streams: 4,
        codec: CodecConfig::default(),
        frame_size: 1 << 16,
        backend: "synthetic".into(),
        guest: "fuzz".into(),
        destination: None,
        resume: 0,
    })
}

/// What the destination is willing to receive: the daemon's defaults (`[listen]`).
pub fn dest_options() -> &'static DestOptions {
    static OPTS: OnceLock<DestOptions> = OnceLock::new();
    OPTS.get_or_init(|| DestOptions {
        psk: psk(),
        socket: Default::default(),
        pin_threads: false,
        timeout: std::time::Duration::from_secs(30),
        max_guest_pages: 1 << 28,
        max_streams: 16,
        drbd: None,
        announce: None,
        resume_window: std::time::Duration::from_secs(120),
    })
}

/// The `handshake` target: must not panic on any input.
pub fn handshake(data: &[u8]) {
    let _ = run(data);
}

/// [`handshake`], telling what happened.
pub fn run(data: &[u8]) -> Outcome {
    let Some((&mode, bytes)) = data.split_first() else {
        return destination(&[]);
    };
    if mode & MODE_SOURCE == 0 {
        destination(bytes)
    } else {
        source(bytes)
    }
}

fn destination(bytes: &[u8]) -> Outcome {
    for end in 0..bytes.len().min(32) {
        let _ = opening(&bytes[..end]);
    }
    let kind = opening(bytes);

    let hello = read_hello(&mut &bytes[..]);
    let stream = accept_stream(&mut &bytes[..]);
    match (&kind, &hello, &stream) {
        (Opening::Complete(ConnectionKind::Control), Err(ProtocolError::Closed { .. }), _) => {
            panic!("opening says the Hello is complete, read_hello ran out of bytes")
        }
        (Opening::Complete(ConnectionKind::Data), _, Err(e)) => {
            panic!("opening says the StreamHello is complete, accept_stream: {e}")
        }
        (Opening::Refused(_) | Opening::Incomplete(_), Ok(_), _)
        | (Opening::Refused(_) | Opening::Incomplete(_), _, Ok(_)) => {
            panic!("opening said {kind:?} of a connection that reads")
        }
        (Opening::Complete(_) | Opening::Incomplete(_), Err(ProtocolError::TooLarge(n)), _) => {
            panic!("read_hello refused a Hello of {n} bytes that opening let through: {kind:?}")
        }
        _ => {}
    }

    match (hello, stream) {
        (Ok(hello), _) => {
            let opts = dest_options();
            match check_version(&hello).and_then(|()| check_hello(&hello, opts)) {
                Ok(()) => {
                    data_stream_stage(&hello);
                    Outcome::HelloAccepted
                }
                Err(why) => Outcome::HelloRefused(why),
            }
        }
        (Err(_), Ok(s)) => Outcome::Stream(s),
        (Err(h), Err(s)) => Outcome::Unreadable {
            hello: h.to_string(),
            stream: s.to_string(),
        },
    }
}

/// What `SinkPipeline::start` builds for each data stream of an accepted Hello.
fn data_stream_stage(hello: &Hello) {
    let keys = MigrationKeys::derive(
        &psk(),
        &hello.transcript(),
        &dataplane::crypto::HandshakeNonce(hello.source_nonce),
        &dataplane::crypto::HandshakeNonce([9; 32]),
    );
    let frame_size = usize::try_from(hello.frame_size).unwrap_or(usize::MAX);
    let mut opener = Opener::new(&keys.stream_key(1, Direction::SourceToDest), frame_size);
    opener.allow_compression(hello.codec.compression);
    let decoder = Decoder::with_frame_size(hello.codec.clone(), hello.guest_pages, frame_size)
        .unwrap_or_else(|e| panic!("check_hello accepted a codec the decoder refuses: {e}"));
    drop((opener, decoder));
}

fn source(bytes: &[u8]) -> Outcome {
    match read_welcome(&mut &bytes[..], &psk(), hello()) {
        Ok(_) => Outcome::Welcomed,
        Err(e) => Outcome::NotWelcomed(e.to_string()),
    }
}

/// A connection for the writing functions: reads from `input`, records what is written.
struct Duplex<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl std::io::Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl std::io::Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Seed inputs: (file name, bytes, whether the destination accepts / the source is welcomed).
///
/// Every seed is what the real writing functions put on the wire: Hellos written by
/// `send_hello` (several codecs, guests and destinations), StreamHellos by `open_stream`, and
/// Welcomes (accept and refuse) by `send_welcome` answering [`hello`].
pub fn seeds() -> Vec<(String, Vec<u8>, bool)> {
    let mut out = Vec::new();
    let mut hellos = vec![("default", hello().clone())];
    let mut h = hello().clone();
    h.codec = CodecConfig {
        compression: Compression::Auto,
        ..CodecConfig::baseline()
    };
    h.streams = 1;
    h.frame_size = 1 << 20;
    h.destination = Some("17".into());
    h.backend = "xen".into();
    hellos.push(("baseline-auto", h));
    let mut h = hello().clone();
    h.codec.compression = Compression::Zstd3;
    h.codec.cbr = false;
    h.codec.verify_caches = false;
    h.codec.cache_bytes = 16 << 10;
    h.guest = "a guest with a long name, ünïcödé and all".into();
    hellos.push(("delta-zstd", h));
    let mut h = hello().clone();
    h.version = VERSION - 1;
    hellos.push(("old-version", h));
    let mut h = hello().clone();
    h.streams = 64;
    hellos.push(("too-many-streams", h));

    for (name, h) in hellos {
        // The Welcome it reads back does not matter here: only what it wrote.
        let mut conn = Duplex {
            input: &[],
            output: Vec::new(),
        };
        let _ = send_hello(&mut conn, &psk(), &h);
        let accepted = check_version(&h)
            .and_then(|()| check_hello(&h, dest_options()))
            .is_ok();
        out.push((
            format!("hello-{name}"),
            [&[0u8][..], &conn.output].concat(),
            accepted,
        ));
    }

    for (name, stream) in [("first", 1), ("last", 16)] {
        let mut wire = Vec::new();
        open_stream(
            &mut wire,
            StreamHello {
                migration_id: hello().migration_id,
                stream,
            },
        )
        .expect("writes to a Vec");
        out.push((format!("stream-{name}"), [&[0u8][..], &wire].concat(), true));
    }

    for (name, verdict) in [
        ("accept", Ok(())),
        (
            "refuse",
            Err("guest of 1 pages exceeds this host's limit".to_string()),
        ),
    ] {
        let mut wire = Vec::new();
        send_welcome(&mut wire, &psk(), hello(), verdict.clone()).expect("writes to a Vec");
        out.push((
            format!("welcome-{name}"),
            [&[MODE_SOURCE][..], &wire].concat(),
            verdict.is_ok(),
        ));
    }
    out
}

//! The `handshake` target: the opening exchange of protocol 7, both ends.
//!
//! # Input format
//!
//! ```text
//! byte 0     mode: bit 0 = side (0 destination, 1 source); bit 1 = signed
//! bytes 1..  what the peer sends on the connection
//! ```
//!
//! **Destination** (bit 0 clear): the peer's opening, answering the greeting [`greeting`].
//! `opening` classifies every prefix up to 32 bytes and the whole input (the acceptor peeks
//! as the bytes trickle in); `verify_opening` then checks a complete opening, and
//! `accept_opening` (the blocking destination, over an in-memory connection, with its own
//! fresh challenge) reads the same bytes. A fuzzer cannot forge the MAC, so unsigned inputs
//! (checked against [`other_greeting`], as a replayed opening would be) exercise everything
//! before it: the header checks, and that a wrong MAC is refused before the body is parsed. With bit 1 set the harness appends the correct MAC (over
//! [`greeting`] and the input), so the body parse behind the MAC gets arbitrary input too: a
//! Hello that reads goes through `check_hello` (the destination's checks, with
//! [`dest_options`]), and one it accepts gets what `SinkPipeline::start` builds for each data
//! stream (an `Opener` and a `Decoder`), so what a Hello makes the destination allocate is
//! exercised (libFuzzer reports a `malloc` beyond `-malloc_limit_mb` as a crash).
//!
//! The verdicts must agree: a complete opening is never "malformed for its length", an
//! unsigned one never verifies, a signed one never fails its MAC.
//!
//! **Source** (bit 0 set): the destination's bytes, a greeting then a Welcome, read by
//! `send_hello` sending [`hello`]; with bit 1 set the harness puts [`greeting`] first, so the
//! bytes are the Welcome alone.

use std::sync::OnceLock;

use dataplane::codec::{CodecConfig, Compression, Decoder};
use dataplane::crypto::{Direction, Opener, PreSharedKey, opening_mac};
use dataplane::migrate::dest::{DestOptions, check_hello};
use dataplane::protocol::{
    Greeting, Hello, Opening, ProtocolError, Proven, StreamHello, accept_opening, opening,
    send_hello, send_key_mismatch, send_welcome, verify_opening,
};

/// Mode bit 0: source side (reads a greeting and a Welcome).
pub const MODE_SOURCE: u8 = 1 << 0;
/// Mode bit 1: the harness signs the opening (destination) or greets (source).
pub const MODE_SIGNED: u8 = 1 << 1;

/// What happened to one input (the target ignores it; tests check seeds with it).
#[derive(Debug)]
pub enum Outcome {
    /// Destination: a Hello proved the key and was accepted (checks passed, decoder built).
    HelloAccepted,
    /// Destination: a Hello proved the key and was refused with this reason.
    HelloRefused(String),
    /// Destination: a StreamHello proved the key.
    Stream(StreamHello),
    /// Destination: the opening did not prove the key, or did not read.
    Unproven(String),
    /// Source: the Welcome accepted and the key check matched.
    Welcomed,
    /// Source: the exchange failed.
    NotWelcomed(String),
}

/// The pre-shared key both ends hold.
pub fn psk() -> PreSharedKey {
    PreSharedKey::from_bytes([0x5a; 32])
}

/// The destination's greeting in this harness (a fixed challenge).
pub fn greeting() -> &'static Greeting {
    static G: OnceLock<Greeting> = OnceLock::new();
    G.get_or_init(|| Greeting::with_challenge([0x33; 32]))
}

/// The greeting of another connection (unsigned inputs are checked against it).
pub fn other_greeting() -> &'static Greeting {
    static G: OnceLock<Greeting> = OnceLock::new();
    G.get_or_init(|| Greeting::with_challenge([0x44; 32]))
}

/// The Hello the source side sends.
pub fn hello() -> &'static Hello {
    static HELLO: OnceLock<Hello> = OnceLock::new();
    HELLO.get_or_init(|| Hello {
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
        return destination(&[], false);
    };
    if mode & MODE_SOURCE == 0 {
        destination(bytes, mode & MODE_SIGNED != 0)
    } else {
        source(bytes, mode & MODE_SIGNED != 0)
    }
}

/// The input with the MAC a holder of the key would append.
pub fn signed(bytes: &[u8]) -> Vec<u8> {
    let mac = opening_mac(&psk(), &[greeting().as_bytes(), bytes]);
    [bytes, &mac].concat()
}

fn destination(bytes: &[u8], sign: bool) -> Outcome {
    let wire = if sign { signed(bytes) } else { bytes.to_vec() };
    for end in 0..wire.len().min(32) {
        let _ = opening(&wire[..end]);
    }
    // The blocking destination reads the same bytes (under its own challenge, so the MAC
    // never verifies there): it must stop at the same place without panicking.
    let mut conn = Duplex {
        input: &wire,
        output: Vec::new(),
    };
    let blocking = accept_opening(&mut conn, &psk());
    assert!(
        !matches!(blocking, Ok(_)),
        "an opening verified under a challenge it never saw"
    );
    let (kind, len) = match opening(&wire) {
        Opening::Complete(kind, len) => (kind, len),
        Opening::Incomplete(n) => {
            assert!(
                n > wire.len(),
                "incomplete at {n} with {} bytes",
                wire.len()
            );
            return Outcome::Unproven(format!("incomplete: {n} bytes needed"));
        }
        Opening::Refused(why) => return Outcome::Unproven(why),
    };
    // Unsigned input is checked against another connection's challenge: even an opening
    // recorded whole from a real source (a seed) must not verify there.
    let challenge = if sign { greeting() } else { other_greeting() };
    let verdict = verify_opening(&psk(), challenge, &wire[..len]);
    match (&verdict, sign && len == wire.len()) {
        (
            Err(ProtocolError::Malformed {
                what: "opening", ..
            }),
            _,
        ) => {
            panic!("opening said Complete({kind:?}, {len}), verify_opening disagrees: {verdict:?}")
        }
        (Ok(_), false) => panic!("an unsigned opening verified"),
        (Err(ProtocolError::WrongKey), true) => panic!("a signed opening failed its MAC"),
        _ => {}
    }
    match verdict {
        Ok(Proven::Control(auth)) => match check_hello(&auth.hello, dest_options()) {
            Ok(()) => {
                data_stream_stage(&auth.hello);
                let mut answer = Vec::new();
                send_welcome(&mut answer, &psk(), &auth, Ok(())).expect("writes to a Vec");
                Outcome::HelloAccepted
            }
            Err(why) => Outcome::HelloRefused(why),
        },
        Ok(Proven::Data(s)) => Outcome::Stream(s),
        Err(e) => Outcome::Unproven(e.to_string()),
    }
}

/// What `SinkPipeline::start` builds for each data stream of an accepted Hello.
fn data_stream_stage(hello: &Hello) {
    let keys = dataplane::crypto::MigrationKeys::derive(
        &psk(),
        &[0; 32],
        &dataplane::crypto::HandshakeNonce(hello.source_nonce),
        &dataplane::crypto::HandshakeNonce(greeting().challenge()),
    );
    let frame_size = usize::try_from(hello.frame_size).unwrap_or(usize::MAX);
    let mut opener = Opener::new(&keys.stream_key(1, Direction::SourceToDest), frame_size);
    opener.allow_compression(hello.codec.compression);
    let decoder = Decoder::with_frame_size(hello.codec.clone(), hello.guest_pages, frame_size)
        .unwrap_or_else(|e| panic!("check_hello accepted a codec the decoder refuses: {e}"));
    drop((opener, decoder));
}

fn source(bytes: &[u8], greet: bool) -> Outcome {
    let input = if greet {
        [greeting().as_bytes().as_slice(), bytes].concat()
    } else {
        bytes.to_vec()
    };
    let mut conn = Duplex {
        input: &input,
        output: Vec::new(),
    };
    match send_hello(&mut conn, &psk(), hello()) {
        Ok(_) => Outcome::Welcomed,
        Err(e) => Outcome::NotWelcomed(e.to_string()),
    }
}

/// A connection for the exchanging functions: reads from `input`, records what is written.
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

/// The source's opening for `h` answering [`greeting`], without its MAC (the signed mode's
/// input), or with it.
fn hello_wire(h: &Hello) -> Vec<u8> {
    dataplane::protocol::handshake::hello_opening(&psk(), greeting(), h).expect("a Hello")
}

/// Seed inputs: (file name, bytes, whether the destination accepts / the source is welcomed).
///
/// Every seed is what the real functions put on the wire: openings by `hello_opening` and
/// `stream_opening` (signed mode: without their MAC, which the harness appends; and one
/// whole, which the destination must refuse, not having sent that challenge), and Welcomes
/// by `send_welcome` and `send_key_mismatch`.
pub fn seeds() -> Vec<(String, Vec<u8>, bool)> {
    use dataplane::protocol::handshake::{MAC_LEN, stream_opening};
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
    h.guest = "a-guest-with.a_long:name@host+1".into();
    hellos.push(("delta-zstd", h));
    let mut h = hello().clone();
    h.guest = "two\nlines".into();
    hellos.push(("label-newline", h));
    let mut h = hello().clone();
    h.streams = 64;
    hellos.push(("too-many-streams", h));

    for (name, h) in hellos {
        let wire = hello_wire(&h);
        let accepted = check_hello(&h, dest_options()).is_ok();
        out.push((
            format!("hello-{name}"),
            [&[MODE_SIGNED][..], &wire[..wire.len() - MAC_LEN]].concat(),
            accepted,
        ));
    }
    // A whole opening, MAC included, as recorded: refused (replay, or another challenge).
    out.push((
        "hello-replayed".into(),
        [&[0u8][..], &hello_wire(hello())].concat(),
        false,
    ));

    for (name, stream) in [("first", 1), ("last", 16)] {
        let wire = stream_opening(
            &psk(),
            greeting(),
            StreamHello {
                migration_id: hello().migration_id,
                stream,
            },
        );
        out.push((
            format!("stream-{name}"),
            [&[MODE_SIGNED][..], &wire[..wire.len() - MAC_LEN]].concat(),
            true,
        ));
    }

    // The destination's answers to the source's Hello under `greeting()`.
    let auth = match verify_opening(&psk(), greeting(), &hello_wire(hello())) {
        Ok(Proven::Control(a)) => a,
        other => panic!("{other:?}"),
    };
    for (name, verdict) in [
        ("accept", Ok(())),
        (
            "refuse",
            Err("guest of 1 pages exceeds this host's limit".to_string()),
        ),
    ] {
        let mut wire = Vec::new();
        send_welcome(&mut wire, &psk(), &auth, verdict.clone()).expect("writes to a Vec");
        out.push((
            format!("welcome-{name}"),
            [&[MODE_SOURCE | MODE_SIGNED][..], &wire].concat(),
            verdict.is_ok(),
        ));
    }
    let mut wire = Vec::new();
    send_key_mismatch(&mut wire).expect("writes to a Vec");
    out.push((
        "welcome-key-mismatch".into(),
        [&[MODE_SOURCE | MODE_SIGNED][..], &wire].concat(),
        false,
    ));
    out
}

//! The `control` target: the sealed control channel, and the coordinator's JSON lines.
//!
//! # Input format
//!
//! ```text
//! byte 0     mode: bit 0 = sealed body (else raw wire bytes)
//!                  bit 1 = the source's end, ToSource messages (else the destination's, ToDest)
//!                  bit 2 = coordinator JSON lines instead (bit 1: a member reading Replies,
//!                          else the coordinator reading Requests; bit 0 unused)
//! bytes 1..  the rest
//! ```
//!
//! **Raw wire** (bit 0 clear): the rest is what arrives on the control connection after the
//! handshake. A `ControlRx` over it, under the fixed control key of the direction, receives
//! messages until it fails (at most [`MAX_MESSAGES`]), so header checks, authentication,
//! sequence numbers and partial frames are exercised; only the seeds (real sealed
//! conversations) get past authentication.
//!
//! **Sealed body** (bit 0 set): the rest is a frame body (cut to a control frame's capacity),
//! sealed with the fixed key the way `ControlTx` seals a message, and received by the same
//! `ControlRx`: postcard gets arbitrary bytes behind valid crypto. A `ToDest::Prepare` that
//! decodes goes on through what the destination's `prepare` parses from it before touching the
//! host: the disk's JSON (`DrbdDisk`) and the network identity (`GuestIdentity`).
//!
//! **Coordinator** (bit 2 set): the rest is lines from the peer (after the key proof), read
//! with `coordinator::wire::recv` until it fails. The coordinator's end hands each `Request` to
//! a fresh `Coordinator::handle` (a `Wait` with its wait cut to 0 ms, so nothing sleeps); the
//! member's end reads `Reply`s.

use std::io::BufReader;
use std::sync::OnceLock;

use dataplane::coordinator::wire::{Reply, Request, recv, send};
use dataplane::coordinator::{Coordinator, GroupFailure, Progress, Verdict};
use dataplane::crypto::{Direction, HandshakeNonce, MigrationKeys, Sealer, StreamKey};
use dataplane::disk::drbd::DrbdDisk;
use dataplane::frame::FrameBuf;
use dataplane::network::GuestIdentity;
use dataplane::protocol::{
    CONTROL_FRAME_SIZE, CONTROL_STREAM, ControlRx, ControlTx, NetworkIdentity, ProtocolError,
    ToDest, ToSource,
};

/// Mode bit 0: sealed-body mode (clear: raw wire bytes).
pub const MODE_SEALED: u8 = 1 << 0;
/// Mode bit 1: the source's end (ToSource messages).
pub const MODE_TO_SOURCE: u8 = 1 << 1;
/// Mode bit 2: coordinator JSON lines.
pub const MODE_COORDINATOR: u8 = 1 << 2;
/// Messages read from one input at most.
pub const MAX_MESSAGES: usize = 64;

/// What happened to one input (the target ignores it; tests check seeds with it).
#[derive(Debug)]
pub enum Outcome {
    /// Control messages received before the channel failed, and its error.
    Control(usize, ProtocolError),
    /// Coordinator lines read before the reader failed (or ran out), and its error.
    Coordinator(usize, std::io::Error),
}

/// The fixed control key of the direction this end receives.
pub fn control_key(to_source: bool) -> &'static StreamKey {
    static KEYS: OnceLock<[StreamKey; 2]> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let keys = MigrationKeys::derive(
            &dataplane::crypto::PreSharedKey::from_bytes([0x5a; 32]),
            &[0x5e; 32],
            &HandshakeNonce([1; 32]),
            &HandshakeNonce([2; 32]),
        );
        [
            keys.stream_key(CONTROL_STREAM, Direction::SourceToDest),
            keys.stream_key(CONTROL_STREAM, Direction::DestToSource),
        ]
    });
    &keys[usize::from(to_source)]
}

/// The `control` target: must not panic on any input.
pub fn control(data: &[u8]) {
    let _ = run(data);
}

/// [`control`], telling what happened.
pub fn run(data: &[u8]) -> Outcome {
    let (mode, rest) = data.split_first().map_or((0, data), |(&m, r)| (m, r));
    let to_source = mode & MODE_TO_SOURCE != 0;
    if mode & MODE_COORDINATOR != 0 {
        return coordinator(to_source, rest);
    }
    if mode & MODE_SEALED == 0 {
        return receive(to_source, rest);
    }
    let mut frame = FrameBuf::new(CONTROL_FRAME_SIZE);
    let body = &rest[..rest.len().min(frame.body_capacity())];
    frame.append_raw_records(body, 1);
    let wire = Sealer::new(control_key(to_source))
        .seal(&mut frame)
        .to_vec();
    receive(to_source, &wire)
}

/// Receives messages from `wire` until the channel fails.
fn receive(to_source: bool, wire: &[u8]) -> Outcome {
    let mut rx = ControlRx::new(wire, control_key(to_source));
    for n in 0..MAX_MESSAGES {
        let got = if to_source {
            rx.recv::<ToSource>().map(drop)
        } else {
            rx.recv::<ToDest>().map(dest_handles)
        };
        if let Err(e) = got {
            return Outcome::Control(n, e);
        }
    }
    Outcome::Control(
        MAX_MESSAGES,
        ProtocolError::Unexpected("message limit".into()),
    )
}

/// What the destination parses out of a message before acting on it.
fn dest_handles(msg: ToDest) {
    if let ToDest::Prepare { disk, network } = msg {
        if let Some(n) = network {
            let _ = GuestIdentity::try_from(n);
        }
        if let Some(json) = disk {
            let _ = serde_json::from_str::<DrbdDisk>(&json);
        }
    }
}

fn coordinator(to_source: bool, bytes: &[u8]) -> Outcome {
    let mut r = BufReader::new(bytes);
    let coordinator = (!to_source).then(|| Coordinator::new(psk()));
    for n in 0.. {
        let got = match &coordinator {
            Some(c) => recv::<Request>(&mut r).map(|req| {
                let req = match req {
                    Request::Wait { group, member, .. } => Request::Wait {
                        group,
                        member,
                        ms: 0,
                    },
                    other => other,
                };
                drop(c.handle(req));
            }),
            None => recv::<Reply>(&mut r).map(drop),
        };
        if let Err(e) = got {
            return Outcome::Coordinator(n, e);
        }
    }
    unreachable!("the loop returns once the input runs out")
}

fn psk() -> dataplane::crypto::PreSharedKey {
    dataplane::crypto::PreSharedKey::from_bytes([0x5a; 32])
}

/// Every kind of `ToDest` a source sends, with realistic contents.
pub fn to_dest_messages() -> Vec<ToDest> {
    let disk = r#"{"resource":"r0","device":"/dev/drbd0","disk":"/dev/vg/guest","meta_disk":"internal","port":7789,"nodes":[{"name":"chicago-7","address":"10.0.0.1","node_id":0},{"name":"dallas-3","address":"10.1.0.1:7790","node_id":1}]}"#;
    vec![
        ToDest::Prepare {
            disk: Some(disk.into()),
            network: Some(NetworkIdentity {
                mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
                ip: Some(std::net::Ipv4Addr::new(10, 0, 0, 7)),
            }),
        },
        ToDest::Prepare {
            disk: None,
            network: None,
        },
        ToDest::DiskSyncing {
            sync_percent: Some(42.5),
        },
        ToDest::DiskSyncing { sync_percent: None },
        ToDest::IterationEnd {
            iteration: 1,
            frames: vec![10, 12, 9, 11],
        },
        ToDest::Paused,
        ToDest::StatePart {
            bytes: (0..=255).collect(),
        },
        ToDest::Final {
            iteration: 7,
            frames: vec![100, 120, 90, 110],
            state: b"QEVM\0\0\0\x03device state".to_vec(),
        },
        ToDest::Digest {
            digest: 0x0123_4567_89ab_cdef,
        },
        ToDest::Commit,
        ToDest::Resume { iteration: 4 },
        ToDest::Abort {
            reason: "operator asked".into(),
            operator: true,
        },
    ]
}

/// Every kind of `ToSource` a destination sends.
pub fn to_source_messages() -> Vec<ToSource> {
    vec![
        ToSource::Prepared,
        ToSource::IterationAck { iteration: 3 },
        ToSource::Ready {
            digest: 0x0123_4567_89ab_cdef,
        },
        ToSource::Started,
        ToSource::Resumed { acked: 3 },
        ToSource::Failed {
            reason: "no frame arrived for 30 s".into(),
        },
    ]
}

/// Requests a member sends, in the order of a migration.
pub fn requests() -> Vec<Request> {
    let (group, member) = ("app".to_string(), "db".to_string());
    let progress = |iteration, ready| Progress {
        iteration,
        sent: 262_144,
        dirtied: 1_000,
        remaining: 900,
        final_copy_ms: Some(40),
        iteration_ms: 2_000,
        wire_bytes: 1 << 30,
        ready,
    };
    vec![
        Request::Join {
            group: group.clone(),
            member: member.clone(),
            pages: 262_144,
            size: 2,
            on_failure: GroupFailure::Abort,
        },
        Request::Join {
            group: group.clone(),
            member: "web".into(),
            pages: 65_536,
            size: 2,
            on_failure: GroupFailure::Continue,
        },
        Request::Report {
            group: group.clone(),
            member: member.clone(),
            progress: progress(1, false),
        },
        Request::Wait {
            group: group.clone(),
            member: member.clone(),
            ms: 500,
        },
        Request::Report {
            group: group.clone(),
            member: "web".into(),
            progress: progress(2, true),
        },
        Request::Show {
            group: group.clone(),
        },
        Request::Fail {
            group: group.clone(),
            member: "web".into(),
            why: "aborted".into(),
        },
        Request::Done { group, member },
    ]
}

/// Replies a coordinator sends.
pub fn replies() -> Vec<Reply> {
    let c = Coordinator::new(psk());
    let mut out = vec![
        Reply::Ok,
        Reply::Verdict {
            verdict: Verdict::Go,
        },
        Reply::Error {
            message: "no group \"x\" here".into(),
        },
    ];
    for req in requests() {
        if let Request::Wait { .. } = req {
            continue;
        }
        out.push(c.handle(req));
    }
    out
}

/// Seed inputs: (file name, bytes). Each one is read to its end without error.
///
/// Raw-wire seeds are whole conversations sealed by a real `ControlTx`; sealed-body seeds one
/// real message each, as postcard bytes; coordinator seeds the JSON lines `wire::send` writes.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut tx = ControlTx::new(vec![0u8], control_key(false));
    for msg in to_dest_messages() {
        tx.send(&msg).expect("writes to a Vec");
        let body = postcard::to_allocvec(&msg).expect("serializes");
        let name = format!("{msg:?}");
        let name: String = name
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        out.push((
            format!("sealed-to-dest-{}-{name}", out.len()),
            [&[MODE_SEALED][..], &body].concat(),
        ));
    }
    out.push(("raw-to-dest-conversation".into(), tx.get_ref().clone()));

    let mut tx = ControlTx::new(vec![MODE_TO_SOURCE], control_key(true));
    for msg in to_source_messages() {
        tx.send(&msg).expect("writes to a Vec");
        let body = postcard::to_allocvec(&msg).expect("serializes");
        let name = format!("{msg:?}");
        let name: String = name
            .chars()
            .take_while(char::is_ascii_alphanumeric)
            .collect();
        out.push((
            format!("sealed-to-source-{name}"),
            [&[MODE_SEALED | MODE_TO_SOURCE][..], &body].concat(),
        ));
    }
    out.push(("raw-to-source-conversation".into(), tx.get_ref().clone()));

    let mut lines = vec![MODE_COORDINATOR];
    for req in requests() {
        send(&mut lines, &req).expect("writes to a Vec");
    }
    out.push(("coordinator-requests".into(), lines));
    let mut lines = vec![MODE_COORDINATOR | MODE_TO_SOURCE];
    for reply in replies() {
        send(&mut lines, &reply).expect("writes to a Vec");
    }
    out.push(("coordinator-replies".into(), lines));
    out
}

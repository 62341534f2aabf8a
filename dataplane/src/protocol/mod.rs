//! The migration protocol between two skyferryd: who says what, when.
//!
//! ```text
//! source                                   destination
//!   | control connection                        |
//!   |<- Greeting (versions, fresh challenge) ---|   sent on every accepted connection
//!   |-- Hello + MAC(PSK; greeting, Hello) ----->|   MAC checked first; only then: size,
//!   |                                           |   config, capacity, a status row
//!   |<- Welcome (key check) --------------------|   keys now derived at both ends
//!   | data connections 1..=N                    |
//!   |<- Greeting (its own challenge) -----------|
//!   |== StreamHello + MAC, then sealed frames =>|   pages, decoded into the new guest
//!   | (sealed control messages from here on)    |
//!   |-- Prepare{disk?, network?} -------------->|   checks it can steer the disk and
//!   |   (both: DRBD bulk sync, then protocol C) |   announce the guest here
//!   |-- DiskSyncing* (every second) ----------->|   the source's sync, still alive
//!   |<- Prepared -------------------------------|   iteration 1 starts only now
//!   |-- IterationEnd{frames per stream} ------->|
//!   |<- IterationAck ---------------------------|   once every frame is decoded
//!   |   ... pause guest ...                     |
//!   |-- Paused -------------------------------->|   announces the guest (GARP/RARP)
//!   |   ... final pages ...                     |
//!   |-- StatePart* (a large state blob) ------->|
//!   |-- Final{frames, state} ------------------>|   both ends now hash guest memory,
//!   |-- Digest{source's memory digest} -------->|   at the same time
//!   |<- Ready (digest matches) -----------------|   DRBD primary here too; holds everything
//!   |   COMMIT POINT: source never resumes      |
//!   |-- Commit -------------------------------->|
//!   |<- Started --------------------------------|   guest runs at the destination
//! ```
//!
//! A connection that has not proven the key (a Hello or StreamHello whose MAC over this
//! connection's challenge verifies) gets nothing but the greeting, a place in the acceptor's
//! bounded pool of unauthenticated connections and a short deadline; see `handshake` and
//! `docs/handshake.md` for the bytes, and `daemon::acceptor` for the pool.
//!
//! Before Commit either side may send Abort/Failed: the guest keeps (or resumes) running at
//! the source and the destination discards what it received, rolls its disk back, and
//! stops announcing; the source announces the guest again where it resumes.
//!
//! When the link breaks between Prepared and Paused, the source reconnects:
//!
//! ```text
//!   |<- Greeting -------------------------------|
//!   |-- Hello{resume: n, same migration} + MAC->|   routed to the migration held here
//!   |<- Welcome --------------------------------|   new nonces, new keys
//!   |== new data connections ==================>|   new pipelines, empty caches at both ends
//!   |-- Resume{iteration} --------------------->|
//!   |<- Resumed{acked} -------------------------|   last iteration fully decoded here
//!   |-- (pages of iterations after acked and those dirtied since, as the next iteration)
//! ```

pub mod control;
pub mod handshake;
pub mod text;

pub use control::{ControlRx, ControlTx, control_channel};
pub use handshake::{
    AuthHello, ConnectionKind, Greeting, Hello, Opening, Proven, StreamHello, Welcome,
    accept_opening, open_stream, opening, read_greeting, read_welcome, send_hello,
    send_key_mismatch, send_welcome, verify_opening,
};

use serde::{Deserialize, Serialize};

use crate::crypto::OpenError;

/// Version of this protocol. 2: the Hello's codec config carries `compression`, frames may
/// carry the compression flags, and `Final` is followed by `Digest` (both ends hash at once).
/// 3: a state blob larger than a control frame goes ahead of `Final` in `StatePart`s.
/// 4: the Hello names where the guest lands (`destination`: a Xen domain id).
/// 5: `Prepare`/`Prepared` before iteration 1 (the disk and the network switchover), and
/// `Paused` at the pause. 6: the Hello is bound into the keys, and a broken pre-copy resumes
/// (`Hello::resume`, `Resume`/`Resumed`). 7: the destination greets every connection with a
/// fresh challenge and the versions it speaks, and each Hello and StreamHello carries a MAC
/// over it (`handshake`): nothing happens for a peer that has not proven the key.
///
/// Bump it for any change to what either side sends; `MIN_VERSION` rises with it unless this
/// side still speaks the older version too. A peer outside the range is told both ranges.
pub const VERSION: u16 = 7;
/// Oldest protocol this side speaks.
pub const MIN_VERSION: u16 = 7;
/// Sealing stream id of the control connection; data streams are 1..=N.
pub const CONTROL_STREAM: u32 = 0;
/// Largest control frame (carries the CPU/device state blob).
pub const CONTROL_FRAME_SIZE: usize = 1 << 20;
/// Largest state blob a destination accepts (a QEMU device state is a few hundred KiB).
pub const MAX_STATE: usize = 256 << 20;
/// State bytes per `StatePart` message (well inside a control frame).
pub const STATE_PART: usize = CONTROL_FRAME_SIZE / 2;
/// Largest Hello body (a Hello is a few hundred bytes; its strings are bounded in `text`).
pub const MAX_HELLO: usize = 4096;
/// Largest block cache per data stream a destination accepts (ten times the default): each
/// data stream's decoder allocates the Hello's cache before any frame is authenticated.
pub const MAX_CACHE_BYTES: u64 = 1 << 30;

/// The guest's network identity, for the announcement after the switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkIdentity {
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// Its IPv4 address, if known (then a gratuitous ARP goes out besides the RARP).
    pub ip: Option<std::net::Ipv4Addr>,
}

/// Source -> destination control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToDest {
    /// First message after the handshake: what else moves with the guest. The destination
    /// answers `Prepared` once it can go on (its disk in sync and synchronous), else `Failed`.
    Prepare {
        /// The guest's DRBD disk (`DrbdDisk` as JSON), if it has one: the destination
        /// writes the same resource file and steers its side.
        disk: Option<String>,
        /// The guest's network identity, if the destination is to announce it.
        network: Option<NetworkIdentity>,
    },
    /// While the source's disk syncs, about every second: the source is alive, and how far
    /// its bulk copy is.
    DiskSyncing {
        /// Percent of the disk in sync, as the source last saw it.
        sync_percent: Option<f64>,
    },
    /// The guest has just paused for the final iteration: the destination announces it.
    Paused,
    /// An iteration's frames are all sent: `frames[s]` is data stream s's frame count so far.
    IterationEnd {
        /// Iteration number.
        iteration: u32,
        /// Frames sent on each data stream since the start.
        frames: Vec<u64>,
    },
    /// A piece of a state blob too large for one message; the pieces, in order, followed by
    /// `Final`'s `state`, make the blob.
    StatePart {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The guest is paused and everything is sent. Sent before the source hashes the
    /// guest, so the destination hashes its copy at the same time.
    Final {
        /// Number of the final iteration.
        iteration: u32,
        /// Frames sent on each data stream since the start.
        frames: Vec<u64>,
        /// CPU and device state.
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
    },
    /// `guest::memory_digest` of the paused guest, after `Final`.
    Digest {
        /// The digest.
        digest: u64,
    },
    /// The source has handed the guest over: start it.
    Commit,
    /// First message of a resumed session (a Hello with `resume` > 0): the link broke
    /// during pre-copy and the source goes on with iteration `iteration`. The destination
    /// answers `Resumed`.
    Resume {
        /// The iteration the source sends next.
        iteration: u32,
    },
    /// Stop; discard everything.
    Abort {
        /// Why, for the destination's status.
        reason: String,
        /// The operator asked for it (else the source failed).
        operator: bool,
    },
}

/// Destination -> source control messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToSource {
    /// Answer to `Prepare`: go ahead with iteration 1.
    Prepared,
    /// Every frame up to this iteration's end is decoded.
    IterationAck {
        /// Iteration number.
        iteration: u32,
    },
    /// Everything arrived and the memory digest matches: ready to start on Commit.
    Ready {
        /// The destination's memory digest (equal to the source's).
        digest: u64,
    },
    /// The guest runs at the destination.
    Started,
    /// Answer to `Resume`: the last iteration whose every frame was decoded here (0: none).
    /// The source resends every page of the iterations after it, and those dirtied since.
    Resumed {
        /// Last acknowledged iteration.
        acked: u32,
    },
    /// The destination cannot go on; it discards what it received.
    Failed {
        /// Why.
        reason: String,
    },
}

/// Protocol failures, written for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// the connection failed
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// the peer closed the connection
    #[error("peer closed the connection ({context})")]
    Closed {
        /// What was expected.
        context: &'static str,
    },
    /// not a skyferry peer, or another protocol version
    #[error("peer does not speak skyferry protocol {MIN_VERSION}..={VERSION}: {0}")]
    NotSkyferry(String),
    /// the peers' pre-shared keys differ
    #[error(
        "the peer's key check failed: its pre-shared key differs from ours (check that both \
         hosts have the same key file), or the handshake was altered on the way"
    )]
    WrongKey,
    /// the destination refused the migration
    #[error("destination refused the migration: {0}")]
    Refused(String),
    /// a sealed control frame was refused
    #[error("control channel: {0}")]
    Frame(#[from] OpenError),
    /// a message that does not parse
    #[error("malformed {what} message: {detail}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// Parser's complaint.
        detail: String,
    },
    /// a message the protocol does not allow at this point
    #[error("unexpected message from peer: {0}")]
    Unexpected(String),
    /// a message that does not fit a control frame
    #[error("control message of {0} bytes exceeds the control frame size")]
    TooLarge(usize),
}

impl ProtocolError {
    /// True for a read that timed out (the channel is intact; poll again).
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProtocolError::Io { source, .. }
            if matches!(source.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }

    /// Wraps an I/O error, turning end-of-file into [`ProtocolError::Closed`].
    pub fn io(context: &'static str, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::UnexpectedEof {
            ProtocolError::Closed { context }
        } else {
            ProtocolError::Io { context, source }
        }
    }
}

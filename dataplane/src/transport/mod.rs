//! Moving sealed frames over TCP with io_uring: a pool of registered frame buffers, one send
//! thread and one receive thread per migration end, each driving every stream's socket from
//! one ring.
//!
//! Ordering: frames of one stream must arrive in order (the opener refuses gaps), so each
//! socket has at most one write and one read in flight; streams proceed independently.
//! An io_uring buffer belongs to the ring from submission until its completion is reaped:
//! [`ring::Ring`] holds in-flight frames, keyed by stream, and on any exit cancels and reaps
//! what is still in flight before the buffers go back to the pool.

pub mod pool;
pub mod rate;
pub mod recv;
pub mod ring;
pub mod send;
pub mod socket;

pub use pool::{FramePool, PoolFrame};
pub use rate::TokenBucket;
pub use recv::{Incoming, RecvSummary, receive_frames};
pub use send::{Outgoing, SendMeter, SendSummary, send_frames, send_frames_metered};
pub use socket::{Congestion, SocketOptions};

use crate::crypto::OpenError;

/// Transport failures, classified so the driver can tell a dead peer from a hostile one.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// setting up io_uring failed (kernel too old, or io_uring disabled)
    #[error("io_uring setup failed ({what}): {source}")]
    Ring {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// a socket operation failed
    #[error("stream {stream}: {op} failed: {source}")]
    Io {
        /// Stream index.
        stream: usize,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// the peer closed the connection in the middle of a frame
    #[error("stream {stream}: peer closed the connection mid-frame ({got} of {need} bytes)")]
    Truncated {
        /// Stream index.
        stream: usize,
        /// Bytes of the frame received.
        got: usize,
        /// Bytes the frame needed.
        need: usize,
    },
    /// a frame header that cannot be ours
    #[error("stream {stream}: {source}")]
    BadFrame {
        /// Stream index.
        stream: usize,
        /// Why the header was refused.
        source: OpenError,
    },
}

impl TransportError {
    /// True when the peer went away (reset, closed, unreachable) rather than misbehaved.
    pub fn is_disconnect(&self) -> bool {
        use std::io::ErrorKind::*;
        match self {
            TransportError::Io { source, .. } => matches!(
                source.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | TimedOut
            ),
            TransportError::Truncated { .. } => true,
            _ => false,
        }
    }
}

//! Sealing frames: per-stream keys derived from a pre-shared key, AES-256-GCM over the body
//! with the header as associated data.

pub mod keys;
pub mod seal;

pub use keys::{Direction, HandshakeNonce, KeyError, MigrationKeys, PreSharedKey, StreamKey};
pub use seal::{HeaderChecker, OpenError, OpenedFrame, Opener, Sealer};

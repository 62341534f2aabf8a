//! Sealing frames: per-stream keys derived from a pre-shared key, AES-256-GCM over the body
//! with the header as associated data.

pub mod aead;
pub mod keys;
pub mod seal;

pub use aead::{AeadImpl, default_impl, set_default_impl};
pub use keys::{
    Direction, HandshakeNonce, KeyError, MigrationKeys, PreSharedKey, StreamKey, coordinator_proof,
    opening_mac, opening_mac_matches,
};
pub use seal::{HeaderChecker, OpenError, OpenedFrame, Opener, Sealer};

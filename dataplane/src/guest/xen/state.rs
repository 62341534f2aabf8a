//! The xen backend's state blob: the HVM context, and what both ends must agree on about the
//! physmap (its size and where its holes are).
//!
//! Layout (little-endian): `SKYFXEN\0`, version u32, reserved u32, frames u64, hole count
//! u64, XXH3-64 of the hole bitmap u64, context length u32, reserved u32, then the context.

use super::BACKEND;
use crate::guest::{DirtyBitmap, GuestError};

const MAGIC: [u8; 8] = *b"SKYFXEN\0";
const VERSION: u32 = 1;
const HEADER: usize = 48;
/// Largest HVM context accepted (Xen's are a few KiB per vCPU; this bounds a hostile blob).
pub const MAX_CONTEXT: usize = 16 << 20;

/// Where a physmap has no memory, summarised so two ends can compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holes {
    /// Frames without memory.
    pub count: u64,
    /// XXH3-64 of the bitmap of those frames.
    pub digest: u64,
}

impl Holes {
    /// Summarises `holes` (bit set = no memory).
    pub fn of(holes: &DirtyBitmap) -> Holes {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        for w in holes.words() {
            h.update(&w.to_le_bytes());
        }
        Holes {
            count: holes.count(),
            digest: h.digest(),
        }
    }
}

/// A decoded blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XenState {
    /// Size of the source's physmap.
    pub frames: u64,
    /// Its holes.
    pub holes: Holes,
    /// `xc_domain_hvm_getcontext`'s bytes.
    pub context: Vec<u8>,
}

fn bad(why: impl Into<String>) -> GuestError {
    GuestError::BadState(format!("{BACKEND}: {}", why.into()))
}

impl XenState {
    /// The blob.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.context.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.frames.to_le_bytes());
        out.extend_from_slice(&self.holes.count.to_le_bytes());
        out.extend_from_slice(&self.holes.digest.to_le_bytes());
        let len = u32::try_from(self.context.len()).expect("context bounded by MAX_CONTEXT");
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.context);
        out
    }

    /// Parses a blob, refusing anything that is not exactly one.
    pub fn decode(blob: &[u8]) -> Result<XenState, GuestError> {
        let header = blob
            .get(..HEADER)
            .ok_or_else(|| bad(format!("state blob of {} bytes is too short", blob.len())))?;
        if header[..8] != MAGIC {
            return Err(bad("not a xen state blob (wrong magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(bad(format!(
                "state blob version {} (this host reads {VERSION})",
                u32_at(8)
            )));
        }
        let len = u32_at(40) as usize;
        if len > MAX_CONTEXT || blob.len() != HEADER + len {
            return Err(bad(format!(
                "context of {len} bytes in a blob of {} bytes",
                blob.len()
            )));
        }
        Ok(XenState {
            frames: u64_at(16),
            holes: Holes {
                count: u64_at(24),
                digest: u64_at(32),
            },
            context: blob[HEADER..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let mut holes = DirtyBitmap::new(1000);
        holes.set(3);
        holes.set(999);
        let s = XenState {
            frames: 1000,
            holes: Holes::of(&holes),
            context: vec![7; 300],
        };
        assert_eq!(s.holes.count, 2);
        let blob = s.encode();
        assert_eq!(XenState::decode(&blob).unwrap(), s);
        assert!(XenState::decode(&blob[..20]).is_err());
        assert!(XenState::decode(&blob[..blob.len() - 1]).is_err());
        let mut other = blob.clone();
        other[0] = b'X';
        assert!(
            XenState::decode(&other)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut v = blob.clone();
        v[8] = 9;
        assert!(
            XenState::decode(&v)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        let mut long = blob;
        long.push(0);
        assert!(XenState::decode(&long).is_err());
        let mut h2 = holes.clone();
        h2.set(4);
        assert_ne!(Holes::of(&h2), s.holes);
    }
}

//! Page deltas (paper IV-B2, V-C): XOR the page with its copy as last sent and run-length
//! encode the result.
//!
//! Runs are found a 64-bit word at a time (a zero word ends a run, a non-zero word extends
//! it), then each run's ends are trimmed to its first and last non-zero byte. That scans at
//! word speed yet keeps byte-exact runs, so a one-byte edit costs one byte of payload plus
//! two bytes of run header. Splitting at every zero word is never worse than merging: a
//! zero word inside a run would cost 8 literal bytes, a new run header costs at most 4.
//!
//! Wire form of the payload: `{ gap: varint, len: varint, xor: [u8; len] }*`, where `gap`
//! counts unchanged bytes since the end of the previous run. `len` is never 0.

use super::wire::{read_varint, varint_len, write_varint};
use crate::page::{BLOCK_SIZE, BLOCKS_PER_PAGE, Block, PAGE_SIZE, Page};

/// Why a delta payload cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// a run reaches past the end of the page
    #[error("delta run at page offset {offset} with length {len} overruns the page")]
    Overrun {
        /// Page offset where the run starts.
        offset: usize,
        /// Run length.
        len: usize,
    },
    /// a run header is cut short or not a valid varint
    #[error("delta payload malformed at payload offset {at}")]
    Malformed {
        /// Payload offset of the bad field.
        at: usize,
    },
    /// a run of zero length (never produced by an encoder)
    #[error("empty delta run at payload offset {at}")]
    EmptyRun {
        /// Payload offset of the run header.
        at: usize,
    },
}

/// Bitmask of the blocks a run over page bytes `start..end` (non-empty) touches.
fn touched(start: usize, end: usize) -> u8 {
    let first = start / BLOCK_SIZE;
    let last = (end - 1) / BLOCK_SIZE;
    // Four blocks: the mask fits in the low nibble.
    (1u8 << (last + 1)) - (1u8 << first)
}

/// XORs `new` with `base` into `xor` and run-length encodes the result into `out`.
///
/// Returns the payload length and the mask of blocks the delta touches, or `None` as soon as
/// the payload would exceed `out.len()` (the caller's threshold), so a heavily rewritten page
/// costs only the work up to the threshold.
pub fn encode(
    new: &Page,
    base: &[&Block; BLOCKS_PER_PAGE],
    xor: &mut Page,
    out: &mut [u8],
) -> Option<(usize, u8)> {
    for ((x, n), b) in xor.blocks_mut().iter_mut().zip(new.blocks()).zip(base) {
        for ((x, n), b) in x.iter_mut().zip(n).zip(b.iter()) {
            *x = n ^ b;
        }
    }
    let (words, _) = xor.0.as_chunks::<8>();
    let word = |i: usize| u64::from_le_bytes(words[i]);
    let mut len = 0;
    let mut last_end = 0;
    let mut changed = 0u8;
    let mut i = 0;
    while i < words.len() {
        if word(i) == 0 {
            i += 1;
            continue;
        }
        let first = i;
        while i < words.len() && word(i) != 0 {
            i += 1;
        }
        // Little-endian: the lowest byte of a word comes first in memory.
        let start = first * 8 + (word(first).trailing_zeros() / 8) as usize;
        let end = i * 8 - (word(i - 1).leading_zeros() / 8) as usize;
        let (gap, n) = ((start - last_end) as u64, end - start);
        let need = varint_len(gap) + varint_len(n as u64) + n;
        if len + need > out.len() {
            return None;
        }
        len += write_varint(&mut out[len..], gap);
        len += write_varint(&mut out[len..], n as u64);
        out[len..len + n].copy_from_slice(&xor.0[start..end]);
        len += n;
        changed |= touched(start, end);
        last_end = end;
    }
    Some((len, changed))
}

/// Applies a delta payload to `page`, which holds the base copy, and returns the mask of
/// blocks it touched (the same mask [`encode`] returned for this payload).
pub fn apply(payload: &[u8], page: &mut Page) -> Result<u8, DeltaError> {
    let mut at = 0;
    let mut pos = 0usize;
    let mut changed = 0u8;
    let field = |at: &mut usize| -> Result<usize, DeltaError> {
        let (v, n) = read_varint(&payload[*at..]).ok_or(DeltaError::Malformed { at: *at })?;
        *at += n;
        // Anything past a page is an overrun; saturate so the check below reports it.
        Ok(usize::try_from(v).unwrap_or(usize::MAX))
    };
    while at < payload.len() {
        let header = at;
        let gap = field(&mut at)?;
        let len = field(&mut at)?;
        if len == 0 {
            return Err(DeltaError::EmptyRun { at: header });
        }
        let start = pos.saturating_add(gap);
        let end = start.saturating_add(len);
        if end > PAGE_SIZE {
            return Err(DeltaError::Overrun { offset: start, len });
        }
        let bytes = payload
            .get(at..at + len)
            .ok_or(DeltaError::Malformed { at })?;
        for (p, x) in page.0[start..end].iter_mut().zip(bytes) {
            *p ^= x;
        }
        at += len;
        changed |= touched(start, end);
        pos = end;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ZERO: Block = [0; BLOCK_SIZE];

    fn split(p: &Page) -> [&Block; BLOCKS_PER_PAGE] {
        let b = p.blocks();
        [&b[0], &b[1], &b[2], &b[3]]
    }

    fn round_trip(base: &Page, new: &Page, limit: usize) -> Option<(usize, u8)> {
        let mut xor = Page::zeroed();
        let mut out = vec![0u8; limit];
        let (len, mask) = encode(new, &split(base), &mut xor, &mut out)?;
        let mut page = base.clone();
        assert_eq!(apply(&out[..len], &mut page), Ok(mask));
        assert_eq!(&page, new);
        Some((len, mask))
    }

    #[test]
    fn identical_pages_give_an_empty_delta() {
        let p = Page([7; PAGE_SIZE]);
        assert_eq!(round_trip(&p, &p, 16), Some((0, 0)));
    }

    #[test]
    fn one_byte_edit_costs_three_bytes_and_touches_one_block() {
        let base = Page([1; PAGE_SIZE]);
        for at in [0, 1, 7, 8, 1023, 1024, 2047, 4095] {
            let mut new = base.clone();
            new.0[at] ^= 0x40;
            let gap_len = varint_len(at as u64);
            assert_eq!(
                round_trip(&base, &new, 64),
                Some((gap_len + 1 + 1, 1 << (at / BLOCK_SIZE))),
                "edit at {at}"
            );
        }
    }

    #[test]
    fn run_across_a_block_boundary_touches_both_blocks() {
        let base = Page::zeroed();
        let mut new = base.clone();
        new.0[1020..1030].fill(9);
        assert_eq!(round_trip(&base, &new, 64).map(|r| r.1), Some(0b0011));
    }

    #[test]
    fn full_rewrite_overflows_the_threshold() {
        let base = Page::zeroed();
        let new = Page([0xa5; PAGE_SIZE]);
        assert_eq!(round_trip(&base, &new, 2048), None);
        assert!(round_trip(&base, &new, 4200).is_some());
    }

    #[test]
    fn scattered_base_blocks_are_used_in_order() {
        let blocks: [Block; 4] = [[1; BLOCK_SIZE], ZERO, [3; BLOCK_SIZE], [4; BLOCK_SIZE]];
        let mut new = Page::zeroed();
        for (i, b) in new.blocks_mut().iter_mut().enumerate() {
            *b = blocks[i];
        }
        new.0[3000] = 0xff;
        let mut xor = Page::zeroed();
        let mut out = [0u8; 16];
        let base = [&blocks[0], &blocks[1], &blocks[2], &blocks[3]];
        let (len, mask) = encode(&new, &base, &mut xor, &mut out).unwrap();
        assert_eq!(mask, 0b0100);
        let mut page = Page::zeroed();
        for (i, b) in page.blocks_mut().iter_mut().enumerate() {
            *b = blocks[i];
        }
        apply(&out[..len], &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn hostile_payloads_are_refused() {
        let mut page = Page::zeroed();
        // gap 4095 then 2 bytes: overruns.
        let mut p = vec![];
        let mut buf = [0u8; 10];
        let n = write_varint(&mut buf, 4095);
        p.extend_from_slice(&buf[..n]);
        p.extend_from_slice(&[2, 1, 1]);
        assert!(matches!(
            apply(&p, &mut page),
            Err(DeltaError::Overrun { .. })
        ));
        // Huge gap must not wrap around.
        let mut p = vec![0xff; 9];
        p.push(0x01);
        p.extend_from_slice(&[1, 1]);
        assert!(matches!(
            apply(&p, &mut page),
            Err(DeltaError::Overrun { .. })
        ));
        // Length says 5, only 2 bytes follow.
        assert!(matches!(
            apply(&[0, 5, 1, 2], &mut page),
            Err(DeltaError::Malformed { .. })
        ));
        assert!(matches!(
            apply(&[0, 0], &mut page),
            Err(DeltaError::EmptyRun { .. })
        ));
        assert!(matches!(
            apply(&[0x80], &mut page),
            Err(DeltaError::Malformed { .. })
        ));
    }
}

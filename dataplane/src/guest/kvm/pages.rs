//! The test guest's page format, host side: what `guest.S` writes and how its sweep judges a
//! page, in Rust. The host fills the initial memory with it, and checks memory with it after
//! the guest's own sweep, so the two oracles can be compared.
//!
//! A written page: word 0 its page number, word 1 its generation (never 0), word 2 the sum
//! of words 4..1023, word 3 the sum of their running sums (word `i` weighted by `1024 - i`),
//! all little-endian u32 with wrapping arithmetic. The generation table (one word per page at
//! [`layout::TABLE`]) says which generation each page must hold, 0 for all zeros.

use super::layout::{BODY_WORDS, HDR_WORDS, PAGE_WORDS, TABLE};
use super::vm::GuestRam;
use crate::page::{PAGE_SIZE, Page};

/// What a sweep makes of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A written page whose header and sums agree with the table.
    Intact,
    /// A zero page, as recorded.
    Zero,
    /// Recorded as zero, but something is written.
    NotZero,
    /// The header names another page.
    Foreign {
        /// The page number it carries.
        found: u32,
    },
    /// Another generation than the table's (an older copy, or a newer page under an older
    /// table).
    Stale {
        /// Generation in the page.
        found: u32,
        /// Generation in the table.
        expected: u32,
    },
    /// Header and body disagree (a page mixing two versions, or corrupted).
    Torn,
}

impl Verdict {
    /// Whether the page is as the guest left it.
    pub fn is_good(self) -> bool {
        matches!(self, Verdict::Intact | Verdict::Zero)
    }
}

fn word(page: &Page, i: u32) -> u32 {
    let at = usize::try_from(i).expect("word index") * 4;
    u32::from_le_bytes(page.0[at..at + 4].try_into().expect("4 bytes"))
}

fn set_word(page: &mut Page, i: u32, v: u32) {
    let at = usize::try_from(i).expect("word index") * 4;
    page.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// The two sums over a page's body words.
pub fn sums(page: &Page) -> (u32, u32) {
    let (mut a, mut b) = (0u32, 0u32);
    for i in HDR_WORDS..PAGE_WORDS {
        a = a.wrapping_add(word(page, i));
        b = b.wrapping_add(a);
    }
    (a, b)
}

/// Writes page `pfn` whole, as the guest's full rewrite does: generation `generation`, body
/// `first, first + step, ...`.
pub fn write_full(page: &mut Page, pfn: u32, generation: u32, first: u32, step: u32) {
    set_word(page, 0, pfn);
    set_word(page, 1, generation);
    let mut v = first;
    for i in HDR_WORDS..PAGE_WORDS {
        set_word(page, i, v);
        v = v.wrapping_add(step);
    }
    let (a, b) = sums(page);
    set_word(page, 2, a);
    set_word(page, 3, b);
}

/// Judges page `pfn` against the table's `expected` generation.
pub fn check(page: &Page, pfn: u32, expected: u32) -> Verdict {
    if expected == 0 {
        return if page.is_zero() {
            Verdict::Zero
        } else {
            Verdict::NotZero
        };
    }
    let found = word(page, 0);
    if found != pfn {
        return Verdict::Foreign { found };
    }
    let generation = word(page, 1);
    if generation != expected {
        return Verdict::Stale {
            found: generation,
            expected,
        };
    }
    if sums(page) != (word(page, 2), word(page, 3)) {
        return Verdict::Torn;
    }
    Verdict::Intact
}

/// The table's generation for page `pfn`.
pub fn expected(ram: &GuestRam, pfn: u32) -> u32 {
    ram.read_u32(TABLE + pfn * 4)
}

/// Every data page in `data` that is not as recorded, with its verdict, but `in_flight`: the
/// page of an operation the guest paused in the middle of, which it finishes when it runs
/// again. The vCPU must be paused (the guest's writes would look torn).
pub fn bad_pages(
    ram: &GuestRam,
    data: std::ops::Range<u32>,
    in_flight: Option<u32>,
) -> Vec<(u32, Verdict)> {
    let mut page = Page::zeroed();
    data.filter(|&pfn| Some(pfn) != in_flight)
        .filter_map(|pfn| {
            ram.load(u64::from(pfn), &mut page);
            let v = check(&page, pfn, expected(ram, pfn));
            (!v.is_good()).then_some((pfn, v))
        })
        .collect()
}

const _: () = assert!(PAGE_WORDS as usize * 4 == PAGE_SIZE && BODY_WORDS == PAGE_WORDS - 4);

#[cfg(test)]
mod tests {
    use super::*;

    fn written(pfn: u32, generation: u32) -> Page {
        let mut p = Page::zeroed();
        write_full(&mut p, pfn, generation, 0x1234_5678, 0x9e37_79b1);
        p
    }

    #[test]
    fn intact_and_zero_pages_pass() {
        assert_eq!(check(&written(9, 3), 9, 3), Verdict::Intact);
        assert_eq!(check(&Page::zeroed(), 9, 0), Verdict::Zero);
        assert!(Verdict::Intact.is_good() && Verdict::Zero.is_good());
    }

    #[test]
    fn stale_foreign_and_written_zero_pages_fail() {
        assert_eq!(
            check(&written(9, 3), 9, 4),
            Verdict::Stale {
                found: 3,
                expected: 4
            }
        );
        assert_eq!(check(&written(8, 3), 9, 3), Verdict::Foreign { found: 8 });
        assert_eq!(check(&written(9, 3), 9, 0), Verdict::NotZero);
        assert_eq!(check(&Page::zeroed(), 9, 3), Verdict::Foreign { found: 0 });
    }

    #[test]
    fn any_single_changed_body_word_is_torn() {
        let good = written(5, 1);
        for i in HDR_WORDS..PAGE_WORDS {
            let mut p = good.clone();
            let v = word(&p, i) ^ 0x8000_0000;
            set_word(&mut p, i, v);
            assert_eq!(check(&p, 5, 1), Verdict::Torn, "word {i}");
        }
        let mut p = good.clone();
        let v = word(&p, 2) + 1;
        set_word(&mut p, 2, v);
        assert_eq!(check(&p, 5, 1), Verdict::Torn, "sum word");
    }

    #[test]
    fn swapped_words_and_mixed_versions_are_torn() {
        let mut p = written(5, 1);
        let (a, b) = (word(&p, 10), word(&p, 11));
        set_word(&mut p, 10, b);
        set_word(&mut p, 11, a);
        assert_eq!(check(&p, 5, 1), Verdict::Torn, "two words swapped");
        // The first half of one version with the second half of another, under the newer
        // header: what a page copied while the guest rewrote it looks like.
        let old = written(5, 1);
        let mut new = Page::zeroed();
        write_full(&mut new, 5, 2, 77, 3);
        let mut mixed = new.clone();
        mixed.0[PAGE_SIZE / 2..].copy_from_slice(&old.0[PAGE_SIZE / 2..]);
        assert_eq!(check(&mixed, 5, 2), Verdict::Torn);
    }

    #[test]
    fn partial_rewrite_updates_sums_incrementally_like_the_guest() {
        // guest.S's op_partial: add d to k words from j, A += k*d, B += d * sum(1024 - i).
        let mut p = written(7, 1);
        let (j, k, d) = (100u32, 16u32, 0x0101_0101u32);
        let (mut da, mut db) = (0u32, 0u32);
        for i in j..j + k {
            let v = word(&p, i).wrapping_add(d);
            set_word(&mut p, i, v);
            da = da.wrapping_add(d);
            db = db.wrapping_add(d.wrapping_mul(PAGE_WORDS - i));
        }
        let (a, b) = (word(&p, 2).wrapping_add(da), word(&p, 3).wrapping_add(db));
        set_word(&mut p, 2, a);
        set_word(&mut p, 3, b);
        set_word(&mut p, 1, 2);
        assert_eq!(check(&p, 7, 2), Verdict::Intact);
    }
}

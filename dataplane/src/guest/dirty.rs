//! Dirty page bitmaps.

use crate::page::Pfn;

/// One bit per guest page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An empty bitmap for `pages` pages.
    pub fn new(pages: u64) -> Self {
        let words = usize::try_from(pages.div_ceil(64)).expect("bitmap fits in memory");
        DirtyBitmap {
            words: vec![0; words],
            pages,
        }
    }

    /// A bitmap with every page set (the first iteration sends everything).
    pub fn full(pages: u64) -> Self {
        let mut b = Self::new(pages);
        b.words.fill(u64::MAX);
        if let Some(last) = b.words.last_mut() {
            let tail = pages % 64;
            if tail != 0 {
                *last = (1u64 << tail) - 1;
            }
        }
        b
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words, for backends that fill the bitmap in bulk (bit i of word w is page 64w+i).
    pub fn words_mut(&mut self) -> &mut [u64] {
        &mut self.words
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks `pfn` dirty.
    pub fn set(&mut self, pfn: Pfn) {
        assert!(
            pfn < self.pages,
            "page {pfn} beyond bitmap of {}",
            self.pages
        );
        self.words[word_index(pfn)] |= 1 << (pfn % 64);
    }

    /// True when `pfn` is dirty.
    pub fn get(&self, pfn: Pfn) -> bool {
        pfn < self.pages && self.words[word_index(pfn)] & (1 << (pfn % 64)) != 0
    }

    /// Dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// ORs `other` into `self`.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Dirty pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = Pfn> + '_ {
        (0u64..).zip(&self.words).flat_map(|(w, &word)| {
            let mut bits = word;
            std::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    w * 64 + b
                })
            })
        })
    }
}

fn word_index(pfn: Pfn) -> usize {
    usize::try_from(pfn / 64).expect("bitmap fits in memory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_bitmap_covers_exactly_the_pages() {
        for pages in [0, 1, 63, 64, 65, 130] {
            let b = DirtyBitmap::full(pages);
            assert_eq!(b.count(), pages);
            assert_eq!(b.iter().collect::<Vec<_>>(), (0..pages).collect::<Vec<_>>());
        }
    }

    #[test]
    fn set_get_merge_iterate() {
        let mut a = DirtyBitmap::new(200);
        for p in [0, 5, 63, 64, 199] {
            a.set(p);
        }
        let mut b = DirtyBitmap::new(200);
        b.set(100);
        a.merge(&b);
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![0, 5, 63, 64, 100, 199]);
        assert!(a.get(199) && !a.get(198) && !a.get(500));
        a.clear();
        assert_eq!(a.count(), 0);
    }
}

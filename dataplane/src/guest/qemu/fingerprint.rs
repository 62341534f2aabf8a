//! Dirty pages of a QEMU guest, found by content: each page's fingerprint is compared with
//! the fingerprint of the copy last sent.
//!
//! QEMU keeps its dirty log to itself, so the backend reads the RAM file instead. Every copy
//! `read_pages` takes is fingerprinted (seeded XXH3-128) and recorded as *sent*. A sweep
//! reads pages again and marks *found* every page whose fingerprint differs.
//!
//! - While the guest runs, a background thread sweeps at most half of one core (it sleeps
//!   as long as each pass took), off the sending path: `collect_dirty` only takes what
//!   passes found so far. A page written after its pass is found by the next one.
//! - Once the guest is paused, one full pass on every core compares every page with what was
//!   sent. That pass is what makes the result exact: a page whose bytes differ from the copy
//!   last sent is always caught, up to a 2^-128 chance of a fingerprint collision per
//!   changed page (the seed is random per migration, so guest content cannot aim at one),
//!   and such a miss would still fail the end-to-end memory digest.
//!
//! Memory: 16 bytes per page (4 MiB per GiB) plus a bit per page.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::ram_file::RamFile;
use crate::guest::{DirtyBitmap, GuestError};
use crate::page::{PAGE_SIZE, Page, Pfn};

/// Pages read per `pread` in a sweep (1 MiB).
const SWEEP_RUN: usize = 256;
/// Shortest time between the starts of two background passes (a small guest would
/// otherwise be swept in a tight loop).
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(20);

/// Fingerprints of the copies sent, and pages found changed since.
#[derive(Debug)]
pub struct Fingerprints {
    /// Per page, the 128-bit fingerprint of the copy last sent; 0 before the first send.
    sent: Box<[[AtomicU64; 2]]>,
    /// Bit per page: a sweep saw content that differs from the copy last sent.
    found: Box<[AtomicU64]>,
    seed: u64,
    pages: u64,
    zero: u128,
}

/// How long a pass took and how much it read.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PassStats {
    /// Pages compared.
    pub pages: u64,
    /// Pages found changed.
    pub changed: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl PassStats {
    /// Milliseconds per GiB of guest memory.
    pub fn ms_per_gib(&self) -> f64 {
        let gib = (self.pages * PAGE_SIZE as u64) as f64 / f64::from(1u32 << 30);
        if gib > 0.0 {
            self.elapsed.as_secs_f64() * 1e3 / gib
        } else {
            0.0
        }
    }
}

impl Fingerprints {
    /// Nothing sent yet, for a guest of `pages` pages; `seed` should be random.
    pub fn new(pages: u64, seed: u64) -> Self {
        let n = usize::try_from(pages).expect("a guest's pages fit in usize");
        let mut f = Fingerprints {
            sent: (0..n)
                .map(|_| [AtomicU64::new(0), AtomicU64::new(0)])
                .collect(),
            found: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            seed,
            pages,
            zero: 0,
        };
        f.zero = f.of(&Page::zeroed());
        f
    }

    /// The fingerprint of `page` (never 0, which means "not sent yet").
    pub fn of(&self, page: &Page) -> u128 {
        if page.is_zero() && self.zero != 0 {
            return self.zero; // common, and a zero check is cheaper than a hash
        }
        xxhash_rust::xxh3::xxh3_128_with_seed(&page.0, self.seed).max(1)
    }

    /// Page `pfn` is about to be copied for sending: what sweeps found of it so far is
    /// about to be sent. Called before the copy, so a change after it is found again.
    pub fn reading(&self, pfn: Pfn) {
        let (w, bit) = word_bit(pfn);
        self.found[w].fetch_and(!bit, Ordering::Relaxed);
    }

    /// The copy of page `pfn` that is being sent has fingerprint `fp`.
    pub fn sent(&self, pfn: Pfn, fp: u128) {
        let s = &self.sent[index(pfn)];
        // Two halves, not one atomic: a sweep that reads them torn sees a mismatch and sends
        // the page once more, which is harmless.
        #[allow(clippy::cast_possible_truncation)] // the halves of a u128
        {
            s[0].store(fp as u64, Ordering::Relaxed);
            s[1].store((fp >> 64) as u64, Ordering::Relaxed);
        }
    }

    fn last_sent(&self, pfn: Pfn) -> u128 {
        let s = &self.sent[index(pfn)];
        u128::from(s[0].load(Ordering::Relaxed)) | (u128::from(s[1].load(Ordering::Relaxed)) << 64)
    }

    /// Moves the pages found so far into `out`.
    pub fn take_found(&self, out: &mut DirtyBitmap) {
        for (o, f) in out.words_mut().iter_mut().zip(self.found.iter()) {
            *o |= f.swap(0, Ordering::Relaxed);
        }
    }

    /// Compares pages `range` with what was sent, marking changed ones found. `all`: the
    /// final pass, where a page never sent counts as changed; otherwise pages not sent yet
    /// are skipped (the current iteration will send them). Stops early when `stop` is set.
    fn sweep(
        &self,
        ram: &RamFile,
        range: std::ops::Range<Pfn>,
        all: bool,
        stop: &AtomicBool,
    ) -> Result<u64, GuestError> {
        let mut buf = vec![Page::zeroed(); SWEEP_RUN];
        let mut changed = 0;
        let mut at = range.start;
        while at < range.end && !stop.load(Ordering::Relaxed) {
            let n = usize::try_from((range.end - at).min(SWEEP_RUN as u64)).expect("small");
            ram.read(at, &mut buf[..n])?;
            for (pfn, page) in (at..).zip(&buf[..n]) {
                let sent = self.last_sent(pfn);
                if (sent == 0 && !all) || sent == self.of(page) {
                    continue;
                }
                let (w, bit) = word_bit(pfn);
                self.found[w].fetch_or(bit, Ordering::Relaxed);
                changed += 1;
            }
            at += n as u64;
        }
        Ok(changed)
    }

    /// [`final_pass`](Self::final_pass) on the calling thread alone (what one background
    /// pass costs, for benchmarks).
    pub fn pass_on_one_thread(&self, ram: &RamFile) -> Result<PassStats, GuestError> {
        let t = Instant::now();
        let changed = self.sweep(ram, 0..self.pages, true, &AtomicBool::new(false))?;
        Ok(PassStats {
            pages: self.pages,
            changed,
            elapsed: t.elapsed(),
        })
    }

    /// One pass over every page on every core: with the guest paused, this finds exactly
    /// the pages that differ from the copies sent.
    pub fn final_pass(&self, ram: &RamFile) -> Result<PassStats, GuestError> {
        let t = Instant::now();
        let threads = std::thread::available_parallelism()
            .map_or(1, std::num::NonZero::get)
            .min(usize::try_from(self.pages.div_ceil(1 << 14)).unwrap_or(1)) // 64 MiB each
            .max(1) as u64;
        let share = self.pages.div_ceil(threads);
        let never = AtomicBool::new(false);
        let changed = std::thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|i| {
                    let range = (i * share).min(self.pages)..((i + 1) * share).min(self.pages);
                    let never = &never;
                    s.spawn(move || self.sweep(ram, range, true, never))
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("sweep thread panicked"))
                .sum::<Result<u64, GuestError>>()
        })?;
        Ok(PassStats {
            pages: self.pages,
            changed,
            elapsed: t.elapsed(),
        })
    }
}

fn index(pfn: Pfn) -> usize {
    usize::try_from(pfn).expect("page number within a mapped guest")
}

fn word_bit(pfn: Pfn) -> (usize, u64) {
    (index(pfn / 64), 1 << (pfn % 64))
}

/// The background sweeper: passes over the whole guest while pre-copy runs.
#[derive(Debug)]
pub struct Sweeper {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    last: Arc<Mutex<Option<PassStats>>>,
}

impl Sweeper {
    /// Starts sweeping `ram` against `fps`. A read error ends the thread with a log line;
    /// the final pass, which does not depend on it, then reports the error.
    pub fn start(fps: Arc<Fingerprints>, ram: Arc<RamFile>) -> Result<Self, GuestError> {
        let stop = Arc::new(AtomicBool::new(false));
        let last = Arc::new(Mutex::new(None));
        let (s, l) = (stop.clone(), last.clone());
        let thread = std::thread::Builder::new()
            .name("sf-qemu-sweep".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match fps.sweep(&ram, 0..fps.pages, false, &s) {
                        Ok(changed) => {
                            let stats = PassStats {
                                pages: fps.pages,
                                changed,
                                elapsed: t.elapsed(),
                            };
                            tracing::debug!(
                                changed,
                                ms = stats.elapsed.as_millis(),
                                ms_per_gib = stats.ms_per_gib(),
                                "fingerprint pass"
                            );
                            *l.lock().expect("sweep stats lock") = Some(stats);
                        }
                        Err(e) => {
                            tracing::warn!("background fingerprint pass: {e}");
                            return;
                        }
                    }
                    // At most half a core: rest as long as the pass ran.
                    let rest = t.elapsed().max(MIN_PASS_INTERVAL);
                    let until = Instant::now() + rest;
                    while !s.load(Ordering::Relaxed) && Instant::now() < until {
                        std::thread::sleep(rest.min(Duration::from_millis(10)));
                    }
                }
            })
            .map_err(|e| GuestError::Backend {
                backend: super::BACKEND,
                op: "start the fingerprint sweeper",
                message: e.to_string(),
            })?;
        Ok(Sweeper {
            stop,
            thread: Some(thread),
            last,
        })
    }

    /// The last complete background pass.
    pub fn last_pass(&self) -> Option<PassStats> {
        *self.last.lock().expect("sweep stats lock")
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::qemu::testutil::TempDir;
    use std::os::unix::fs::FileExt;

    fn page(byte: u8) -> Page {
        Page([byte; PAGE_SIZE])
    }

    #[test]
    fn every_changed_byte_is_found_and_unchanged_pages_are_not() {
        let dir = TempDir::new("fp");
        let path = dir.path().join("ram");
        let pages = 300u64; // more than one sweep run
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(pages * PAGE_SIZE as u64).unwrap();
        for pfn in (0..pages).step_by(3) {
            file.write_all_at(&page(u8::try_from(pfn % 200).unwrap() + 1).0, pfn * 4096)
                .unwrap();
        }
        let ram = RamFile::open(&path).unwrap();
        let fps = Fingerprints::new(pages, 0x5eed);
        // Send everything once, as iteration 1 does.
        let mut copy = vec![Page::zeroed(); usize::try_from(pages).unwrap()];
        ram.read(0, &mut copy).unwrap();
        for (pfn, p) in (0..).zip(&copy) {
            fps.reading(pfn);
            fps.sent(pfn, fps.of(p));
        }
        let stats = fps.final_pass(&ram).unwrap();
        assert_eq!(stats.changed, 0, "nothing changed since it was sent");

        // One byte anywhere in a page, a hole filled, a page zeroed.
        file.write_all_at(&[0xaa], 7 * 4096 + 4095).unwrap();
        file.write_all_at(&[1], 257 * 4096).unwrap();
        file.write_all_at(&page(0).0, 3 * 4096).unwrap();
        let stats = fps.final_pass(&ram).unwrap();
        assert_eq!(stats.changed, 3);
        let mut dirty = DirtyBitmap::new(pages);
        fps.take_found(&mut dirty);
        assert_eq!(dirty.iter().collect::<Vec<_>>(), vec![3, 7, 257]);
        let mut again = DirtyBitmap::new(pages);
        fps.take_found(&mut again);
        assert_eq!(again.count(), 0, "taking clears");
    }

    #[test]
    fn the_background_sweeper_skips_unsent_pages_and_finds_changes() {
        let dir = TempDir::new("sweeper");
        let path = dir.path().join("ram");
        let pages = 64u64;
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(pages * PAGE_SIZE as u64).unwrap();
        let ram = Arc::new(RamFile::open(&path).unwrap());
        let fps = Arc::new(Fingerprints::new(pages, 1));
        // Only pages 0..32 were sent.
        for pfn in 0..32 {
            fps.sent(pfn, fps.of(&Page::zeroed()));
        }
        file.write_all_at(&[9], 5 * 4096).unwrap();
        file.write_all_at(&[9], 40 * 4096).unwrap();
        let sweeper = Sweeper::start(fps.clone(), ram).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while sweeper.last_pass().is_none() {
            assert!(Instant::now() < deadline, "no pass in 10 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(sweeper);
        let mut dirty = DirtyBitmap::new(pages);
        fps.take_found(&mut dirty);
        assert_eq!(
            dirty.iter().collect::<Vec<_>>(),
            vec![5],
            "page 40 was never sent"
        );
    }
}

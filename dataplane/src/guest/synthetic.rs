//! The synthetic guest backend (docs/backends.md): an in-process guest whose
//! writer threads reproduce the memory behaviour of the paper's workloads from a seed
//! ([`super::workload`]).
//!
//! - [`SyntheticGuest`] is the source: guest memory is an anonymous mapping filled per the
//!   workload model, rewritten by rate-controlled writer threads (`synth-writer-N`) that
//!   mark a per-page dirty bit after each write.
//! - [`SyntheticTarget`] is the destination: an anonymous mapping the codec's decoders write
//!   into through [`PageWriter`]s; on [`DestGuest::start`] it runs the same writers from the
//!   state blob, so the guest visibly keeps running after the migration.
//!
//! # Memory access
//!
//! Guest memory is shared with threads that modify it at any time, so no `&`/`&mut [u8]`
//! covers it while writers run. Writers and readers go through atomic 64-bit words
//! ([`AtomicU64`], relaxed) obtained from a raw pointer taken once from the mapping: a copy
//! that races with a write is torn (some words old, some new) but well defined, and harmless,
//! because the writer sets the page's dirty bit (release) after its write: the page is read
//! again in a later iteration. A collector that sees the bit (acquire) also sees the write.
//! A byte slice over the whole mapping is formed only while every writer is parked.
//!
//! Writer threads own disjoint pages (a slice of every tier each), so memory content after
//! `n` writes per writer depends on the seed alone, not on thread timing.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::shm::SharedMemory;
use super::workload::{
    Layout, Modulation, PageAccess, Rng, SALT_PHASE, Workload, WriterCore, WriterState, mix64,
};
use super::{
    DestGuest, DirtyBitmap, GuestError, PageWriter, SourceGuest, memory_digest, memory_digest_known,
};
use crate::codec::PageSink;
use crate::limits::try_vec;
use crate::page::{PAGE_SIZE, Page, PageBatch, Pfn};

const BACKEND: &str = "synthetic";
const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;

/// Most writer threads a guest may have.
pub const MAX_WRITERS: usize = 64;

/// Shortest sleep between write bursts.
const MIN_SLEEP: Duration = Duration::from_millis(2);
/// Longest sleep between write bursts (writers wake on pause and stop anyway).
const MAX_SLEEP: Duration = Duration::from_millis(100);
/// Most time a writer catches up on after falling behind (descheduled, overloaded).
const MAX_CATCH_UP: Duration = Duration::from_millis(50);
/// How long the destination's digest waits for open page writers to be dropped.
const WRITERS_GONE_TIMEOUT: Duration = Duration::from_secs(10);

fn alloc_err(e: crate::limits::LimitError) -> GuestError {
    backend_err("create", e.to_string())
}

fn backend_err(op: &'static str, message: impl Into<String>) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message: message.into(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A writer that panicked leaves consistent control state (see `WriterExit`).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn index_of(pfn: Pfn) -> usize {
    usize::try_from(pfn).expect("page number range-checked against a mapped guest")
}

// ---------------------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------------------

/// A shared-memory mapping of `pages` pages, accessed only through `base`.
struct GuestMemory {
    /// Owns the mapping (unmapped on drop); used only to populate it, so no reference to
    /// guest memory is ever formed through it.
    map: SharedMemory,
    /// Start of the mapping (page-aligned), taken once at creation.
    base: *mut u8,
    len: usize,
    pages: u64,
}

// SAFETY: `GuestMemory` is a pointer to a mapping of a memfd that only it can reach; the mapping is not
// tied to a thread. Every access through `base` is either atomic (`page_words`), or happens
// under the conditions `bytes`, `fill` and the destination's page writers document.
unsafe impl Send for GuestMemory {}
// SAFETY: as for `Send`: shared access goes through atomics or is excluded from running
// concurrently with writes by the callers' protocol (parked writers, page ownership).
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory")
            .field("pages", &self.pages)
            .finish_non_exhaustive()
    }
}

impl GuestMemory {
    fn new(pages: u64, populate: bool) -> Result<Self, GuestError> {
        if pages == 0 {
            return Err(backend_err("create", "a guest needs at least one page"));
        }
        let len = pages
            .checked_mul(PAGE_SIZE as u64)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| backend_err("create", format!("{pages} pages do not fit in memory")))?;
        let mut map = SharedMemory::new("skyferry-synthetic-guest", len, populate)?;
        let base = map.as_mut_ptr();
        Ok(GuestMemory {
            map,
            base,
            len,
            pages,
        })
    }

    fn offset(&self, pfn: Pfn) -> usize {
        assert!(
            pfn < self.pages,
            "{BACKEND}: page {pfn} is beyond the guest's {} pages",
            self.pages
        );
        index_of(pfn) * PAGE_SIZE
    }

    /// Page `pfn` as atomic words.
    fn page_words(&self, pfn: Pfn) -> &[AtomicU64; WORDS_PER_PAGE] {
        let offset = self.offset(pfn);
        // SAFETY: `offset(pfn)` checked `pfn < pages`, so `offset + PAGE_SIZE <= len` and the
        // page lies inside the mapping, which lives as long as `self`. The mapping is
        // page-aligned, so the address meets `AtomicU64`'s 8-byte alignment; `AtomicU64` has
        // `u64`'s size and every bit pattern is valid. While such a reference lives, other
        // accesses to the page are atomic too (writers, `read_pages`), or non-atomic reads
        // with no write running (`bytes`): no data race. The only non-atomic writes, the
        // initial `fill` (`&mut self`, before the memory is shared) and the destination's
        // `&mut Page`s (only while no engine runs and no digest is taken), never overlap a
        // use of these words.
        unsafe { &*self.base.add(offset).cast::<[AtomicU64; WORDS_PER_PAGE]>() }
    }

    /// All of guest memory as bytes.
    ///
    /// # Safety
    /// No thread may write guest memory while the returned slice is alive (writers parked
    /// or stopped, no destination page writer open).
    unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: `base` points to `len` mapped bytes that live as long as `self`, and the
        // caller guarantees no write happens while the slice lives; concurrent atomic loads
        // (`read_pages`) are reads and do not conflict with it.
        unsafe { std::slice::from_raw_parts(self.base, self.len) }
    }

    /// Writes the initial content of every non-zero page (zero pages are left untouched, so
    /// they cost no memory), in parallel.
    fn fill(&mut self, layout: &Layout) {
        // SAFETY: `&mut self` is exclusive and the memory is not yet shared (no writer or
        // reader exists before the guest is built), so this is the only access to the
        // `len` mapped bytes at `base` while the slice lives.
        let mem = unsafe { std::slice::from_raw_parts_mut(self.base, self.len) };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let chunk_pages = index_of(self.pages).div_ceil(threads).max(1);
        std::thread::scope(|s| {
            for (i, chunk) in mem.chunks_mut(chunk_pages * PAGE_SIZE).enumerate() {
                s.spawn(move || {
                    let mut page = Box::new(Page::zeroed());
                    let mut scratch = Box::new(Page::zeroed());
                    let first = (i * chunk_pages) as u64;
                    for (pfn, dst) in (first..).zip(chunk.chunks_exact_mut(PAGE_SIZE)) {
                        if layout.kind(pfn).is_some() {
                            layout.initial_page(pfn, &mut page, &mut scratch);
                            dst.copy_from_slice(&page.0);
                        }
                    }
                });
            }
        });
    }
}

impl PageAccess for GuestMemory {
    fn load(&self, pfn: Pfn, out: &mut Page) {
        let (dst, _) = out.0.as_chunks_mut::<8>();
        for (d, w) in dst.iter_mut().zip(self.page_words(pfn)) {
            *d = w.load(Ordering::Relaxed).to_ne_bytes();
        }
    }

    fn store(&self, pfn: Pfn, new: &Page, old: Option<&Page>) {
        let (new, _) = new.0.as_chunks::<8>();
        let words = self.page_words(pfn);
        match old {
            Some(old) => {
                let (old, _) = old.0.as_chunks::<8>();
                for ((n, o), w) in new.iter().zip(old).zip(words) {
                    if n != o {
                        w.store(u64::from_ne_bytes(*n), Ordering::Relaxed);
                    }
                }
            }
            None => {
                for (n, w) in new.iter().zip(words) {
                    w.store(u64::from_ne_bytes(*n), Ordering::Relaxed);
                }
            }
        }
    }
}

/// One bit per page, set by writers after each write.
#[derive(Debug)]
struct DirtyLog {
    words: Box<[AtomicU64]>,
}

impl DirtyLog {
    fn new(pages: u64) -> Self {
        DirtyLog {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn mark(&self, pfn: Pfn) {
        self.words[index_of(pfn / 64)].fetch_or(1 << (pfn % 64), Ordering::Release);
    }

    fn clear(&self) {
        for w in &self.words {
            w.swap(0, Ordering::AcqRel);
        }
    }

    fn collect(&self, into: &mut [u64]) {
        for (w, d) in self.words.iter().zip(into) {
            *d |= w.swap(0, Ordering::AcqRel);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writer threads
// ---------------------------------------------------------------------------------------

/// What the writers and their controller share.
#[derive(Debug)]
struct EngineShared {
    mem: Arc<GuestMemory>,
    dirty: DirtyLog,
    layout: Arc<Layout>,
    speed: f64,
    /// Auto-converge: percent of the write rate taken away.
    throttle: AtomicU8,
    /// Set while a pause or stop is requested: writers check it between page writes.
    attention: AtomicBool,
    /// Page writes so far.
    writes: AtomicU64,
    ctl: Mutex<Control>,
    cv: Condvar,
}

#[derive(Debug)]
struct Control {
    pause: bool,
    stop: bool,
    /// Writers waiting in the pause.
    parked: usize,
    /// Writer threads that have not exited.
    running: usize,
    /// Each writer's state, as of its last park or its exit.
    states: Vec<WriterState>,
}

impl Control {
    /// No write is in flight and none can start while the lock is held.
    fn quiescent(&self) -> bool {
        self.running == 0 || (self.pause && self.parked == self.running)
    }
}

/// Writer threads over a guest memory, with pause, resume and stop.
#[derive(Debug)]
struct Engine {
    shared: Arc<EngineShared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Engine {
    fn start(
        mem: Arc<GuestMemory>,
        layout: Arc<Layout>,
        speed: f64,
        states: Vec<WriterState>,
    ) -> Result<Engine, GuestError> {
        let count = states.len();
        let pages = mem.pages;
        let engine = Engine {
            shared: Arc::new(EngineShared {
                mem,
                dirty: DirtyLog::new(pages),
                layout,
                speed,
                throttle: AtomicU8::new(0),
                attention: AtomicBool::new(false),
                writes: AtomicU64::new(0),
                ctl: Mutex::new(Control {
                    pause: false,
                    stop: false,
                    parked: 0,
                    running: 0,
                    states: states.clone(),
                }),
                cv: Condvar::new(),
            }),
            threads: Mutex::new(Vec::with_capacity(count)),
        };
        for (index, state) in states.into_iter().enumerate() {
            let core = WriterCore::new(engine.shared.layout.clone(), index, count, state);
            let shared = engine.shared.clone();
            lock(&engine.shared.ctl).running += 1;
            let spawned = std::thread::Builder::new()
                .name(format!("synth-writer-{index}"))
                .spawn(move || run_writer(&shared, index, core));
            match spawned {
                Ok(handle) => lock(&engine.threads).push(handle),
                Err(e) => {
                    lock(&engine.shared.ctl).running -= 1;
                    // Dropping the engine stops the writers already started.
                    return Err(backend_err("start writer thread", e.to_string()));
                }
            }
        }
        Ok(engine)
    }

    fn pause(&self) {
        let s = &self.shared;
        let mut ctl = lock(&s.ctl);
        ctl.pause = true;
        s.attention.store(true, Ordering::Release);
        s.cv.notify_all();
        while !ctl.quiescent() {
            ctl = s.cv.wait(ctl).unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn resume(&self) -> Result<(), GuestError> {
        let s = &self.shared;
        let mut ctl = lock(&s.ctl);
        if ctl.stop {
            return Err(backend_err(
                "resume",
                "guest was handed over to the destination; it must not run here",
            ));
        }
        ctl.pause = false;
        s.attention.store(false, Ordering::Release);
        s.cv.notify_all();
        Ok(())
    }

    /// Runs `f` while no write is in flight and none can start, or fails if writers run.
    fn quiescent<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(&Control) -> R,
    ) -> Result<R, GuestError> {
        let ctl = lock(&self.shared.ctl);
        if !ctl.quiescent() {
            return Err(backend_err(op, "the guest is running; pause it first"));
        }
        Ok(f(&ctl))
    }

    /// Stops the writers for good and joins them.
    fn stop(&self) -> Result<(), GuestError> {
        {
            let s = &self.shared;
            let mut ctl = lock(&s.ctl);
            ctl.stop = true;
            s.attention.store(true, Ordering::Release);
            s.cv.notify_all();
        }
        let handles = std::mem::take(&mut *lock(&self.threads));
        let panicked = handles
            .into_iter()
            .map(JoinHandle::join)
            .filter(Result::is_err)
            .count();
        if panicked > 0 {
            return Err(backend_err(
                "stop writers",
                format!("{panicked} writer thread(s) panicked"),
            ));
        }
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Joins the writers while the memory they write is certainly alive (they hold it too).
        let _ = self.stop();
    }
}

/// Marks a writer gone even if it panics, so `pause` never waits for a dead thread.
struct WriterExit<'a>(&'a EngineShared);

impl Drop for WriterExit<'_> {
    fn drop(&mut self) {
        let mut ctl = lock(&self.0.ctl);
        ctl.running -= 1;
        self.0.cv.notify_all();
    }
}

/// The rate multiplier over time (Fig. 7b's varying rate); timing only, not content.
struct Phases {
    modulation: Option<Modulation>,
    rng: Rng,
    until: Instant,
    multiplier: f64,
}

impl Phases {
    fn new(modulation: Option<Modulation>, seed: u64) -> Self {
        Phases {
            modulation,
            rng: Rng::new(mix64(seed ^ SALT_PHASE)),
            until: Instant::now(),
            multiplier: 1.0,
        }
    }

    fn multiplier(&mut self, now: Instant) -> f64 {
        let Some(m) = self.modulation else {
            return 1.0;
        };
        if now >= self.until {
            self.multiplier = m.low + (m.high - m.low) * self.rng.unit();
            let (lo, hi) = m.phase_secs;
            self.until = now + Duration::from_secs_f64(lo + (hi - lo) * self.rng.unit());
        }
        self.multiplier
    }
}

fn run_writer(shared: &EngineShared, index: usize, mut core: WriterCore) {
    let _exit = WriterExit(shared);
    let rate = core.rate() * shared.speed;
    let mut phases = Phases::new(
        shared.layout.workload().params().modulation,
        shared.layout.seed(),
    );
    let mut budget = 0.0f64;
    let mut last = Instant::now();
    loop {
        if shared.attention.load(Ordering::Acquire) {
            let mut ctl = lock(&shared.ctl);
            if ctl.pause && !ctl.stop {
                ctl.states[index] = core.state();
                ctl.parked += 1;
                shared.cv.notify_all();
                while ctl.pause && !ctl.stop {
                    ctl = shared.cv.wait(ctl).unwrap_or_else(PoisonError::into_inner);
                }
                ctl.parked -= 1;
                // Paused time is not owed.
                last = Instant::now();
            }
            if ctl.stop {
                ctl.states[index] = core.state();
                return;
            }
            continue;
        }

        let now = Instant::now();
        let dt = now.duration_since(last).min(MAX_CATCH_UP).as_secs_f64();
        last = now;
        let kept = f64::from(100 - shared.throttle.load(Ordering::Relaxed).min(100)) / 100.0;
        let r = rate * phases.multiplier(now) * kept;
        budget = (budget + r * dt).min(r * MAX_CATCH_UP.as_secs_f64() + 1.0);
        while budget >= 1.0 && !shared.attention.load(Ordering::Relaxed) {
            if let Some(pfn) = core.step(&*shared.mem) {
                // After the write: a collector that sees the bit sees the write.
                shared.dirty.mark(pfn);
                shared.writes.fetch_add(1, Ordering::Relaxed);
            }
            budget -= 1.0;
        }

        // Sleep until the next write is due, at least as long as the burst took: a writer
        // that cannot keep up uses at most half a core instead of spinning.
        let busy = now.elapsed();
        let due = if r > 0.0 {
            Duration::from_secs_f64(((1.0 - budget).max(0.0) / r).min(MAX_SLEEP.as_secs_f64()))
        } else {
            MAX_SLEEP
        };
        let sleep = due.clamp(MIN_SLEEP, MAX_SLEEP).max(busy);
        let ctl = lock(&shared.ctl);
        if !ctl.pause && !ctl.stop {
            drop(shared.cv.wait_timeout(ctl, sleep));
        }
    }
}

// ---------------------------------------------------------------------------------------
// State blob
// ---------------------------------------------------------------------------------------

const STATE_MAGIC: [u8; 4] = *b"SFSG";
const STATE_VERSION: u16 = 1;

/// The synthetic guest's "CPU state": where every writer is in its sequence.
#[derive(Debug, Clone, PartialEq)]
struct SavedState {
    workload: Workload,
    seed: u64,
    pages: u64,
    speed: f64,
    writers: Vec<WriterState>,
}

/// The state blob of a guest that runs nothing: an idle-model synthetic guest at speed 0.
/// Guests without writers of their own (an [`ImageGuest`](super::image::ImageGuest)) send it,
/// so a [`SyntheticTarget`] can receive them and "run" them after the commit.
pub fn stopped_state(pages: u64) -> Vec<u8> {
    SavedState {
        workload: Workload::Idle,
        seed: 0,
        pages,
        speed: 0.0,
        writers: vec![WriterState::initial(Workload::Idle, 0, 0)],
    }
    .encode()
}

impl SavedState {
    /// Little-endian: magic, version u16, name length u8 and name, seed u64, pages u64,
    /// speed f64 bits u64, writers u16, tiers u8, then per writer rng u64, steps u64 and a
    /// sweep cursor u64 per tier.
    fn encode(&self) -> Vec<u8> {
        let name = self.workload.name().as_bytes();
        let tiers = self.workload.params().tiers.len();
        let mut b = Vec::with_capacity(40 + name.len() + self.writers.len() * (16 + 8 * tiers));
        b.extend_from_slice(&STATE_MAGIC);
        b.extend_from_slice(&STATE_VERSION.to_le_bytes());
        b.push(u8::try_from(name.len()).expect("model names are short"));
        b.extend_from_slice(name);
        for v in [self.seed, self.pages, self.speed.to_bits()] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(
            &u16::try_from(self.writers.len())
                .expect("at most MAX_WRITERS")
                .to_le_bytes(),
        );
        b.push(u8::try_from(tiers).expect("few tiers"));
        for w in &self.writers {
            b.extend_from_slice(&w.rng.to_le_bytes());
            b.extend_from_slice(&w.steps.to_le_bytes());
            for c in &w.cursors {
                b.extend_from_slice(&c.to_le_bytes());
            }
        }
        b
    }

    fn decode(blob: &[u8]) -> Result<Self, GuestError> {
        let bad = |m: &str| GuestError::BadState(format!("{BACKEND}: {m}"));
        let mut r = Reader(blob);
        if r.take(4).map_err(|_| bad("too short"))? != STATE_MAGIC {
            return Err(bad("not a synthetic guest state (bad magic)"));
        }
        let version = r.u16()?;
        if version != STATE_VERSION {
            return Err(bad(&format!("version {version}, expected {STATE_VERSION}")));
        }
        let name_len = usize::from(r.u8()?);
        let name =
            std::str::from_utf8(r.take(name_len)?).map_err(|_| bad("model name is not UTF-8"))?;
        let workload: Workload = name
            .parse()
            .map_err(|e: super::workload::UnknownWorkload| bad(&e.to_string()))?;
        let seed = r.u64()?;
        let pages = r.u64()?;
        let speed = f64::from_bits(r.u64()?);
        if !(speed.is_finite() && speed >= 0.0) {
            return Err(bad(&format!(
                "speed {speed} is not a finite non-negative number"
            )));
        }
        let count = usize::from(r.u16()?);
        if !(1..=MAX_WRITERS).contains(&count) {
            return Err(bad(&format!("{count} writers, expected 1..={MAX_WRITERS}")));
        }
        let tiers = usize::from(r.u8()?);
        if tiers != workload.params().tiers.len() {
            return Err(bad(&format!(
                "{tiers} tiers, model {workload} has {}",
                workload.params().tiers.len()
            )));
        }
        let mut writers = Vec::with_capacity(count);
        for _ in 0..count {
            let rng = r.u64()?;
            let steps = r.u64()?;
            let cursors = (0..tiers).map(|_| r.u64()).collect::<Result<_, _>>()?;
            writers.push(WriterState {
                rng,
                steps,
                cursors,
            });
        }
        if !r.0.is_empty() {
            return Err(bad(&format!("{} bytes after the end", r.0.len())));
        }
        Ok(SavedState {
            workload,
            seed,
            pages,
            speed,
            writers,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GuestError> {
        if self.0.len() < n {
            return Err(GuestError::BadState(format!(
                "{BACKEND}: state blob cut short"
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, GuestError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, GuestError> {
        let (b, _) = self.take(2)?.as_chunks::<2>();
        Ok(u16::from_le_bytes(b[0]))
    }

    fn u64(&mut self) -> Result<u64, GuestError> {
        let (b, _) = self.take(8)?.as_chunks::<8>();
        Ok(u64::from_le_bytes(b[0]))
    }
}

// ---------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------

/// How a synthetic guest runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticOptions {
    /// Multiplies every write rate of the model (0 stops writes; tests use 10-1000).
    pub speed: f64,
    /// Writer threads (each owns a slice of every tier).
    pub writers: usize,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        SyntheticOptions {
            speed: 1.0,
            writers: 1,
        }
    }
}

/// A running synthetic guest at the source.
#[derive(Debug)]
pub struct SyntheticGuest {
    engine: Engine,
    options: SyntheticOptions,
}

static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

impl SyntheticGuest {
    /// A `pages`-page guest running `workload` from `seed` at speed 1.0 with one writer.
    pub fn new(pages: u64, workload: Workload, seed: u64) -> Result<Self, GuestError> {
        Self::with_options(pages, workload, seed, SyntheticOptions::default())
    }

    /// A guest with explicit options. Fills memory per the model, then starts the writers.
    pub fn with_options(
        pages: u64,
        workload: Workload,
        seed: u64,
        options: SyntheticOptions,
    ) -> Result<Self, GuestError> {
        if !(options.speed.is_finite() && options.speed >= 0.0) {
            return Err(backend_err(
                "create",
                format!("speed {} must be finite and >= 0", options.speed),
            ));
        }
        if !(1..=MAX_WRITERS).contains(&options.writers) {
            return Err(backend_err(
                "create",
                format!("{} writers, expected 1..={MAX_WRITERS}", options.writers),
            ));
        }
        let layout = Arc::new(Layout::new(workload, pages, seed).map_err(alloc_err)?);
        let mut mem = GuestMemory::new(pages, false)?;
        mem.fill(&layout);
        let states = (0..options.writers)
            .map(|i| WriterState::initial(workload, seed, i))
            .collect();
        let engine = Engine::start(Arc::new(mem), layout, options.speed, states)?;
        Ok(SyntheticGuest { engine, options })
    }

    /// Faults in every page the model left untouched (zero pages cost no memory until
    /// then), as a real guest's memory is resident: benchmarks call it so that reading a
    /// zero page costs what it costs on a hypervisor, not a page allocation.
    pub fn preallocate(&self) -> Result<(), GuestError> {
        self.engine.shared.mem.map.populate()
    }

    /// The workload model.
    pub fn workload(&self) -> Workload {
        self.engine.shared.layout.workload()
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.engine.shared.layout.seed()
    }

    /// The options it runs with.
    pub fn options(&self) -> SyntheticOptions {
        self.options
    }

    /// Where the model put content and tiers.
    pub fn layout(&self) -> &Layout {
        &self.engine.shared.layout
    }

    /// Page writes so far (for status and rate checks).
    pub fn writes(&self) -> u64 {
        self.engine.shared.writes.load(Ordering::Relaxed)
    }

    /// Runs `f` over all of guest memory while paused (tests, measurements); fails if the
    /// guest runs. `f` runs under the guest's control lock: it must not call the guest.
    pub fn with_memory<R>(&self, f: impl FnOnce(&[u8]) -> R) -> Result<R, GuestError> {
        let mem = &self.engine.shared.mem;
        // SAFETY: `quiescent` runs the closure with the control lock held and only when
        // every writer is parked or gone, and none can resume before the lock is released,
        // so no write happens while the slice lives.
        self.engine
            .quiescent("read memory", |_| f(unsafe { mem.bytes() }))
    }
}

impl SourceGuest for SyntheticGuest {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.engine.shared.mem.pages
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        // The log always runs; starting it forgets earlier writes (the first iteration reads
        // every page after this point anyway).
        self.engine.shared.dirty.clear();
        Ok(())
    }

    fn collect_dirty(&self, bitmap: &mut DirtyBitmap) -> Result<(), GuestError> {
        let pages = self.page_count();
        if bitmap.pages() != pages {
            return Err(backend_err(
                "collect dirty log",
                format!(
                    "bitmap covers {} pages, the guest has {pages}",
                    bitmap.pages()
                ),
            ));
        }
        self.engine.shared.dirty.collect(bitmap.words_mut());
        Ok(())
    }

    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError> {
        let mem = &self.engine.shared.mem;
        if let Some(&pfn) = pfns.iter().find(|&&p| p >= mem.pages) {
            return Err(GuestError::PageOutOfRange {
                pfn,
                page_count: mem.pages,
            });
        }
        for &pfn in pfns {
            mem.load(pfn, batch.push(pfn, &ZERO_PAGE));
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        self.engine.pause();
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.engine.resume()
    }

    /// Scales the writers' rate: the synthetic guest's vCPU time is its write rate.
    fn throttle(&self, percent: u8) -> Result<(), GuestError> {
        self.engine
            .shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
        Ok(())
    }

    fn state(&self) -> Result<Vec<u8>, GuestError> {
        let layout = &self.engine.shared.layout;
        self.engine.quiescent("save state", |ctl| {
            SavedState {
                workload: layout.workload(),
                seed: layout.seed(),
                pages: layout.pages(),
                speed: self.options.speed,
                writers: ctl.states.clone(),
            }
            .encode()
        })
    }

    fn memory_digest(&self) -> Result<u64, GuestError> {
        self.with_memory(memory_digest)
    }

    fn memory_digest_with(
        &self,
        known: &(dyn Fn(usize) -> Option<u64> + Sync),
    ) -> Result<u64, GuestError> {
        self.with_memory(|m| memory_digest_known(m, known))
    }

    fn hand_over(&self) -> Result<(), GuestError> {
        self.engine.stop()
    }
}

// ---------------------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------------------

/// The guest being built at the destination.
#[derive(Debug)]
pub struct SyntheticTarget {
    inner: Arc<TargetInner>,
}

#[derive(Debug)]
struct TargetInner {
    mem: Arc<GuestMemory>,
    /// Which page writer holds each page (0: none yet).
    owners: Box<[AtomicU32]>,
    ctl: Mutex<TargetControl>,
    cv: Condvar,
}

#[derive(Debug)]
struct TargetControl {
    next_writer: u32,
    /// Page writers not yet dropped.
    live: Vec<u32>,
    state: Option<SavedState>,
    engine: Option<Engine>,
}

impl SyntheticTarget {
    /// An empty (all-zero) guest of `pages` pages, its memory faulted in as pages arrive.
    pub fn new(pages: u64) -> Result<Self, GuestError> {
        Self::build(pages, false)
    }

    /// An empty guest whose memory is faulted in now, as a hypervisor that preallocates
    /// guest memory does (benchmarks use it to keep page-fault cost out of the pipeline's).
    pub fn preallocated(pages: u64) -> Result<Self, GuestError> {
        Self::build(pages, true)
    }

    fn build(pages: u64, populate: bool) -> Result<Self, GuestError> {
        let mem = GuestMemory::new(pages, populate)?;
        Ok(SyntheticTarget {
            inner: Arc::new(TargetInner {
                owners: try_vec("page owners", index_of(pages), |_| AtomicU32::new(0))
                    .map_err(alloc_err)?
                    .into(),
                mem: Arc::new(mem),
                ctl: Mutex::new(TargetControl {
                    next_writer: 1,
                    live: Vec::new(),
                    state: None,
                    engine: None,
                }),
                cv: Condvar::new(),
            }),
        })
    }

    /// Page writes since [`start`](DestGuest::start) (0 before).
    pub fn writes(&self) -> u64 {
        lock(&self.inner.ctl)
            .engine
            .as_ref()
            .map_or(0, |e| e.shared.writes.load(Ordering::Relaxed))
    }
}

impl TargetInner {
    /// Records that writer `id` writes `pfn`; panics if another open writer holds it.
    fn claim(&self, pfn: Pfn, id: u32) {
        let slot = &self.owners[index_of(pfn)];
        let current = slot.load(Ordering::Acquire);
        if current == id
            || (current == 0
                && slot
                    .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok())
        {
            return;
        }
        // Held by another writer: take it over only if that writer is gone (its writes
        // happened before its drop, which released this lock).
        let ctl = lock(&self.ctl);
        let current = slot.load(Ordering::Acquire);
        if current != id && ctl.live.contains(&current) {
            drop(ctl);
            panic!(
                "{BACKEND}: page {pfn} is written by two open page writers; \
                 the ownership sets given to DestGuest::writer overlap"
            );
        }
        slot.store(id, Ordering::Release);
    }
}

/// Writes one stream's pages into the destination guest.
struct TargetWriter {
    inner: Arc<TargetInner>,
    id: u32,
    owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
}

impl std::fmt::Debug for TargetWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetWriter")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl PageSink for TargetWriter {
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
        let mem = &self.inner.mem;
        assert!(
            pfn < mem.pages,
            "{BACKEND}: page {pfn} is beyond the guest's {} pages",
            mem.pages
        );
        assert!(
            (self.owns)(pfn),
            "{BACKEND}: page {pfn} arrived on a stream whose writer does not own it"
        );
        self.inner.claim(pfn, self.id);
        let offset = mem.offset(pfn);
        // SAFETY: `offset + PAGE_SIZE <= len` (checked `pfn < pages`), inside the mapping,
        // which `self.inner` keeps alive; the mapping is page-aligned and offsets are page
        // multiples, so the address meets `Page`'s 64-byte alignment, and `Page` is 4096
        // plain bytes (any content is valid). The reference is exclusive: `claim` made this
        // writer the page's only holder among open writers; the borrow of `&mut self` stops
        // this writer from handing out the page twice; the guest's own writers do not run
        // while any page writer is open (`start` refuses, `writer` refuses after start), and
        // the digest waits until every page writer is dropped.
        unsafe { &mut *mem.base.add(offset).cast::<Page>() }
    }

    fn zero_page(&mut self, pfn: Pfn) {
        // A fresh destination is all zeros: reading is cheaper than writing, and leaves the
        // cache lines clean.
        let page = self.page_mut(pfn);
        if !page.is_zero() {
            page.0.fill(0);
        }
    }
}

impl PageWriter for TargetWriter {}

impl Drop for TargetWriter {
    fn drop(&mut self) {
        let mut ctl = lock(&self.inner.ctl);
        ctl.live.retain(|&id| id != self.id);
        self.inner.cv.notify_all();
    }
}

impl DestGuest for SyntheticTarget {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.inner.mem.pages
    }

    fn writer(
        &self,
        owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    ) -> Result<Box<dyn PageWriter>, GuestError> {
        let mut ctl = lock(&self.inner.ctl);
        if ctl.engine.is_some() {
            return Err(backend_err(
                "open page writer",
                "the guest already runs here",
            ));
        }
        let id = ctl.next_writer;
        ctl.next_writer = id
            .checked_add(1)
            .ok_or_else(|| backend_err("open page writer", "too many page writers"))?;
        ctl.live.push(id);
        Ok(Box::new(TargetWriter {
            inner: self.inner.clone(),
            id,
            owns,
        }))
    }

    fn set_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let state = SavedState::decode(blob)?;
        if state.pages != self.inner.mem.pages {
            return Err(GuestError::SizeMismatch {
                source_pages: state.pages,
                dest_pages: self.inner.mem.pages,
            });
        }
        let mut ctl = lock(&self.inner.ctl);
        if ctl.engine.is_some() {
            return Err(backend_err("set state", "the guest already runs here"));
        }
        ctl.state = Some(state);
        Ok(())
    }

    /// Waits (up to 10 s, then panics) until every page writer has been dropped; briefly
    /// pauses the guest if it runs.
    fn memory_digest(&self) -> u64 {
        self.memory_digest_with(&|_| None)
    }

    fn memory_digest_with(&self, known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> u64 {
        let inner = &*self.inner;
        let deadline = Instant::now() + WRITERS_GONE_TIMEOUT;
        let mut ctl = lock(&inner.ctl);
        while !ctl.live.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{BACKEND}: memory digest requested while {} page writer(s) are still open",
                ctl.live.len()
            );
            ctl = inner
                .cv
                .wait_timeout(ctl, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        match &ctl.engine {
            Some(engine) => {
                engine.pause();
                let digest = engine
                    .quiescent("digest", |_| {
                        // SAFETY: every writer is parked and cannot resume while the engine's
                        // control lock is held (we run inside `quiescent`); no page writer is
                        // open and none can be opened after start.
                        memory_digest_known(unsafe { inner.mem.bytes() }, known)
                    })
                    .expect("writers parked by pause");
                // Only `hand_over`-like stops make resume fail; the target never stops its
                // engine before drop.
                let _ = engine.resume();
                digest
            }
            // SAFETY: no page writer is open, none can be opened while `ctl` is held, and no
            // engine runs: nothing writes guest memory while the slice lives.
            None => memory_digest_known(unsafe { inner.mem.bytes() }, known),
        }
    }

    fn start(&self) -> Result<(), GuestError> {
        let mut ctl = lock(&self.inner.ctl);
        if ctl.engine.is_some() {
            return Err(backend_err("start", "the guest already runs here"));
        }
        if !ctl.live.is_empty() {
            return Err(backend_err(
                "start",
                format!("{} page writer(s) still open", ctl.live.len()),
            ));
        }
        let state = ctl
            .state
            .clone()
            .ok_or_else(|| GuestError::BadState(format!("{BACKEND}: no state installed")))?;
        let layout =
            Arc::new(Layout::new(state.workload, state.pages, state.seed).map_err(alloc_err)?);
        let engine = Engine::start(self.inner.mem.clone(), layout, state.speed, state.writers)?;
        ctl.engine = Some(engine);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{CodecConfig, CodecStats, Decoder, Encoder};
    use crate::frame::{DEFAULT_FRAME_SIZE, FrameBuf};
    use crate::guest::workload::InitialShares;
    use std::collections::BTreeSet;

    const MIB: u64 = 256; // pages per MiB

    fn guest(workload: Workload, mib: u64, speed: f64) -> SyntheticGuest {
        SyntheticGuest::with_options(
            mib * MIB,
            workload,
            42,
            SyntheticOptions { speed, writers: 1 },
        )
        .expect("guest")
    }

    fn snapshot(g: &SyntheticGuest) -> Vec<u8> {
        g.with_memory(<[u8]>::to_vec).expect("paused")
    }

    fn changed_pages(a: &[u8], b: &[u8]) -> BTreeSet<Pfn> {
        (0u64..)
            .zip(a.chunks_exact(PAGE_SIZE).zip(b.chunks_exact(PAGE_SIZE)))
            .filter(|(_, (x, y))| x != y)
            .map(|(p, _)| p)
            .collect()
    }

    fn shares(workload: Workload) -> InitialShares {
        let g = guest(workload, 16, 0.0);
        g.pause().unwrap();
        let s = g.with_memory(InitialShares::measure).unwrap();
        eprintln!(
            "{workload}: zero pages {:.1}%, zero blocks {:.1}%, duplicate blocks {:.1}%, redundancy {:.1}%",
            100.0 * s.zero_pages,
            100.0 * s.zero_blocks,
            100.0 * s.duplicate_blocks,
            100.0 * s.redundancy()
        );
        s
    }

    #[test]
    fn initial_shares_kernel() {
        let s = shares(Workload::Kernel);
        // Fig. 13a: ~13% redundancy (with a 100 MB cache, which finds about half the
        // duplicates of a 1 GiB guest; all of them here), less than half of it zero pages.
        assert!((0.05..=0.07).contains(&s.zero_pages), "{s:?}");
        assert!((0.12..=0.18).contains(&s.redundancy()), "{s:?}");
        assert!(s.zero_pages < s.redundancy() / 2.0, "{s:?}");
    }

    #[test]
    fn initial_shares_tpcw() {
        let s = shares(Workload::Tpcw);
        assert!((0.02..=0.04).contains(&s.zero_pages), "{s:?}");
        assert!(s.redundancy() < 0.12, "{s:?}");
    }

    #[test]
    fn initial_shares_specjbb() {
        let s = shares(Workload::Specjbb);
        // Fig. 13a: the most redundancy, most of it zero pages.
        assert!((0.40..=0.50).contains(&s.zero_pages), "{s:?}");
        assert!(s.zero_pages > 0.8 * s.redundancy(), "{s:?}");
    }

    #[test]
    fn initial_shares_idle() {
        let s = shares(Workload::Idle);
        assert!((0.55..=0.65).contains(&s.zero_pages), "{s:?}");
    }

    #[test]
    fn same_seed_same_memory() {
        let a = guest(Workload::Tpcw, 4, 0.0);
        let b = guest(Workload::Tpcw, 4, 0.0);
        a.pause().unwrap();
        b.pause().unwrap();
        assert_eq!(a.memory_digest().unwrap(), b.memory_digest().unwrap());
    }

    /// Every page whose content changed between two pause points is in the dirty log, with
    /// collections running concurrently with the writers in between.
    #[test]
    fn collect_dirty_never_loses_a_page() {
        for workload in [Workload::Kernel, Workload::Specjbb] {
            let g = guest(workload, 8, 200.0);
            g.pause().unwrap();
            g.start_dirty_log().unwrap();
            let mut before = snapshot(&g);
            for _round in 0..3 {
                let mut dirty = DirtyBitmap::new(g.page_count());
                g.resume().unwrap();
                for _ in 0..4 {
                    std::thread::sleep(Duration::from_millis(15));
                    g.collect_dirty(&mut dirty).unwrap();
                }
                g.pause().unwrap();
                g.collect_dirty(&mut dirty).unwrap();
                let after = snapshot(&g);
                let changed = changed_pages(&before, &after);
                let reported: BTreeSet<Pfn> = dirty.iter().collect();
                assert!(!changed.is_empty(), "{workload}: writers wrote nothing");
                let lost: Vec<_> = changed.difference(&reported).collect();
                assert!(
                    lost.is_empty(),
                    "{workload}: changed but not reported: {lost:?}"
                );
                // Reported but unchanged: only a page rewritten back to its old content.
                let extra = reported.difference(&changed).count();
                assert!(
                    extra * 50 <= reported.len(),
                    "{workload}: {extra} of {} reported pages unchanged",
                    reported.len()
                );
                before = after;
            }
        }
    }

    #[test]
    fn pause_stops_every_write() {
        let g = guest(Workload::Specjbb, 8, 100.0);
        std::thread::sleep(Duration::from_millis(20));
        g.pause().unwrap();
        let d1 = g.memory_digest().unwrap();
        let w1 = g.writes();
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(g.memory_digest().unwrap(), d1);
        assert_eq!(g.writes(), w1);
        g.resume().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert!(g.memory_digest().is_err(), "digest while running must fail");
        g.pause().unwrap();
        assert_ne!(g.memory_digest().unwrap(), d1, "writers never resumed");
    }

    #[test]
    fn writers_follow_the_rate() {
        // tpcw at 32 MiB: 52.5k/s * 1/32 * speed 2 = ~3.3k writes/s (modulated 0.9-1.1).
        let g = guest(Workload::Tpcw, 32, 2.0);
        let expect = 52_500.0 * 32.0 / 1024.0 * 2.0;
        std::thread::sleep(Duration::from_millis(400));
        let rate = g.writes() as f64 / 0.4;
        assert!(
            (0.5 * expect..=1.3 * expect).contains(&rate),
            "{rate} writes/s, expected ~{expect}"
        );
    }

    #[test]
    fn specjbb_hot_set_is_never_clean() {
        // Speed 20: the eden sweep passes every 10 ms.
        let g = guest(Workload::Specjbb, 16, 20.0);
        g.start_dirty_log().unwrap();
        let hot = g.layout().tiers()[0].clone();
        for _ in 0..3 {
            // Wait for writes rather than time: on a loaded machine the writer may not run
            // for a while, and a sweep is what the claim is about (20 writes per hot page
            // cover one whatever the tiers' shares).
            let w0 = g.writes();
            let deadline = Instant::now() + Duration::from_secs(30);
            while g.writes() - w0 < 20 * hot.len() as u64 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut dirty = DirtyBitmap::new(g.page_count());
            g.collect_dirty(&mut dirty).unwrap();
            let clean = hot.iter().filter(|&&p| !dirty.get(p)).count();
            assert!(
                clean * 20 < hot.len(),
                "{clean} of {} hot pages clean",
                hot.len()
            );
        }
    }

    #[test]
    fn state_round_trip_and_garbage() {
        let g = SyntheticGuest::with_options(
            1000,
            Workload::Tpcw,
            7,
            SyntheticOptions {
                speed: 50.0,
                writers: 2,
            },
        )
        .unwrap();
        assert!(g.state().is_err(), "state while running");
        std::thread::sleep(Duration::from_millis(30));
        g.pause().unwrap();
        let blob = g.state().unwrap();
        let s = SavedState::decode(&blob).unwrap();
        assert_eq!(s.workload, Workload::Tpcw);
        assert_eq!((s.seed, s.pages, s.speed), (7, 1000, 50.0));
        assert_eq!(s.writers.len(), 2);
        assert!(s.writers.iter().all(|w| w.steps > 0));
        assert_eq!(s.encode(), blob);
        assert!(blob.len() < 256, "{} bytes", blob.len());

        let t = SyntheticTarget::new(1000).unwrap();
        t.set_state(&blob).unwrap();
        assert!(matches!(
            SyntheticTarget::new(999).unwrap().set_state(&blob),
            Err(GuestError::SizeMismatch { .. })
        ));
        // Every truncation and every single-byte corruption of the header is rejected or
        // decodes to something valid; none panics.
        for n in 0..blob.len() {
            assert!(
                matches!(t.set_state(&blob[..n]), Err(GuestError::BadState(_))),
                "{n}"
            );
        }
        let mut long = blob.clone();
        long.push(0);
        assert!(t.set_state(&long).is_err());
        for i in 0..blob.len() {
            for x in [0x01, 0x80, 0xff] {
                let mut b = blob.clone();
                b[i] ^= x;
                let _ = t.set_state(&b);
            }
        }
        let mut rng = Rng::new(1);
        for len in 0..300 {
            let junk: Vec<u8> = (0..len).map(|_| rng.next_u64().to_le_bytes()[0]).collect();
            assert!(t.set_state(&junk).is_err());
        }
        for (at, v) in [(0, b'X'), (4, 9)] {
            let mut b = blob.clone();
            b[at] = v;
            assert!(matches!(t.set_state(&b), Err(GuestError::BadState(_))));
        }
    }

    #[test]
    fn resume_after_hand_over_fails() {
        let g = guest(Workload::Idle, 1, 1.0);
        g.pause().unwrap();
        g.hand_over().unwrap();
        let err = g.resume().unwrap_err().to_string();
        assert!(err.contains("handed over"), "{err}");
        // Still inspectable.
        g.pause().unwrap();
        g.memory_digest().unwrap();
        g.state().unwrap();
    }

    #[test]
    fn read_pages_range_checked() {
        let g = guest(Workload::Idle, 1, 0.0);
        let mut batch = PageBatch::with_capacity(4);
        g.read_pages(&[0, 255], &mut batch).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(matches!(
            g.read_pages(&[1, 256], &mut batch),
            Err(GuestError::PageOutOfRange {
                pfn: 256,
                page_count: 256
            })
        ));
        assert_eq!(batch.len(), 2, "nothing pushed on error");
    }

    #[test]
    fn destination_writers_on_two_threads() {
        let pages = 2048u64;
        let t = SyntheticTarget::new(pages).unwrap();
        let mut expected = vec![0u8; index_of(pages) * PAGE_SIZE];
        for pfn in 0..pages {
            let b = (pfn % 251) as u8;
            expected[index_of(pfn) * PAGE_SIZE..][..PAGE_SIZE].fill(b);
        }
        std::thread::scope(|s| {
            for parity in 0..2u64 {
                let mut w = t.writer(Box::new(move |p| p % 2 == parity)).unwrap();
                s.spawn(move || {
                    for pfn in (parity..pages).step_by(2) {
                        w.page_mut(pfn).0.fill((pfn % 251) as u8);
                    }
                });
            }
        });
        assert_eq!(t.memory_digest(), memory_digest(&expected));
    }

    #[test]
    fn destination_ownership_is_checked() {
        let t = SyntheticTarget::new(64).unwrap();
        let mut a = t.writer(Box::new(|_| true)).unwrap();
        let mut b = t.writer(Box::new(|p| p < 32)).unwrap();
        a.page_mut(3).0[0] = 1;
        let overlap = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.page_mut(3);
        }));
        assert!(overlap.is_err(), "two open writers wrote page 3");
        let foreign = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.page_mut(40);
        }));
        assert!(foreign.is_err(), "writer wrote a page it does not own");
        let beyond = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            a.page_mut(64);
        }));
        assert!(beyond.is_err());
        assert!(t.start().is_err(), "start with writers open / no state");
        drop(a);
        b.page_mut(3).0[1] = 2; // a is gone: b may take the page over
        drop(b);
        let mut mem = vec![0u8; 64 * PAGE_SIZE];
        mem[3 * PAGE_SIZE] = 1;
        mem[3 * PAGE_SIZE + 1] = 2;
        assert_eq!(t.memory_digest(), memory_digest(&mem));
    }

    fn encode_all(
        g: &SyntheticGuest,
        pfns: &[Pfn],
        enc: &mut [Encoder; 2],
        dec: &mut [Decoder; 2],
        sinks: &mut [Box<dyn PageWriter>; 2],
    ) {
        let mut frame = FrameBuf::new(DEFAULT_FRAME_SIZE);
        for s in 0..2 {
            let mine: Vec<Pfn> = pfns.iter().copied().filter(|p| p % 2 == s as u64).collect();
            let mut batch = PageBatch::with_capacity(mine.len());
            g.read_pages(&mine, &mut batch).unwrap();
            let mut deliver = |f: &mut FrameBuf| {
                dec[s]
                    .decode(f.body(), f.records(), f.cache_digest(), &mut *sinks[s])
                    .unwrap();
                f.clear();
            };
            enc[s].encode_batch(&batch, &mut frame, &mut deliver);
            enc[s].finish_frame(&mut frame);
            deliver(&mut frame);
        }
    }

    fn saved(stats: &[CodecStats]) -> (f64, f64, f64) {
        let mut all = CodecStats::default();
        for s in stats {
            all.add(s);
        }
        let n = all.bytes_in.max(1) as f64;
        (
            all.saved_zero as f64 / n,
            all.saved_cbr as f64 / n,
            all.saved_delta as f64 / n,
        )
    }

    /// A whole pre-copy through the real codec into a destination (two streams), ending with
    /// equal digests and the guest running at the destination. Prints what the codec saved.
    fn migrate_through_the_codec(workload: Workload) {
        {
            let g = guest(workload, 6, 50.0);
            let pages = g.page_count();
            let t = SyntheticTarget::new(pages).unwrap();
            let config = CodecConfig::default();
            let mut enc = [
                Encoder::new(config.clone()).unwrap(),
                Encoder::new(config.clone()).unwrap(),
            ];
            let mut dec = [
                Decoder::new(config.clone(), pages).unwrap(),
                Decoder::new(config.clone(), pages).unwrap(),
            ];
            let mut sinks = [
                t.writer(Box::new(|p| p % 2 == 0)).unwrap(),
                t.writer(Box::new(|p| p % 2 == 1)).unwrap(),
            ];
            g.start_dirty_log().unwrap();
            let all: Vec<Pfn> = (0..pages).collect();
            encode_all(&g, &all, &mut enc, &mut dec, &mut sinks);
            let first = saved(&[enc[0].stats().clone(), enc[1].stats().clone()]);
            let mark = [enc[0].stats().clone(), enc[1].stats().clone()];
            let mut sent = Vec::new();
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(20));
                let mut dirty = DirtyBitmap::new(pages);
                g.collect_dirty(&mut dirty).unwrap();
                let pfns: Vec<Pfn> = dirty.iter().collect();
                sent.push(pfns.len());
                encode_all(&g, &pfns, &mut enc, &mut dec, &mut sinks);
            }
            g.pause().unwrap();
            let mut dirty = DirtyBitmap::new(pages);
            g.collect_dirty(&mut dirty).unwrap();
            let last: Vec<Pfn> = dirty.iter().collect();
            encode_all(&g, &last, &mut enc, &mut dec, &mut sinks);
            let mut later = [enc[0].stats().clone(), enc[1].stats().clone()];
            for (l, m) in later.iter_mut().zip(&mark) {
                // Counters since the first iteration.
                l.bytes_in -= m.bytes_in;
                l.saved_zero -= m.saved_zero;
                l.saved_cbr -= m.saved_cbr;
                l.saved_delta -= m.saved_delta;
            }
            let rest = saved(&later);
            eprintln!(
                "{workload}: iteration 1 saved zero {:.1}% cbr {:.1}%; iterations 2+ ({sent:?} + {} pages) saved zero {:.1}% cbr {:.1}% delta {:.1}%",
                100.0 * first.0,
                100.0 * first.1,
                last.len(),
                100.0 * rest.0,
                100.0 * rest.1,
                100.0 * rest.2
            );
            drop(sinks);
            let digest = g.memory_digest().unwrap();
            assert_eq!(t.memory_digest(), digest, "{workload}");
            t.set_state(&g.state().unwrap()).unwrap();
            g.hand_over().unwrap();
            assert!(g.resume().is_err());
            t.start().unwrap();
            if workload != Workload::Idle {
                let deadline = Instant::now() + Duration::from_secs(1);
                while t.writes() == 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert_ne!(
                    t.memory_digest(),
                    digest,
                    "{workload}: guest does not run at the destination"
                );
            }
        }
    }

    #[test]
    fn migrate_kernel() {
        migrate_through_the_codec(Workload::Kernel);
    }

    #[test]
    fn migrate_tpcw() {
        migrate_through_the_codec(Workload::Tpcw);
    }

    #[test]
    fn migrate_specjbb() {
        migrate_through_the_codec(Workload::Specjbb);
    }

    #[test]
    fn migrate_idle() {
        migrate_through_the_codec(Workload::Idle);
    }

    /// The destination continues the source's sequence: same writes, same memory.
    #[test]
    fn destination_continues_deterministically() {
        let pages = 4 * MIB;
        let g = guest(Workload::Kernel, 4, 30.0);
        std::thread::sleep(Duration::from_millis(30));
        g.pause().unwrap();
        let blob = g.state().unwrap();
        let t = SyntheticTarget::new(pages).unwrap();
        {
            let mut w = t.writer(Box::new(|_| true)).unwrap();
            let mem = snapshot(&g);
            for (pfn, page) in (0u64..).zip(mem.chunks_exact(PAGE_SIZE)) {
                w.page_mut(pfn).0.copy_from_slice(page);
            }
        }
        t.set_state(&blob).unwrap();
        // Replay the same number of further steps at both ends, without threads.
        let steps = 500;
        let saved = SavedState::decode(&blob).unwrap();
        let layout = Arc::new(Layout::new(saved.workload, pages, saved.seed).unwrap());
        let replay = |mem: &GuestMemory| {
            let mut core = WriterCore::new(layout.clone(), 0, 1, saved.writers[0].clone());
            for _ in 0..steps {
                core.step(mem);
            }
        };
        g.hand_over().unwrap();
        replay(&g.engine.shared.mem);
        replay(&t.inner.mem);
        assert_eq!(t.memory_digest(), g.memory_digest().unwrap());
    }

    /// CPU seconds used so far by threads named `synth-writer-*` (Linux).
    fn writer_cpu_secs() -> f64 {
        let mut total = 0.0;
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if !comm.starts_with("synth-writer") {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised name: utime and stime are the 12th and 13th.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
            total += ticks / 100.0;
        }
        total
    }

    /// Pre-copy of a 1 GiB guest at speed 1.0 over a simulated link, through the real codec
    /// (one stream): pages per iteration and what the codec saved. A report, not a check:
    /// `cargo test --release -p skyferry-dataplane --lib precopy_report -- --ignored --nocapture`
    /// (env `SYNTH_MODELS=kernel,tpcw`, `SYNTH_LINK_MBIT=1000`, `SYNTH_CODEC=0` for raw pages).
    #[test]
    #[ignore = "report; runs for minutes"]
    fn precopy_report() {
        let models: Vec<Workload> = std::env::var("SYNTH_MODELS")
            .unwrap_or_else(|_| "kernel,tpcw,specjbb".into())
            .split(',')
            .map(|m| m.parse().unwrap())
            .collect();
        let mbit: f64 = std::env::var("SYNTH_LINK_MBIT").map_or(1000.0, |v| v.parse().unwrap());
        let codec = std::env::var("SYNTH_CODEC").map_or(true, |v| v != "0");
        let iterations: usize = std::env::var("SYNTH_ITERS").map_or(10, |v| v.parse().unwrap());
        let link = mbit * 1e6 / 8.0;
        for workload in models {
            let t0 = Instant::now();
            let g = guest(workload, 1024, 1.0);
            eprintln!(
                "{workload}: 1 GiB filled in {:.2} s",
                t0.elapsed().as_secs_f64()
            );
            let started = Instant::now();
            let cpu0 = writer_cpu_secs();
            let pages = g.page_count();
            let config = if codec {
                CodecConfig::default()
            } else {
                CodecConfig::baseline()
            };
            let mut enc = Encoder::new(config).unwrap();
            let mut frame = FrameBuf::new(DEFAULT_FRAME_SIZE);
            g.start_dirty_log().unwrap();
            let mut pfns: Vec<Pfn> = (0..pages).collect();
            let mut batch = PageBatch::with_capacity(1024);
            eprintln!("{workload} over {mbit} Mb/s, codec {codec}:");
            for i in 1..=iterations {
                let start = Instant::now();
                let before = enc.stats().clone();
                for chunk in pfns.chunks(1024) {
                    batch.clear();
                    g.read_pages(chunk, &mut batch).unwrap();
                    enc.encode_batch(&batch, &mut frame, |f| f.clear());
                }
                let st = enc.stats();
                let bytes = st.bytes_out - before.bytes_out;
                let wire = Duration::from_secs_f64(bytes as f64 / link);
                let took = start.elapsed().max(wire);
                std::thread::sleep(wire.saturating_sub(start.elapsed()));
                let n = (st.bytes_in - before.bytes_in).max(1) as f64;
                eprintln!(
                    "  iter {i:2}: {:7} pages in {:6.3} s, wire {:5.1}% (zero {:4.1}% cbr {:4.1}% delta {:4.1}%)",
                    pfns.len(),
                    took.as_secs_f64(),
                    100.0 * bytes as f64 / n,
                    100.0 * (st.saved_zero - before.saved_zero) as f64 / n,
                    100.0 * (st.saved_cbr - before.saved_cbr) as f64 / n,
                    100.0 * (st.saved_delta - before.saved_delta) as f64 / n,
                );
                let mut dirty = DirtyBitmap::new(pages);
                g.collect_dirty(&mut dirty).unwrap();
                pfns = dirty.iter().collect();
            }
            let secs = started.elapsed().as_secs_f64();
            eprintln!(
                "  {} writes in {secs:.1} s ({:.0}/s), writer CPU {:.1}% of a core",
                g.writes(),
                g.writes() as f64 / secs,
                100.0 * (writer_cpu_secs() - cpu0) / secs
            );
        }
    }
}

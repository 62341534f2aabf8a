//! Workload models for the synthetic guest: what memory holds and how it is rewritten.
//!
//! A model fixes, from a seed, (1) the initial content of every page, (2) which pages its
//! writers touch and how fast, and (3) how much each write changes a page. Everything here
//! is pure: the threads, pausing and the dirty log live in [`super::synthetic`]; the content
//! of memory after `n` writer steps depends only on the seed, the guest size and `n`.
//!
//! # Content
//!
//! Pages hold one of four kinds of content, generated so that the codec's optimizations find
//! what they would find in a real guest, and no more:
//!
//! - [`Content::Text`]: page-cache pages of C source (tokens, identifiers, comments,
//!   indentation): text, but every 1 KiB block distinct.
//! - [`Content::Binary`]: ELF-like pages: x86-64 code, symbol and string tables, pointer
//!   tables, with a few zero 1 KiB blocks of section padding.
//! - [`Content::Database`]: InnoDB-like 4 KiB B-tree pages: header with page number and LSN,
//!   rows, free space, page directory and trailer. Half-empty pages after splits leave a zero
//!   block now and then.
//! - [`Content::Heap`]: a Java heap: object headers (mark word, compressed class pointer),
//!   int/reference/long fields, byte/int arrays and zeroed `long[]` arrays.
//!
//! Full pages are cut from per-guest *corpora*: a run of each content kind made once from
//! the seed by the token-by-token generators. A page is a corpus span at a random offset
//! with a random 64-bit stamp in each non-zero 1 KiB block, so making a page costs a copy,
//! blocks never repeat by accident, and a page's next version differs almost entirely.
//!
//! Memory is laid out in extents of [`EXTENT_PAGES`] pages (64 KiB), each holding one kind or
//! left zero (never touched, like free memory). A share of the content pages duplicates
//! another page up to [`DUP_DISTANCE`] pages (200 MiB) before it: half of them entirely, half
//! in two of their four blocks (shared libraries, the same file cached twice, copied
//! buffers). That is the content-based redundancy the block cache finds in the first
//! iteration; a 100 MB cache finds about half of it, a 200 MB one nearly all (Fig. 13b).
//!
//! # Writes
//!
//! Writers pick pages from *tiers* (a hot set, a warm set, ...), each with a rate and an
//! access pattern (random, or a sweep like a bump allocator), and change them in one of
//! three ways (the shape of the paper's Fig. 6):
//!
//! - **small**: 1-6 edits of 1-64 bytes in the page's own style (a token, a field store, a
//!   row update with its LSN): the delta is tens to a few hundred bytes;
//! - **medium**: one run of 256-1536 bytes rewritten;
//! - **full**: the page gets new content (fresh allocations, a new file in the page cache, a
//!   database page read from disk), in some tiers a copy of another page's original content.
//!
//! Every write changes at least one byte of its page.
//!
//! # Parameters
//!
//! Rates are page writes per second for a 1 GiB guest ([`REFERENCE_PAGES`]) at speed 1.0;
//! they scale linearly with the guest size and the speed factor (tier sizes scale with the
//! guest). Shares of tiers are of all pages; `s/m/f` is the small/medium/full mix in
//! percent.
//!
//! Pre-copy levels off when some set of pages is dirtied faster than the link can send it:
//! in an iteration of `T` seconds, writes at `r` pages/s dirty at most `r T` pages, so if
//! `r` is below the link's page rate every iteration is shorter than the last and pre-copy
//! converges towards zero. The hot tiers below write (mostly full, incompressible) pages
//! faster than a 1 Gb/s link's ~30k pages/s, so pre-copy stops shrinking at about the hot
//! tier's size, with or without the codec; the codec makes the small-update tiers cheap.
//!
//! | model | follows | zero pages | duplicates (of content pages) | content | tiers: share, writes/s, access, s/m/f |
//! |---|---|---|---|---|---|
//! | `kernel` | Fig. 6 (kernel), Fig. 7, Fig. 13a (~13% redundancy, under half zero pages) | 6% | 11% | text 60%, binary 30%, heap 10% | fresh memory of compiler processes 1%, 60k, sweep, 0/10/90; slab and page tables 3%, 20k, random, 90/8/2; page cache churn 12%, 1k, random, 30/15/55 (a fifth of full rewrites copy another page). Rate x0.5..x1.5 in phases of 1-4 s (Fig. 7b) |
//! | `tpcw` | Fig. 6 (TPC-W: over half rewritten almost entirely), Fig. 7, Fig. 12a-b | 3% | 4% | database 70%, heap 20%, binary 10% | redo log and request objects 1%, 40k, sweep, 0/10/90; index roots and hot rows 0.5%, 10k, random, 85/5/10; popular rows 8%, 2k, random, 45/5/50; rest of the database, 500, random, 45/5/50. Steady (x0.9..x1.1) |
//! | `specjbb` | Fig. 12c-d (hot pages only clean after the stop), Fig. 13a (mostly zero pages) | 45% | 3% | heap 85%, binary 10%, text 5% | eden 1.5%, 39.3k (every page each 0.1 s), sweep, 0/10/90; old generation 10%, 2k, random, 85/10/5. Steady |
//! | `idle` | - | 60% | 5% | text 40%, binary 45%, heap 15% | timers and log buffers 0.05%, 4, random, 90/10/0 |
//!
//! Measured (tests `initial_shares_*` on 16 MiB guests, unbounded cache; iteration 1 through
//! the codec with its default 100 MB cache on 1 GiB guests, `precopy_report`):
//!
//! | model | zero pages | zero blocks | duplicate blocks | total | iteration 1 through the codec: zero + CBR |
//! |---|---|---|---|---|---|
//! | `kernel` | 5.9% | 2.1% | 7.7% | 15.6% | 8.0% + 3.9% = 11.9% |
//! | `tpcw` | 3.1% | 2.1% | 2.8% | 7.9% | 5.1% + 1.3% = 6.4% |
//! | `specjbb` | 44.9% | 2.3% | 1.0% | 48.3% | 47.3% + 1.0% = 48.3% |
//! | `idle` | 60.2% | 1.3% | 1.4% | 62.8% | - |
//!
//! Pre-copy of a 1 GiB guest at speed 1.0 through the codec (`precopy_report`, pages per
//! iteration):
//!
//! | model, link | iterations 1-10 |
//! |---|---|
//! | `kernel`, 1 Gb/s | 262144, 15409, 6727, 3651, 3370, 3682, 3220, 2586, 2478, 2744 |
//! | `tpcw`, 1 Gb/s | 262144, 18045, 5298, 3723, 3468, 3385, 3454, 3411, 3410, 3443 |
//! | `specjbb`, 1 Gb/s | 262144, 11603, 4605, 4198, 4148, 4151, 4187, 4174, 4135, 4177 |
//! | `kernel`, 100 Mb/s | 262144, 38639, 20892, 16458, 13611, 13850, 13185, 12699, 13243, 12961 |
//! | `tpcw`, 100 Mb/s | 262144, 60266, 30902, 21881, 16452, 13709, 12323, 11427, 10738, 10303 |
//! | `specjbb`, 100 Mb/s | 262144, 29236, 17258, 8974, 7927, 7517, 7574, 7667, 7716, 7820 |
//! | `kernel`, 622 Mb/s, no codec (Fig. 7) | 262144, 19799, 10778, 9054, 8501, 8229, 8057, 8230, 9279 |
//!
//! `kernel` levels off after the fourth iteration and then varies with the rate's phase
//! (Fig. 7); over 100 Mb/s 40% of its re-sent bytes are saved by deltas (Fig. 6, Table II).
//! Over 100 Mb/s a `tpcw` iteration carries 40-50 MB (Fig. 12a: "over 20 MB"). `specjbb`'s
//! eden (3.9k pages) is dirty in every iteration at either speed.
//!
//! A page write costs about 1.2-1.4 us (1 GiB guests, release build); measured during the
//! runs above the writer used 9-17% of one core at speed 1.0. It sleeps between bursts and
//! takes at most half a core however high the speed (the rate then falls short).

use std::fmt;
use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;

use crate::limits::{LimitError, try_reserve, try_vec};
use crate::page::{BLOCK_SIZE, BLOCKS_PER_PAGE, PAGE_SIZE, Page, Pfn};

/// Guest size the rates are given for: 1 GiB of 4 KiB pages.
pub const REFERENCE_PAGES: u64 = 1 << 18;

/// Pages in one layout extent (64 KiB): the unit of content kind and tier membership.
pub const EXTENT_PAGES: u64 = 16;

/// The workload models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Workload {
    /// Linux kernel compile: page cache of sources and objects, small rewrites, varying rate.
    Kernel,
    /// TPC-W: a database buffer pool written all over at a steady rate.
    Tpcw,
    /// SPECjbb 2005: a small young generation rewritten very fast, much untouched memory.
    Specjbb,
    /// An idle guest: a few writes a second.
    Idle,
}

/// Unknown workload name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown workload `{0}`; accepted: kernel, tpcw, specjbb, idle")]
pub struct UnknownWorkload(pub String);

impl Workload {
    /// Every model.
    pub const ALL: [Workload; 4] = [
        Workload::Kernel,
        Workload::Tpcw,
        Workload::Specjbb,
        Workload::Idle,
    ];

    /// The model's name, as parsed.
    pub fn name(self) -> &'static str {
        self.params().name
    }

    /// The model's parameters.
    pub fn params(self) -> &'static WorkloadParams {
        match self {
            Workload::Kernel => &KERNEL,
            Workload::Tpcw => &TPCW,
            Workload::Specjbb => &SPECJBB,
            Workload::Idle => &IDLE,
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Workload {
    type Err = UnknownWorkload;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Workload::ALL
            .into_iter()
            .find(|w| w.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownWorkload(s.to_owned()))
    }
}

/// What a content page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Content {
    /// C source text (page cache).
    Text,
    /// ELF-like binaries: code, symbol/string tables, pointer tables, some zero padding.
    Binary,
    /// InnoDB-like B-tree pages.
    Database,
    /// Java heap objects.
    Heap,
}

/// How a tier's writes change pages: shares of small and medium writes; the rest are full
/// rewrites, of which `copy` copy another page's original content.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WriteMix {
    /// Share of writes that make 1-6 edits of 1-64 bytes.
    pub small: f64,
    /// Share of writes that rewrite one run of 256-1536 bytes.
    pub medium: f64,
    /// Share of full rewrites whose new content copies another page's original content.
    pub copy: f64,
}

/// How a tier picks the page to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Uniformly at random in the tier.
    Random,
    /// In order, wrapping around (bump-pointer allocation).
    Sweep,
}

/// How big a tier is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Span {
    /// This share of all pages (at least one extent).
    Share(f64),
    /// Every content page of the tier's kinds that no earlier tier took.
    Rest,
}

/// A set of pages written at one rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tier {
    /// What the tier stands for.
    pub name: &'static str,
    /// Its size.
    pub span: Span,
    /// Content kinds it takes pages from (empty: any).
    pub kinds: &'static [Content],
    /// Page writes per second for a 1 GiB guest at speed 1.0.
    pub rate: f64,
    /// How pages are picked.
    pub access: Access,
    /// How much each write changes.
    pub mix: WriteMix,
}

/// A rate that changes by phase: each phase lasts a uniform time in `phase_secs` and
/// multiplies every tier's rate by a uniform factor in `low..high`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Modulation {
    /// Lowest multiplier.
    pub low: f64,
    /// Highest multiplier.
    pub high: f64,
    /// Shortest and longest phase, seconds.
    pub phase_secs: (f64, f64),
}

/// A workload model's parameters (see the module table).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkloadParams {
    /// Model name.
    pub name: &'static str,
    /// The part of the paper it follows.
    pub follows: &'static str,
    /// Share of pages that are zero and never written.
    pub zero_pages: f64,
    /// Share of content pages that duplicate another page (half whole, half two blocks).
    pub dup_pages: f64,
    /// Content kinds and their shares of the content pages.
    pub content: &'static [(Content, f64)],
    /// Who writes where, in the order tiers take pages.
    pub tiers: &'static [Tier],
    /// Rate variation over time, if any.
    pub modulation: Option<Modulation>,
}

const KERNEL: WorkloadParams = WorkloadParams {
    name: "kernel",
    follows: "Fig. 6 (kernel compile), Fig. 7, Fig. 13a: ~13% redundancy, under half zero pages",
    zero_pages: 0.06,
    dup_pages: 0.11,
    content: &[
        (Content::Text, 0.60),
        (Content::Binary, 0.30),
        (Content::Heap, 0.10),
    ],
    tiers: &[
        Tier {
            name: "fresh memory of compiler processes (cc1 obstacks, stacks)",
            span: Span::Share(0.01),
            kinds: &[Content::Heap, Content::Binary],
            rate: 60_000.0,
            access: Access::Sweep,
            mix: WriteMix {
                small: 0.0,
                medium: 0.10,
                copy: 0.0,
            },
        },
        Tier {
            name: "slab, page tables, dentries (small updates)",
            span: Span::Share(0.03),
            kinds: &[Content::Heap, Content::Binary],
            rate: 20_000.0,
            access: Access::Random,
            mix: WriteMix {
                small: 0.90,
                medium: 0.08,
                copy: 0.0,
            },
        },
        Tier {
            name: "page cache churn (sources read, objects written)",
            span: Span::Share(0.12),
            kinds: &[Content::Text, Content::Binary],
            rate: 1_000.0,
            access: Access::Random,
            mix: WriteMix {
                small: 0.30,
                medium: 0.15,
                copy: 0.20,
            },
        },
    ],
    modulation: Some(Modulation {
        low: 0.5,
        high: 1.5,
        phase_secs: (1.0, 4.0),
    }),
};

const TPCW_MIX: WriteMix = WriteMix {
    small: 0.45,
    medium: 0.05,
    copy: 0.0,
};

const TPCW: WorkloadParams = WorkloadParams {
    name: "tpcw",
    follows: "Fig. 6 (TPC-W: over half the pages rewritten almost entirely), Fig. 7, Fig. 12a-b",
    zero_pages: 0.03,
    dup_pages: 0.04,
    content: &[
        (Content::Database, 0.70),
        (Content::Heap, 0.20),
        (Content::Binary, 0.10),
    ],
    tiers: &[
        Tier {
            name: "redo log buffer, request objects (sequential)",
            span: Span::Share(0.01),
            kinds: &[Content::Database, Content::Heap],
            rate: 40_000.0,
            access: Access::Sweep,
            mix: WriteMix {
                small: 0.0,
                medium: 0.10,
                copy: 0.0,
            },
        },
        Tier {
            name: "index roots, hot rows (small updates)",
            span: Span::Share(0.005),
            kinds: &[Content::Database],
            rate: 10_000.0,
            access: Access::Random,
            mix: WriteMix {
                small: 0.85,
                medium: 0.05,
                copy: 0.0,
            },
        },
        Tier {
            name: "popular rows (best sellers, carts)",
            span: Span::Share(0.08),
            kinds: &[Content::Database],
            rate: 2_000.0,
            access: Access::Random,
            mix: TPCW_MIX,
        },
        Tier {
            name: "rest of the database",
            span: Span::Rest,
            kinds: &[Content::Database],
            rate: 500.0,
            access: Access::Random,
            mix: TPCW_MIX,
        },
    ],
    modulation: Some(Modulation {
        low: 0.9,
        high: 1.1,
        phase_secs: (1.0, 2.0),
    }),
};

const SPECJBB: WorkloadParams = WorkloadParams {
    name: "specjbb",
    follows: "Fig. 12c-d (hot pages deferred to the last iteration), Fig. 13a (mostly zero pages)",
    zero_pages: 0.45,
    dup_pages: 0.03,
    content: &[
        (Content::Heap, 0.85),
        (Content::Binary, 0.10),
        (Content::Text, 0.05),
    ],
    tiers: &[
        Tier {
            name: "young generation (eden), allocation sweep",
            span: Span::Share(0.015),
            kinds: &[Content::Heap],
            // 3932 pages of a 1 GiB guest, each rewritten every 0.1 s.
            rate: 39_322.0,
            access: Access::Sweep,
            mix: WriteMix {
                small: 0.0,
                medium: 0.10,
                copy: 0.0,
            },
        },
        Tier {
            name: "old generation updates",
            span: Span::Share(0.10),
            kinds: &[Content::Heap],
            rate: 2_000.0,
            access: Access::Random,
            mix: WriteMix {
                small: 0.85,
                medium: 0.10,
                copy: 0.0,
            },
        },
    ],
    modulation: None,
};

const IDLE: WorkloadParams = WorkloadParams {
    name: "idle",
    follows: "none: a guest doing nothing (timers, log lines)",
    zero_pages: 0.60,
    dup_pages: 0.05,
    content: &[
        (Content::Text, 0.40),
        (Content::Binary, 0.45),
        (Content::Heap, 0.15),
    ],
    tiers: &[Tier {
        name: "timers, log buffers",
        span: Span::Share(0.0005),
        kinds: &[],
        rate: 4.0,
        access: Access::Random,
        mix: WriteMix {
            small: 0.90,
            medium: 0.10,
            copy: 0.0,
        },
    }],
    modulation: None,
};

/// Farthest a duplicated page lies from its source: 200 MiB of pages.
pub const DUP_DISTANCE: u64 = 51_200;

/// Chance that each of blocks 1-3 of a binary page is zero (section padding, `.bss`): 6% of
/// binary blocks.
const BINARY_ZERO_BLOCK: f64 = 0.08;

// ---------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------

/// splitmix64: one word of state, so a writer's position in its sequence is one number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng(u64);

impl Rng {
    /// A generator at `state`.
    pub fn new(state: u64) -> Self {
        Rng(state)
    }

    /// The state (to resume the sequence with [`Rng::new`]).
    pub fn state(&self) -> u64 {
        self.0
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (`n > 0`), by multiply-shift.
    pub fn below(&mut self, n: usize) -> usize {
        let n64 = u64::try_from(n).unwrap_or(u64::MAX);
        let wide = (u128::from(self.next_u64()) * u128::from(n64)) >> 64;
        // The product shifted down is below n, so it fits n's type.
        usize::try_from(wide).unwrap_or(0)
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// The splitmix64 finalizer: a bijective 64-bit mix.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A key from two numbers (seed and page, say).
fn key2(a: u64, b: u64) -> u64 {
    mix64(a ^ mix64(b.wrapping_add(0x632b_e59b_d9b4_e019)))
}

/// `x` rounded to the nearest integer, clamped to `0..=u64::MAX` (shares times counts).
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    reason = "rounded and clamped to the u64 range first; NaN maps to 0"
)]
pub(crate) fn round_u64(x: f64) -> u64 {
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x.round() as u64
    }
}

fn usize_of(x: u64) -> usize {
    usize::try_from(x).expect("guest page index fits in usize")
}

/// The low byte of `x` (random bits cut to size).
fn lo8(x: u64) -> u8 {
    x.to_le_bytes()[0]
}

/// The low 16 bits of `x`.
fn lo16(x: u64) -> u16 {
    let b = x.to_le_bytes();
    u16::from_le_bytes([b[0], b[1]])
}

/// The low 32 bits of `x`.
fn lo32(x: u64) -> u32 {
    let b = x.to_le_bytes();
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

// ---------------------------------------------------------------------------------------
// Layout
// ---------------------------------------------------------------------------------------

/// Salts that keep the layout's random choices independent of each other.
const SALT_CLASS: u64 = 0x11;
const SALT_TIER: u64 = 0x22;
const SALT_DUP: u64 = 0x33;
const SALT_SOURCE: u64 = 0x44;
const SALT_WRITER: u64 = 0x55;
const SALT_CORPUS: u64 = 0x77;
/// Salt of the modulation schedule (shared by every writer, not part of content).
pub const SALT_PHASE: u64 = 0x66;

/// Where everything is in one guest: the content kind of each extent and the pages of each
/// tier. A pure function of (workload, pages, seed), so both ends build the same one.
#[derive(Debug)]
pub struct Layout {
    workload: Workload,
    seed: u64,
    pages: u64,
    /// Content kind per extent; `None` is a zero extent.
    kinds: Vec<Option<Content>>,
    /// Pages of each tier, in the order the writers use them.
    tiers: Vec<Vec<Pfn>>,
    /// Content that pages are cut from.
    corpora: Corpora,
}

fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.below(i + 1);
        items.swap(i, j);
    }
}

impl Layout {
    /// The layout of a `pages`-page guest running `workload` from `seed`; an error if its
    /// tables cannot be allocated.
    pub fn new(workload: Workload, pages: u64, seed: u64) -> Result<Layout, LimitError> {
        let params = workload.params();
        let extents =
            usize::try_from(pages.div_ceil(EXTENT_PAGES)).map_err(|_| LimitError::Allocation {
                what: "a guest layout",
                bytes: pages,
            })?;
        let mut order: Vec<usize> = try_vec("a guest layout", extents, |i| i)?;
        shuffle(&mut order, &mut Rng::new(key2(seed, SALT_CLASS)));

        // Zero extents first, then each content kind by its share of the rest.
        let mut kinds = try_vec("a guest layout", extents, |_| None)?;
        let zero = usize_of(round_u64(params.zero_pages * extents as f64)).min(extents);
        let content_extents = extents - zero;
        let mut cum = 0.0;
        let mut at = zero;
        for &(kind, share) in params.content {
            cum += share;
            let end = zero + usize_of(round_u64(cum * content_extents as f64)).min(content_extents);
            for &e in &order[at..end.max(at)] {
                kinds[e] = Some(kind);
            }
            at = at.max(end);
        }
        // Rounding leftovers take the first kind.
        if let Some(&(first, _)) = params.content.first() {
            for &e in &order[at..] {
                kinds[e] = Some(first);
            }
        }

        // Tiers take content extents in a second shuffled order, each up to its quota among
        // the kinds it accepts.
        let mut content: Vec<usize> = Vec::new();
        try_reserve(&mut content, "a guest layout", extents)?;
        content.extend((0..extents).filter(|&e| kinds[e].is_some()));
        shuffle(&mut content, &mut Rng::new(key2(seed, SALT_TIER)));
        let mut taken = try_vec("a guest layout", extents, |_| false)?;
        let mut tiers = Vec::with_capacity(params.tiers.len());
        for tier in params.tiers {
            let quota = match tier.span {
                Span::Share(s) => usize_of(round_u64(s * extents as f64)).max(1),
                Span::Rest => usize::MAX,
            };
            let mut pfns = Vec::new();
            let most = quota
                .min(content.len())
                .saturating_mul(usize_of(EXTENT_PAGES));
            try_reserve(&mut pfns, "a guest layout", most)?;
            let mut got = 0;
            for &e in &content {
                if got == quota {
                    break;
                }
                let kind = kinds[e].expect("content extent");
                if taken[e] || !(tier.kinds.is_empty() || tier.kinds.contains(&kind)) {
                    continue;
                }
                taken[e] = true;
                got += 1;
                let first = e as u64 * EXTENT_PAGES;
                pfns.extend(first..(first + EXTENT_PAGES).min(pages));
            }
            tiers.push(pfns);
        }
        let corpus_bytes = usize_of(pages.saturating_mul(PAGE_SIZE as u64) / 32)
            .clamp(CORPUS_MIN_BYTES, CORPUS_MAX_BYTES);
        Ok(Layout {
            workload,
            seed,
            pages,
            kinds,
            tiers,
            corpora: Corpora::new(params, seed, corpus_bytes),
        })
    }

    /// The workload.
    pub fn workload(&self) -> Workload {
        self.workload
    }

    /// The seed.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Pages in the guest.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Pages of each tier.
    pub fn tiers(&self) -> &[Vec<Pfn>] {
        &self.tiers
    }

    /// The content kind of `pfn`, `None` for a zero page.
    pub fn kind(&self, pfn: Pfn) -> Option<Content> {
        self.kinds[usize_of(pfn / EXTENT_PAGES)]
    }

    /// If `pfn` starts as a copy of another page: the source and whether the copy is whole
    /// (else two of the four blocks).
    ///
    /// The source lies up to [`DUP_DISTANCE`] pages away (before, wrapping around), so a block
    /// cache of 100-200 MB finds most copies and a 10 MB one few (Fig. 13b).
    fn dup_source(&self, pfn: Pfn) -> Option<(Pfn, bool)> {
        self.kind(pfn)?;
        if self.pages < 2 || !self.is_dup(pfn) {
            return None;
        }
        let whole = key2(self.seed ^ SALT_DUP, pfn) & 1 == 0;
        let mut rng = Rng::new(key2(self.seed ^ SALT_SOURCE, pfn));
        let reach = usize_of(DUP_DISTANCE.min(self.pages - 1));
        (0..16).find_map(|_| {
            let q = (pfn + self.pages - 1 - rng.below(reach) as u64) % self.pages;
            (self.kind(q).is_some() && !self.is_dup(q)).then_some((q, whole))
        })
    }

    /// A random page that holds its own original content (not a copy), if one is found.
    fn original_page(&self, rng: &mut Rng) -> Option<Pfn> {
        let pages = usize::try_from(self.pages).ok()?;
        (0..16).find_map(|_| {
            let q = rng.below(pages) as u64;
            (self.kind(q).is_some() && !self.is_dup(q)).then_some(q)
        })
    }

    fn is_dup(&self, pfn: Pfn) -> bool {
        let h = key2(self.seed ^ SALT_DUP, pfn);
        (h >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < self.workload.params().dup_pages
    }

    /// The content `pfn` would have if it were not a copy: its kind filled from its own key.
    fn original_content(&self, pfn: Pfn, page: &mut Page) {
        match self.kind(pfn) {
            Some(kind) => self.fill_page(kind, key2(self.seed, pfn), page),
            None => page.0.fill(0),
        }
    }

    /// The initial content of `pfn`. `scratch` is working space.
    pub fn initial_page(&self, pfn: Pfn, page: &mut Page, scratch: &mut Page) {
        self.original_content(pfn, page);
        if let Some((source, whole)) = self.dup_source(pfn) {
            self.original_content(source, scratch);
            if whole {
                page.clone_from(scratch);
            } else {
                // Two of the source's blocks, at this page's blocks 1 and 3 (the block cache
                // matches blocks wherever they sit).
                let pick = usize_of(key2(self.seed, pfn) % 4);
                let src = *scratch.blocks();
                let dst = page.blocks_mut();
                dst[1] = src[pick];
                dst[3] = src[(pick + 1) % BLOCKS_PER_PAGE];
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Writers
// ---------------------------------------------------------------------------------------

/// Where a writer reads and writes pages: guest memory, or a test's array.
pub trait PageAccess {
    /// Copies page `pfn` into `out`.
    fn load(&self, pfn: Pfn, out: &mut Page);
    /// Makes page `pfn` equal to `new`. With `old`, the page currently equals `old` (the
    /// caller is the page's only writer) and implementations may store only the words that
    /// differ.
    fn store(&self, pfn: Pfn, new: &Page, old: Option<&Page>);
}

/// A writer's position in its deterministic sequence: what the state blob carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterState {
    /// The content generator's state.
    pub rng: u64,
    /// Writes done.
    pub steps: u64,
    /// Next position of each tier's sweep.
    pub cursors: Vec<u64>,
}

impl WriterState {
    /// Writer `index`'s starting state for a guest seeded with `seed`.
    pub fn initial(workload: Workload, seed: u64, index: usize) -> Self {
        WriterState {
            rng: key2(seed ^ SALT_WRITER, index as u64),
            steps: 0,
            cursors: vec![0; workload.params().tiers.len()],
        }
    }
}

/// One writer's deterministic page modifier: picks a page per tier rates, changes it per the
/// tier's write mix. Writers own disjoint slices of every tier, so each page has one writer
/// and content does not depend on how the threads interleave.
#[derive(Debug)]
pub struct WriterCore {
    layout: Arc<Layout>,
    /// This writer's part of each tier.
    slices: Vec<Range<usize>>,
    /// Cumulative tier weights (rates of the tiers this writer has pages in).
    cumulative: Vec<f64>,
    /// Page writes per second at speed 1.0 for this writer (already scaled to the guest).
    rate: f64,
    rng: Rng,
    steps: u64,
    cursors: Vec<u64>,
    page: Box<Page>,
    before: Box<Page>,
}

impl WriterCore {
    /// Writer `index` of `count`, resuming from `state`.
    ///
    /// # Panics
    /// If `index >= count` or `state` has the wrong number of cursors (validate blobs first).
    pub fn new(layout: Arc<Layout>, index: usize, count: usize, state: WriterState) -> Self {
        assert!(index < count, "writer {index} of {count}");
        let params = layout.workload.params();
        assert_eq!(state.cursors.len(), params.tiers.len(), "cursor per tier");
        let scale = layout.pages as f64 / REFERENCE_PAGES as f64;
        let mut slices = Vec::with_capacity(params.tiers.len());
        let mut cumulative = Vec::with_capacity(params.tiers.len());
        let mut rate = 0.0;
        let mut cum = 0.0;
        for (tier, pages) in params.tiers.iter().zip(&layout.tiers) {
            let slice = pages.len() * index / count..pages.len() * (index + 1) / count;
            // A writer's share of the tier's rate is its share of the tier's pages.
            let share = if pages.is_empty() {
                0.0
            } else {
                slice.len() as f64 / pages.len() as f64
            };
            let r = tier.rate * scale * share;
            rate += r;
            cum += r;
            cumulative.push(cum);
            slices.push(slice);
        }
        WriterCore {
            layout,
            slices,
            cumulative,
            rate,
            rng: Rng::new(state.rng),
            steps: state.steps,
            cursors: state.cursors,
            page: Box::new(Page::zeroed()),
            before: Box::new(Page::zeroed()),
        }
    }

    /// Page writes per second at speed 1.0.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Where the writer is.
    pub fn state(&self) -> WriterState {
        WriterState {
            rng: self.rng.state(),
            steps: self.steps,
            cursors: self.cursors.clone(),
        }
    }

    /// Writes one page; returns it, or `None` if this writer has no pages.
    pub fn step(&mut self, mem: &impl PageAccess) -> Option<Pfn> {
        let total = *self.cumulative.last()?;
        if total <= 0.0 {
            return None;
        }
        let u = self.rng.unit() * total;
        let t = self
            .cumulative
            .iter()
            .position(|&c| u < c)
            .unwrap_or(self.cumulative.len() - 1);
        let tier = &self.layout.workload.params().tiers[t];
        let slice = &self.layout.tiers[t][self.slices[t].clone()];
        let pfn = match tier.access {
            Access::Random => slice[self.rng.below(slice.len())],
            Access::Sweep => {
                let c = self.cursors[t];
                self.cursors[t] = c.wrapping_add(1);
                slice[usize_of(c % slice.len() as u64)]
            }
        };
        let kind = self.layout.kind(pfn).expect("tiers hold content pages");
        let page = &mut *self.page;
        let r = self.rng.unit();
        if r >= tier.mix.small + tier.mix.medium && !self.rng.chance(tier.mix.copy) {
            // Fresh content. Its blocks carry new random stamps and `fill_page` never makes an
            // all-zero page, so it differs from whatever the page held (but for a 2^-64
            // chance): no need to read the old content first.
            self.layout.fill_page(kind, self.rng.next_u64(), page);
            mem.store(pfn, page, None);
        } else {
            mem.load(pfn, page);
            self.before.0 = page.0;
            let touched = if r < tier.mix.small {
                small_edit(kind, &mut self.rng, page)
            } else if r < tier.mix.small + tier.mix.medium {
                medium_edit(&self.layout.corpora, kind, &mut self.rng, page)
            } else {
                // A copy of another page's original content.
                let key = self.rng.next_u64();
                match self.layout.original_page(&mut Rng::new(key)) {
                    Some(q) => self.layout.original_content(q, page),
                    None => self.layout.fill_page(kind, key, page),
                }
                0..PAGE_SIZE
            };
            if page.0[touched.clone()] == self.before.0[touched.clone()] {
                // The edit wrote what was there: every write must change the page.
                page.0[touched.start] ^= 0x01;
            }
            mem.store(pfn, page, Some(&self.before));
        }
        self.steps += 1;
        Some(pfn)
    }
}

// ---------------------------------------------------------------------------------------
// Content
// ---------------------------------------------------------------------------------------

/// Bytes of content per kind cut into pages: a thirty-second of the guest, within these
/// bounds (small enough to make quickly at both ends, large enough that pages differ).
const CORPUS_MIN_BYTES: usize = 64 << 10;
const CORPUS_MAX_BYTES: usize = 1 << 20;

/// Long runs of each content kind, made once per guest from the seed by the slow,
/// token-by-token generators below. Pages are cut from them at random offsets and stamped
/// with a unique value per 1 KiB block, so making a page costs a copy, blocks stay distinct
/// (no false content-based redundancy), and two versions of a page differ almost entirely.
#[derive(Debug)]
struct Corpora {
    /// Indexed by [`Corpora::slot`]; empty for kinds the model does not use.
    runs: [Vec<u8>; 4],
}

impl Corpora {
    fn new(params: &WorkloadParams, seed: u64, bytes: usize) -> Self {
        let mut runs: [Vec<u8>; 4] = Default::default();
        for &(kind, _) in params.content {
            let mut rng = Rng::new(key2(seed ^ SALT_CORPUS, Self::slot(kind) as u64));
            let mut run = vec![0; bytes];
            match kind {
                Content::Text => text(&mut rng, &mut run),
                Content::Binary => {
                    for section in run.chunks_mut(PAGE_SIZE) {
                        match rng.below(20) {
                            0..=11 => code(&mut rng, section),
                            12..=14 => symtab(&mut rng, section),
                            15..=17 => strtab(&mut rng, section),
                            _ => pointers(&mut rng, section),
                        }
                    }
                }
                Content::Database => {
                    db_records(&mut rng, &mut run, lo32(seed));
                }
                Content::Heap => heap_objects(&mut rng, &mut run, oop_base(seed)),
            }
            runs[Self::slot(kind)] = run;
        }
        Corpora { runs }
    }

    fn slot(kind: Content) -> usize {
        match kind {
            Content::Text => 0,
            Content::Binary => 1,
            Content::Database => 2,
            Content::Heap => 3,
        }
    }

    /// `len` bytes of `kind` from a random offset (8-byte aligned: objects and rows stay
    /// aligned).
    fn cut(&self, kind: Content, rng: &mut Rng, len: usize) -> &[u8] {
        let run = &self.runs[Self::slot(kind)];
        assert!(
            run.len() >= len,
            "no corpus for {kind:?}: not in this model"
        );
        let at = rng.below((run.len() - len) / 8 + 1) * 8;
        &run[at..at + len]
    }
}

/// Makes each non-zero block of `page` that overlaps `used` unique: 8 random bytes at an
/// aligned place (a field, a pointer), or 16 hex digits in text (a constant).
fn stamp_blocks(kind: Content, rng: &mut Rng, page: &mut Page, used: Range<usize>) {
    for (b, block) in page.blocks_mut().iter_mut().enumerate() {
        let start = b * BLOCK_SIZE;
        let lo = used.start.max(start) - start;
        let hi = used.end.min(start + BLOCK_SIZE).saturating_sub(start);
        if hi < lo + 16 || crate::page::is_zero(block) {
            continue;
        }
        let v = rng.next_u64();
        if kind == Content::Text {
            let at = rng.range(lo, hi - 16);
            let mut s = Sink::new(&mut block[at..at + 16]);
            for i in (0..16).rev() {
                s.byte(b"0123456789abcdef"[usize_of((v >> (4 * i)) & 15)]);
            }
        } else {
            let at = (lo + rng.below((hi - lo) / 8 - 1) * 8) & !7;
            block[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
    }
}

impl Layout {
    /// Fills `page` with new content of `kind` from `key`.
    ///
    /// # Panics
    /// If the model has no content of `kind`.
    pub fn fill_page(&self, kind: Content, key: u64, page: &mut Page) {
        let mut rng = Rng::new(key);
        match kind {
            Content::Database => db_page(&self.corpora, &mut rng, page, key),
            _ => {
                page.0
                    .copy_from_slice(self.corpora.cut(kind, &mut rng, PAGE_SIZE));
                if kind == Content::Binary {
                    // Section padding, `.bss`.
                    // Not block 0, so a fresh page is never all zero.
                    for block in &mut page.blocks_mut()[1..] {
                        if rng.chance(BINARY_ZERO_BLOCK) {
                            block.fill(0);
                        }
                    }
                }
                stamp_blocks(kind, &mut rng, page, 0..PAGE_SIZE);
            }
        }
    }
}

/// 1-6 small edits in the page's style; returns the span touched.
fn small_edit(kind: Content, rng: &mut Rng, page: &mut Page) -> Range<usize> {
    match kind {
        Content::Database => db_row_update(rng, page),
        Content::Heap => field_stores(rng, page),
        Content::Text | Content::Binary => {
            let mut span = (PAGE_SIZE, 0);
            for _ in 0..rng.range(1, 6) {
                let len = rng.range(1, 64);
                let at = rng.below(PAGE_SIZE - len + 1);
                let out = &mut page.0[at..at + len];
                if kind == Content::Text {
                    text(rng, out);
                } else {
                    code(rng, out);
                }
                span = (span.0.min(at), span.1.max(at + len));
            }
            span.0..span.1
        }
    }
}

/// One run of 256-1536 bytes rewritten in the page's style; returns it.
fn medium_edit(corpora: &Corpora, kind: Content, rng: &mut Rng, page: &mut Page) -> Range<usize> {
    let len = rng.range(256, 1536) & !7;
    let at = rng.below((PAGE_SIZE - len) / 8 + 1) * 8;
    page.0[at..at + len].copy_from_slice(corpora.cut(kind, rng, len));
    at..at + len
}

/// Appends bytes to a buffer, dropping what does not fit.
struct Sink<'a> {
    out: &'a mut [u8],
    pos: usize,
}

impl<'a> Sink<'a> {
    fn new(out: &'a mut [u8]) -> Self {
        Sink { out, pos: 0 }
    }

    fn full(&self) -> bool {
        self.pos >= self.out.len()
    }

    fn put(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.out.len() - self.pos);
        self.out[self.pos..self.pos + n].copy_from_slice(&bytes[..n]);
        self.pos += n;
    }

    fn byte(&mut self, b: u8) {
        if self.pos < self.out.len() {
            self.out[self.pos] = b;
            self.pos += 1;
        }
    }

    fn repeat(&mut self, b: u8, n: usize) {
        let n = n.min(self.out.len() - self.pos);
        self.out[self.pos..self.pos + n].fill(b);
        self.pos += n;
    }

    fn decimal(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.put(&digits[i..]);
    }

    fn hex(&mut self, v: u64, width: usize) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        self.put(b"0x");
        for i in (0..width).rev() {
            self.byte(HEX[usize_of((v >> (4 * i)) & 15)]);
        }
    }
}

const SYLLABLES: [&[u8]; 64] = [
    b"dev", b"buf", b"len", b"ctx", b"irq", b"page", b"lock", b"list", b"node", b"head", b"data",
    b"priv", b"reg", b"addr", b"map", b"skb", b"net", b"pci", b"dma", b"io", b"mem", b"inode",
    b"file", b"sb", b"cpu", b"task", b"sched", b"timer", b"work", b"queue", b"entry", b"flags",
    b"count", b"size", b"offset", b"state", b"ops", b"init", b"exit", b"alloc", b"free", b"get",
    b"put", b"read", b"write", b"set", b"clear", b"check", b"update", b"handle", b"probe",
    b"remove", b"attach", b"rx", b"tx", b"hw", b"phys", b"virt", b"pfn", b"vma", b"mm", b"fs",
    b"blk", b"nr",
];

const TYPES: [&[u8]; 16] = [
    b"int",
    b"void",
    b"u32",
    b"u64",
    b"size_t",
    b"bool",
    b"char *",
    b"struct device *",
    b"unsigned long",
    b"long",
    b"u8",
    b"u16",
    b"struct page *",
    b"loff_t",
    b"ssize_t",
    b"gfp_t",
];

const ERRNOS: [&[u8]; 8] = [
    b"EINVAL", b"ENOMEM", b"EIO", b"EBUSY", b"ENODEV", b"EAGAIN", b"EFAULT", b"ENOSPC",
];

const OPERATORS: [&[u8]; 8] = [b"==", b"!=", b"<", b">", b"<=", b">=", b"&", b"|"];

const WORDS: [&[u8]; 32] = [
    b"the", b"of", b"to", b"and", b"a", b"in", b"is", b"for", b"this", b"that", b"we", b"must",
    b"be", b"when", b"lock", b"held", b"caller", b"returns", b"zero", b"on", b"success", b"page",
    b"buffer", b"device", b"with", b"not", b"if", b"it", b"may", b"sleep", b"free", b"after",
];

fn pick<T: Copy, const N: usize>(table: &[T; N], r: u64) -> T {
    table[usize_of(r % N as u64)]
}

/// An identifier of 1-3 syllables.
fn ident(s: &mut Sink<'_>, rng: &mut Rng) {
    let r = rng.next_u64();
    let n = 1 + (r & 3) % 3;
    for i in 0..n {
        if i > 0 {
            s.byte(b'_');
        }
        s.put(pick(&SYLLABLES, r >> (8 + 6 * i)));
    }
}

fn tabs(s: &mut Sink<'_>, n: u64) {
    s.repeat(b'\t', usize_of(n));
}

/// Pseudo C source, line by line.
fn text(rng: &mut Rng, out: &mut [u8]) {
    let mut s = Sink::new(out);
    while !s.full() {
        let r = rng.next_u64();
        let indent = 1 + (r >> 8) % 3;
        match r % 16 {
            0..=3 => {
                tabs(&mut s, indent);
                ident(&mut s, rng);
                s.put(b" = ");
                ident(&mut s, rng);
                s.put(b"->");
                ident(&mut s, rng);
                s.put(b";\n");
            }
            4 | 5 => {
                tabs(&mut s, indent);
                s.put(b"if (");
                ident(&mut s, rng);
                s.byte(b' ');
                s.put(pick(&OPERATORS, r >> 16));
                s.byte(b' ');
                s.decimal((r >> 20) % 512);
                s.put(b")\n");
                tabs(&mut s, indent + 1);
                s.put(b"return -");
                s.put(pick(&ERRNOS, r >> 32));
                s.put(b";\n");
            }
            6 => {
                s.put(b"static ");
                s.put(pick(&TYPES, r >> 16));
                s.byte(b' ');
                ident(&mut s, rng);
                s.byte(b'(');
                s.put(pick(&TYPES, r >> 20));
                s.byte(b' ');
                ident(&mut s, rng);
                s.put(b", ");
                s.put(pick(&TYPES, r >> 24));
                s.byte(b' ');
                ident(&mut s, rng);
                s.put(b")\n{\n");
            }
            7 | 8 => {
                tabs(&mut s, indent);
                ident(&mut s, rng);
                s.byte(b'(');
                ident(&mut s, rng);
                s.put(b", ");
                ident(&mut s, rng);
                s.put(b", ");
                s.decimal((r >> 16) % 4096);
                s.put(b");\n");
            }
            9 => {
                s.put(b"\t/* ");
                for i in 0..4 + (r >> 16) % 9 {
                    if i > 0 {
                        s.byte(b' ');
                    }
                    s.put(pick(&WORDS, rng.next_u64()));
                }
                s.put(b" */\n");
            }
            10 => s.put(b"}\n\n"),
            11 => {
                s.put(b"#include <linux/");
                ident(&mut s, rng);
                s.put(b".h>\n");
            }
            12 | 13 => {
                tabs(&mut s, indent);
                s.put(pick(&TYPES, r >> 16));
                s.byte(b' ');
                ident(&mut s, rng);
                s.put(b";\n");
            }
            14 => {
                s.put(b"#define ");
                let start = s.pos;
                ident(&mut s, rng);
                let end = s.pos;
                s.out[start..end].make_ascii_uppercase();
                s.byte(b'\t');
                s.hex(r >> 16, 8);
                s.byte(b'\n');
            }
            _ => {
                tabs(&mut s, indent);
                s.put(b"for (i = 0; i < ");
                ident(&mut s, rng);
                s.put(b"; i++)\n");
            }
        }
    }
}

/// x86-64-like instruction stream.
fn code(rng: &mut Rng, out: &mut [u8]) {
    let mut s = Sink::new(out);
    while !s.full() {
        let r = rng.next_u64();
        let imm = lo32(r >> 16);
        // Branch and call displacements: within +-1 MiB.
        let rel = (((r >> 32) as u32) & 0x1f_ffff).wrapping_sub(0x10_0000);
        match r % 16 {
            0 => s.put(&[0x55, 0x48, 0x89, 0xe5]),
            1 => s.put(&[0x48, 0x8b, 0x45, lo8(u64::from(imm)) & 0xf8]),
            2 => {
                s.byte(0xe8);
                s.put(&rel.to_le_bytes());
            }
            3 => s.put(&[0x0f, 0x1f, 0x44, 0x00, 0x00]),
            4 => s.put(&[0x5d, 0xc3]),
            5 => s.put(&[0x48, 0x83, 0xec, lo8(u64::from(imm)) & 0x78]),
            6 => s.put(&[0x89, 0x7d, lo8(u64::from(imm)) | 0x80]),
            7 => {
                s.byte(0xb8);
                s.put(&(imm & 0xfff).to_le_bytes());
            }
            8 => {
                s.put(&[0x0f, 0x84]);
                s.put(&(rel & 0xffff).to_le_bytes());
            }
            9 => s.put(&[0x74, lo8(u64::from(imm)) & 0x7f]),
            10 => {
                s.put(&[0x48, 0x8d, 0x3d]);
                s.put(&rel.to_le_bytes());
            }
            11 => s.put(&[0x41, 0x57, 0x41, 0x56]),
            12 => s.put(&[0x31, 0xc0]),
            13 => s.put(&[0x48, 0x85, 0xc0]),
            14 => {
                s.byte(0xe9);
                s.put(&rel.to_le_bytes());
            }
            _ => s.repeat(0xcc, 1 + usize_of(u64::from(imm) % 8)),
        }
    }
}

/// `Elf64_Sym` entries with rising names and addresses.
fn symtab(rng: &mut Rng, out: &mut [u8]) {
    let mut name = (rng.next_u64() % 200_000) as u32;
    let mut addr = 0xffff_ffff_8100_0000u64 + (rng.next_u64() & 0x00ff_fff0);
    let mut s = Sink::new(out);
    while !s.full() {
        let r = rng.next_u64();
        s.put(&name.to_le_bytes());
        s.byte(if r & 1 == 0 { 0x12 } else { 0x11 });
        s.byte(0);
        s.put(&(1 + lo16(r >> 8) % 30).to_le_bytes());
        s.put(&addr.to_le_bytes());
        let size = 16 + (r >> 24) % 2048;
        s.put(&size.to_le_bytes());
        name += 8 + (r >> 40) as u32 % 24;
        addr += size.next_multiple_of(16);
    }
}

/// NUL-separated symbol names.
fn strtab(rng: &mut Rng, out: &mut [u8]) {
    let mut s = Sink::new(out);
    while !s.full() {
        match rng.below(4) {
            0 => s.put(b"__ksymtab_"),
            1 => s.put(b"__func__."),
            _ => {}
        }
        ident(&mut s, rng);
        s.byte(0);
    }
}

/// Tables of kernel addresses and small integers.
fn pointers(rng: &mut Rng, out: &mut [u8]) {
    let mut s = Sink::new(out);
    while !s.full() {
        let r = rng.next_u64();
        let v = match r % 10 {
            0..=6 => 0xffff_ffff_8100_0000 | ((r >> 8) & 0x00ff_fff8),
            7 | 8 => (r >> 8) % 1024,
            _ => 0,
        };
        s.put(&v.to_le_bytes());
    }
}

// Database pages: InnoDB-like layout, big-endian fields as InnoDB stores them.
const DB_LSN: Range<usize> = 16..24;
const DB_HEAP_TOP: Range<usize> = 40..42;
const DB_N_RECS: Range<usize> = 54..56;
const DB_RECORDS: usize = 120;
const DB_TRAILER: usize = PAGE_SIZE - 8;

fn db_page(corpora: &Corpora, rng: &mut Rng, page: &mut Page, key: u64) {
    page.0.fill(0);
    let p = &mut page.0;
    let page_no = lo32(key >> 40);
    p[0..4].copy_from_slice(&lo32(rng.next_u64()).to_be_bytes());
    p[4..8].copy_from_slice(&page_no.to_be_bytes());
    p[8..12].copy_from_slice(&page_no.wrapping_sub(1).to_be_bytes());
    p[12..16].copy_from_slice(&page_no.wrapping_add(1).to_be_bytes());
    let lsn = 0x0000_0003_0000_0000 + (rng.next_u64() & 0xffff_ffff);
    p[DB_LSN].copy_from_slice(&lsn.to_be_bytes());
    p[24..26].copy_from_slice(&0x45bfu16.to_be_bytes());
    p[34..38].copy_from_slice(&7u32.to_be_bytes());
    p[56..64].copy_from_slice(&(rng.next_u64() & 0xff_ffff).to_be_bytes());
    p[66..74].copy_from_slice(&(40 + rng.next_u64() % 8).to_be_bytes());
    p[94..102].copy_from_slice(b"infimum\0");
    p[107..115].copy_from_slice(b"supremum");

    // Fill factor: most pages 85-100% full, two in five 45-85% (after splits).
    let fill = if rng.chance(0.6) {
        0.85 + 0.15 * rng.unit()
    } else {
        0.45 + 0.40 * rng.unit()
    };
    let dir_len = 32;
    let room = DB_TRAILER - dir_len - DB_RECORDS;
    let used = usize_of(round_u64(fill * room as f64)).min(room);
    p[DB_RECORDS..DB_RECORDS + used].copy_from_slice(corpora.cut(Content::Database, rng, used));
    let recs = u16::try_from(used / 70).unwrap_or(u16::MAX);
    p[DB_HEAP_TOP].copy_from_slice(&u16::try_from(DB_RECORDS + used).unwrap_or(0).to_be_bytes());
    p[DB_N_RECS].copy_from_slice(&recs.to_be_bytes());
    // Page directory: slot offsets growing down from the trailer.
    for (i, slot) in p[DB_TRAILER - dir_len..DB_TRAILER]
        .chunks_exact_mut(2)
        .rev()
        .enumerate()
    {
        let off = u16::try_from(DB_RECORDS + i * used / 16).unwrap_or(0);
        slot.copy_from_slice(&off.to_be_bytes());
    }
    let checksum: [u8; 4] = p[0..4].try_into().expect("4 bytes");
    p[DB_TRAILER..DB_TRAILER + 4].copy_from_slice(&checksum);
    p[DB_TRAILER + 4..].copy_from_slice(&lo32(lsn).to_be_bytes());
    stamp_blocks(Content::Database, rng, page, DB_RECORDS..DB_RECORDS + used);
}

/// Rows filling `out`; returns how many.
fn db_records(rng: &mut Rng, out: &mut [u8], page_no: u32) -> u16 {
    let mut s = Sink::new(out);
    let mut id = page_no.wrapping_mul(40);
    let mut n = 0u16;
    while !s.full() {
        let r = rng.next_u64();
        // Record header: info bits, heap number, next-record offset.
        s.byte(0x00);
        s.put(&(n.wrapping_add(2) << 3).to_be_bytes());
        s.put(&(60 + (lo16(r) & 0x7f)).to_be_bytes());
        s.put(&id.to_be_bytes());
        // Item title: 2-6 words.
        let title_at = s.pos;
        s.byte(0);
        for i in 0..2 + (r >> 8) % 5 {
            if i > 0 {
                s.byte(b' ');
            }
            let w = pick(&SYLLABLES, rng.next_u64());
            s.put(w);
        }
        if title_at < s.out.len() {
            s.out[title_at] = u8::try_from(s.pos - title_at - 1).unwrap_or(u8::MAX);
        }
        s.put(&((lo32(r >> 16) % 100_000) | 0x8000_0000).to_be_bytes());
        s.put(&(lo16(r >> 40) % 500).to_be_bytes());
        s.put(&(0x0fa0_0000 | (lo32(r >> 24) & 0xffff)).to_be_bytes());
        // Customer name.
        s.byte(8);
        ident(&mut s, rng);
        id = id.wrapping_add(1);
        n = n.wrapping_add(1);
    }
    n
}

/// An update of 1-3 fields of a row, with the LSN in header and trailer; the checksum too
/// when the page was flushed since (three in ten).
fn db_row_update(rng: &mut Rng, page: &mut Page) -> Range<usize> {
    let p = &mut page.0;
    let lsn = u64::from_be_bytes(p[DB_LSN].try_into().expect("8 bytes"))
        .wrapping_add(1 + rng.below(5000) as u64);
    p[DB_LSN].copy_from_slice(&lsn.to_be_bytes());
    p[DB_TRAILER + 4..].copy_from_slice(&lo32(lsn).to_be_bytes());
    if rng.chance(0.3) {
        let sum = lo32(rng.next_u64());
        p[0..4].copy_from_slice(&sum.to_be_bytes());
        p[DB_TRAILER..DB_TRAILER + 4].copy_from_slice(&sum.to_be_bytes());
    }
    let top = usize::from(u16::from_be_bytes([
        p[DB_HEAP_TOP.start],
        p[DB_HEAP_TOP.start + 1],
    ]))
    .clamp(DB_RECORDS + 64, DB_TRAILER - 64);
    for _ in 0..rng.range(1, 3) {
        let len = rng.range(1, 40);
        let at = rng.range(DB_RECORDS, top - len);
        if rng.chance(0.5) {
            // A number: the low bytes of a counter or price.
            for b in &mut p[at..at + len.min(4)] {
                *b = lo8(rng.next_u64());
            }
        } else {
            text(rng, &mut p[at..at + len]);
        }
    }
    DB_LSN.start..PAGE_SIZE
}

/// Compressed-oop base of a heap page: references point near the page.
fn oop_base(key: u64) -> u32 {
    0x0100_0000 | (lo32(key >> 20) & 0x00ff_fff0)
}

/// Java objects filling `out`.
fn heap_objects(rng: &mut Rng, out: &mut [u8], base: u32) {
    let mut s = Sink::new(out);
    while !s.full() {
        let r = rng.next_u64();
        // Identity hash in one mark word in five.
        let mark: u64 = if r.is_multiple_of(5) {
            ((r >> 8) & 0x7fff_ffff) << 8 | 1
        } else {
            1
        };
        s.put(&mark.to_le_bytes());
        // Class popularity is skewed: a few classes account for most objects.
        let class = ((r >> 40) % 48) * ((r >> 46) % 48) / 48;
        match (r >> 52) % 20 {
            0..=1 => {
                // byte[] (a Latin-1 string).
                s.put(&0x0008_1000u32.to_le_bytes());
                let len_at = s.pos;
                s.put(&[0; 4]);
                let start = s.pos;
                for i in 0..1 + (r >> 32) % 6 {
                    if i > 0 {
                        s.byte(b' ');
                    }
                    s.put(pick(&WORDS, rng.next_u64()));
                }
                let len = u32::try_from(s.pos - start).unwrap_or(0);
                if len_at + 4 <= s.out.len() {
                    s.out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
                }
            }
            2 => {
                // int[] of small values.
                s.put(&0x0008_1040u32.to_le_bytes());
                let n = 4 + (r >> 32) % 60;
                s.put(&u32::try_from(n).unwrap_or(0).to_le_bytes());
                for _ in 0..n {
                    s.put(&(lo32(rng.next_u64()) % 1000).to_le_bytes());
                }
            }
            3 if (r >> 20).is_multiple_of(8) => {
                // A fresh long[]: zeros.
                s.put(&0x0008_1080u32.to_le_bytes());
                let n = 16 + (r >> 32) % 240;
                s.put(&u32::try_from(n).unwrap_or(0).to_le_bytes());
                s.repeat(0, usize_of(n * 8));
            }
            _ => {
                s.put(&(0x0008_2000 + lo32(class) * 0x1c0).to_le_bytes());
                // The class fixes the field layout.
                let shape = mix64(class);
                for f in 0..1 + shape % 7 {
                    let v = rng.next_u64();
                    match (shape >> (8 + 2 * f)) & 3 {
                        0 => s.put(&(lo32(v) % 1000).to_le_bytes()),
                        1 | 2 => s.put(&base.wrapping_add(lo32(v) & 0xfff8).to_le_bytes()),
                        _ => s.put(&(v % 100_000).to_le_bytes()),
                    }
                }
            }
        }
        // Objects are 8-byte aligned.
        let pad = s.pos.next_multiple_of(8) - s.pos;
        s.repeat(0, pad);
    }
}

/// 1-6 field stores: references, ints, longs.
fn field_stores(rng: &mut Rng, page: &mut Page) -> Range<usize> {
    let base = oop_base(rng.next_u64());
    let mut span = (PAGE_SIZE, 0);
    for _ in 0..rng.range(1, 6) {
        let at = rng.below(PAGE_SIZE / 8) * 8 + 4 * rng.below(2);
        let v = rng.next_u64();
        let len = match v % 10 {
            0..=4 => {
                page.0[at..at + 4]
                    .copy_from_slice(&base.wrapping_add(lo32(v) & 0xfff8).to_le_bytes());
                4
            }
            5..=7 => {
                page.0[at..at + 4].copy_from_slice(&(lo32(v >> 8) % 1000).to_le_bytes());
                4
            }
            _ => {
                let at8 = at & !7;
                page.0[at8..at8 + 8].copy_from_slice(&(v >> 16).to_le_bytes());
                span = (span.0.min(at8), span.1.max(at8 + 8));
                continue;
            }
        };
        span = (span.0.min(at), span.1.max(at + len));
    }
    span.0..span.1
}

// ---------------------------------------------------------------------------------------
// Measurement
// ---------------------------------------------------------------------------------------

/// What the codec would find in a memory image on a first full pass, counted exactly (an
/// unbounded block cache): shares of all pages / all blocks.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct InitialShares {
    /// Pages that are all zero.
    pub zero_pages: f64,
    /// Zero 1 KiB blocks in non-zero pages.
    pub zero_blocks: f64,
    /// Non-zero blocks equal to a block earlier in memory.
    pub duplicate_blocks: f64,
}

impl InitialShares {
    /// Measures `mem` (a whole number of pages).
    pub fn measure(mem: &[u8]) -> InitialShares {
        let mut seen = std::collections::HashSet::new();
        let (pages, _) = mem.as_chunks::<PAGE_SIZE>();
        let (mut zero_pages, mut zero_blocks, mut dup_blocks) = (0u64, 0u64, 0u64);
        for page in pages {
            if crate::page::is_zero(page) {
                zero_pages += 1;
                continue;
            }
            let (blocks, _) = page.as_chunks::<BLOCK_SIZE>();
            for block in blocks {
                if crate::page::is_zero(block) {
                    zero_blocks += 1;
                } else if !seen.insert(xxhash_rust::xxh3::xxh3_128(block)) {
                    dup_blocks += 1;
                }
            }
        }
        let n = pages.len().max(1) as f64;
        let blocks = n * BLOCKS_PER_PAGE as f64;
        InitialShares {
            zero_pages: zero_pages as f64 / n,
            zero_blocks: zero_blocks as f64 / blocks,
            duplicate_blocks: dup_blocks as f64 / blocks,
        }
    }

    /// Everything the codec saves on a first pass: zero pages, zero and duplicate blocks.
    pub fn redundancy(&self) -> f64 {
        self.zero_pages + self.zero_blocks + self.duplicate_blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// Pages in a plain array, for driving writers without threads; records every store
    /// and whether it changed the page.
    struct Pages {
        pages: RefCell<Vec<Page>>,
        stores: RefCell<Vec<(Pfn, bool)>>,
    }

    impl PageAccess for Pages {
        fn load(&self, pfn: Pfn, out: &mut Page) {
            out.clone_from(&self.pages.borrow()[usize_of(pfn)]);
        }
        fn store(&self, pfn: Pfn, new: &Page, old: Option<&Page>) {
            let mut pages = self.pages.borrow_mut();
            let page = &mut pages[usize_of(pfn)];
            assert!(
                old.is_none_or(|old| old == page),
                "store's `old` is not the page's content"
            );
            self.stores.borrow_mut().push((pfn, page != new));
            page.clone_from(new);
        }
    }

    fn image(layout: &Layout) -> Vec<Page> {
        let mut scratch = Page::zeroed();
        (0..layout.pages())
            .map(|pfn| {
                let mut p = Page::zeroed();
                layout.initial_page(pfn, &mut p, &mut scratch);
                p
            })
            .collect()
    }

    #[test]
    fn names_parse_and_print() {
        for w in Workload::ALL {
            assert_eq!(w.to_string().parse::<Workload>(), Ok(w));
        }
        assert_eq!("TPCW".parse::<Workload>(), Ok(Workload::Tpcw));
        let err = "mysql".parse::<Workload>().unwrap_err().to_string();
        assert!(
            err.contains("mysql") && err.contains("kernel, tpcw, specjbb, idle"),
            "{err}"
        );
    }

    #[test]
    fn params_are_consistent() {
        for w in Workload::ALL {
            let p = w.params();
            let content: f64 = p.content.iter().map(|&(_, s)| s).sum();
            assert!(
                (content - 1.0).abs() < 1e-9,
                "{w}: content shares sum to {content}"
            );
            for t in p.tiers {
                assert!(t.mix.small + t.mix.medium <= 1.0, "{w}/{}", t.name);
                assert!(t.rate > 0.0);
            }
        }
    }

    #[test]
    fn layout_is_deterministic_and_tiers_are_disjoint_content() {
        for w in Workload::ALL {
            let a = Layout::new(w, 3000, 9).unwrap();
            let b = Layout::new(w, 3000, 9).unwrap();
            assert_eq!(a.kinds, b.kinds);
            assert_eq!(a.tiers, b.tiers);
            let mut seen = std::collections::HashSet::new();
            for (tier, pfns) in w.params().tiers.iter().zip(a.tiers()) {
                assert!(!pfns.is_empty(), "{w}: tier {} empty", tier.name);
                for &p in pfns {
                    assert!(p < 3000);
                    let kind = a.kind(p).expect("content page");
                    assert!(tier.kinds.is_empty() || tier.kinds.contains(&kind));
                    assert!(seen.insert(p), "{w}: page {p} in two tiers");
                }
            }
        }
    }

    #[test]
    fn text_looks_like_source() {
        let layout = Layout::new(Workload::Kernel, 64, 1).unwrap();
        let mut page = Page::zeroed();
        layout.fill_page(Content::Text, 1, &mut page);
        let printable = page
            .0
            .iter()
            .filter(|&&b| b == b'\n' || b == b'\t' || (0x20..0x7f).contains(&b))
            .count();
        assert_eq!(printable, PAGE_SIZE);
        assert!(page.0.iter().filter(|&&b| b == b'\n').count() > 50);
    }

    #[test]
    fn every_write_changes_its_page_and_replays_exactly() {
        for w in Workload::ALL {
            let layout = Arc::new(Layout::new(w, 1024, 5).unwrap());
            let run = |steps: usize| {
                let mem = Pages {
                    pages: RefCell::new(image(&layout)),
                    stores: RefCell::new(Vec::new()),
                };
                let mut core = WriterCore::new(layout.clone(), 0, 1, WriterState::initial(w, 5, 0));
                for _ in 0..steps {
                    let pfn = core.step(&mem).expect("writer has pages");
                    // One store per write, to the page returned, and it changed the page.
                    assert_eq!(mem.stores.take(), vec![(pfn, true)], "{w}");
                }
                (core.state(), mem.pages.into_inner())
            };
            let (s1, m1) = run(300);
            let (s2, m2) = run(300);
            assert_eq!(s1, s2);
            assert!(m1 == m2, "{w}: same seed, same steps, different memory");
        }
    }

    /// Bytes changed by a small write: Fig. 6's left side.
    #[test]
    fn small_writes_change_few_bytes_and_full_writes_most() {
        let mut rng = Rng::new(3);
        let kernel = Layout::new(Workload::Kernel, 64, 1).unwrap();
        let tpcw = Layout::new(Workload::Tpcw, 64, 1).unwrap();
        for kind in [
            Content::Text,
            Content::Binary,
            Content::Database,
            Content::Heap,
        ] {
            let layout = if kind == Content::Database {
                &tpcw
            } else {
                &kernel
            };
            let mut sizes = Vec::new();
            for i in 0..200 {
                let mut page = Page::zeroed();
                layout.fill_page(kind, i, &mut page);
                let before = page.clone();
                small_edit(kind, &mut rng, &mut page);
                sizes.push(page.0.iter().zip(&before.0).filter(|(a, b)| a != b).count());
            }
            sizes.sort_unstable();
            let median = sizes[sizes.len() / 2];
            assert!(
                (1..=160).contains(&median),
                "{kind:?}: median small edit {median} bytes"
            );
            let mut page = Page::zeroed();
            layout.fill_page(kind, 1, &mut page);
            let before = page.clone();
            layout.fill_page(kind, 2, &mut page);
            let changed = page.0.iter().zip(&before.0).filter(|(a, b)| a != b).count();
            assert!(
                changed > PAGE_SIZE / 2,
                "{kind:?}: full rewrite changed {changed}"
            );
        }
    }
}

//! The source side of the codec.

use std::sync::Arc;
use std::time::Instant;

use super::adaptive::Dial;
use super::block_cache::{CacheState, Fate, ZERO_SEQ};
use super::compress::{Compression, Compressor, Level};
use super::delta;
use super::fingerprint::{BlockHasher, FingerprintIndex, Xxh3};
use super::stats::CodecStats;
use super::wire::{BlockCode, RecordKind, varint_len};
use super::{CodecConfig, ConfigError};
use crate::frame::{DEFAULT_FRAME_SIZE, FrameBuf, HEADER_LEN, TAG_LEN};
use crate::page::{BLOCK_SIZE, BLOCKS_PER_PAGE, PAGE_SIZE, Page, PageBatch, Pfn, is_zero};

/// Encodes one stream's pages into records.
///
/// Generic over the block fingerprint so tests can force collisions; production uses
/// [`Xxh3`]. After warm-up (the page index has seen each page once) it allocates nothing.
#[derive(Debug)]
pub struct Encoder<H: BlockHasher = Xxh3> {
    config: CodecConfig,
    hasher: H,
    cache: Option<CacheState>,
    index: Option<FingerprintIndex>,
    stats: CodecStats,
    /// XOR scratch for deltas.
    xor: Box<Page>,
    /// Delta payload scratch, `delta_threshold` bytes.
    delta_out: Box<[u8]>,
    /// Made at the first frame that is compressed (it is sized to the frame).
    compressor: Option<Compressor>,
    /// With `compression = "auto"`: where the controller sets the level.
    dial: Option<Arc<Dial>>,
}

/// What CBR made of a page's blocks.
struct BlockPlan {
    codes: [BlockCode; BLOCKS_PER_PAGE],
    fates: [Fate; BLOCKS_PER_PAGE],
    /// Fingerprints, valid where `hashed` is set.
    fps: [u64; BLOCKS_PER_PAGE],
    hashed: [bool; BLOCKS_PER_PAGE],
    refs: usize,
    zeros: usize,
}

impl BlockPlan {
    fn literals(&self) -> usize {
        BLOCKS_PER_PAGE - self.refs - self.zeros
    }

    /// Payload bytes of the Blocks record (or of a Full record when nothing matched).
    fn payload_len(&self) -> usize {
        if self.literals() == BLOCKS_PER_PAGE {
            PAGE_SIZE
        } else {
            1 + self.literals() * BLOCK_SIZE + self.refs * 4
        }
    }
}

impl Encoder<Xxh3> {
    /// An encoder with the production fingerprint, for frames of the default size.
    pub fn new(config: CodecConfig) -> Result<Self, ConfigError> {
        Self::with_frame_size(config, DEFAULT_FRAME_SIZE)
    }

    /// An encoder for frames of `frame_size` bytes: with compression on, its scratch is
    /// made now, so not even the first frame allocates.
    pub fn with_frame_size(config: CodecConfig, frame_size: usize) -> Result<Self, ConfigError> {
        let mut e = Self::with_hasher(config, Xxh3)?;
        if e.config.compression != Compression::Off {
            let body = frame_size.saturating_sub(HEADER_LEN + TAG_LEN);
            e.compressor = Some(Compressor::new(body));
        }
        Ok(e)
    }
}

impl<H: BlockHasher> Encoder<H> {
    /// An encoder with a chosen fingerprint function.
    pub fn with_hasher(config: CodecConfig, hasher: H) -> Result<Self, ConfigError> {
        config.validate()?;
        let blocks = config.cache_blocks();
        let cache = config
            .uses_cache()
            .then(|| CacheState::new(blocks, config.delta, config.verify_caches));
        let index = config.cbr.then(|| FingerprintIndex::new(blocks));
        let delta_out = vec![
            0;
            if config.delta {
                config.delta_threshold
            } else {
                0
            }
        ];
        Ok(Encoder {
            hasher,
            cache,
            index,
            stats: CodecStats::default(),
            xor: Box::new(Page::zeroed()),
            delta_out: delta_out.into_boxed_slice(),
            compressor: None,
            dial: None,
            config,
        })
    }

    /// With `compression = "auto"`, follow the level `dial` holds and report each compressed
    /// frame's cost to it. Without a dial, `auto` compresses nothing.
    pub fn follow_dial(&mut self, dial: Arc<Dial>) {
        self.dial = Some(dial);
    }

    /// The config this encoder runs.
    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    /// Counters so far.
    pub fn stats(&self) -> &CodecStats {
        &self.stats
    }

    /// Digest of the whole cache state; equal at both ends when they agree. O(cache size).
    pub fn cache_state_digest(&self) -> Option<u64> {
        self.cache.as_ref().map(CacheState::state_digest)
    }

    /// Empties the block cache, keeping its memory; the decoder must reset at the same point
    /// of the stream. Counters are kept.
    pub fn reset_cache(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.reset();
        }
        if let Some(index) = &mut self.index {
            index.clear();
        }
    }

    /// Encodes a batch, handing each full frame to `flush`, which must leave an empty frame
    /// in its place (typically: send it, take a fresh buffer from the pool). A partly filled
    /// frame stays in `frame` for the next batch or for [`finish_frame`](Self::finish_frame).
    pub fn encode_batch(
        &mut self,
        batch: &PageBatch,
        frame: &mut FrameBuf,
        mut flush: impl FnMut(&mut FrameBuf),
    ) {
        let next = batch.iter().skip(1).map(|(pfn, _)| Some(pfn)).chain([None]);
        for ((pfn, page), next) in batch.iter().zip(next) {
            if let Some(next) = next {
                self.prefetch(next);
            }
            if !frame.has_room() {
                self.finish_frame(frame);
                flush(frame);
                debug_assert!(frame.is_empty(), "flush must leave an empty frame");
            }
            self.encode_page(pfn, page, frame);
        }
    }

    /// Stamps what the frame header must carry from the codec (the cache digest) and
    /// compresses the body when the config asks for it and it shrinks. Call it once the frame
    /// holds its last record, before sealing.
    pub fn finish_frame(&mut self, frame: &mut FrameBuf) {
        frame.set_cache_digest(self.cache.as_ref().and_then(CacheState::digest));
        let level = match self.config.compression {
            Compression::Auto => self.dial.as_deref().and_then(Dial::level),
            fixed => fixed.fixed(),
        };
        if let Some(level) = level {
            self.compress(level, frame);
        }
    }

    fn compress(&mut self, level: Level, frame: &mut FrameBuf) {
        if frame.is_empty() || frame.compression().is_some() {
            return;
        }
        let compressor = match &mut self.compressor {
            Some(c) if c.max_input() >= frame.body_capacity() => c,
            slot => slot.insert(Compressor::new(frame.body_capacity())),
        };
        // The clock is read only to tell the adaptive controller what compression costs;
        // nothing on the wire depends on it.
        let started = self.dial.is_some().then(Instant::now);
        let c = compressor.compress_frame(level, frame);
        if let (Some(dial), Some(started)) = (&self.dial, started) {
            dial.record(c, started.elapsed());
        }
        if c.after < c.before {
            self.stats.frames_compressed += 1;
            self.stats.saved_compress += (c.before - c.after) as u64;
        }
    }

    /// Starts loading into the CPU cache what encoding page `pfn` will look up first (its
    /// delta base in the page index). Call it for the next page before encoding this one:
    /// the page index is far larger than the CPU caches. A hint: nothing changes.
    pub fn prefetch(&self, pfn: Pfn) {
        if self.config.delta
            && let Some(cache) = &self.cache
        {
            cache.prefetch_base(pfn);
        }
    }

    /// Encodes one staged page into `frame`.
    ///
    /// # Panics
    /// If `frame` has no room for another record.
    pub fn encode_page(&mut self, pfn: Pfn, page: &Page, frame: &mut FrameBuf) {
        let before = frame.body_len();
        self.stats.bytes_in += PAGE_SIZE as u64;
        if self.config.zero_pages && page.is_zero() {
            frame.append_record(|w| w.header(RecordKind::Zero, pfn));
            self.count(RecordKind::Zero);
            self.stats.saved_zero += PAGE_SIZE as u64;
            if let Some(cache) = &mut self.cache {
                cache.commit(
                    pfn,
                    page.blocks(),
                    &[Fate::Keep(ZERO_SEQ); 4],
                    |_| None,
                    |_, _| {},
                );
            }
        } else if self.cache.is_some() {
            self.encode_cached(pfn, page, frame);
        } else {
            frame.append_record(|w| {
                w.header(RecordKind::Full, pfn);
                w.bytes(&page.0);
            });
            self.count(RecordKind::Full);
        }
        self.stats.bytes_out += (frame.body_len() - before) as u64;
    }

    fn count(&mut self, kind: RecordKind) {
        self.stats.pages[kind as usize] += 1;
    }

    /// CBR lookups for each block.
    fn plan_blocks(&mut self, page: &Page) -> BlockPlan {
        let cache = self.cache.as_ref().expect("cache present");
        let mut plan = BlockPlan {
            codes: [BlockCode::Literal; BLOCKS_PER_PAGE],
            fates: [Fate::Insert; BLOCKS_PER_PAGE],
            fps: [0; BLOCKS_PER_PAGE],
            hashed: [false; BLOCKS_PER_PAGE],
            refs: 0,
            zeros: 0,
        };
        // First every fingerprint (starting to load its bucket), then every lookup: the index
        // is far larger than the CPU caches, and the four buckets load while the next blocks
        // are hashed instead of one after another.
        for (i, block) in page.blocks().iter().enumerate() {
            if self.config.zero_pages && is_zero(block) {
                plan.codes[i] = BlockCode::Zero;
                plan.fates[i] = Fate::Keep(ZERO_SEQ);
                plan.zeros += 1;
                continue;
            }
            if let Some(index) = &self.index {
                plan.fps[i] = self.hasher.fingerprint(block);
                plan.hashed[i] = true;
                index.prefetch(plan.fps[i]);
            }
        }
        let Some(index) = &self.index else {
            return plan;
        };
        let found = std::array::from_fn::<_, BLOCKS_PER_PAGE, _>(|i| {
            plan.hashed[i].then(|| index.lookup(plan.fps[i])).flatten()
        });
        for (i, block) in page.blocks().iter().enumerate() {
            if !plan.hashed[i] {
                continue;
            }
            match found[i] {
                // Confirm the bytes: a fingerprint only nominates a candidate.
                Some(seq) if cache.store.is_live(seq) && cache.store.get(seq) == block => {
                    plan.codes[i] = BlockCode::Ref;
                    plan.fates[i] = Fate::Keep(seq);
                    plan.refs += 1;
                    self.stats.cache_hits += 1;
                }
                Some(seq) if cache.store.is_live(seq) => {
                    self.stats.fingerprint_collisions += 1;
                    self.stats.cache_misses += 1;
                }
                // Indexed, but the FIFO has dropped it since.
                Some(_) => self.stats.cache_misses += 1,
                None => self.stats.cache_misses += 1,
            }
        }
        plan
    }

    fn encode_cached(&mut self, pfn: Pfn, page: &Page, frame: &mut FrameBuf) {
        // The page's base is looked up before the blocks are hashed (nothing in between
        // changes the cache); see also `prefetch`.
        let base = self
            .config
            .delta
            .then(|| self.cache.as_ref().expect("cache present").base(pfn))
            .flatten();
        let mut plan = self.plan_blocks(page);
        let cache = self.cache.as_mut().expect("cache present");

        // A delta only pays when some block missed; it must beat the blocks record too.
        let base = base.filter(|_| plan.literals() > 0);
        if let Some(base) = base {
            // varint(len) + len must stay below the alternative's payload.
            let limit = self
                .delta_out
                .len()
                .min(plan.payload_len().saturating_sub(3));
            let base_blocks = base.map(|seq| cache.store.get(seq));
            match delta::encode(
                page,
                &base_blocks,
                &mut self.xor,
                &mut self.delta_out[..limit],
            ) {
                Some((len, touched)) => {
                    let payload = &self.delta_out[..len];
                    frame.append_record(|w| {
                        w.header(RecordKind::Delta, pfn);
                        w.varint(len as u64);
                        w.bytes(payload);
                    });
                    self.stats.pages[RecordKind::Delta as usize] += 1;
                    self.stats.saved_delta += (PAGE_SIZE - len - varint_len(len as u64)) as u64;
                    for (i, fate) in plan.fates.iter_mut().enumerate() {
                        *fate = if touched & (1 << i) != 0 {
                            Fate::Insert
                        } else {
                            Fate::Keep(base[i])
                        };
                    }
                    self.commit(pfn, page, &plan);
                    return;
                }
                None => self.stats.delta_overflows += 1,
            }
        }

        if plan.literals() == BLOCKS_PER_PAGE {
            frame.append_record(|w| {
                w.header(RecordKind::Full, pfn);
                w.bytes(&page.0);
            });
            self.count(RecordKind::Full);
        } else {
            let store = &cache.store;
            frame.append_record(|w| {
                w.header(RecordKind::Blocks, pfn);
                w.byte(BlockCode::mask(&plan.codes));
                for ((code, fate), block) in plan.codes.iter().zip(&plan.fates).zip(page.blocks()) {
                    match (code, fate) {
                        (BlockCode::Literal, _) => w.bytes(block),
                        (BlockCode::Ref, Fate::Keep(seq)) => w.u32(store.slot(*seq)),
                        _ => {}
                    }
                }
            });
            self.count(RecordKind::Blocks);
            self.stats.saved_zero += (plan.zeros * BLOCK_SIZE) as u64;
            self.stats.saved_cbr += (plan.refs * (BLOCK_SIZE - 4)) as u64;
        }
        self.commit(pfn, page, &plan);
    }

    /// Applies the record's cache effects and keeps the fingerprint index in step.
    fn commit(&mut self, pfn: Pfn, page: &Page, plan: &BlockPlan) {
        let cache = self.cache.as_mut().expect("cache present");
        let before = cache.evictions();
        let (index, hasher) = (&mut self.index, &self.hasher);
        let reuse = hasher.is_xxh3();
        let known = |i: usize| (reuse && plan.hashed[i]).then_some(plan.fps[i]);
        cache.commit(pfn, page.blocks(), &plan.fates, known, |i, seq| {
            if let Some(index) = index {
                // A block a delta touched was not hashed if CBR had seen it as zero.
                let fp = if plan.hashed[i] {
                    plan.fps[i]
                } else {
                    hasher.fingerprint(&page.blocks()[i])
                };
                index.inserted(fp, seq);
            }
        });
        self.stats.cache_evictions += cache.evictions() - before;
    }
}

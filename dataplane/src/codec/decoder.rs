//! The destination side of the codec.

use super::block_cache::{CacheState, Fate, ZERO_SEQ};
use super::compress::{Algorithm, CompressError, Decompressor};
use super::delta::{self, DeltaError};
use super::stats::CodecStats;
use super::wire::{BlockCode, RecordKind, RecordReader, WireError};
use super::{CodecConfig, ConfigError};
use crate::frame::{DEFAULT_FRAME_SIZE, HEADER_LEN, TAG_LEN};
use crate::page::{BLOCK_SIZE, BLOCKS_PER_PAGE, Block, PAGE_SIZE, Page, Pfn, blocks_of};

/// Where decoded pages go: the destination guest's memory.
pub trait PageSink {
    /// The frame to fill for page `pfn` (already range-checked). Its old content is not read:
    /// the decoder overwrites all 4 KiB.
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page;

    /// Page `pfn` is all zeros. Override when zeroing can be skipped (fresh anonymous memory).
    fn zero_page(&mut self, pfn: Pfn) {
        self.page_mut(pfn).0.fill(0);
    }

    /// Page `pfn` is `data`, whole (a page sent in full). The default copies it into
    /// [`page_mut`](Self::page_mut) with non-temporal stores: guest memory is written once
    /// here and not read again soon, and the decoder reads the page from `data`, still in
    /// the CPU's cache, for everything else.
    fn write_page(&mut self, pfn: Pfn, data: &[u8; PAGE_SIZE]) {
        crate::page::copy_streaming(&mut self.page_mut(pfn).0, data);
    }
}

/// A plain array of pages is a sink (tests, benchmarks, fuzzing); page numbers index it.
impl PageSink for [Page] {
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
        &mut self[usize::try_from(pfn).expect("page number range-checked")]
    }
}

/// What can be wrong with a frame's records. Each means the sender is broken or hostile (the
/// frame was authenticated): the migration must abort and the destination discard its copy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// the record structure is malformed
    #[error(transparent)]
    Wire(#[from] WireError),
    /// a page number beyond the guest
    #[error("record for page {pfn} but the guest has {page_count} pages")]
    PageOutOfRange {
        /// The page number.
        pfn: Pfn,
        /// Pages in the destination guest.
        page_count: u64,
    },
    /// a cache reference or delta arrived while this stream keeps no cache
    #[error("{kind} record for page {pfn} but this stream runs without a block cache")]
    NoCache {
        /// The record kind.
        kind: &'static str,
        /// The page number.
        pfn: Pfn,
    },
    /// a cache slot outside the cache or never filled
    #[error("page {pfn} references cache slot {slot}, which is not filled (capacity {capacity})")]
    BadSlot {
        /// The page number.
        pfn: Pfn,
        /// The slot.
        slot: u32,
        /// Slots in the cache.
        capacity: usize,
    },
    /// a delta for a page whose previous version is not cached
    #[error("delta for page {pfn}, whose previous version is not in the cache")]
    DeltaWithoutBase {
        /// The page number.
        pfn: Pfn,
    },
    /// a delta payload that does not apply
    #[error("delta for page {pfn}: {source}")]
    BadDelta {
        /// The page number.
        pfn: Pfn,
        /// What is wrong with it.
        source: DeltaError,
    },
    /// the header's record count disagrees with the body
    #[error("frame header promises {expected} records, body holds {found}")]
    RecordCount {
        /// Records the header promised.
        expected: u32,
        /// Records found.
        found: u32,
    },
    /// the two ends' block caches differ
    #[error("block caches diverged: sender digest {sender:#018x}, ours {ours:#018x}")]
    CacheDiverged {
        /// The sender's digest.
        sender: u64,
        /// Ours.
        ours: u64,
    },
    /// a digest was sent but this end keeps none
    #[error("frame carries a cache digest but cache verification is off here")]
    UnexpectedDigest,
    /// a page that travels on another stream
    #[error("record for page {pfn}, which belongs to another stream")]
    NotThisStream {
        /// The page number.
        pfn: Pfn,
    },
    /// a compressed body that does not decompress within a frame
    #[error(transparent)]
    Decompress(#[from] CompressError),
    /// a body compressed with an algorithm the handshake did not agree on
    #[error("frame compressed with {algorithm}, but this stream agreed on compression = {agreed}")]
    CompressionNotAgreed {
        /// The algorithm the header names.
        algorithm: Algorithm,
        /// The setting both ends agreed on.
        agreed: super::Compression,
    },
    /// an earlier frame failed; the stream cannot continue
    #[error("decoder stopped after an earlier error; the stream must be restarted")]
    Poisoned,
}

/// Decodes one stream's records into page writes.
pub struct Decoder {
    config: CodecConfig,
    page_count: u64,
    cache: Option<CacheState>,
    stats: CodecStats,
    poisoned: bool,
    owns: Option<Box<dyn Fn(Pfn) -> bool + Send>>,
    /// Present when the config allows compression; bounded by one frame body.
    decompressor: Option<Decompressor>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("page_count", &self.page_count)
            .field("poisoned", &self.poisoned)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Decoder {
    /// A decoder for a guest of `page_count` pages and frames of the default size. `config`
    /// must equal the encoder's.
    pub fn new(config: CodecConfig, page_count: u64) -> Result<Self, ConfigError> {
        Self::with_frame_size(config, page_count, DEFAULT_FRAME_SIZE)
    }

    /// A decoder for frames of up to `frame_size` bytes on the wire: a compressed body may
    /// decompress to at most what such a frame holds uncompressed.
    pub fn with_frame_size(
        config: CodecConfig,
        page_count: u64,
        frame_size: usize,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        let decompressor = (config.compression != super::Compression::Off)
            .then(|| Decompressor::new(frame_size.saturating_sub(HEADER_LEN + TAG_LEN)));
        let cache = config
            .uses_cache()
            .then(|| CacheState::new(config.cache_blocks(), config.delta, config.verify_caches));
        Ok(Decoder {
            config,
            page_count,
            cache,
            stats: CodecStats::default(),
            poisoned: false,
            owns: None,
            decompressor,
        })
    }

    /// Accepts only pages for which `owns` holds (the pages assigned to this stream); any
    /// other is refused with [`DecodeError::NotThisStream`] before anything is written.
    pub fn restrict_to(&mut self, owns: impl Fn(Pfn) -> bool + Send + 'static) {
        self.owns = Some(Box::new(owns));
    }

    /// Counters so far.
    pub fn stats(&self) -> &CodecStats {
        &self.stats
    }

    /// The config this decoder runs.
    pub fn config(&self) -> &CodecConfig {
        &self.config
    }

    /// Digest of the whole cache state; equal at both ends when they agree. O(cache size).
    pub fn cache_state_digest(&self) -> Option<u64> {
        self.cache.as_ref().map(CacheState::state_digest)
    }

    /// Empties the block cache, keeping its memory, at the point of the stream where the
    /// encoder reset its own. Counters are kept.
    pub fn reset_cache(&mut self) {
        if let Some(cache) = &mut self.cache {
            cache.reset();
        }
    }

    /// Decodes an opened frame's body into `sink`. `records` and `cache_digest` come from
    /// the frame header.
    ///
    /// Records are applied as they are read: after an error, pages of this frame may have
    /// been written and the decoder refuses all further frames, so the destination must
    /// discard the migration.
    pub fn decode(
        &mut self,
        body: &[u8],
        records: u32,
        cache_digest: Option<u64>,
        sink: &mut (impl PageSink + ?Sized),
    ) -> Result<(), DecodeError> {
        if self.poisoned {
            return Err(DecodeError::Poisoned);
        }
        let result = self.decode_body(body, records, cache_digest, sink);
        self.poisoned = result.is_err();
        result
    }

    /// Like [`decode`](Self::decode), for a body that may be compressed: `compression` is
    /// what the frame header says (`OpenedFrame::compression`).
    pub fn decode_compressed(
        &mut self,
        body: &[u8],
        compression: Option<Algorithm>,
        records: u32,
        cache_digest: Option<u64>,
        sink: &mut (impl PageSink + ?Sized),
    ) -> Result<(), DecodeError> {
        let Some(algorithm) = compression else {
            return self.decode(body, records, cache_digest, sink);
        };
        if self.poisoned {
            return Err(DecodeError::Poisoned);
        }
        let agreed = self.config.compression;
        // Taken out for the call, so the records (in its scratch) and `self` can both be
        // borrowed; moving it allocates nothing.
        let result = match self.decompressor.take() {
            Some(mut d) if agreed.accepts(algorithm) => {
                let r = match d.decompress(algorithm, body) {
                    Ok(plain) => {
                        let saved = plain.len().saturating_sub(body.len()) as u64;
                        self.decode_body(plain, records, cache_digest, sink)
                            .map(|()| saved)
                    }
                    Err(e) => Err(e.into()),
                };
                self.decompressor = Some(d);
                r.map(|saved| {
                    self.stats.frames_compressed += 1;
                    self.stats.saved_compress += saved;
                })
            }
            d => {
                self.decompressor = d;
                Err(DecodeError::CompressionNotAgreed { algorithm, agreed })
            }
        };
        self.poisoned = result.is_err();
        result
    }

    fn decode_body(
        &mut self,
        body: &[u8],
        records: u32,
        cache_digest: Option<u64>,
        sink: &mut (impl PageSink + ?Sized),
    ) -> Result<(), DecodeError> {
        let mut reader = RecordReader::new(body);
        let mut found = 0u32;
        while !reader.is_empty() {
            if found == records {
                return Err(DecodeError::RecordCount {
                    expected: records,
                    found: found + 1,
                });
            }
            let start = reader.offset();
            let (kind, pfn) = reader.header()?;
            if pfn >= self.page_count {
                return Err(DecodeError::PageOutOfRange {
                    pfn,
                    page_count: self.page_count,
                });
            }
            if self.owns.as_ref().is_some_and(|owns| !owns(pfn)) {
                return Err(DecodeError::NotThisStream { pfn });
            }
            match kind {
                RecordKind::Zero => self.zero(pfn, sink),
                RecordKind::Full => self.full(pfn, &mut reader, sink)?,
                RecordKind::Blocks => self.blocks(pfn, &mut reader, sink)?,
                RecordKind::Delta => self.delta(pfn, &mut reader, sink)?,
            }
            self.stats.pages[kind as usize] += 1;
            self.stats.bytes_in += PAGE_SIZE as u64;
            self.stats.bytes_out += (reader.offset() - start) as u64;
            found += 1;
        }
        if found != records {
            return Err(DecodeError::RecordCount {
                expected: records,
                found,
            });
        }
        let ours = self.cache.as_ref().and_then(CacheState::digest);
        match (cache_digest, ours) {
            (Some(sender), Some(ours)) if sender != ours => {
                Err(DecodeError::CacheDiverged { sender, ours })
            }
            (Some(_), None) => Err(DecodeError::UnexpectedDigest),
            _ => Ok(()),
        }
    }

    fn cache_for(&mut self, kind: RecordKind, pfn: Pfn) -> Result<&mut CacheState, DecodeError> {
        self.cache.as_mut().ok_or(DecodeError::NoCache {
            kind: kind.name(),
            pfn,
        })
    }

    fn commit(
        &mut self,
        pfn: Pfn,
        blocks: &[Block; BLOCKS_PER_PAGE],
        fates: &[Fate; BLOCKS_PER_PAGE],
    ) {
        if let Some(cache) = &mut self.cache {
            let before = cache.evictions();
            cache.commit(pfn, blocks, fates, |_| None, |_, _| {});
            self.stats.cache_evictions += cache.evictions() - before;
        }
    }

    fn zero(&mut self, pfn: Pfn, sink: &mut (impl PageSink + ?Sized)) {
        sink.zero_page(pfn);
        self.stats.saved_zero += PAGE_SIZE as u64;
        self.commit(
            pfn,
            Page::zeroed().blocks(),
            &[Fate::Keep(ZERO_SEQ); BLOCKS_PER_PAGE],
        );
    }

    fn full(
        &mut self,
        pfn: Pfn,
        reader: &mut RecordReader<'_>,
        sink: &mut (impl PageSink + ?Sized),
    ) -> Result<(), DecodeError> {
        // Guest memory is written, the cache filled and the blocks hashed from the frame, not
        // from the page just written.
        let data = reader.array::<PAGE_SIZE>()?;
        sink.write_page(pfn, data);
        self.commit(pfn, blocks_of(data), &[Fate::Insert; BLOCKS_PER_PAGE]);
        Ok(())
    }

    fn blocks(
        &mut self,
        pfn: Pfn,
        reader: &mut RecordReader<'_>,
        sink: &mut (impl PageSink + ?Sized),
    ) -> Result<(), DecodeError> {
        let mask_at = reader.offset();
        let mask = reader.byte()?;
        let mut codes = [BlockCode::Literal; BLOCKS_PER_PAGE];
        for (i, code) in codes.iter_mut().enumerate() {
            *code = BlockCode::from_mask(mask, i).ok_or(WireError::BadMask {
                mask,
                offset: mask_at,
            })?;
        }
        let page = sink.page_mut(pfn);
        let mut fates = [Fate::Insert; BLOCKS_PER_PAGE];
        // References resolve against the cache as it was before this record: insertions
        // come after, in `commit`, exactly as at the source.
        for ((code, fate), out) in codes.iter().zip(&mut fates).zip(page.blocks_mut()) {
            match code {
                BlockCode::Literal => out.copy_from_slice(reader.array::<BLOCK_SIZE>()?),
                BlockCode::Zero => {
                    out.fill(0);
                    *fate = Fate::Keep(ZERO_SEQ);
                    self.stats.saved_zero += BLOCK_SIZE as u64;
                }
                BlockCode::Ref => {
                    let slot = reader.u32()?;
                    let cache = self.cache.as_ref().ok_or(DecodeError::NoCache {
                        kind: "cache reference in a blocks",
                        pfn,
                    })?;
                    let seq = cache.store.seq_at(slot).ok_or(DecodeError::BadSlot {
                        pfn,
                        slot,
                        capacity: cache.store.capacity(),
                    })?;
                    out.copy_from_slice(cache.store.get(seq));
                    *fate = Fate::Keep(seq);
                    self.stats.saved_cbr += (BLOCK_SIZE - 4) as u64;
                }
            }
        }
        self.commit(pfn, page.blocks(), &fates);
        Ok(())
    }

    fn delta(
        &mut self,
        pfn: Pfn,
        reader: &mut RecordReader<'_>,
        sink: &mut (impl PageSink + ?Sized),
    ) -> Result<(), DecodeError> {
        let len_at = reader.offset();
        let len = reader.varint()?;
        let len =
            usize::try_from(len)
                .ok()
                .filter(|&l| l < PAGE_SIZE)
                .ok_or(DecodeError::BadDelta {
                    pfn,
                    source: DeltaError::Malformed { at: len_at },
                })?;
        let payload = reader.bytes(len)?;
        let cache = self.cache_for(RecordKind::Delta, pfn)?;
        let base = cache
            .base(pfn)
            .ok_or(DecodeError::DeltaWithoutBase { pfn })?;
        let page = sink.page_mut(pfn);
        for (out, &seq) in page.blocks_mut().iter_mut().zip(&base) {
            out.copy_from_slice(cache.store.get(seq));
        }
        let touched =
            delta::apply(payload, page).map_err(|source| DecodeError::BadDelta { pfn, source })?;
        let fates = std::array::from_fn(|i| {
            if touched & (1 << i) != 0 {
                Fate::Insert
            } else {
                Fate::Keep(base[i])
            }
        });
        // A hostile delta may use the whole page (our encoder stops short of it): saturate.
        let record_payload = reader.offset() - len_at;
        self.stats.saved_delta += PAGE_SIZE.saturating_sub(record_payload) as u64;
        self.commit(pfn, page.blocks(), &fates);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoder;
    use crate::frame::FrameBuf;

    /// Guest memory that says how each page was written.
    struct Recording {
        pages: Vec<Page>,
        whole: Vec<Pfn>,
    }

    impl PageSink for Recording {
        fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
            self.pages.page_mut(pfn)
        }

        fn write_page(&mut self, pfn: Pfn, data: &[u8; PAGE_SIZE]) {
            self.whole.push(pfn);
            crate::page::copy_streaming(&mut self.page_mut(pfn).0, data);
        }
    }

    fn page(seed: u8) -> Page {
        let mut p = Page::zeroed();
        for (i, b) in (0u8..=255).cycle().zip(p.0.iter_mut()) {
            *b = i.wrapping_mul(31).wrapping_add(seed) | 1;
        }
        p
    }

    /// A full page lands through `write_page` and is cached from the frame: a later delta
    /// against it, and a block reference into it, rebuild the exact bytes, and both ends'
    /// caches agree.
    #[test]
    fn full_pages_are_written_whole_and_cached_from_the_frame() {
        let config = CodecConfig::default();
        let mut enc = Encoder::new(config.clone()).unwrap();
        let mut dec = Decoder::new(config, 4).unwrap();
        let mut guest = Recording {
            pages: vec![Page::zeroed(); 4],
            whole: Vec::new(),
        };
        let first = page(1);
        let mut edited = first.clone();
        edited.0[100..108].copy_from_slice(b"changed!");
        let mut shared = page(9);
        shared.blocks_mut()[2] = first.blocks()[3];

        let mut frame = FrameBuf::new(crate::frame::DEFAULT_FRAME_SIZE);
        enc.encode_page(0, &first, &mut frame);
        enc.encode_page(1, &page(5), &mut frame);
        enc.finish_frame(&mut frame);
        dec.decode(
            frame.body(),
            frame.records(),
            frame.cache_digest(),
            &mut guest,
        )
        .unwrap();
        assert_eq!(guest.whole, vec![0, 1], "full pages go through write_page");

        frame.clear();
        enc.encode_page(0, &edited, &mut frame);
        enc.encode_page(2, &shared, &mut frame);
        enc.finish_frame(&mut frame);
        dec.decode(
            frame.body(),
            frame.records(),
            frame.cache_digest(),
            &mut guest,
        )
        .unwrap();
        let kinds = &dec.stats().pages;
        assert_eq!(kinds[RecordKind::Delta as usize], 1, "{kinds:?}");
        assert_eq!(kinds[RecordKind::Blocks as usize], 1, "{kinds:?}");
        assert_eq!(guest.pages[0], edited);
        assert_eq!(guest.pages[1], page(5));
        assert_eq!(guest.pages[2], shared);
        assert_eq!(enc.cache_state_digest(), dec.cache_state_digest());
    }
}

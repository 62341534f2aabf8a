//! The destination pipeline: recv -> open+decode[s] -> guest memory.
//!
//! A frame is opened and decoded on the same thread, while it is still in that core's cache.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, bounded};

use super::{Leftover, Leftovers, PipelineError, join_all, spawn_stage, stream_of};
use crate::codec::PageSink;
use crate::codec::{CodecConfig, CodecStats, Decoder};
use crate::crypto::{Opener, StreamKey};
use crate::guest::DestGuest;
use crate::guest::chunk_digest::{ChunkDigests, ChunkHasher};
use crate::page::{Page, Pfn};
use crate::transport::{FramePool, Incoming, receive_frames};

/// Frames each stream may hold between the socket and its decoder.
const FRAMES_PER_STREAM: usize = 16;

/// Decoding progress the destination driver waits on.
#[derive(Debug)]
pub struct SinkProgress {
    decoded: Vec<AtomicU64>,
    failed: Mutex<Option<String>>,
    changed: Condvar,
    lock: Mutex<()>,
    /// Someone is in `wait_for`: only then does a decoded frame take the lock to wake them.
    waiting: AtomicBool,
}

impl SinkProgress {
    fn bump(&self, stream: usize) {
        // SeqCst pairs with `wait_for`: either it sees this count, or this sees `waiting`
        // and wakes it (under the lock it holds while checking), so no wake-up is lost.
        self.decoded[stream].fetch_add(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            let _g = self.lock.lock().expect("progress lock");
            self.changed.notify_all();
        }
    }

    fn fail(&self, why: String) {
        self.failed
            .lock()
            .expect("progress lock")
            .get_or_insert(why);
        let _g = self.lock.lock().expect("progress lock");
        self.changed.notify_all();
    }

    /// Why the pipeline failed, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed.lock().expect("progress lock").clone()
    }

    /// Frames decoded on each stream.
    pub fn decoded(&self) -> Vec<u64> {
        self.decoded
            .iter()
            .map(|d| d.load(Ordering::Acquire))
            .collect()
    }

    /// Waits until each stream s has decoded `frames[s]` frames. `Err` with the reason when
    /// the pipeline failed first, or when `timeout` passes without progress.
    pub fn wait_for(&self, frames: &[u64], timeout: Duration) -> Result<(), String> {
        let g = self.lock.lock().expect("progress lock");
        self.waiting.store(true, Ordering::SeqCst);
        let r = self.wait_locked(g, frames, timeout);
        self.waiting.store(false, Ordering::SeqCst);
        r
    }

    fn wait_locked(
        &self,
        mut g: std::sync::MutexGuard<'_, ()>,
        frames: &[u64],
        timeout: Duration,
    ) -> Result<(), String> {
        let mut last = self.decoded();
        loop {
            if let Some(why) = self.failed.lock().expect("progress lock").clone() {
                return Err(why);
            }
            let now = self.decoded();
            if now.iter().zip(frames).all(|(d, want)| d >= want) {
                return Ok(());
            }
            let (guard, t) = self
                .changed
                .wait_timeout(g, timeout)
                .expect("progress lock");
            g = guard;
            let after = self.decoded();
            if t.timed_out() && after == last {
                return Err(format!(
                    "no frame arrived for {} s (decoded {after:?}, expected {frames:?})",
                    timeout.as_secs()
                ));
            }
            last = after;
        }
    }
}

/// A running destination pipeline.
#[derive(Debug)]
pub struct SinkPipeline {
    threads: Vec<JoinHandle<Result<Leftover, PipelineError>>>,
    /// The decoders, kept from the stream threads' exit until the pipeline drops (their
    /// page writers are dropped in the threads: the digest needs them closed).
    leftovers: Leftovers,
    sockets: Vec<TcpStream>,
    /// Progress, for the driver.
    pub progress: Arc<SinkProgress>,
    /// Bytes read off the sockets.
    pub wire_bytes: Arc<AtomicU64>,
    /// Codec counters per stream.
    pub stats: Arc<Mutex<Vec<CodecStats>>>,
    /// Digest chunks hashed as their pages landed in order (valid once the threads end).
    pub digests: Arc<ChunkDigests>,
    /// Codec counters of the pipelines this one resumed from.
    carried: CodecStats,
}

impl SinkPipeline {
    /// Starts the threads; `sockets[s]` and `keys[s]` belong to data stream s.
    pub fn start(
        guest: &Arc<dyn DestGuest>,
        sockets: Vec<TcpStream>,
        keys: &[StreamKey],
        codec: &CodecConfig,
        frame_size: usize,
        pin: bool,
    ) -> Result<Self, PipelineError> {
        let digests = Arc::new(ChunkDigests::new(guest.page_count()));
        let n = sockets.len();
        let pool = FramePool::new((n * FRAMES_PER_STREAM).max(4), frame_size);
        let progress = Arc::new(SinkProgress {
            decoded: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: Mutex::new(None),
            changed: Condvar::new(),
            lock: Mutex::new(()),
            waiting: AtomicBool::new(false),
        });
        let stats = Arc::new(Mutex::new(vec![CodecStats::default(); n]));
        let wire_bytes = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut incoming_txs = Vec::new();
        let mut checkers = Vec::new();
        let page_count = guest.page_count();

        for (s, key) in keys.iter().enumerate().take(n) {
            let (in_tx, in_rx) = bounded::<Incoming>(FRAMES_PER_STREAM / 2);
            incoming_txs.push(in_tx);
            let mut opener = Opener::new(key, frame_size);
            opener.allow_compression(codec.compression);
            checkers.push(opener.header_checker());
            let mut decoder = Decoder::with_frame_size(codec.clone(), page_count, frame_size)
                .map_err(|e| {
                    PipelineError::Guest(crate::guest::GuestError::BadState(e.to_string()))
                })?;
            decoder.restrict_to(move |pfn| stream_of(pfn, n) == s);
            let mut stage = StreamStage {
                stream: s,
                opener,
                decoder,
                writer: guest.writer(Box::new(move |pfn| stream_of(pfn, n) == s))?,
                pool: pool.clone(),
                stats: stats.clone(),
                progress: progress.clone(),
                digests: digests.clone(),
                hasher: ChunkHasher::default(),
            };
            let progress = progress.clone();
            threads.push(spawn_stage(
                format!("sf-decode-{s}"),
                1 + s,
                pin,
                move || {
                    stage
                        .run(&in_rx)
                        .inspect_err(|e| progress.fail(e.to_string()))?;
                    Ok(Some(Box::new(stage.decoder) as Box<dyn Send>))
                },
            ));
        }

        let socks = sockets
            .iter()
            .map(TcpStream::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| crate::transport::TransportError::Io {
                stream: 0,
                op: "clone socket",
                source,
            })?;
        let (wire, prog_r) = (wire_bytes.clone(), progress.clone());
        threads.push(spawn_stage("sf-recv".into(), 0, pin, move || {
            receive_frames(&socks, &pool, &checkers, &incoming_txs, &wire)
                .map(|_| None)
                .map_err(PipelineError::from)
                .inspect_err(|e| prog_r.fail(e.to_string()))
        }));
        Ok(SinkPipeline {
            threads,
            leftovers: Leftovers::default(),
            sockets,
            progress,
            wire_bytes,
            stats,
            digests,
            carried: CodecStats::default(),
        })
    }

    /// A resumed migration's new pipeline counts on from `old`'s figures (wire bytes, codec
    /// counters); `old` has stopped.
    pub fn carry_over(&mut self, old: &SinkPipeline) {
        let wire = old.wire_bytes.load(std::sync::atomic::Ordering::Relaxed);
        self.wire_bytes
            .fetch_add(wire, std::sync::atomic::Ordering::Relaxed);
        self.carried = old.codec_totals();
    }

    /// Codec counters summed over the streams (and the pipelines this one resumed from).
    pub fn codec_totals(&self) -> CodecStats {
        let mut t = self.carried.clone();
        for s in self.stats.lock().expect("stats lock").iter() {
            t.add(s);
        }
        t
    }

    /// Closes the sockets (the receive thread ends) and joins every thread.
    pub fn stop(&mut self) -> Result<(), PipelineError> {
        for s in &self.sockets {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        join_all(std::mem::take(&mut self.threads), &mut self.leftovers)
    }

    /// Waits for the source to close every stream, then joins every thread (dropping the
    /// guest's page writers). Calling it again does nothing.
    pub fn finish(&mut self) -> Result<(), PipelineError> {
        join_all(std::mem::take(&mut self.threads), &mut self.leftovers)
    }
}

/// Passes page writes through to the guest and hashes each page once it is written (on the
/// next write, or at the frame's end), while it is still in this core's cache.
struct HashingSink<'a> {
    inner: &'a mut dyn crate::guest::PageWriter,
    hasher: &'a mut ChunkHasher,
    digests: &'a ChunkDigests,
    /// The page handed out last, complete once the decoder asks for another.
    pending: Option<Pfn>,
}

impl HashingSink<'_> {
    fn flush(&mut self) {
        if let Some(pfn) = self.pending.take() {
            let page = self.inner.page_mut(pfn);
            self.hasher.feed(self.digests, pfn, &page.0, true);
        }
    }
}

impl PageSink for HashingSink<'_> {
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
        if self.pending != Some(pfn) {
            self.flush();
        }
        self.pending = Some(pfn);
        self.inner.page_mut(pfn)
    }

    fn zero_page(&mut self, pfn: Pfn) {
        self.flush();
        self.inner.zero_page(pfn);
        self.hasher.feed(self.digests, pfn, &ZERO_PAGE.0, true);
    }

    fn write_page(&mut self, pfn: Pfn, data: &[u8; crate::page::PAGE_SIZE]) {
        self.flush();
        self.inner.write_page(pfn, data);
        // Hashed from the frame: the guest's copy may have bypassed the CPU's cache.
        self.hasher.feed(self.digests, pfn, data, true);
    }
}

static ZERO_PAGE: Page = Page([0; crate::page::PAGE_SIZE]);

/// One stream's opener and decoder.
struct StreamStage {
    stream: usize,
    opener: Opener,
    decoder: Decoder,
    writer: Box<dyn crate::guest::PageWriter>,
    pool: FramePool,
    stats: Arc<Mutex<Vec<CodecStats>>>,
    progress: Arc<SinkProgress>,
    digests: Arc<ChunkDigests>,
    hasher: ChunkHasher,
}

impl StreamStage {
    /// Opens and decodes each frame the receive thread hands over, in order.
    fn run(&mut self, incoming: &Receiver<Incoming>) -> Result<(), PipelineError> {
        let _stage = tracing::debug_span!("decode_stage", stream = self.stream).entered();
        for mut inc in incoming {
            let stream = self.stream;
            let opened = {
                let _span = tracing::trace_span!("open").entered();
                self.opener.open(&mut inc.frame.frame.raw_mut()[..inc.len])
            };
            let _span = tracing::trace_span!("decode").entered();
            let r = match opened {
                Ok(opened) => {
                    let mut sink = HashingSink {
                        inner: self.writer.as_mut(),
                        hasher: &mut self.hasher,
                        digests: &self.digests,
                        pending: None,
                    };
                    let r = self.decoder.decode_compressed(
                        opened.body,
                        opened.compression,
                        opened.records,
                        opened.cache_digest,
                        &mut sink,
                    );
                    sink.flush();
                    r.map_err(|source| PipelineError::Decode { stream, source })
                }
                Err(source) => Err(PipelineError::Open { stream, source }),
            };
            self.pool.give(inc.frame);
            r?;
            if let Ok(mut all) = self.stats.try_lock() {
                all[stream].clone_from(self.decoder.stats());
            }
            self.progress.bump(stream);
        }
        self.stats.lock().expect("stats lock")[self.stream].clone_from(self.decoder.stats());
        Ok(())
    }
}

//! The source pipeline: scan -> read+encode+seal[s] -> send.
//!
//! The scan thread only splits each iteration's pages into per-stream lists of page numbers.
//! Each stream's thread copies its pages out of the guest, encodes and seals them: the stable
//! copy, the frame it becomes and the sealing all stay in one core's cache, no page crosses
//! between cores, and guest reads run on every stream at once.

use std::net::TcpStream;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::{Leftover, Leftovers, PipelineError, Stopped, join_all, spawn_stage, stream_of};
use crate::codec::adaptive::Dial;
use crate::codec::{CodecConfig, CodecStats, Compression, Encoder};
use crate::crypto::{Sealer, StreamKey};
use crate::guest::chunk_digest::{ChunkDigests, ChunkHasher};
use crate::guest::{DirtyBitmap, SourceGuest};
use crate::page::{PageBatch, Pfn};
use crate::transport::{FramePool, Outgoing, SendMeter, TokenBucket, send_frames_metered};

/// Pages per batch handed from the scan thread to an encoder.
pub const BATCH_PAGES: usize = 64;

/// Frames each stream may have between its encoder and the socket.
const FRAMES_PER_STREAM: usize = 16;

/// What the driver asks of the scan thread.
#[derive(Debug)]
pub enum ScanCmd {
    /// Read and send these pages (one pre-copy iteration, or the final copy).
    Iteration {
        /// Iteration number.
        iteration: u32,
        /// Pages to send.
        pages: DirtyBitmap,
    },
}

/// A stream has sealed every frame of an iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flushed {
    /// Stream index.
    pub stream: usize,
    /// Iteration.
    pub iteration: u32,
    /// Frames sealed on the stream since the start.
    pub frames: u64,
}

enum Work {
    /// Pages to read and send (a recycled list; give it back).
    Pages(Vec<Pfn>),
    Flush(u32),
}

/// How to run the pipeline.
#[derive(Debug, Clone)]
pub struct SourceSettings {
    /// The codec of every stream.
    pub codec: CodecConfig,
    /// Data frame size.
    pub frame_size: usize,
    /// Send-side limit in bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Pin stage threads to cores.
    pub pin_threads: bool,
}

/// A running source pipeline.
#[derive(Debug)]
pub struct SourcePipeline {
    scan: Option<Sender<ScanCmd>>,
    flushed: Receiver<Flushed>,
    threads: Vec<JoinHandle<Result<Leftover, PipelineError>>>,
    /// The encoders, kept from the stream threads' exit until the pipeline drops.
    leftovers: Leftovers,
    /// Bytes written to the sockets so far.
    pub wire_bytes: Arc<AtomicU64>,
    /// Pages read from the guest so far (all iterations).
    pub pages_scanned: Arc<AtomicU64>,
    /// Codec counters per stream, updated after each batch.
    pub stats: Arc<Mutex<Vec<CodecStats>>>,
    /// Digest chunks the stream threads hashed as they read them in order; the driver
    /// invalidates them from the dirty log.
    pub digests: Arc<ChunkDigests>,
    streams: usize,
    /// Flush reports received so far for the iteration being waited on.
    partial: (u32, Vec<Option<u64>>),
    /// Dropping it stops the `auto` compression controller.
    stop_auto: Option<Sender<()>>,
    /// Codec counters of the pipelines this one resumed from.
    carried: CodecStats,
}

impl SourcePipeline {
    /// Starts the threads. `sockets[s]` and `keys[s]` belong to data stream s.
    pub fn start(
        guest: Arc<dyn SourceGuest>,
        sockets: Vec<TcpStream>,
        keys: &[StreamKey],
        settings: &SourceSettings,
    ) -> Result<Self, crate::codec::ConfigError> {
        let digests = Arc::new(ChunkDigests::new(guest.page_count()));
        let n = sockets.len();
        let pool = FramePool::new((n * FRAMES_PER_STREAM).max(4), settings.frame_size);
        let wire_bytes = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(Mutex::new(vec![CodecStats::default(); n]));
        let (flushed_tx, flushed) = bounded(4 * n);
        let (out_tx, out_rx) = bounded::<Outgoing>(n * FRAMES_PER_STREAM / 2);
        let lists = PfnPool::new(6 * n + 4);
        let pages_scanned = Arc::new(AtomicU64::new(0));
        let auto = settings.codec.compression == Compression::Auto;
        let dial = Arc::new(Dial::default());
        let meter = Arc::new(SendMeter::default());
        let mut threads = Vec::new();
        let mut work_txs = Vec::with_capacity(n);

        for (s, key) in keys.iter().enumerate().take(n) {
            let (work_tx, work_rx) = bounded::<Work>(4);
            work_txs.push(work_tx);
            let mut encoder =
                Encoder::with_frame_size(settings.codec.clone(), settings.frame_size)?;
            if auto {
                encoder.follow_dial(dial.clone());
            }
            let mut stream = StreamStage {
                stream: s,
                encoder,
                sealer: Sealer::new(key),
                pool: pool.clone(),
                out: out_tx.clone(),
                flushed: flushed_tx.clone(),
                stats: stats.clone(),
                digests: digests.clone(),
                hasher: ChunkHasher::default(),
            };
            let (lists, guest, scanned) = (lists.clone(), guest.clone(), pages_scanned.clone());
            threads.push(spawn_stage(
                format!("sf-encode-{s}"),
                1 + s,
                settings.pin_threads,
                move || {
                    stream.run(guest.as_ref(), &work_rx, &lists, &scanned)?;
                    Ok(Some(Box::new(stream.encoder) as Box<dyn Send>))
                },
            ));
        }
        drop(out_tx);

        let (scan_tx, scan_rx) = bounded::<ScanCmd>(1);
        threads.push(spawn_stage(
            "sf-scan".into(),
            0,
            settings.pin_threads,
            move || {
                scan_stage(&scan_rx, &work_txs, &lists);
                Ok(None)
            },
        ));
        let limit = settings.max_bandwidth.map(|bps| {
            TokenBucket::new(
                bps,
                settings.frame_size as u64 * 4,
                std::time::Instant::now(),
            )
        });
        let (wire, send_meter) = (wire_bytes.clone(), meter.clone());
        threads.push(spawn_stage(
            "sf-send".into(),
            1,
            settings.pin_threads,
            move || {
                let sent = send_frames_metered(&sockets, &pool, &out_rx, limit, &wire, &send_meter);
                if sent.is_err() {
                    // Free what waits in the channel too: stream threads blocked on a buffer
                    // then run into the closed channel and stop.
                    for o in out_rx.try_iter() {
                        pool.give(o.frame);
                    }
                }
                sent?;
                // Everything is written: close our side so the destination sees a clean end.
                for s in &sockets {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
                Ok(None)
            },
        ));
        let stop_auto = auto.then(|| {
            let (stop, stopped) = bounded::<()>(0);
            let probes = super::autocompress::Probes {
                dial,
                meter,
                wire: wire_bytes.clone(),
                scanned: pages_scanned.clone(),
            };
            threads.push(spawn_stage("sf-autoz".into(), 0, false, move || {
                super::autocompress::run(&probes, n, &stopped).map(|()| None)
            }));
            stop
        });
        Ok(SourcePipeline {
            scan: Some(scan_tx),
            flushed,
            threads,
            leftovers: Leftovers::default(),
            wire_bytes,
            pages_scanned,
            stats,
            digests,
            streams: n,
            partial: (0, Vec::new()),
            stop_auto,
            carried: CodecStats::default(),
        })
    }

    /// Queues one iteration's pages. Fails when the pipeline has stopped (join to learn why).
    pub fn send_pages(&self, iteration: u32, pages: DirtyBitmap) -> Result<(), Stopped> {
        let scan = self.scan.as_ref().ok_or(Stopped)?;
        scan.send(ScanCmd::Iteration { iteration, pages })
            .map_err(|_| Stopped)
    }

    /// Waits up to `timeout` for every stream to seal all of `iteration`: `Ok(Some(frames
    /// per stream))` when done, `Ok(None)` on timeout (call again), `Err` when the pipeline
    /// stopped.
    pub fn wait_flushed_timeout(
        &mut self,
        iteration: u32,
        timeout: std::time::Duration,
    ) -> Result<Option<Vec<u64>>, Stopped> {
        if self.partial.0 != iteration {
            self.partial = (iteration, vec![None; self.streams]);
        }
        let deadline = std::time::Instant::now() + timeout;
        while self.partial.1.iter().any(Option::is_none) {
            match self.flushed.recv_deadline(deadline) {
                Ok(f) if f.iteration == iteration => self.partial.1[f.stream] = Some(f.frames),
                Ok(_) => {}
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => return Ok(None),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return Err(Stopped),
            }
        }
        Ok(Some(
            self.partial.1.iter().map(|f| f.expect("all set")).collect(),
        ))
    }

    /// A resumed migration's new pipeline counts on from `old`'s figures (wire bytes, pages
    /// scanned, codec counters); `old` has finished.
    pub fn carry_over(&mut self, old: &SourcePipeline) {
        let (wire, scanned) = (
            old.wire_bytes.load(Relaxed),
            old.pages_scanned.load(Relaxed),
        );
        self.wire_bytes.fetch_add(wire, Relaxed);
        self.pages_scanned.fetch_add(scanned, Relaxed);
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

    /// Stops taking work, lets everything queued reach the sockets, closes them and joins
    /// every thread. Calling it again does nothing.
    pub fn finish(&mut self) -> Result<(), PipelineError> {
        self.scan = None;
        self.stop_auto = None;
        join_all(std::mem::take(&mut self.threads), &mut self.leftovers)
    }
}

/// Recycled lists of page numbers.
#[derive(Clone)]
struct PfnPool {
    tx: Sender<Vec<Pfn>>,
    rx: Receiver<Vec<Pfn>>,
}

impl PfnPool {
    fn new(n: usize) -> Self {
        let (tx, rx) = bounded(n);
        for _ in 0..n {
            tx.send(Vec::with_capacity(BATCH_PAGES)).expect("sized");
        }
        PfnPool { tx, rx }
    }
    /// A list from the pool; a new one if the pool is empty, which happens only when a stream
    /// thread has stopped with lists in its channel (the scan thread must not wait for them).
    fn take(&self) -> Vec<Pfn> {
        self.rx
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH_PAGES))
    }
    fn give(&self, mut list: Vec<Pfn>) {
        list.clear();
        let _ = self.tx.try_send(list); // a full pool drops the extra list
    }
}

/// Splits each iteration's pages into per-stream lists and marks its end on every stream.
/// Returns when the driver is done or a stream thread has stopped.
fn scan_stage(cmds: &Receiver<ScanCmd>, work: &[Sender<Work>], lists: &PfnPool) {
    let _stage = tracing::debug_span!("scan_stage").entered();
    let n = work.len();
    let mut pending: Vec<Vec<Pfn>> = (0..n).map(|_| lists.take()).collect();
    for cmd in cmds {
        let ScanCmd::Iteration { iteration, pages } = cmd;
        for pfn in pages.iter() {
            let s = stream_of(pfn, n);
            pending[s].push(pfn);
            if pending[s].len() == BATCH_PAGES {
                let full = std::mem::replace(&mut pending[s], lists.take());
                if work[s].send(Work::Pages(full)).is_err() {
                    return; // a stream stopped; its error is the one to report
                }
            }
        }
        for s in 0..n {
            if !pending[s].is_empty() {
                let part = std::mem::replace(&mut pending[s], lists.take());
                if work[s].send(Work::Pages(part)).is_err() {
                    return;
                }
            }
            if work[s].send(Work::Flush(iteration)).is_err() {
                return;
            }
        }
    }
}

/// One stream's encoder and sealer.
struct StreamStage {
    stream: usize,
    encoder: Encoder,
    sealer: Sealer,
    pool: FramePool,
    out: Sender<Outgoing>,
    flushed: Sender<Flushed>,
    stats: Arc<Mutex<Vec<CodecStats>>>,
    digests: Arc<ChunkDigests>,
    hasher: ChunkHasher,
}

impl StreamStage {
    /// Reads each list's pages from the guest, encodes them into frames, seals each frame as
    /// it fills and hands it to the send thread. Returns when the scan thread is done or a
    /// later stage has stopped.
    fn run(
        &mut self,
        guest: &dyn SourceGuest,
        work: &Receiver<Work>,
        lists: &PfnPool,
        scanned: &AtomicU64,
    ) -> Result<(), PipelineError> {
        let _stage = tracing::debug_span!("encode_stage", stream = self.stream).entered();
        let mut frame = self.pool.take();
        let mut batch = PageBatch::with_capacity(BATCH_PAGES);
        for w in work {
            match w {
                Work::Pages(pfns) => {
                    {
                        let _span =
                            tracing::trace_span!("read_pages", pages = pfns.len()).entered();
                        batch.clear();
                        guest.read_pages(&pfns, &mut batch)?;
                    }
                    scanned.fetch_add(pfns.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    lists.give(pfns);
                    let _span = tracing::trace_span!("encode", pages = batch.len()).entered();
                    let next = batch.iter().skip(1).map(|(pfn, _)| Some(pfn)).chain([None]);
                    for ((pfn, page), next) in batch.iter().zip(next) {
                        if let Some(next) = next {
                            self.encoder.prefetch(next);
                        }
                        if !frame.frame.has_room() && !self.ship(&mut frame) {
                            return Ok(());
                        }
                        // The copy is in this core's cache now: hash it for the digest too.
                        self.hasher.feed(&self.digests, pfn, &page.0, false);
                        self.encoder.encode_page(pfn, page, &mut frame.frame);
                    }
                    self.publish_stats();
                }
                Work::Flush(iteration) => {
                    if !frame.frame.is_empty() && !self.ship(&mut frame) {
                        return Ok(());
                    }
                    // Exact counters at every iteration's end, whoever is reading.
                    self.stats.lock().expect("stats lock")[self.stream]
                        .clone_from(self.encoder.stats());
                    let f = Flushed {
                        stream: self.stream,
                        iteration,
                        frames: self.sealer.next_seq(),
                    };
                    if self.flushed.send(f).is_err() {
                        return Ok(());
                    }
                }
            }
        }
        self.pool.give(frame);
        Ok(())
    }

    /// Seals `frame` and queues it for sending, leaving a fresh frame in its place; false
    /// when the send thread has stopped.
    fn ship(&mut self, frame: &mut crate::transport::PoolFrame) -> bool {
        self.encoder.finish_frame(&mut frame.frame);
        let mut full = std::mem::replace(frame, self.pool.take());
        let len = {
            let _span = tracing::trace_span!("seal").entered();
            self.sealer.seal(&mut full.frame).len()
        };
        self.out
            .send(Outgoing {
                stream: self.stream,
                frame: full,
                len,
            })
            .is_ok()
    }

    /// Publishes the counters for status readers, never waiting for them: if a reader holds
    /// the lock, the next batch publishes.
    fn publish_stats(&self) {
        if let Ok(mut all) = self.stats.try_lock() {
            all[self.stream].clone_from(self.encoder.stats());
        }
    }
}

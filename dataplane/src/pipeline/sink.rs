//! The destination pipeline: recv -> open[s] -> decode[s] -> guest memory.

use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, bounded};

use super::{PipelineError, join_all, spawn_stage, stream_of};
use crate::codec::{CodecConfig, CodecStats, Decoder};
use crate::crypto::{Opener, StreamKey};
use crate::frame::HEADER_LEN;
use crate::guest::DestGuest;
use crate::transport::{FramePool, Incoming, PoolFrame, receive_frames};

/// Frames each stream may hold between the socket and its decoder.
const FRAMES_PER_STREAM: usize = 16;

struct Opened {
    frame: PoolFrame,
    body_len: usize,
    records: u32,
    digest: Option<u64>,
}

/// Decoding progress the destination driver waits on.
#[derive(Debug)]
pub struct SinkProgress {
    decoded: Vec<AtomicU64>,
    failed: Mutex<Option<String>>,
    changed: Condvar,
    lock: Mutex<()>,
}

impl SinkProgress {
    fn bump(&self, stream: usize) {
        self.decoded[stream].fetch_add(1, Ordering::Release);
        let _g = self.lock.lock().expect("progress lock");
        self.changed.notify_all();
    }

    fn fail(&self, why: String) {
        self.failed
            .lock()
            .expect("progress lock")
            .get_or_insert(why);
        let _g = self.lock.lock().expect("progress lock");
        self.changed.notify_all();
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
        let mut g = self.lock.lock().expect("progress lock");
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
    threads: Vec<JoinHandle<Result<(), PipelineError>>>,
    sockets: Vec<TcpStream>,
    /// Progress, for the driver.
    pub progress: Arc<SinkProgress>,
    /// Bytes read off the sockets.
    pub wire_bytes: Arc<AtomicU64>,
    /// Codec counters per stream.
    pub stats: Arc<Mutex<Vec<CodecStats>>>,
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
        let n = sockets.len();
        let pool = FramePool::new((n * FRAMES_PER_STREAM).max(4), frame_size);
        let progress = Arc::new(SinkProgress {
            decoded: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: Mutex::new(None),
            changed: Condvar::new(),
            lock: Mutex::new(()),
        });
        let stats = Arc::new(Mutex::new(vec![CodecStats::default(); n]));
        let wire_bytes = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        let mut incoming_txs = Vec::new();
        let mut checkers = Vec::new();
        let page_count = guest.page_count();

        for (s, key) in keys.iter().enumerate().take(n) {
            let (in_tx, in_rx) = bounded::<Incoming>(FRAMES_PER_STREAM / 2);
            let (dec_tx, dec_rx) = bounded::<Opened>(FRAMES_PER_STREAM / 2);
            incoming_txs.push(in_tx);
            let mut opener = Opener::new(key, frame_size);
            checkers.push(opener.header_checker());
            let (pool_o, prog_o) = (pool.clone(), progress.clone());
            threads.push(spawn_stage(
                format!("sf-open-{s}"),
                1 + 2 * s,
                pin,
                move || {
                    open_stage(s, &mut opener, &in_rx, &dec_tx, &pool_o)
                        .inspect_err(|e| prog_o.fail(e.to_string()))
                },
            ));
            let mut decoder = Decoder::new(codec.clone(), page_count).map_err(|e| {
                PipelineError::Guest(crate::guest::GuestError::BadState(e.to_string()))
            })?;
            decoder.restrict_to(move |pfn| stream_of(pfn, n) == s);
            let mut writer = guest.writer(Box::new(move |pfn| stream_of(pfn, n) == s))?;
            let (pool_d, prog_d, stats_d) = (pool.clone(), progress.clone(), stats.clone());
            threads.push(spawn_stage(
                format!("sf-decode-{s}"),
                2 + 2 * s,
                pin,
                move || {
                    for o in &dec_rx {
                        let body = &o.frame.frame.raw(HEADER_LEN + o.body_len)[HEADER_LEN..];
                        let r = decoder.decode(body, o.records, o.digest, writer.as_mut());
                        pool_d.give(o.frame);
                        stats_d.lock().expect("stats lock")[s] = decoder.stats().clone();
                        if let Err(source) = r {
                            let e = PipelineError::Decode { stream: s, source };
                            prog_d.fail(e.to_string());
                            return Err(e);
                        }
                        prog_d.bump(s);
                    }
                    Ok(())
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
                .map(|_| ())
                .map_err(PipelineError::from)
                .inspect_err(|e| prog_r.fail(e.to_string()))
        }));
        Ok(SinkPipeline {
            threads,
            sockets,
            progress,
            wire_bytes,
            stats,
        })
    }

    /// Codec counters summed over the streams.
    pub fn codec_totals(&self) -> CodecStats {
        let mut t = CodecStats::default();
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
        join_all(std::mem::take(&mut self.threads)).map(|_| ())
    }

    /// Waits for the source to close every stream, then joins every thread (dropping the
    /// guest's page writers). Calling it again does nothing.
    pub fn finish(&mut self) -> Result<(), PipelineError> {
        join_all(std::mem::take(&mut self.threads)).map(|_| ())
    }
}

fn open_stage(
    stream: usize,
    opener: &mut Opener,
    incoming: &Receiver<Incoming>,
    decode: &Sender<Opened>,
    pool: &FramePool,
) -> Result<(), PipelineError> {
    for mut inc in incoming {
        let opened = opener
            .open(&mut inc.frame.frame.raw_mut()[..inc.len])
            .map_err(|source| PipelineError::Open { stream, source })?;
        let o = Opened {
            body_len: opened.body.len(),
            records: opened.records,
            digest: opened.cache_digest,
            frame: inc.frame,
        };
        if let Err(e) = decode.send(o) {
            pool.give(e.into_inner().frame);
            return Ok(());
        }
    }
    Ok(())
}

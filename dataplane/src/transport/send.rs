//! The send thread: writes sealed frames to every stream's socket from one io_uring.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use io_uring::types::Timespec;

use super::TransportError;
use super::pool::{FramePool, PoolFrame};
use super::rate::TokenBucket;
use super::ring::{Done, Ring};

/// A sealed frame to send.
#[derive(Debug)]
pub struct Outgoing {
    /// Index of the stream (socket) it goes on.
    pub stream: usize,
    /// The buffer; its first `len` bytes are the sealed frame.
    pub frame: PoolFrame,
    /// Sealed length.
    pub len: usize,
}

/// What the send thread did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SendSummary {
    /// Frames written, per stream.
    pub frames: Vec<u64>,
    /// Bytes written, per stream.
    pub bytes: Vec<u64>,
    /// Time spent waiting for the rate limit.
    pub throttled: Duration,
}

/// Where the send thread's time goes, live (the adaptive compression controller reads it):
/// waiting for the link, or waiting for frames because the stages before it are slower.
#[derive(Debug, Default)]
pub struct SendMeter {
    /// Nanoseconds spent waiting for the rate limit or for a socket to take bytes.
    pub link_wait_ns: AtomicU64,
    /// Nanoseconds spent with no frame to send.
    pub starved_ns: AtomicU64,
}

fn add_since(counter: &AtomicU64, since: Instant) {
    let ns = u64::try_from(since.elapsed().as_nanos()).unwrap_or(u64::MAX);
    counter.fetch_add(ns, Ordering::Relaxed);
}

/// How long the ring waits for a completion before looking for new frames again, so a
/// stream whose socket is full does not hold back the others.
const POLL: Timespec = Timespec::new().nsec(500_000);

/// Sends every frame that arrives on `rx`, in order per stream, until `rx` is closed and all
/// is written. Written frames go back to `pool`; `sent_bytes` counts bytes as they leave.
///
/// On every return, every buffer is back in `pool`: writes still in flight are cancelled and
/// reaped first (see [`Ring`]).
pub fn send_frames(
    sockets: &[TcpStream],
    pool: &FramePool,
    rx: &Receiver<Outgoing>,
    limit: Option<TokenBucket>,
    sent_bytes: &AtomicU64,
) -> Result<SendSummary, TransportError> {
    send_frames_metered(sockets, pool, rx, limit, sent_bytes, &SendMeter::default())
}

/// Gives the frames still queued back to the pool when the send loop ends by any path, so a
/// stream thread waiting for a free buffer never waits for one that is gone.
struct Requeue<'a> {
    pool: &'a FramePool,
    queues: Vec<VecDeque<Outgoing>>,
}

impl Drop for Requeue<'_> {
    fn drop(&mut self) {
        for q in &mut self.queues {
            for o in q.drain(..) {
                self.pool.give(o.frame);
            }
        }
    }
}

/// [`send_frames`], accounting in `meter` where the time goes.
pub fn send_frames_metered(
    sockets: &[TcpStream],
    pool: &FramePool,
    rx: &Receiver<Outgoing>,
    mut limit: Option<TokenBucket>,
    sent_bytes: &AtomicU64,
    meter: &SendMeter,
) -> Result<SendSummary, TransportError> {
    let _stage = tracing::debug_span!("send_stage", streams = sockets.len()).entered();
    let n = sockets.len();
    let mut ring = Ring::new(pool, n)?;

    let mut requeue = Requeue {
        pool,
        queues: (0..n).map(|_| VecDeque::new()).collect(),
    };
    let queues = &mut requeue.queues;
    // Per stream, the length of the frame in flight and the bytes of it written so far (its
    // buffer is in the ring).
    let mut writing: Vec<(usize, usize)> = vec![(0, 0); n];
    let mut open = true;
    let mut summary = SendSummary {
        frames: vec![0; n],
        bytes: vec![0; n],
        throttled: Duration::ZERO,
    };
    // Reused for every batch of completions: the loop allocates nothing.
    let mut done: Vec<Done> = Vec::with_capacity(n);

    loop {
        // Take in new frames: block only when there is nothing else to do.
        if open {
            if ring.busy() == 0 && queues.iter().all(VecDeque::is_empty) {
                let t = Instant::now();
                match rx.recv() {
                    Ok(o) => queues[o.stream].push_back(o),
                    Err(_) => open = false,
                }
                add_since(&meter.starved_ns, t);
            }
            loop {
                match rx.try_recv() {
                    Ok(o) => queues[o.stream].push_back(o),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }

        // Start a write on every idle stream with a frame waiting, as the rate allows.
        let mut wait = None;
        for (s, queue) in queues.iter_mut().enumerate() {
            if ring.is_busy(s) {
                continue;
            }
            let Some(next) = queue.front() else { continue };
            if let Some(bucket) = &mut limit
                && let Err(w) = bucket.take(next.len, Instant::now())
            {
                wait = Some(wait.map_or(w, |x: Duration| x.min(w)));
                continue;
            }
            let o = queue.pop_front().expect("front exists");
            writing[s] = (o.len, 0);
            ring.write(s, sockets[s].as_raw_fd(), o.frame, 0..o.len)?;
        }

        if ring.busy() == 0 {
            if !open && queues.iter().all(VecDeque::is_empty) {
                return Ok(summary);
            }
            if let Some(w) = wait {
                let t = Instant::now();
                std::thread::sleep(w);
                summary.throttled += t.elapsed();
                add_since(&meter.link_wait_ns, t);
            }
            continue;
        }

        let t = Instant::now();
        let submitted = ring.submit_and_wait(Some(&POLL), "submit sends");
        add_since(&meter.link_wait_ns, t);
        submitted?;
        ring.reap(&mut done);
        let mut batch = done.drain(..);
        while let Some(d) = batch.next() {
            let s = d.slot;
            if d.result < 0 {
                pool.give(d.frame);
                batch.for_each(|d| pool.give(d.frame));
                return Err(TransportError::Io {
                    stream: s,
                    op: "send",
                    source: std::io::Error::from_raw_os_error(-d.result),
                });
            }
            let res = usize::try_from(d.result).expect("non-negative");
            let (len, written) = &mut writing[s];
            *written += res;
            sent_bytes.fetch_add(res as u64, Ordering::Relaxed);
            if *written < *len {
                // Short write: send the rest before anything else on this stream.
                let range = *written..*len;
                ring.write(s, sockets[s].as_raw_fd(), d.frame, range)?;
                continue;
            }
            summary.frames[s] += 1;
            summary.bytes[s] += *len as u64;
            pool.give(d.frame);
        }
    }
}

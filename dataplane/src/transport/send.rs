//! The send thread: writes sealed frames to every stream's socket from one io_uring.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, opcode};

use super::TransportError;
use super::pool::{FramePool, PoolFrame};
use super::rate::TokenBucket;

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
    let mut ring = pool.ring(n)?;

    let mut requeue = Requeue {
        pool,
        queues: (0..n).map(|_| VecDeque::new()).collect(),
    };
    let queues = &mut requeue.queues;
    let mut inflight: Vec<Option<(Outgoing, usize)>> = (0..n).map(|_| None).collect();
    let mut busy = 0usize;
    let mut open = true;
    let mut summary = SendSummary {
        frames: vec![0; n],
        bytes: vec![0; n],
        throttled: Duration::ZERO,
    };
    // Reused for every batch of completions: the loop allocates nothing.
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(n);

    loop {
        // Take in new frames: block only when there is nothing else to do.
        if open {
            if busy == 0 && queues.iter().all(VecDeque::is_empty) {
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
            if inflight[s].is_some() {
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
            submit_write(&mut ring, &sockets[s], s, &o, 0)?;
            inflight[s] = Some((o, 0));
            busy += 1;
        }

        if busy == 0 {
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

        let args = SubmitArgs::new().timespec(&POLL);
        let t = Instant::now();
        let submitted = ring.submitter().submit_with_args(1, &args);
        add_since(&meter.link_wait_ns, t);
        match submitted {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(source) => {
                return Err(TransportError::Ring {
                    what: "submit sends",
                    source,
                });
            }
        }
        done.clear();
        done.extend(ring.completion().map(|c| {
            (
                usize::try_from(c.user_data()).expect("stream index"),
                c.result(),
            )
        }));
        for &(s, res) in &done {
            let (o, written) = inflight[s]
                .as_mut()
                .expect("completion for a write in flight");
            if res < 0 {
                return Err(TransportError::Io {
                    stream: s,
                    op: "send",
                    source: std::io::Error::from_raw_os_error(-res),
                });
            }
            let res = usize::try_from(res).expect("non-negative");
            *written += res;
            sent_bytes.fetch_add(res as u64, Ordering::Relaxed);
            if *written < o.len {
                // Short write: send the rest before anything else on this stream.
                let (o, written) = (&*o, *written);
                submit_write(&mut ring, &sockets[s], s, o, written)?;
                continue;
            }
            let (o, _) = inflight[s].take().expect("in flight");
            summary.frames[s] += 1;
            summary.bytes[s] += o.len as u64;
            busy -= 1;
            pool.give(o.frame);
        }
    }
}

fn submit_write(
    ring: &mut IoUring,
    socket: &TcpStream,
    stream: usize,
    o: &Outgoing,
    from: usize,
) -> Result<(), TransportError> {
    let bytes = &o.frame.frame.raw(o.len)[from..];
    let entry = opcode::WriteFixed::new(
        Fd(socket.as_raw_fd()),
        bytes.as_ptr(),
        u32::try_from(bytes.len()).expect("frames are below 4 GiB"),
        o.frame.index(),
    )
    .build()
    .user_data(stream as u64);
    // SAFETY: the buffer is a registered pool buffer held in `inflight` until this write's
    // completion is reaped, so it stays valid and unmodified while the kernel reads it.
    unsafe { ring.submission().push(&entry) }.map_err(|_| TransportError::Ring {
        what: "submission queue full",
        source: std::io::Error::other("send ring full"),
    })
}

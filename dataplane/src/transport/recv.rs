//! The receive thread: reads frames off every stream's socket from one io_uring, header
//! first, so a frame's length is checked before its body is read.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::Sender;

use super::TransportError;
use super::pool::{FramePool, PoolFrame};
use super::ring::{Done, Ring};
use crate::crypto::HeaderChecker;
use crate::frame::HEADER_LEN;

/// A whole frame as received (not yet opened).
#[derive(Debug)]
pub struct Incoming {
    /// Stream it came on.
    pub stream: usize,
    /// The buffer; its first `len` bytes are the sealed frame.
    pub frame: PoolFrame,
    /// Wire length.
    pub len: usize,
}

/// What the receive thread did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RecvSummary {
    /// Frames received, per stream.
    pub frames: Vec<u64>,
    /// Bytes received, per stream.
    pub bytes: Vec<u64>,
}

struct Reading {
    got: usize,
    /// HEADER_LEN until the header is checked, then the frame's length.
    need: usize,
    header_checked: bool,
}

impl Reading {
    const NEW: Reading = Reading {
        got: 0,
        need: HEADER_LEN,
        header_checked: false,
    };
}

/// Receives frames on every socket and hands each to `out[stream]`, until every peer has
/// closed its end cleanly between frames (or a consumer hung up).
///
/// On every return, every buffer is back in `pool` or handed to a consumer: reads still in
/// flight are cancelled and reaped first (see [`Ring`]).
pub fn receive_frames(
    sockets: &[TcpStream],
    pool: &FramePool,
    checkers: &[HeaderChecker],
    out: &[Sender<Incoming>],
    received_bytes: &AtomicU64,
) -> Result<RecvSummary, TransportError> {
    let _stage = tracing::debug_span!("recv_stage", streams = sockets.len()).entered();
    let n = sockets.len();
    assert!(
        checkers.len() == n && out.len() == n,
        "one checker and consumer per socket"
    );
    assert!(
        checkers.iter().all(|c| c.max_frame() <= pool.frame_size()),
        "a checker accepts frames larger than the pool's buffers"
    );
    let mut ring = Ring::new(pool, n)?;

    let mut summary = RecvSummary {
        frames: vec![0; n],
        bytes: vec![0; n],
    };
    let mut reading: Vec<Reading> = Vec::with_capacity(n);
    for (s, sock) in sockets.iter().enumerate() {
        ring.read(s, sock.as_raw_fd(), pool.take(), 0..HEADER_LEN)?;
        reading.push(Reading::NEW);
    }
    // Reused for every batch of completions: the loop allocates nothing.
    let mut done: Vec<Done> = Vec::with_capacity(n);

    while ring.busy() > 0 {
        ring.submit_and_wait(None, "submit reads")?;
        ring.reap(&mut done);
        let mut batch = done.drain(..);
        while let Some(d) = batch.next() {
            // A buffer reaped here is ours: give it back on every early return, with the
            // rest of the batch.
            let step = on_read(&d, &mut reading[d.slot], &checkers[d.slot], received_bytes);
            let s = d.slot;
            match step {
                Err(e) => {
                    pool.give(d.frame);
                    batch.for_each(|d| pool.give(d.frame));
                    return Err(e);
                }
                Ok(Step::Closed) => pool.give(d.frame),
                Ok(Step::More) => {
                    let r = &reading[s];
                    ring.read(s, sockets[s].as_raw_fd(), d.frame, r.got..r.need)?;
                }
                Ok(Step::Whole) => {
                    let len = reading[s].need;
                    reading[s] = Reading::NEW;
                    summary.frames[s] += 1;
                    summary.bytes[s] += len as u64;
                    let incoming = Incoming {
                        stream: s,
                        len,
                        frame: d.frame,
                    };
                    if out[s].send(incoming).is_err() {
                        // The consumer is gone: the migration is being torn down.
                        batch.for_each(|d| pool.give(d.frame));
                        return Ok(summary);
                    }
                    ring.read(s, sockets[s].as_raw_fd(), pool.take(), 0..HEADER_LEN)?;
                }
            }
        }
    }
    Ok(summary)
}

/// What a completed read means for its stream.
enum Step {
    /// The peer closed cleanly between frames: the stream is finished.
    Closed,
    /// Read on.
    More,
    /// The frame is whole.
    Whole,
}

fn on_read(
    d: &Done,
    r: &mut Reading,
    checker: &HeaderChecker,
    received_bytes: &AtomicU64,
) -> Result<Step, TransportError> {
    let s = d.slot;
    if d.result < 0 {
        return Err(TransportError::Io {
            stream: s,
            op: "receive",
            source: std::io::Error::from_raw_os_error(-d.result),
        });
    }
    if d.result == 0 {
        if r.got != 0 {
            return Err(TransportError::Truncated {
                stream: s,
                got: r.got,
                need: r.need,
            });
        }
        return Ok(Step::Closed);
    }
    let res = usize::try_from(d.result).expect("positive");
    r.got += res;
    received_bytes.fetch_add(res as u64, Ordering::Relaxed);
    if !r.header_checked && r.got == HEADER_LEN {
        r.need = checker
            .check(d.frame.frame.raw(HEADER_LEN))
            .map_err(|source| TransportError::BadFrame { stream: s, source })?;
        r.header_checked = true;
    }
    Ok(if r.got < r.need {
        Step::More
    } else {
        Step::Whole
    })
}

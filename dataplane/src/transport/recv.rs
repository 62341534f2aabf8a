//! The receive thread: reads frames off every stream's socket from one io_uring, header
//! first, so a frame's length is checked before its body is read.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_channel::Sender;
use io_uring::types::Fd;
use io_uring::{IoUring, opcode};

use super::TransportError;
use super::pool::{FramePool, PoolFrame};
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
    frame: PoolFrame,
    got: usize,
    /// HEADER_LEN until the header is checked, then the frame's length.
    need: usize,
    header_checked: bool,
}

/// Receives frames on every socket and hands each to `out[stream]`, until every peer has
/// closed its end cleanly between frames (or a consumer hung up).
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
    let mut ring = pool.ring(n)?;

    let mut summary = RecvSummary {
        frames: vec![0; n],
        bytes: vec![0; n],
    };
    let mut reading: Vec<Option<Reading>> = Vec::with_capacity(n);
    for (s, sock) in sockets.iter().enumerate() {
        let mut r = Reading {
            frame: pool.take(),
            got: 0,
            need: HEADER_LEN,
            header_checked: false,
        };
        submit_read(&mut ring, sock, s, &mut r)?;
        reading.push(Some(r));
    }
    let mut live = n;
    // Reused for every batch of completions: the loop allocates nothing.
    let mut done: Vec<(usize, i32)> = Vec::with_capacity(n);

    while live > 0 {
        ring.submitter().submit_and_wait(1).or_else(|e| {
            if e.raw_os_error() == Some(libc::EINTR) {
                Ok(0)
            } else {
                Err(TransportError::Ring {
                    what: "submit reads",
                    source: e,
                })
            }
        })?;
        done.clear();
        done.extend(ring.completion().map(|c| {
            (
                usize::try_from(c.user_data()).expect("stream index"),
                c.result(),
            )
        }));
        for &(s, res) in &done {
            let r = reading[s]
                .as_mut()
                .expect("completion for a read in flight");
            if res < 0 {
                return Err(TransportError::Io {
                    stream: s,
                    op: "receive",
                    source: std::io::Error::from_raw_os_error(-res),
                });
            }
            if res == 0 {
                if r.got != 0 {
                    return Err(TransportError::Truncated {
                        stream: s,
                        got: r.got,
                        need: r.need,
                    });
                }
                // Clean close between frames: this stream is finished.
                let r = reading[s].take().expect("reading");
                pool.give(r.frame);
                live -= 1;
                continue;
            }
            let res = usize::try_from(res).expect("positive");
            r.got += res;
            received_bytes.fetch_add(res as u64, Ordering::Relaxed);
            if !r.header_checked && r.got == HEADER_LEN {
                r.need = checkers[s]
                    .check(r.frame.frame.raw(HEADER_LEN))
                    .map_err(|source| TransportError::BadFrame { stream: s, source })?;
                r.header_checked = true;
            }
            if r.got < r.need {
                submit_read(&mut ring, &sockets[s], s, r)?;
                continue;
            }
            let full = std::mem::replace(
                r,
                Reading {
                    frame: pool.take(),
                    got: 0,
                    need: HEADER_LEN,
                    header_checked: false,
                },
            );
            summary.frames[s] += 1;
            summary.bytes[s] += full.need as u64;
            let incoming = Incoming {
                stream: s,
                len: full.need,
                frame: full.frame,
            };
            if out[s].send(incoming).is_err() {
                // The consumer is gone: the migration is being torn down.
                return Ok(summary);
            }
            submit_read(
                &mut ring,
                &sockets[s],
                s,
                reading[s].as_mut().expect("reading"),
            )?;
        }
    }
    Ok(summary)
}

fn submit_read(
    ring: &mut IoUring,
    socket: &TcpStream,
    stream: usize,
    r: &mut Reading,
) -> Result<(), TransportError> {
    let dest = r.frame.frame.raw_mut()[r.got..r.need].as_mut_ptr();
    let entry = opcode::ReadFixed::new(
        Fd(socket.as_raw_fd()),
        dest,
        u32::try_from(r.need - r.got).expect("frames are below 4 GiB"),
        r.frame.index(),
    )
    .build()
    .user_data(stream as u64);
    // SAFETY: the buffer is a registered pool buffer held in `reading` until this read's
    // completion is reaped, and nothing else reads or writes it meanwhile; `got..need` lies
    // within it (the slice above is bounds-checked: need <= the checker's max_frame <= the
    // pool's frame size, asserted on entry).
    unsafe { ring.submission().push(&entry) }.map_err(|_| TransportError::Ring {
        what: "submission queue full",
        source: std::io::Error::other("receive ring full"),
    })
}

//! An io_uring that owns the pool buffers of its operations in flight.
//!
//! The kernel writes into (or reads from) a buffer from submission until the operation's
//! completion is reaped. So a buffer goes into the ring with its operation and comes out only
//! with its completion ([`Ring::reap`]). When the ring is dropped with operations still in
//! flight (an early return on an error, a peer gone, a consumer gone), its `Drop` cancels them
//! and reaps every completion before the buffers go back to the pool; a buffer whose
//! completion never comes is leaked, never reused. No exit path can hand a buffer the kernel
//! may still touch to anyone else.

use std::ops::Range;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, opcode, squeue};

use super::TransportError;
use super::pool::{FramePool, PoolFrame};

/// user_data of the cancel requests `Drop` submits (slots are small indexes).
const CANCEL: u64 = u64::MAX;

/// How long `Drop` waits for a cancelled operation's completion before it gives up on it and
/// leaks its buffer (a cancelled socket operation completes at once; this is a backstop).
const DRAIN_PATIENCE: Duration = Duration::from_secs(10);

/// One finished operation: its slot, the kernel's result, and its buffer, back to the caller.
#[derive(Debug)]
pub struct Done {
    /// The slot the operation was submitted on.
    pub slot: usize,
    /// Bytes transferred, or a negated errno.
    pub result: i32,
    /// The operation's buffer, which the kernel no longer touches.
    pub frame: PoolFrame,
}

/// A ring with every buffer of `pool` registered and at most one operation in flight per slot.
pub struct Ring<'p> {
    // Field order: `ring` drops (and closes) before `inflight`. `Drop` below has emptied
    // `inflight` by then, or forgotten what it could not reap.
    ring: IoUring,
    pool: &'p FramePool,
    /// The buffer of the operation in flight on each slot (its user_data).
    inflight: Vec<Option<PoolFrame>>,
    busy: usize,
}

impl std::fmt::Debug for Ring<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("slots", &self.inflight.len())
            .field("busy", &self.busy)
            .finish_non_exhaustive()
    }
}

impl<'p> Ring<'p> {
    /// A ring for `slots` sockets (one operation in flight each) over `pool`'s buffers.
    pub fn new(pool: &'p FramePool, slots: usize) -> Result<Self, TransportError> {
        Ok(Ring {
            ring: pool.ring(slots)?,
            pool,
            inflight: (0..slots).map(|_| None).collect(),
            busy: 0,
        })
    }

    /// Operations in flight.
    pub fn busy(&self) -> usize {
        self.busy
    }

    /// True while `slot` has an operation in flight.
    pub fn is_busy(&self, slot: usize) -> bool {
        self.inflight[slot].is_some()
    }

    /// Reads from `fd` into `frame.raw_mut()[range]`; the ring holds `frame` until the
    /// completion is reaped.
    pub fn read(
        &mut self,
        slot: usize,
        fd: RawFd,
        mut frame: PoolFrame,
        range: Range<usize>,
    ) -> Result<(), TransportError> {
        let index = frame.index();
        let bytes = &mut frame.frame.raw_mut()[range];
        let entry = opcode::ReadFixed::new(Fd(fd), bytes.as_mut_ptr(), len32(bytes.len()), index)
            .build()
            .user_data(slot as u64);
        self.push(slot, entry, frame, "receive ring full")
    }

    /// Writes `frame.raw()[range]` to `fd`; the ring holds `frame` until the completion is
    /// reaped.
    pub fn write(
        &mut self,
        slot: usize,
        fd: RawFd,
        frame: PoolFrame,
        range: Range<usize>,
    ) -> Result<(), TransportError> {
        let index = frame.index();
        let bytes = &frame.frame.raw(range.end)[range];
        let entry = opcode::WriteFixed::new(Fd(fd), bytes.as_ptr(), len32(bytes.len()), index)
            .build()
            .user_data(slot as u64);
        self.push(slot, entry, frame, "send ring full")
    }

    fn push(
        &mut self,
        slot: usize,
        entry: squeue::Entry,
        frame: PoolFrame,
        full: &'static str,
    ) -> Result<(), TransportError> {
        assert!(
            self.inflight[slot].is_none(),
            "slot {slot} already has an operation in flight"
        );
        // SAFETY: the entry names a registered pool buffer (`frame.index()`) and a range
        // inside it (the slices above are bounds-checked). The buffer's heap storage does not
        // move when `frame` moves, and `frame` is stored in `inflight` right below, from where
        // only `reap` takes it (after the kernel posted this operation's completion) or `Drop`
        // (after cancelling and reaping it, or never). Nothing else reads or writes it meanwhile.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.pool.give(frame);
            return Err(TransportError::Ring {
                what: "submission queue full",
                source: std::io::Error::other(full),
            });
        }
        self.inflight[slot] = Some(frame);
        self.busy += 1;
        Ok(())
    }

    /// Submits what was queued and waits for at least one completion, or until `timeout`.
    /// An interrupted or timed-out wait is not an error.
    pub fn submit_and_wait(
        &mut self,
        timeout: Option<&Timespec>,
        what: &'static str,
    ) -> Result<(), TransportError> {
        let submitted = match timeout {
            Some(t) => {
                let args = SubmitArgs::new().timespec(t);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submitter().submit_and_wait(1),
        };
        match submitted {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(()),
            Err(source) => Err(TransportError::Ring { what, source }),
        }
    }

    /// Moves every posted completion, with its buffer, into `out`.
    pub fn reap(&mut self, out: &mut Vec<Done>) {
        for c in self.ring.completion() {
            if c.user_data() == CANCEL {
                continue;
            }
            let slot = usize::try_from(c.user_data()).expect("a slot index");
            let frame = self.inflight[slot]
                .take()
                .expect("a completion for an operation in flight");
            self.busy -= 1;
            out.push(Done {
                slot,
                result: c.result(),
                frame,
            });
        }
    }
}

impl Drop for Ring<'_> {
    /// Cancels the operations still in flight and reaps their completions, then gives their
    /// buffers back to the pool. A buffer whose completion does not come is leaked.
    fn drop(&mut self) {
        if self.busy == 0 {
            return;
        }
        for slot in 0..self.inflight.len() {
            if self.inflight[slot].is_none() {
                continue;
            }
            let cancel = opcode::AsyncCancel::new(slot as u64)
                .build()
                .user_data(CANCEL);
            // SAFETY: a cancel request names no buffer. The queue holds twice the slots, so
            // it has room after a submit.
            while unsafe { self.ring.submission().push(&cancel) }.is_err() {
                if self.ring.submit().is_err() {
                    break;
                }
            }
        }
        let deadline = Instant::now() + DRAIN_PATIENCE;
        let tick = Timespec::new().nsec(100_000_000);
        let mut done = Vec::with_capacity(self.busy);
        while self.busy > 0 && Instant::now() < deadline {
            if self.submit_and_wait(Some(&tick), "drain").is_err() {
                break;
            }
            self.reap(&mut done);
            for d in done.drain(..) {
                self.pool.give(d.frame);
            }
        }
        if self.busy > 0 {
            tracing::error!(
                operations = self.busy,
                "io_uring operations did not complete after cancellation; leaking their buffers"
            );
            for f in self.inflight.iter_mut().filter_map(Option::take) {
                // The kernel may still write into it: never free it nor hand it out again.
                std::mem::forget(f);
            }
        }
    }
}

fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("frames are below 4 GiB")
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn a_dropped_ring_gives_back_the_buffers_of_operations_in_flight() {
        let pool = FramePool::new(3, crate::frame::DEFAULT_FRAME_SIZE);
        let (a, _b) = UnixStream::pair().unwrap();
        let (c, _d) = UnixStream::pair().unwrap();
        let mut ring = Ring::new(&pool, 2).unwrap();
        // Nobody writes to `_b` or `_d`: both reads stay in flight.
        ring.read(0, a.as_raw_fd(), pool.take(), 0..100).unwrap();
        ring.read(1, c.as_raw_fd(), pool.take(), 0..100).unwrap();
        ring.submit_and_wait(Some(&Timespec::new().nsec(1_000_000)), "submit")
            .unwrap();
        assert_eq!((ring.busy(), pool.free()), (2, 1));
        drop(ring);
        assert_eq!(pool.free(), 3);
    }
}

//! A fixed pool of frame buffers, registered with io_uring and recycled.
//!
//! Taking a buffer blocks while all are in use: that is the pipeline's backpressure, and it
//! bounds its memory to `count * frame_size`.

use crossbeam_channel::{Receiver, Sender, bounded};

use crate::frame::FrameBuf;

/// A pooled frame buffer and its io_uring registration index.
#[derive(Debug)]
pub struct PoolFrame {
    index: u16,
    /// The frame.
    pub frame: FrameBuf,
}

impl PoolFrame {
    /// Registration index of the buffer (for `ReadFixed`/`WriteFixed`).
    pub fn index(&self) -> u16 {
        self.index
    }
}

/// The pool.
#[derive(Debug, Clone)]
pub struct FramePool {
    free_tx: Sender<PoolFrame>,
    free_rx: Receiver<PoolFrame>,
    iovecs: std::sync::Arc<[IoVec]>,
    frame_size: usize,
}

/// Address and length of one buffer (a `libc::iovec` that may cross threads).
#[derive(Debug, Clone, Copy)]
pub struct IoVec {
    /// Start of the buffer.
    pub base: usize,
    /// Its length.
    pub len: usize,
}

impl FramePool {
    /// `count` buffers of `frame_size` bytes (at most 2^16 buffers: io_uring indexes them
    /// with 16 bits).
    pub fn new(count: usize, frame_size: usize) -> Self {
        assert!((1..=1 << 16).contains(&count), "pool of {count} buffers");
        let (free_tx, free_rx) = bounded(count);
        let mut iovecs = Vec::with_capacity(count);
        for i in 0..count {
            let mut frame = FrameBuf::new(frame_size);
            let raw = frame.raw_mut();
            iovecs.push(IoVec {
                base: raw.as_mut_ptr() as usize,
                len: raw.len(),
            });
            let index = u16::try_from(i).expect("count checked above");
            free_tx
                .send(PoolFrame { index, frame })
                .expect("channel sized for the pool");
        }
        FramePool {
            free_tx,
            free_rx,
            iovecs: iovecs.into(),
            frame_size,
        }
    }

    /// Size of every buffer.
    pub fn frame_size(&self) -> usize {
        self.frame_size
    }

    /// Waits for a free buffer.
    pub fn take(&self) -> PoolFrame {
        self.free_rx.recv().expect("the pool holds its own sender")
    }

    /// A free buffer if one is ready.
    pub fn try_take(&self) -> Option<PoolFrame> {
        self.free_rx.try_recv().ok()
    }

    /// Returns a buffer, emptied.
    pub fn give(&self, mut f: PoolFrame) {
        f.frame.clear();
        // The channel holds every buffer at once, so this never blocks.
        self.free_tx
            .send(f)
            .expect("the pool holds its own receiver");
    }

    /// Buffers currently free.
    pub fn free(&self) -> usize {
        self.free_rx.len()
    }

    /// A ring for `sockets` sockets with every pool buffer registered, for the thread that
    /// will own it.
    ///
    /// Only [`super::ring::Ring`] calls it: it holds the buffer of every operation it submits
    /// until that operation's completion is reaped.
    pub(crate) fn ring(&self, sockets: usize) -> Result<io_uring::IoUring, super::TransportError> {
        let ring_err = |what| move |source| super::TransportError::Ring { what, source };
        let entries = u32::try_from(2 * sockets.max(4)).unwrap_or(256);
        let ring = io_uring::IoUring::new(entries).map_err(ring_err("create a ring"))?;
        let iovecs = self.iovecs();
        // SAFETY: every iovec describes a pool buffer's heap allocation, which is never
        // resized. The kernel touches a registered buffer only during an operation submitted
        // on it, and `Ring` submits only on buffers it holds (so alive and not used by any
        // other code) until the completion is reaped. A buffer dropped elsewhere is simply
        // never named in an operation again; registration keeps only the kernel's own page
        // references.
        unsafe { ring.submitter().register_buffers(&iovecs) }
            .map_err(ring_err("register buffers"))?;
        Ok(ring)
    }

    /// Where each buffer lives, by index, for registration with a ring.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.iovecs
            .iter()
            .map(|v| libc::iovec {
                iov_base: v.base as *mut libc::c_void,
                iov_len: v.len,
            })
            .collect()
    }
}

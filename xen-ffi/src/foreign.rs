//! libxenforeignmemory: mapping a domain's frames into this process.

use std::marker::PhantomData;
use std::ptr::NonNull;
use std::sync::Arc;

use crate::bindings::types::{xen_pfn_t, xenforeignmemory_handle};
use crate::error::{XenError, last_errno};
use crate::library::Libraries;
use crate::xc::open_error;

/// Bytes per guest frame.
pub const FRAME_SIZE: usize = 4096;

/// An open libxenforeignmemory handle. Clones share it; it closes when the last clone and
/// the last [`MappedBatch`] made from it are gone.
#[derive(Clone)]
pub struct ForeignMemory {
    handle: Arc<Handle>,
}

struct Handle {
    libs: Arc<Libraries>,
    fmem: NonNull<xenforeignmemory_handle>,
}

// SAFETY: the handle is a privcmd file descriptor and a logger; each map and unmap is an
// independent ioctl/mmap/munmap on it, with no per-call state kept in the handle, so calls
// from several threads do not interfere. Only Drop closes it, with exclusive access.
unsafe impl Send for Handle {}
// SAFETY: as for Send.
unsafe impl Sync for Handle {}

impl std::fmt::Debug for ForeignMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForeignMemory")
            .field("fmem", &self.handle.fmem)
            .finish()
    }
}

/// How a batch is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (the source).
    Read,
    /// Read and write (the destination).
    Write,
}

impl ForeignMemory {
    /// Opens the interface. `ENOENT` (no `/dev/xen/privcmd`) becomes
    /// [`XenError::NotAvailable`].
    pub fn open(libs: &Arc<Libraries>) -> Result<ForeignMemory, XenError> {
        // SAFETY: a null logger is allowed (the library then logs to stderr); the result is
        // checked for null before use.
        let fmem = unsafe { libs.fmem.xenforeignmemory_open(std::ptr::null_mut(), 0) };
        match NonNull::new(fmem) {
            Some(fmem) => Ok(ForeignMemory {
                handle: Arc::new(Handle {
                    libs: Arc::clone(libs),
                    fmem,
                }),
            }),
            None => Err(open_error("xenforeignmemory_open", last_errno())),
        }
    }

    /// Maps `frames` of domain `domid`, in order, into one local range. Frames that cannot
    /// be mapped are reported per page ([`MappedBatch::failures`]); the others are usable.
    pub fn map(&self, domid: u32, frames: &[u64], access: Access) -> Result<MappedBatch, XenError> {
        let mut errors = vec![0i32; frames.len()];
        if frames.is_empty() {
            return Ok(MappedBatch {
                handle: Arc::clone(&self.handle),
                addr: NonNull::dangling(),
                frames: Vec::new(),
                errors,
                access,
            });
        }
        let prot = match access {
            Access::Read => libc::PROT_READ,
            Access::Write => libc::PROT_READ | libc::PROT_WRITE,
        };
        let arr: Vec<xen_pfn_t> = frames.to_vec();
        // SAFETY: the handle is open; `arr` and `errors` each hold `frames.len()` elements,
        // as the call requires; the returned range is checked for null and unmapped once,
        // by MappedBatch's drop.
        let addr = unsafe {
            self.handle.libs.fmem.xenforeignmemory_map(
                self.handle.fmem.as_ptr(),
                domid,
                prot,
                arr.len(),
                arr.as_ptr(),
                errors.as_mut_ptr(),
            )
        };
        let Some(addr) = NonNull::new(addr.cast::<u8>()) else {
            let errno = last_errno();
            return Err(if errno == libc::ESRCH {
                XenError::NoSuchDomain { domid }
            } else {
                XenError::Call {
                    call: "xenforeignmemory_map",
                    domid,
                    errno,
                }
            });
        };
        Ok(MappedBatch {
            handle: Arc::clone(&self.handle),
            addr,
            frames: arr,
            errors,
            access,
        })
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: opened by xenforeignmemory_open and closed exactly once, here; every
        // MappedBatch holds the handle, so all were unmapped before.
        unsafe { self.libs.fmem.xenforeignmemory_close(self.fmem.as_ptr()) };
    }
}

/// Frames of a domain mapped into this process, unmapped on drop.
pub struct MappedBatch {
    handle: Arc<Handle>,
    addr: NonNull<u8>,
    frames: Vec<u64>,
    errors: Vec<i32>,
    access: Access,
}

// SAFETY: the batch owns its mapping; the pages it hands out are raw guest memory accessed
// only by copying (ForeignPage), never through Rust references, so sharing the batch
// between threads creates no aliasing the compiler relies on.
unsafe impl Send for MappedBatch {}
// SAFETY: as for Send.
unsafe impl Sync for MappedBatch {}

impl std::fmt::Debug for MappedBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedBatch")
            .field("frames", &self.frames.len())
            .field("failed", &self.failures().count())
            .field("access", &self.access)
            .finish()
    }
}

impl MappedBatch {
    /// Frames in the batch.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Whether it maps nothing.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Frames that could not be mapped, with their (positive) errno.
    pub fn failures(&self) -> impl Iterator<Item = (u64, i32)> + '_ {
        self.frames
            .iter()
            .zip(&self.errors)
            .filter(|(_, e)| **e != 0)
            .map(|(f, e)| (*f, e.saturating_abs()))
    }

    /// The batch if every frame mapped, else [`XenError::MapFrames`] naming the first that
    /// did not (the mapping is undone).
    pub fn complete(self, domid: u32) -> Result<Self, XenError> {
        let failed = self.failures().count();
        let first = self.failures().next();
        match first {
            None => Ok(self),
            Some((frame, errno)) => Err(XenError::MapFrames {
                domid,
                requested: self.len(),
                failed,
                frame,
                errno,
            }),
        }
    }

    /// Page `i`, or `None` if its frame did not map.
    pub fn page(&self, i: usize) -> Option<ForeignPage<'_>> {
        if self.errors.get(i).is_none_or(|&e| e != 0) {
            return None;
        }
        // SAFETY: i < len, so the offset stays inside the mapped range of len pages.
        let ptr = unsafe { self.addr.add(i * FRAME_SIZE) };
        Some(ForeignPage {
            ptr,
            writable: self.access == Access::Write,
            _batch: PhantomData,
        })
    }
}

impl Drop for MappedBatch {
    fn drop(&mut self) {
        if self.frames.is_empty() {
            return;
        }
        // SAFETY: `addr` is the range xenforeignmemory_map returned for `frames.len()`
        // pages; it is unmapped exactly once, here, and no ForeignPage outlives the batch.
        unsafe {
            self.handle.libs.fmem.xenforeignmemory_unmap(
                self.handle.fmem.as_ptr(),
                self.addr.as_ptr().cast(),
                self.frames.len(),
            );
        }
    }
}

/// One mapped guest frame, valid while its batch lives.
///
/// It is the guest's memory, not Rust's: the guest (or the hypervisor) may change it at any
/// time, so it is only ever copied, never lent out as a reference. A copy that races with a
/// guest write may mix old and new bytes; log-dirty reports that frame again, so the next
/// round carries it whole.
#[derive(Debug, Clone, Copy)]
pub struct ForeignPage<'b> {
    ptr: NonNull<u8>,
    writable: bool,
    _batch: PhantomData<&'b ()>,
}

impl ForeignPage<'_> {
    /// Copies the frame out.
    pub fn copy_to(&self, out: &mut [u8; FRAME_SIZE]) {
        // SAFETY: ptr is a mapped, readable frame of FRAME_SIZE bytes for the batch's
        // lifetime (tied to 'b); `out` is a distinct local buffer. See the type's note on
        // concurrent guest writes.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr(), out.as_mut_ptr(), FRAME_SIZE) };
    }

    /// Overwrites the frame. Panics on a batch mapped [`Access::Read`] (writing would fault).
    pub fn write(&self, data: &[u8; FRAME_SIZE]) {
        assert!(self.writable, "frame mapped read-only");
        // SAFETY: ptr is a mapped, writable frame of FRAME_SIZE bytes for the batch's
        // lifetime; `data` is Rust memory, so the ranges do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr(), FRAME_SIZE) };
    }

    /// The frame as a slice, without copying.
    ///
    /// # Safety
    /// Nothing may write the frame while the slice lives: the domain is paused and no
    /// mapping of this process writes it (the destination, once its writers are done).
    pub unsafe fn as_slice(&self) -> &[u8; FRAME_SIZE] {
        // SAFETY: the frame is mapped and readable for the batch's lifetime, which bounds
        // the returned borrow; the caller guarantees no concurrent writes.
        unsafe { &*self.ptr.as_ptr().cast::<[u8; FRAME_SIZE]>() }
    }

    /// The frame's address, for a backend that hands out frames under its own exclusion
    /// rules (the destination, whose domain is paused and whose writers own disjoint frames).
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.ptr
    }
}

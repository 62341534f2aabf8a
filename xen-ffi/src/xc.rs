//! The libxenctrl handle and the domain operations migration needs.

use std::ptr::NonNull;
use std::sync::Arc;

use crate::bindings::types::{
    XEN_DOMCTL_PFINFO_BROKEN, XEN_DOMCTL_PFINFO_LTAB_MASK, XEN_DOMCTL_PFINFO_XALLOC,
    XEN_DOMCTL_PFINFO_XTAB, XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL, XEN_DOMCTL_SHADOW_OP_CLEAN,
    XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, XEN_DOMCTL_SHADOW_OP_OFF, XEN_DOMINF_dying,
    XEN_DOMINF_hvm_guest, XEN_DOMINF_paused, XEN_DOMINF_shutdown, xc_domaininfo_t,
    xc_hypercall_buffer_t, xc_interface, xc_shadow_op_stats_t, xen_pfn_t,
};
use crate::error::{XenError, last_errno};
use crate::library::Libraries;

/// Frames per `xc_get_pfn_type_batch` call: the hypervisor refuses more
/// (XEN_DOMCTL_getpageframeinfo3 returns E2BIG above 1024).
const TYPE_BATCH: usize = 1024;

/// Bytes per page of Xen's hypercall buffers.
const XC_PAGE: usize = 4096;

/// An open libxenctrl interface (`xc_interface_open`), closed on drop.
pub struct Xc {
    libs: Arc<Libraries>,
    xch: NonNull<xc_interface>,
}

// SAFETY: an xc_interface opened without XC_OPENFLAG_NON_REENTRANT may be used from several
// threads at once (xenctrl.h: only that flag makes the caller responsible for mutual
// exclusion); the handle is closed only by Drop, which has exclusive access.
unsafe impl Send for Xc {}
// SAFETY: as for Send.
unsafe impl Sync for Xc {}

impl std::fmt::Debug for Xc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xc").field("xch", &self.xch).finish()
    }
}

/// A domain as `xc_domain_getinfolist` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain id.
    pub domid: u32,
    /// HVM (as opposed to PV).
    pub hvm: bool,
    /// Paused by control software.
    pub paused: bool,
    /// Shut down, or being destroyed.
    pub shutdown_or_dying: bool,
    /// Pages the domain holds.
    pub tot_pages: u64,
    /// Its limit.
    pub max_pages: u64,
}

/// What a guest frame is, for migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameType {
    /// Memory with content to carry.
    Ram,
    /// No memory behind it (a hole in the physmap, or a broken or allocate-only frame).
    Hole,
}

impl Xc {
    /// Opens the hypervisor interface. `ENOENT` (no `/dev/xen/privcmd`) becomes
    /// [`XenError::NotAvailable`].
    pub fn open(libs: &Arc<Libraries>) -> Result<Xc, XenError> {
        // SAFETY: null loggers are allowed (libxenctrl then logs to stderr) and 0 asks for
        // a reentrant handle; the result is checked for null before use.
        let xch = unsafe {
            libs.ctrl
                .xc_interface_open(std::ptr::null_mut(), std::ptr::null_mut(), 0)
        };
        match NonNull::new(xch) {
            Some(xch) => Ok(Xc {
                libs: Arc::clone(libs),
                xch,
            }),
            None => Err(open_error("xc_interface_open", last_errno())),
        }
    }

    fn call_error(&self, call: &'static str, domid: u32) -> XenError {
        match last_errno() {
            libc::ESRCH => XenError::NoSuchDomain { domid },
            errno => XenError::Call { call, domid, errno },
        }
    }

    /// The domain `domid`, or [`XenError::NoSuchDomain`].
    pub fn domain_info(&self, domid: u32) -> Result<DomainInfo, XenError> {
        // SAFETY: xc_domaininfo_t is plain data (integers and byte arrays): all zeros is a
        // valid value.
        let mut info: xc_domaininfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: the handle is open, and `info` has room for the one entry asked for.
        let n = unsafe {
            self.libs
                .ctrl
                .xc_domain_getinfolist(self.xch.as_ptr(), domid, 1, &raw mut info)
        };
        if n < 0 {
            return Err(self.call_error("xc_domain_getinfolist", domid));
        }
        // The list starts at the first domain with an id >= domid.
        if n == 0 || u32::from(info.domain) != domid {
            return Err(XenError::NoSuchDomain { domid });
        }
        Ok(DomainInfo {
            domid,
            hvm: info.flags & XEN_DOMINF_hvm_guest != 0,
            paused: info.flags & XEN_DOMINF_paused != 0,
            shutdown_or_dying: info.flags & (XEN_DOMINF_shutdown | XEN_DOMINF_dying) != 0,
            tot_pages: info.tot_pages,
            max_pages: info.max_pages,
        })
    }

    /// Size of the domain's physmap in frames (highest guest frame + 1).
    pub fn nr_gpfns(&self, domid: u32) -> Result<u64, XenError> {
        let mut gpfns: xen_pfn_t = 0;
        // SAFETY: the handle is open and `gpfns` is a valid out-pointer.
        let rc = unsafe {
            self.libs
                .ctrl
                .xc_domain_nr_gpfns(self.xch.as_ptr(), domid, &raw mut gpfns)
        };
        if rc < 0 {
            return Err(self.call_error("xc_domain_nr_gpfns", domid));
        }
        Ok(gpfns)
    }

    /// Pauses the domain (Xen counts pauses: each needs its unpause).
    pub fn pause(&self, domid: u32) -> Result<(), XenError> {
        // SAFETY: the handle is open; the call takes only integers.
        let rc = unsafe { self.libs.ctrl.xc_domain_pause(self.xch.as_ptr(), domid) };
        self.check(rc, "xc_domain_pause", domid)
    }

    /// Undoes one [`pause`](Self::pause).
    pub fn unpause(&self, domid: u32) -> Result<(), XenError> {
        // SAFETY: the handle is open; the call takes only integers.
        let rc = unsafe { self.libs.ctrl.xc_domain_unpause(self.xch.as_ptr(), domid) };
        self.check(rc, "xc_domain_unpause", domid)
    }

    /// Turns log-dirty mode on: from now on Xen records every frame the guest writes.
    pub fn enable_logdirty(&self, domid: u32) -> Result<(), XenError> {
        self.shadow_op(domid, XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
    }

    /// Turns log-dirty mode off.
    pub fn disable_logdirty(&self, domid: u32) -> Result<(), XenError> {
        self.shadow_op(domid, XEN_DOMCTL_SHADOW_OP_OFF)
    }

    fn shadow_op(&self, domid: u32, sop: u32) -> Result<(), XenError> {
        // SAFETY: the handle is open; `mb` may be null for these operations (xenctrl.h's
        // 4.16+ interface, as Xen's own save code calls it).
        let rc = unsafe {
            self.libs
                .ctrl
                .xc_shadow_control(self.xch.as_ptr(), domid, sop, std::ptr::null_mut(), 0)
        };
        self.check(rc, "xc_shadow_control", domid)
    }

    /// A hypercall buffer for a dirty bitmap of `frames` frames.
    pub fn dirty_buffer(&self, frames: u64) -> Result<DirtyBuffer<'_>, XenError> {
        let words = usize::try_from(frames.div_ceil(64)).expect("bitmap fits in memory");
        let pages = (words * 8).div_ceil(XC_PAGE).max(1);
        let nr = i32::try_from(pages).map_err(|_| XenError::Call {
            call: "xc__hypercall_buffer_alloc_pages",
            domid: 0,
            errno: libc::EINVAL,
        })?;
        // What DECLARE_HYPERCALL_BUFFER initialises: no buffer yet, no shadow, no bounce.
        let mut buf = Box::new(xc_hypercall_buffer_t {
            hbuf: std::ptr::null_mut(),
            param_shadow: std::ptr::null_mut(),
            dir: 0,
            ubuf: usize::MAX as *mut _,
            sz: 0,
        });
        // SAFETY: `buf` is initialised as the header's macro does and lives (boxed, so it
        // does not move) until DirtyBuffer's drop frees it with the same page count.
        let p = unsafe {
            self.libs
                .ctrl
                .xc__hypercall_buffer_alloc_pages(self.xch.as_ptr(), &raw mut *buf, nr)
        };
        if p.is_null() {
            return Err(XenError::Call {
                call: "xc__hypercall_buffer_alloc_pages",
                domid: 0,
                errno: last_errno(),
            });
        }
        Ok(DirtyBuffer {
            xc: self,
            buf,
            pages: nr,
            words,
            frames,
        })
    }

    /// Copies the frames written since the last call into `buf` and clears Xen's log
    /// (`XEN_DOMCTL_SHADOW_OP_CLEAN`). `final_round` marks the round taken while paused.
    /// Returns Xen's count of dirty frames.
    pub fn logdirty_clean(
        &self,
        domid: u32,
        buf: &mut DirtyBuffer<'_>,
        final_round: bool,
    ) -> Result<u32, XenError> {
        let mode = if final_round {
            XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL
        } else {
            0
        };
        let mut stats = xc_shadow_op_stats_t {
            fault_count: 0,
            dirty_count: 0,
        };
        let frames = core::ffi::c_ulong::from(buf.frames);
        // SAFETY: the handle is open; `buf` holds an allocated hypercall buffer with room
        // for `frames` bits (dirty_buffer sized it), and `stats` is a valid out-pointer.
        let rc = unsafe {
            self.libs.ctrl.xc_logdirty_control(
                self.xch.as_ptr(),
                domid,
                XEN_DOMCTL_SHADOW_OP_CLEAN,
                &raw mut *buf.buf,
                frames,
                mode,
                &raw mut stats,
            )
        };
        if rc < 0 {
            return Err(self.call_error("xc_logdirty_control", domid));
        }
        Ok(stats.dirty_count)
    }

    /// The HVM context (CPU and platform device state), taken while the domain is paused.
    pub fn hvm_context(&self, domid: u32) -> Result<Vec<u8>, XenError> {
        // SAFETY: a null buffer asks for the size only (xc_domain_hvm_getcontext's contract).
        let size = unsafe {
            self.libs.ctrl.xc_domain_hvm_getcontext(
                self.xch.as_ptr(),
                domid,
                std::ptr::null_mut(),
                0,
            )
        };
        let len =
            u32::try_from(size).map_err(|_| self.call_error("xc_domain_hvm_getcontext", domid))?;
        let mut ctx = vec![0u8; len as usize];
        // SAFETY: `ctx` has exactly `len` writable bytes, the size passed.
        let got = unsafe {
            self.libs
                .ctrl
                .xc_domain_hvm_getcontext(self.xch.as_ptr(), domid, ctx.as_mut_ptr(), len)
        };
        let got =
            u32::try_from(got).map_err(|_| self.call_error("xc_domain_hvm_getcontext", domid))?;
        ctx.truncate(got.min(len) as usize);
        Ok(ctx)
    }

    /// Loads an HVM context taken by [`hvm_context`](Self::hvm_context).
    pub fn set_hvm_context(&self, domid: u32, ctx: &[u8]) -> Result<(), XenError> {
        let len = u32::try_from(ctx.len()).map_err(|_| XenError::Call {
            call: "xc_domain_hvm_setcontext",
            domid,
            errno: libc::E2BIG,
        })?;
        // The C prototype takes a mutable pointer but only reads (it is copied into a
        // hypercall bounce buffer); a private copy keeps `ctx` truly untouched anyway.
        let mut copy = ctx.to_vec();
        // SAFETY: `copy` has exactly `len` bytes.
        let rc = unsafe {
            self.libs.ctrl.xc_domain_hvm_setcontext(
                self.xch.as_ptr(),
                domid,
                copy.as_mut_ptr(),
                len,
            )
        };
        self.check(rc, "xc_domain_hvm_setcontext", domid)
    }

    /// The type of each frame in `frames`.
    pub fn frame_types(&self, domid: u32, frames: &[u64]) -> Result<Vec<FrameType>, XenError> {
        let mut out = Vec::with_capacity(frames.len());
        let mut arr: Vec<xen_pfn_t> = Vec::with_capacity(TYPE_BATCH);
        for chunk in frames.chunks(TYPE_BATCH) {
            arr.clear();
            arr.extend_from_slice(chunk);
            let num = u32::try_from(arr.len()).expect("at most TYPE_BATCH");
            // SAFETY: the handle is open and `arr` holds `num` frame numbers, which the call
            // overwrites in place with their types.
            let rc = unsafe {
                self.libs.ctrl.xc_get_pfn_type_batch(
                    self.xch.as_ptr(),
                    domid,
                    num,
                    arr.as_mut_ptr(),
                )
            };
            if rc < 0 {
                return Err(self.call_error("xc_get_pfn_type_batch", domid));
            }
            out.extend(arr.iter().map(|&t| {
                // Older hypervisors leave the frame number in the low bits: keep the type.
                match u32::try_from(t & xen_pfn_t::from(XEN_DOMCTL_PFINFO_LTAB_MASK)) {
                    Ok(
                        XEN_DOMCTL_PFINFO_XTAB
                        | XEN_DOMCTL_PFINFO_XALLOC
                        | XEN_DOMCTL_PFINFO_BROKEN,
                    ) => FrameType::Hole,
                    _ => FrameType::Ram,
                }
            }));
        }
        Ok(out)
    }

    fn check(&self, rc: i32, call: &'static str, domid: u32) -> Result<(), XenError> {
        if rc < 0 {
            Err(self.call_error(call, domid))
        } else {
            Ok(())
        }
    }
}

impl Drop for Xc {
    fn drop(&mut self) {
        // SAFETY: the handle was opened by xc_interface_open and is closed exactly once,
        // here; every borrow of it (DirtyBuffer) has ended.
        unsafe { self.libs.ctrl.xc_interface_close(self.xch.as_ptr()) };
    }
}

/// A dirty bitmap in hypercall-safe memory, freed on drop.
pub struct DirtyBuffer<'x> {
    xc: &'x Xc,
    buf: Box<xc_hypercall_buffer_t>,
    pages: i32,
    words: usize,
    frames: u64,
}

impl std::fmt::Debug for DirtyBuffer<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBuffer")
            .field("frames", &self.frames)
            .finish_non_exhaustive()
    }
}

impl DirtyBuffer<'_> {
    /// The bitmap as the last [`Xc::logdirty_clean`] left it: bit i of word w is frame
    /// 64w + i.
    pub fn words(&self) -> &[u64] {
        // SAFETY: hbuf points at `pages` whole pages allocated by
        // xc__hypercall_buffer_alloc_pages (page-aligned, so aligned for u64), at least
        // `words` u64s, written by Xen only during logdirty_clean, which takes `&mut self`.
        unsafe { std::slice::from_raw_parts(self.buf.hbuf.cast::<u64>(), self.words) }
    }

    /// Frames covered.
    pub fn frames(&self) -> u64 {
        self.frames
    }
}

impl Drop for DirtyBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: the buffer was allocated by xc__hypercall_buffer_alloc_pages on this
        // handle with this page count and is freed exactly once.
        unsafe {
            self.xc.libs.ctrl.xc__hypercall_buffer_free_pages(
                self.xc.xch.as_ptr(),
                &raw mut *self.buf,
                self.pages,
            );
        }
    }
}

/// The error for a handle that could not be opened.
pub(crate) fn open_error(call: &'static str, errno: i32) -> XenError {
    match errno {
        libc::ENOENT => XenError::NotAvailable { call },
        libc::EACCES | libc::EPERM => XenError::PermissionDenied { call },
        errno => XenError::Call {
            call,
            domid: 0,
            errno,
        },
    }
}

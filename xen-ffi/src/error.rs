//! Typed errors: which call failed, on which domain, with which errno.

use std::io;

/// What went wrong talking to Xen, written for the operator.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// No hypervisor interface: not dom0 of a Xen host (`/dev/xen/privcmd` is missing).
    #[error(
        "Xen is not available on this host: {call} found no /dev/xen/privcmd \
         (the xen backend runs in dom0 of a Xen host)"
    )]
    NotAvailable {
        /// The call that found out.
        call: &'static str,
    },
    /// The hypervisor interface exists but this process may not use it.
    #[error("{call}: permission denied (skyferryd must run as root in dom0)")]
    PermissionDenied {
        /// The call that was refused.
        call: &'static str,
    },
    /// A Xen library could not be loaded, or lacks a function the bindings need.
    #[error(
        "cannot load {library}: {reason} (needs Xen 4.17's tools libraries: see docs/backends.md, \"Xen HVM domains\")"
    )]
    Load {
        /// The library's path or soname.
        library: String,
        /// What the dynamic loader said.
        reason: String,
    },
    /// No domain with this id.
    #[error("Xen domain {domid} does not exist")]
    NoSuchDomain {
        /// The domain id asked for.
        domid: u32,
    },
    /// A library call failed.
    #[error("{call} on domain {domid} failed: {}", errno_text(*.errno))]
    Call {
        /// The C function.
        call: &'static str,
        /// The domain it acted on.
        domid: u32,
        /// `errno` after the call.
        errno: i32,
    },
    /// Some frames of a batch could not be mapped.
    #[error(
        "xenforeignmemory_map: {failed} of {requested} frames of domain {domid} could not be \
         mapped; the first, frame {frame:#x}: {}", errno_text(*.errno)
    )]
    MapFrames {
        /// The domain.
        domid: u32,
        /// Frames asked for.
        requested: usize,
        /// Frames that failed.
        failed: usize,
        /// The first frame that failed.
        frame: u64,
        /// Its error (positive errno).
        errno: i32,
    },
}

impl XenError {
    /// The errno of a failed call, if this error carries one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XenError::Call { errno, .. } | XenError::MapFrames { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn errno_text(errno: i32) -> String {
    io::Error::from_raw_os_error(errno).to_string()
}

/// `errno` as the last call left it.
pub(crate) fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

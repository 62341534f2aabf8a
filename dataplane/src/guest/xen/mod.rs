//! The `xen` backend: an HVM domain, from dom0, through `xen-ffi` only.
//!
//! The source maps the domain's frames in batches (`xenforeignmemory_map`), finds what the
//! guest wrote through Xen's log-dirty mode, pauses it with `xc_domain_pause`, and sends its
//! HVM context as the state blob. The destination fills a domain the toolstack created
//! paused with the same configuration, loads the context, and unpauses it at the commit.
//!
//! Holes in the physmap (the MMIO hole, unpopulated frames) are told from memory the way
//! Xen's own save code does, by frame type: they travel as zero pages, are never written at
//! the destination, and both ends must have the same ones (the blob carries a summary).

mod source;
mod state;
mod target;

pub use source::{XenGuest, XenSourceConfig};
pub use state::{Holes, XenState};
pub use target::XenTarget;
pub use xen_ffi::LibraryPaths;

use skyferry_xen_ffi as xen_ffi;

use super::GuestError;

/// Backend name.
pub const BACKEND: &str = "xen";

/// Frames mapped at once by the source (as Xen's own save code batches them).
const MAP_BATCH: usize = 1024;

fn xen_err(op: &'static str) -> impl FnOnce(xen_ffi::XenError) -> GuestError {
    move |e| GuestError::Backend {
        backend: BACKEND,
        op,
        message: e.to_string(),
    }
}

fn err(op: &'static str, message: impl Into<String>) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message: message.into(),
    }
}

/// Every frame of `frames`, split into holes (bit set) and memory, by frame type.
fn holes_of(xc: &xen_ffi::Xc, domid: u32, frames: u64) -> Result<super::DirtyBitmap, GuestError> {
    let mut holes = super::DirtyBitmap::new(frames);
    let all: Vec<u64> = (0..frames).collect();
    for (i, t) in xc
        .frame_types(domid, &all)
        .map_err(xen_err("read frame types"))?
        .into_iter()
        .enumerate()
    {
        if t == xen_ffi::FrameType::Hole {
            holes.set(i as u64);
        }
    }
    Ok(holes)
}

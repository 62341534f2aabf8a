//! Loading Xen's libraries at run time.
//!
//! skyferry does not link against Xen. libxenctrl's ABI changes with every Xen release (its
//! soname is `libxenctrl.so.4.17`, its symbols versioned `VERS_4.17.0`), and linking would
//! make every skyferry binary need it at start-up, on KVM and QEMU hosts too. Loading it
//! when a xen guest is first used keeps one build for every host, lets the other backends
//! and the tests run where Xen is absent, turns a missing or mismatched library into an
//! error message instead of a loader failure, and lets tests load the test double
//! (`double/`) in place of both libraries. The sonames asked for by default are exactly the
//! ABI the checked-in bindings were generated from.

use std::ffi::OsString;
use std::sync::Arc;

use crate::bindings::xenctrl::XenCtrl;
use crate::bindings::xenforeignmemory::XenForeignMemory;
use crate::error::XenError;

/// The libxenctrl the bindings were generated for.
pub const XENCTRL_SONAME: &str = "libxenctrl.so.4.17";
/// libxenforeignmemory's stable ABI (symbols versioned 1.0-1.4; the bindings use 1.0's).
pub const XENFOREIGNMEMORY_SONAME: &str = "libxenforeignmemory.so.1";

/// Where to load the libraries from: sonames (searched as the dynamic loader does) or paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibraryPaths {
    /// libxenctrl.
    pub xenctrl: OsString,
    /// libxenforeignmemory.
    pub xenforeignmemory: OsString,
}

impl Default for LibraryPaths {
    fn default() -> Self {
        LibraryPaths {
            xenctrl: XENCTRL_SONAME.into(),
            xenforeignmemory: XENFOREIGNMEMORY_SONAME.into(),
        }
    }
}

impl LibraryPaths {
    /// One library that provides both (the test double).
    pub fn both(path: impl Into<OsString>) -> Self {
        let path = path.into();
        LibraryPaths {
            xenctrl: path.clone(),
            xenforeignmemory: path,
        }
    }
}

/// Both libraries, loaded, with every function the bindings use resolved.
pub struct Libraries {
    pub(crate) ctrl: XenCtrl,
    pub(crate) fmem: XenForeignMemory,
    paths: LibraryPaths,
}

impl std::fmt::Debug for Libraries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Libraries")
            .field("paths", &self.paths)
            .finish_non_exhaustive()
    }
}

impl Libraries {
    /// Loads both libraries and resolves every function (a missing one is an error now, not
    /// a crash later).
    pub fn load(paths: &LibraryPaths) -> Result<Arc<Libraries>, XenError> {
        let err = |library: &OsString, e: libloading::Error| XenError::Load {
            library: library.to_string_lossy().into_owned(),
            reason: e.to_string(),
        };
        // SAFETY: loading runs the library's initialisers. These are Xen's own tools
        // libraries (or the test double): their initialisers only set up library state.
        // Every symbol is then resolved with the exact prototype bindgen read from the
        // library's own headers, which is what makes the later calls sound.
        let ctrl = unsafe { XenCtrl::new(&paths.xenctrl) }.map_err(|e| err(&paths.xenctrl, e))?;
        // SAFETY: as above, for libxenforeignmemory.
        let fmem = unsafe { XenForeignMemory::new(&paths.xenforeignmemory) }
            .map_err(|e| err(&paths.xenforeignmemory, e))?;
        Ok(Arc::new(Libraries {
            ctrl,
            fmem,
            paths: paths.clone(),
        }))
    }

    /// Where they were loaded from.
    pub fn paths(&self) -> &LibraryPaths {
        &self.paths
    }
}

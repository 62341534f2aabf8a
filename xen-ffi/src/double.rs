//! The test double of Xen's C libraries (`double/xen_double.c`): one shared library that tests
//! load in place of libxenctrl and libxenforeignmemory. [`build`] compiles it against the real
//! Xen headers; [`XenDouble`] loads it and drives its test hooks (`double/xen_double.h`): create
//! the fake host's domains, play their guest, inject faults and read back what the double saw.
//!
//! The host's domains are files in a directory: the double's Xen functions find it through the
//! `XEN_DOUBLE_DIR` environment variable of the process that calls them, the hooks take it as an
//! argument.

use std::ffi::{CString, c_char, c_int, c_void};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::NonNull;
use std::time::SystemTime;

use libloading::Library;

/// Size of a guest frame.
pub const PAGE_SIZE: usize = 4096;
/// Largest HVM context a domain holds.
pub const MAX_CONTEXT: usize = 65536;
/// Events a domain keeps; older ones are overwritten.
pub const EVENT_CAP: usize = 4096;

/// [`Event::flags`]: the CLEAN (or PEEK) had `XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL`.
pub const EVF_FINAL: u32 = 1;
/// [`Event::flags`]: an hvm getcontext that only asked for the size.
pub const EVF_SIZE_QUERY: u32 = 2;
/// [`Event::flags`]: the failure was injected by a fault knob.
pub const EVF_INJECTED: u32 = 4;

/// gcc flags: with the missing/strict prototype warnings as errors, every Xen function the
/// double defines must match the prototype in Xen's own headers.
const CFLAGS: &[&str] = &[
    "-std=gnu11",
    "-shared",
    "-fPIC",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wmissing-prototypes",
    "-Wstrict-prototypes",
];

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("Xen's development headers are missing ({0}): apt-get install libxen-dev pkg-config")]
    NoHeaders(String),
    #[error("gcc failed to build the Xen test double:\n{0}")]
    Gcc(String),
    #[error("building the Xen test double: {0}")]
    Io(#[from] io::Error),
}

/// Builds `libxen_double.so` in `out_dir` (unless it is newer than its sources) and returns its
/// path. Concurrent builds into one directory are safe: each writes a temporary file and renames.
pub fn build(out_dir: &Path) -> Result<PathBuf, BuildError> {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let source = crate_dir.join("double/xen_double.c");
    let inputs = [
        source.clone(),
        crate_dir.join("double/xen_double.h"),
        crate_dir.join("include/skyferry-xen.h"),
    ];
    let out = out_dir.join("libxen_double.so");
    if is_fresh(&out, &inputs)? {
        return Ok(out);
    }
    let cflags = pkg_config_cflags()?;
    fs::create_dir_all(out_dir)?;
    let tmp = out_dir.join(format!(".libxen_double.so.{}.tmp", std::process::id()));
    let gcc = Command::new("gcc")
        .args(CFLAGS)
        .args(&cflags)
        .arg("-I")
        .arg(crate_dir.join("include"))
        .arg(&source)
        .arg("-o")
        .arg(&tmp)
        .output()?;
    if !gcc.status.success() {
        let _ = fs::remove_file(&tmp);
        return Err(BuildError::Gcc(
            String::from_utf8_lossy(&gcc.stderr).into_owned(),
        ));
    }
    fs::rename(&tmp, &out)?;
    Ok(out)
}

fn is_fresh(out: &Path, inputs: &[PathBuf]) -> io::Result<bool> {
    let built = match fs::metadata(out) {
        Ok(meta) => meta.modified()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut newest = SystemTime::UNIX_EPOCH;
    for input in inputs {
        newest = newest.max(fs::metadata(input)?.modified()?);
    }
    Ok(built >= newest)
}

fn pkg_config_cflags() -> Result<Vec<String>, BuildError> {
    let output = Command::new("pkg-config")
        .args(["--cflags", "xencontrol", "xenforeignmemory"])
        .output()
        .map_err(|e| BuildError::NoHeaders(format!("cannot run pkg-config: {e}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(BuildError::NoHeaders(stderr.trim().to_owned()));
    }
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect())
}

/// `enum xen_double_fault`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Fault {
    /// Mapping frame `arg` fails with `-errno` in `err[]`.
    MapFrame = 0,
    /// `xc_logdirty_control` fails from CLEAN round `arg` on (1 = the first CLEAN).
    LogdirtyRound = 1,
    /// For this and the kinds below, `arg` is how many calls fail (0: all, until cleared).
    LogdirtyEnable = 2,
    Pause = 3,
    Unpause = 4,
    SetContext = 5,
    GetContext = 6,
}

/// `enum xen_double_event_kind`; what `arg0` and `arg1` mean is in the comments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum EventKind {
    /// arg0: pause count after.
    Pause = 1,
    /// arg0: pause count after.
    Unpause = 2,
    LogdirtyEnable = 3,
    /// arg0: 1 if log-dirty was on.
    LogdirtyOff = 4,
    /// arg0: round (1 = first), arg1: dirty frames returned; flag [`EVF_FINAL`].
    Clean = 5,
    /// arg0: rounds so far, arg1: dirty frames returned.
    Peek = 6,
    /// arg0: context bytes; flag [`EVF_SIZE_QUERY`].
    GetContext = 7,
    /// arg0: context bytes.
    SetContext = 8,
    /// Writes-per-round ran: arg0: round, arg1: pages written.
    GuestWrites = 9,
    /// arg0: [`XenFunction`], arg1: errno; flag [`EVF_INJECTED`].
    Failed = 10,
}

impl EventKind {
    pub fn from_raw(raw: u32) -> Option<Self> {
        Some(match raw {
            1 => Self::Pause,
            2 => Self::Unpause,
            3 => Self::LogdirtyEnable,
            4 => Self::LogdirtyOff,
            5 => Self::Clean,
            6 => Self::Peek,
            7 => Self::GetContext,
            8 => Self::SetContext,
            9 => Self::GuestWrites,
            10 => Self::Failed,
            _ => return None,
        })
    }
}

/// `enum xen_double_fn`: the Xen function a [`EventKind::Failed`] event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum XenFunction {
    NrGpfns = 1,
    Pause = 2,
    Unpause = 3,
    ShadowControl = 4,
    LogdirtyControl = 5,
    HvmGetContext = 6,
    HvmSetContext = 7,
    GetPfnTypeBatch = 8,
    ForeignMemoryMap = 9,
}

impl XenFunction {
    pub fn from_raw(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::NrGpfns,
            2 => Self::Pause,
            3 => Self::Unpause,
            4 => Self::ShadowControl,
            5 => Self::LogdirtyControl,
            6 => Self::HvmGetContext,
            7 => Self::HvmSetContext,
            8 => Self::GetPfnTypeBatch,
            9 => Self::ForeignMemoryMap,
            _ => return None,
        })
    }
}

/// `struct xen_double_event`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Event {
    /// 0 for a domain's first event.
    pub seq: u64,
    pub kind: u32,
    pub flags: u32,
    pub arg0: u64,
    pub arg1: u64,
    /// CLOCK_MONOTONIC, comparable across processes.
    pub time_ns: u64,
    /// The process that made the call.
    pub pid: u32,
    pub reserved: u32,
}

impl Event {
    pub fn kind(&self) -> Option<EventKind> {
        EventKind::from_raw(self.kind)
    }

    /// For a [`EventKind::Failed`] event: the function and the errno it failed with.
    pub fn failure(&self) -> Option<(XenFunction, i32)> {
        if self.kind() != Some(EventKind::Failed) {
            return None;
        }
        Some((
            XenFunction::from_raw(self.arg0)?,
            i32::try_from(self.arg1).ok()?,
        ))
    }
}

/// `struct xen_double_status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Status {
    pub nr_pages: u64,
    pub holes: u64,
    pub pause_count: u32,
    /// 1 while log-dirty is enabled.
    pub logdirty: u32,
    /// CLEANs done.
    pub rounds: u64,
    /// Events appended so far (the next event's `seq`).
    pub events: u64,
    /// Frames foreign-mapped without `PROT_WRITE`.
    pub mapped_read: u64,
    /// Frames foreign-mapped with `PROT_WRITE`.
    pub mapped_write: u64,
    /// Pages written by writes-per-round.
    pub guest_writes: u64,
    /// Frames marked dirty now.
    pub dirty: u64,
    pub context_len: u32,
    pub writes_per_round: u32,
}

/// `struct xen_double_domain`, only ever behind a pointer.
#[repr(C)]
struct RawDomain {
    _opaque: [u8; 0],
}

/// The hooks' entry points, with the prototypes of `double/xen_double.h`.
struct Hooks {
    create: unsafe extern "C" fn(*const c_char, u32, u64) -> c_int,
    destroy: unsafe extern "C" fn(*const c_char, u32) -> c_int,
    open: unsafe extern "C" fn(*const c_char, u32) -> *mut RawDomain,
    close: unsafe extern "C" fn(*mut RawDomain),
    write: unsafe extern "C" fn(*mut RawDomain, u64, u32, *const c_void, usize) -> c_int,
    read: unsafe extern "C" fn(*mut RawDomain, u64, *mut c_void) -> c_int,
    set_hole: unsafe extern "C" fn(*mut RawDomain, u64, c_int) -> c_int,
    toolstack_pause: unsafe extern "C" fn(*mut RawDomain) -> c_int,
    set_context: unsafe extern "C" fn(*mut RawDomain, *const c_void, usize) -> c_int,
    get_context: unsafe extern "C" fn(*mut RawDomain, *mut c_void, usize) -> i64,
    set_writes_per_round: unsafe extern "C" fn(*mut RawDomain, u32, u64) -> c_int,
    set_fault: unsafe extern "C" fn(*mut RawDomain, u32, u64, i32) -> c_int,
    clear_faults: unsafe extern "C" fn(*mut RawDomain),
    status: unsafe extern "C" fn(*mut RawDomain, *mut Status),
    events: unsafe extern "C" fn(*mut RawDomain, u64, *mut Event, usize) -> usize,
}

/// # Safety
/// `T` must be the function pointer type of the symbol `name` names, and the value must not
/// be used after `lib` is unloaded.
unsafe fn symbol<T: Copy>(lib: &Library, name: &[u8]) -> Result<T, libloading::Error> {
    // SAFETY: the caller promises that T is the symbol's type.
    let symbol = unsafe { lib.get::<T>(name) }?;
    Ok(*symbol)
}

/// The loaded double. Its Xen functions are looked up by whoever binds them (as the real
/// libraries' would be); this type only exposes the test hooks.
pub struct XenDouble {
    hooks: Hooks,
    path: PathBuf,
    // Last, so it is unloaded after nothing can call `hooks` any more.
    _lib: Library,
}

impl std::fmt::Debug for XenDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenDouble")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// A hook's `0 or -errno`.
fn check(rc: c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::from_raw_os_error(-rc))
    } else {
        Ok(())
    }
}

impl XenDouble {
    /// Loads a double built by [`build`].
    pub fn load(path: &Path) -> Result<Self, libloading::Error> {
        // SAFETY: loading runs the library's initialisers; xen_double.c has none of its own.
        let lib = unsafe { Library::new(path) }?;
        // SAFETY: each field's type is the prototype of the symbol it is loaded from
        // (double/xen_double.h), and the pointers live in `hooks`, which `_lib` outlives.
        let hooks = unsafe {
            Hooks {
                create: symbol(&lib, b"xen_double_create\0")?,
                destroy: symbol(&lib, b"xen_double_destroy\0")?,
                open: symbol(&lib, b"xen_double_open\0")?,
                close: symbol(&lib, b"xen_double_close\0")?,
                write: symbol(&lib, b"xen_double_write\0")?,
                read: symbol(&lib, b"xen_double_read\0")?,
                set_hole: symbol(&lib, b"xen_double_set_hole\0")?,
                toolstack_pause: symbol(&lib, b"xen_double_toolstack_pause\0")?,
                set_context: symbol(&lib, b"xen_double_set_context\0")?,
                get_context: symbol(&lib, b"xen_double_get_context\0")?,
                set_writes_per_round: symbol(&lib, b"xen_double_set_writes_per_round\0")?,
                set_fault: symbol(&lib, b"xen_double_set_fault\0")?,
                clear_faults: symbol(&lib, b"xen_double_clear_faults\0")?,
                status: symbol(&lib, b"xen_double_status\0")?,
                events: symbol(&lib, b"xen_double_events\0")?,
            }
        };
        Ok(Self {
            hooks,
            path: path.to_owned(),
            _lib: lib,
        })
    }

    /// The shared library, for a process that should load it as libxenctrl/libxenforeignmemory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates (or replaces) domain `domid` in host directory `dir` and opens it: zeroed
    /// memory, no holes, not paused, log-dirty off. Processes that had a replaced domain open
    /// keep the old one.
    pub fn create_domain(&self, dir: &Path, domid: u32, nr_pages: u64) -> io::Result<Domain<'_>> {
        let c_dir = c_path(dir)?;
        // SAFETY: c_dir is a NUL-terminated string that outlives the call.
        check(unsafe { (self.hooks.create)(c_dir.as_ptr(), domid, nr_pages) })?;
        self.open_domain(dir, domid)
    }

    /// Opens an existing domain; `ESRCH` if there is none.
    pub fn open_domain(&self, dir: &Path, domid: u32) -> io::Result<Domain<'_>> {
        let c_dir = c_path(dir)?;
        // SAFETY: c_dir is a NUL-terminated string that outlives the call.
        let raw = unsafe { (self.hooks.open)(c_dir.as_ptr(), domid) };
        let raw = NonNull::new(raw).ok_or_else(io::Error::last_os_error)?;
        Ok(Domain {
            hooks: &self.hooks,
            raw,
            domid,
        })
    }

    /// Removes a domain from the host (`ESRCH` if there is none); open handles keep working.
    pub fn destroy_domain(&self, dir: &Path, domid: u32) -> io::Result<()> {
        let c_dir = c_path(dir)?;
        // SAFETY: c_dir is a NUL-terminated string that outlives the call.
        check(unsafe { (self.hooks.destroy)(c_dir.as_ptr(), domid) })
    }
}

/// An open domain of the fake host, closed on drop.
pub struct Domain<'a> {
    hooks: &'a Hooks,
    raw: NonNull<RawDomain>,
    domid: u32,
}

// SAFETY: the C handle is not changed after xen_double_open (an fd and a mapping), and every
// hook synchronises the shared state it touches (atomics, a process-shared mutex), since other
// processes use the same domain concurrently anyway; threads are no different.
unsafe impl Send for Domain<'_> {}
// SAFETY: as for Send: all methods take &self and the hooks are safe to call concurrently.
unsafe impl Sync for Domain<'_> {}

impl std::fmt::Debug for Domain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Domain")
            .field("domid", &self.domid)
            .finish_non_exhaustive()
    }
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from xen_double_open and is closed only here, once.
        unsafe { (self.hooks.close)(self.raw.as_ptr()) }
    }
}

impl Domain<'_> {
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// Writes guest memory as the guest would: the bytes, then (log-dirty on) the dirty bit.
    /// `offset + data.len()` must stay within the frame; `EINVAL` for a hole or a bad frame,
    /// `EAGAIN` while the domain is paused (a paused guest does not write).
    pub fn write(&self, gfn: u64, offset: usize, data: &[u8]) -> io::Result<()> {
        let offset = u32::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond the frame"))?;
        // SAFETY: raw is open; data is valid for data.len() bytes during the call.
        check(unsafe {
            (self.hooks.write)(
                self.raw.as_ptr(),
                gfn,
                offset,
                data.as_ptr().cast(),
                data.len(),
            )
        })
    }

    /// A frame's contents (zeros for a hole).
    pub fn read(&self, gfn: u64) -> io::Result<Vec<u8>> {
        let mut page = vec![0u8; PAGE_SIZE];
        // SAFETY: raw is open; page has the PAGE_SIZE bytes the hook writes.
        check(unsafe { (self.hooks.read)(self.raw.as_ptr(), gfn, page.as_mut_ptr().cast()) })?;
        Ok(page)
    }

    /// Makes a frame a hole (no memory: reads as zeros, cannot be mapped) or populates it.
    pub fn set_hole(&self, gfn: u64, hole: bool) -> io::Result<()> {
        // SAFETY: raw is open.
        check(unsafe { (self.hooks.set_hole)(self.raw.as_ptr(), gfn, c_int::from(hole)) })
    }

    /// Pauses the domain as the toolstack does when it creates one paused (`xl create -p`).
    pub fn toolstack_pause(&self) -> io::Result<()> {
        // SAFETY: raw is open.
        check(unsafe { (self.hooks.toolstack_pause)(self.raw.as_ptr()) })
    }

    /// Sets the HVM context (at most [`MAX_CONTEXT`] bytes) without logging an event.
    pub fn set_context(&self, data: &[u8]) -> io::Result<()> {
        // SAFETY: raw is open; data is valid for data.len() bytes during the call.
        check(unsafe {
            (self.hooks.set_context)(self.raw.as_ptr(), data.as_ptr().cast(), data.len())
        })
    }

    /// The HVM context, as the last setcontext (or [`Domain::set_context`]) left it.
    pub fn context(&self) -> Vec<u8> {
        let mut buf = vec![0u8; MAX_CONTEXT];
        // SAFETY: raw is open; buf has buf.len() writable bytes.
        let len = unsafe {
            (self.hooks.get_context)(self.raw.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
        };
        buf.truncate(usize::try_from(len).unwrap_or(0));
        buf
    }

    /// After each non-final CLEAN of the unpaused domain, the double writes `pages` pages,
    /// chosen from `seed` and the round; each starts with the round and the frame number (u64
    /// little-endian words 0 and 1). 0 turns it off.
    pub fn set_writes_per_round(&self, pages: u32, seed: u64) {
        // SAFETY: raw is open.
        let rc = unsafe { (self.hooks.set_writes_per_round)(self.raw.as_ptr(), pages, seed) };
        debug_assert_eq!(rc, 0);
    }

    /// Arms a fault knob (see [`Fault`] for what `arg` means); `errno` must be positive.
    pub fn set_fault(&self, fault: Fault, arg: u64, errno: i32) -> io::Result<()> {
        if errno <= 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a fault needs an errno > 0",
            ));
        }
        // SAFETY: raw is open.
        check(unsafe { (self.hooks.set_fault)(self.raw.as_ptr(), fault as u32, arg, errno) })
    }

    pub fn clear_fault(&self, fault: Fault) {
        // SAFETY: raw is open; errno 0 disarms the knob.
        let rc = unsafe { (self.hooks.set_fault)(self.raw.as_ptr(), fault as u32, 0, 0) };
        debug_assert_eq!(rc, 0);
    }

    pub fn clear_faults(&self) {
        // SAFETY: raw is open.
        unsafe { (self.hooks.clear_faults)(self.raw.as_ptr()) }
    }

    pub fn status(&self) -> Status {
        let mut status = Status::default();
        // SAFETY: raw is open; status is a valid struct xen_double_status to fill.
        unsafe { (self.hooks.status)(self.raw.as_ptr(), &mut status) };
        status
    }

    /// Every event kept, oldest first.
    pub fn events(&self) -> Vec<Event> {
        self.events_since(0)
    }

    /// The kept events with `seq >= seq`, oldest first.
    pub fn events_since(&self, seq: u64) -> Vec<Event> {
        let mut events = vec![Event::default(); EVENT_CAP];
        // SAFETY: raw is open; events has room for events.len() entries.
        let n = unsafe {
            (self.hooks.events)(self.raw.as_ptr(), seq, events.as_mut_ptr(), events.len())
        };
        events.truncate(n);
        events
    }
}

#![cfg(feature = "double")]
//! The Xen test double, checked through its hooks and through the Xen functions it defines,
//! which are called here the way skyferry's bindings call the real libraries: looked up by name
//! and called with the prototypes of Xen's headers (declared by hand below).
//!
//! The double finds the host's domains through `XEN_DOUBLE_DIR`, which is process-wide: it is
//! set once, by `host()`, before any test calls into the double, and each test uses domain ids
//! of its own. The case without it runs in a subprocess.

use std::collections::BTreeSet;
use std::ffi::{c_int, c_longlong, c_uint, c_ulong, c_void};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use libloading::Library;
use skyferry_xen_ffi::double::{
    self, Domain, EVF_FINAL, EVF_INJECTED, EVF_SIZE_QUERY, Event, EventKind, Fault, PAGE_SIZE,
    XenDouble, XenFunction,
};

const ENOENT: i32 = 2;
const ESRCH: i32 = 3;
const EIO: i32 = 5;
const E2BIG: i32 = 7;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;
const EOVERFLOW: i32 = 75;
const EAGAIN: i32 = 11;
const EFAULT: i32 = 14;

const PROT_READ: c_int = 1;
const PROT_WRITE: c_int = 2;

// xen/domctl.h
const SHADOW_OP_OFF: c_uint = 0;
const SHADOW_OP_ENABLE_TEST: c_uint = 1;
const SHADOW_OP_ENABLE_LOGDIRTY: c_uint = 2;
const SHADOW_OP_CLEAN: c_uint = 11;
const SHADOW_OP_PEEK: c_uint = 12;
const SHADOW_LOGDIRTY_FINAL: c_uint = 1;
const DOMINF_HVM_GUEST: u32 = 1 << 1;
const DOMINF_PAUSED: u32 = 1 << 3;
const DOMINF_RUNNING: u32 = 1 << 5;
const PFINFO_NOTAB: u64 = 0;
const PFINFO_XTAB: u64 = 0xf << 28;
const DOMID_FIRST_RESERVED: u32 = 0x7ff0;

/// The Xen functions the double must define, and nothing else but its hooks.
const XEN_FUNCTIONS: [&str; 17] = [
    "xc_interface_open",
    "xc_interface_close",
    "xc_domain_getinfolist",
    "xc_domain_nr_gpfns",
    "xc_domain_pause",
    "xc_domain_unpause",
    "xc_shadow_control",
    "xc_logdirty_control",
    "xc__hypercall_buffer_alloc_pages",
    "xc__hypercall_buffer_free_pages",
    "xc_domain_hvm_getcontext",
    "xc_domain_hvm_setcontext",
    "xc_get_pfn_type_batch",
    "xenforeignmemory_open",
    "xenforeignmemory_close",
    "xenforeignmemory_map",
    "xenforeignmemory_unmap",
];

#[repr(C)]
struct XcInterface {
    _opaque: [u8; 0],
}

#[repr(C)]
struct ForeignMemory {
    _opaque: [u8; 0],
}

/// xc_domaininfo_t (struct xen_domctl_getdomaininfo), 112 bytes on x86-64: the fields read
/// here, then the rest (outstanding_pages .. arch_config) as opaque words.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct DomainInfo {
    domain: u16,
    pad1: u16,
    flags: u32,
    tot_pages: u64,
    max_pages: u64,
    rest: [u64; 11],
}
const _: () = assert!(size_of::<DomainInfo>() == 112);

/// xc_hypercall_buffer_t.
#[repr(C)]
struct HypercallBuffer {
    hbuf: *mut c_void,
    param_shadow: *mut HypercallBuffer,
    dir: c_int,
    ubuf: *mut c_void,
    sz: usize,
}

impl HypercallBuffer {
    /// As DECLARE_HYPERCALL_BUFFER initialises it.
    fn new() -> Self {
        Self {
            hbuf: ptr::null_mut(),
            param_shadow: ptr::null_mut(),
            dir: 0,
            ubuf: ptr::without_provenance_mut(usize::MAX),
            sz: 0,
        }
    }
}

/// xc_shadow_op_stats_t.
#[repr(C)]
#[derive(Default)]
struct ShadowOpStats {
    fault_count: u32,
    dirty_count: u32,
}

type Xch = *mut XcInterface;

/// The double's Xen functions, with the prototypes of xenctrl.h, xenforeignmemory.h and
/// include/skyferry-xen.h.
struct Xen {
    interface_open: unsafe extern "C" fn(*mut c_void, *mut c_void, c_uint) -> Xch,
    interface_close: unsafe extern "C" fn(Xch) -> c_int,
    getinfolist: unsafe extern "C" fn(Xch, u32, c_uint, *mut DomainInfo) -> c_int,
    nr_gpfns: unsafe extern "C" fn(Xch, u32, *mut u64) -> c_int,
    pause: unsafe extern "C" fn(Xch, u32) -> c_int,
    unpause: unsafe extern "C" fn(Xch, u32) -> c_int,
    shadow_control: unsafe extern "C" fn(Xch, u32, c_uint, *mut c_uint, c_uint) -> c_int,
    logdirty_control: unsafe extern "C" fn(
        Xch,
        u32,
        c_uint,
        *mut HypercallBuffer,
        c_ulong,
        c_uint,
        *mut ShadowOpStats,
    ) -> c_longlong,
    alloc_pages: unsafe extern "C" fn(Xch, *mut HypercallBuffer, c_int) -> *mut c_void,
    free_pages: unsafe extern "C" fn(Xch, *mut HypercallBuffer, c_int),
    hvm_getcontext: unsafe extern "C" fn(Xch, u32, *mut u8, u32) -> c_int,
    hvm_setcontext: unsafe extern "C" fn(Xch, u32, *mut u8, u32) -> c_int,
    get_pfn_type_batch: unsafe extern "C" fn(Xch, u32, c_uint, *mut u64) -> c_int,
    fmem_open: unsafe extern "C" fn(*mut c_void, c_uint) -> *mut ForeignMemory,
    fmem_close: unsafe extern "C" fn(*mut ForeignMemory) -> c_int,
    fmem_map: unsafe extern "C" fn(
        *mut ForeignMemory,
        u32,
        c_int,
        usize,
        *const u64,
        *mut c_int,
    ) -> *mut c_void,
    fmem_unmap: unsafe extern "C" fn(*mut ForeignMemory, *mut c_void, usize) -> c_int,
    _lib: Library,
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .expect("an OS error")
}

impl Xen {
    fn load(path: &Path) -> Self {
        // SAFETY: the double has no initialisers of its own.
        let lib = unsafe { Library::new(path) }.expect("load the double");
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the field this initialises has the prototype of the header's
                // declaration of $name, and the pointer lives in Xen, which owns `lib`.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }.expect($name)
            };
        }
        Self {
            interface_open: sym!("xc_interface_open"),
            interface_close: sym!("xc_interface_close"),
            getinfolist: sym!("xc_domain_getinfolist"),
            nr_gpfns: sym!("xc_domain_nr_gpfns"),
            pause: sym!("xc_domain_pause"),
            unpause: sym!("xc_domain_unpause"),
            shadow_control: sym!("xc_shadow_control"),
            logdirty_control: sym!("xc_logdirty_control"),
            alloc_pages: sym!("xc__hypercall_buffer_alloc_pages"),
            free_pages: sym!("xc__hypercall_buffer_free_pages"),
            hvm_getcontext: sym!("xc_domain_hvm_getcontext"),
            hvm_setcontext: sym!("xc_domain_hvm_setcontext"),
            get_pfn_type_batch: sym!("xc_get_pfn_type_batch"),
            fmem_open: sym!("xenforeignmemory_open"),
            fmem_close: sym!("xenforeignmemory_close"),
            fmem_map: sym!("xenforeignmemory_map"),
            fmem_unmap: sym!("xenforeignmemory_unmap"),
            _lib: lib,
        }
    }

    fn open(&self) -> Result<Xc<'_>, i32> {
        // SAFETY: NULL loggers are allowed (Xen logs to stderr); no flags.
        let xch = unsafe { (self.interface_open)(ptr::null_mut(), ptr::null_mut(), 0) };
        if xch.is_null() {
            Err(errno())
        } else {
            Ok(Xc { xen: self, xch })
        }
    }

    fn fmem_open(&self) -> Result<Fmem<'_>, i32> {
        // SAFETY: a NULL logger is allowed; no flags.
        let fmem = unsafe { (self.fmem_open)(ptr::null_mut(), 0) };
        if fmem.is_null() {
            Err(errno())
        } else {
            Ok(Fmem { xen: self, fmem })
        }
    }
}

/// An open xc_interface.
struct Xc<'a> {
    xen: &'a Xen,
    xch: Xch,
}

impl Drop for Xc<'_> {
    fn drop(&mut self) {
        // SAFETY: xch came from xc_interface_open and is closed once, here.
        assert_eq!(unsafe { (self.xen.interface_close)(self.xch) }, 0);
    }
}

fn rc(rc: c_int) -> Result<c_int, i32> {
    if rc < 0 {
        assert_eq!(rc, -1, "libxenctrl fails with -1 and errno");
        Err(errno())
    } else {
        Ok(rc)
    }
}

/// What one CLEAN or PEEK returned.
#[derive(Debug)]
struct Round {
    dirty: BTreeSet<u64>,
    dirty_count: u32,
}

impl Xc<'_> {
    fn getinfolist(&self, first: u32, max: u32) -> Result<Vec<DomainInfo>, i32> {
        let blank = DomainInfo {
            domain: 0,
            pad1: 0,
            flags: 0,
            tot_pages: 0,
            max_pages: 0,
            rest: [0; 11],
        };
        let mut info = vec![blank; max as usize];
        // SAFETY: info has room for max entries.
        let n = rc(unsafe { (self.xen.getinfolist)(self.xch, first, max, info.as_mut_ptr()) })?;
        info.truncate(usize::try_from(n).unwrap());
        Ok(info)
    }

    fn nr_gpfns(&self, domid: u32) -> Result<u64, i32> {
        let mut gpfns = 0;
        // SAFETY: gpfns is a valid out pointer.
        rc(unsafe { (self.xen.nr_gpfns)(self.xch, domid, &mut gpfns) })?;
        Ok(gpfns)
    }

    fn pause(&self, domid: u32) -> Result<(), i32> {
        // SAFETY: plain values.
        rc(unsafe { (self.xen.pause)(self.xch, domid) }).map(drop)
    }

    fn unpause(&self, domid: u32) -> Result<(), i32> {
        // SAFETY: plain values.
        rc(unsafe { (self.xen.unpause)(self.xch, domid) }).map(drop)
    }

    fn shadow_control(&self, domid: u32, sop: c_uint) -> Result<(), i32> {
        // SAFETY: mb may be NULL.
        rc(unsafe { (self.xen.shadow_control)(self.xch, domid, sop, ptr::null_mut(), 0) }).map(drop)
    }

    fn alloc(&self, pages: c_int) -> HypercallBuffer {
        let mut buf = HypercallBuffer::new();
        // SAFETY: buf is a hypercall buffer initialised as DECLARE_HYPERCALL_BUFFER does.
        let p = unsafe { (self.xen.alloc_pages)(self.xch, &mut buf, pages) };
        assert!(!p.is_null(), "alloc_pages: errno {}", errno());
        assert_eq!(p, buf.hbuf);
        buf
    }

    fn free(&self, buf: &mut HypercallBuffer, pages: c_int) {
        // SAFETY: buf was allocated by alloc with `pages` pages.
        unsafe { (self.xen.free_pages)(self.xch, buf, pages) };
    }

    /// A CLEAN or PEEK of `pages` frames into a fresh hypercall buffer.
    fn logdirty(&self, domid: u32, sop: c_uint, pages: u64, mode: c_uint) -> Result<Round, i32> {
        let buf_pages = c_int::try_from(pages.div_ceil(8 * PAGE_SIZE as u64).max(1)).unwrap();
        let mut buf = self.alloc(buf_pages);
        let mut stats = ShadowOpStats::default();
        // SAFETY: buf.hbuf holds buf_pages pages, at least the pages / 8 bytes written.
        let ret = unsafe {
            (self.xen.logdirty_control)(self.xch, domid, sop, &mut buf, pages, mode, &mut stats)
        };
        let result = if ret < 0 {
            assert_eq!(ret, -1);
            Err(errno())
        } else {
            assert_eq!(
                u64::try_from(ret),
                Ok(pages),
                "Xen returns the number of bits covered"
            );
            // SAFETY: hbuf holds at least pages / 8 bytes, which the call wrote.
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    buf.hbuf.cast::<u8>(),
                    usize::try_from(pages.div_ceil(8)).unwrap(),
                )
            };
            let dirty = (0..pages).filter(|&i| bytes[(i / 8) as usize] & (1 << (i % 8)) != 0);
            Ok(Round {
                dirty: dirty.collect(),
                dirty_count: stats.dirty_count,
            })
        };
        self.free(&mut buf, buf_pages);
        assert!(buf.hbuf.is_null());
        result
    }

    fn clean(&self, domid: u32, pages: u64) -> Round {
        self.logdirty(domid, SHADOW_OP_CLEAN, pages, 0)
            .expect("CLEAN")
    }

    /// The context size (buf None) or the context copied into buf.
    fn getcontext(&self, domid: u32, buf: Option<&mut [u8]>) -> Result<usize, i32> {
        let (p, size) = match buf {
            Some(buf) => (buf.as_mut_ptr(), u32::try_from(buf.len()).unwrap()),
            None => (ptr::null_mut(), 0),
        };
        // SAFETY: p is NULL or valid for size bytes.
        rc(unsafe { (self.xen.hvm_getcontext)(self.xch, domid, p, size) })
            .map(|n| usize::try_from(n).unwrap())
    }

    fn setcontext(&self, domid: u32, data: &[u8]) -> Result<(), i32> {
        let size = u32::try_from(data.len()).unwrap();
        // SAFETY: data is valid for size bytes; Xen's prototype is not const but only reads.
        rc(unsafe { (self.xen.hvm_setcontext)(self.xch, domid, data.as_ptr().cast_mut(), size) })
            .map(drop)
    }

    fn pfn_types(&self, domid: u32, frames: &mut [u64]) -> Result<(), i32> {
        let num = c_uint::try_from(frames.len()).unwrap();
        // SAFETY: frames holds num entries.
        rc(unsafe { (self.xen.get_pfn_type_batch)(self.xch, domid, num, frames.as_mut_ptr()) })
            .map(drop)
    }
}

/// An open xenforeignmemory handle.
struct Fmem<'a> {
    xen: &'a Xen,
    fmem: *mut ForeignMemory,
}

impl Drop for Fmem<'_> {
    fn drop(&mut self) {
        // SAFETY: fmem came from xenforeignmemory_open and is closed once, here.
        assert_eq!(unsafe { (self.xen.fmem_close)(self.fmem) }, 0);
    }
}

/// A foreign mapping, unmapped on drop.
struct Mapping<'a> {
    fmem: &'a Fmem<'a>,
    addr: *mut u8,
    pages: usize,
}

impl Fmem<'_> {
    /// Maps `frames` with an err array: the mapping and err[].
    fn map(&self, domid: u32, prot: c_int, frames: &[u64]) -> Result<(Mapping<'_>, Vec<i32>), i32> {
        let mut err = vec![i32::MIN; frames.len()];
        // SAFETY: frames and err hold frames.len() entries each.
        let addr = unsafe {
            (self.xen.fmem_map)(
                self.fmem,
                domid,
                prot,
                frames.len(),
                frames.as_ptr(),
                err.as_mut_ptr(),
            )
        };
        if addr.is_null() {
            return Err(errno());
        }
        Ok((
            Mapping {
                fmem: self,
                addr: addr.cast(),
                pages: frames.len(),
            },
            err,
        ))
    }

    /// Maps `frames` without an err array: all or nothing.
    fn map_all(&self, domid: u32, prot: c_int, frames: &[u64]) -> Result<Mapping<'_>, i32> {
        // SAFETY: frames holds frames.len() entries; err may be NULL.
        let addr = unsafe {
            (self.xen.fmem_map)(
                self.fmem,
                domid,
                prot,
                frames.len(),
                frames.as_ptr(),
                ptr::null_mut(),
            )
        };
        if addr.is_null() {
            return Err(errno());
        }
        Ok(Mapping {
            fmem: self,
            addr: addr.cast(),
            pages: frames.len(),
        })
    }
}

impl Mapping<'_> {
    fn read(&self, slot: usize) -> Vec<u8> {
        assert!(slot < self.pages);
        let mut page = vec![0; PAGE_SIZE];
        // SAFETY: slot is within the mapping and was mapped readable (err[slot] == 0).
        unsafe {
            ptr::copy_nonoverlapping(
                self.addr.add(slot * PAGE_SIZE),
                page.as_mut_ptr(),
                PAGE_SIZE,
            )
        };
        page
    }

    fn write(&self, slot: usize, offset: usize, data: &[u8]) {
        assert!(slot < self.pages && offset + data.len() <= PAGE_SIZE);
        // SAFETY: the range is within a slot mapped writable; nothing else in this process
        // holds a reference to that memory.
        unsafe {
            ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.addr.add(slot * PAGE_SIZE + offset),
                data.len(),
            )
        };
    }
}

impl Drop for Mapping<'_> {
    fn drop(&mut self) {
        // SAFETY: addr and pages are what xenforeignmemory_map returned and was given.
        let rc =
            unsafe { (self.fmem.xen.fmem_unmap)(self.fmem.fmem, self.addr.cast(), self.pages) };
        assert_eq!(rc, 0);
    }
}

struct Host {
    double: XenDouble,
    xen: Xen,
    dir: PathBuf,
}

fn build_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-double")
}

/// The double, built once, and this process's host directory, in XEN_DOUBLE_DIR.
fn host() -> &'static Host {
    static HOST: OnceLock<Host> = OnceLock::new();
    HOST.get_or_init(|| {
        let so = double::build(&build_dir()).unwrap_or_else(|e| panic!("{e}"));
        let hosts = build_dir().join("hosts");
        // Hosts of earlier runs whose process is gone.
        for entry in fs::read_dir(&hosts).into_iter().flatten().flatten() {
            if !Path::new("/proc").join(entry.file_name()).exists() {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
        let dir = hosts.join(std::process::id().to_string());
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        // SAFETY: this runs once, before any test calls into the double (every test gets there
        // through host(), which waits for this), so no thread reads the environment through
        // libc meanwhile; std's own readers are serialised with set_var.
        unsafe { std::env::set_var("XEN_DOUBLE_DIR", &dir) };
        Host {
            double: XenDouble::load(&so).expect("load the double"),
            xen: Xen::load(&so),
            dir,
        }
    })
}

fn create(domid: u32, nr_pages: u64) -> Domain<'static> {
    let host = host();
    host.double
        .create_domain(&host.dir, domid, nr_pages)
        .expect("create a domain")
}

fn os_error<T>(result: io::Result<T>) -> Option<i32> {
    result.err().and_then(|e| e.raw_os_error())
}

fn kinds(events: &[Event]) -> Vec<EventKind> {
    events
        .iter()
        .map(|e| e.kind().expect("a known event kind"))
        .collect()
}

fn failures(events: &[Event]) -> Vec<(XenFunction, i32, bool)> {
    events
        .iter()
        .filter_map(|e| {
            e.failure()
                .map(|(f, errno)| (f, errno, e.flags & EVF_INJECTED != 0))
        })
        .collect()
}

/// Set in the environment of a subprocess running one of the `child_` tests, which do nothing
/// otherwise: what they check depends on environment variables this process must not change.
const CHILD: &str = "SKYFERRY_XEN_DOUBLE_CHILD";

/// Runs test `name` of this binary in a subprocess with `XEN_DOUBLE_DIR` set to `dir` (unset
/// if None) and `CHILD` to `arg`, and checks that it ran and passed.
fn run_child(name: &str, dir: Option<&Path>, arg: &Path, envs: &[(&str, &str)]) {
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args([name, "--exact", "--test-threads=1"])
        .env(CHILD, arg)
        .env_remove("XEN_DOUBLE_DIR")
        .envs(envs.iter().copied());
    if let Some(dir) = dir {
        child.env("XEN_DOUBLE_DIR", dir);
    }
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} with XEN_DOUBLE_DIR={dir:?}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With CHILD = the double's path: neither library opens.
#[test]
fn child_open_without_host() {
    let Some(so) = std::env::var_os(CHILD) else {
        return;
    };
    let xen = Xen::load(Path::new(&so));
    assert_eq!(xen.open().err(), Some(ENOENT));
    assert_eq!(xen.fmem_open().err(), Some(ENOENT));
}

#[test]
fn open_fails_with_enoent_without_a_host() {
    let host = host();
    let not_a_dir = host.dir.join("not-a-directory");
    fs::write(&not_a_dir, b"").unwrap();
    for dir in [None, Some(not_a_dir.as_path())] {
        run_child("child_open_without_host", dir, host.double.path(), &[]);
    }
    assert!(host.xen.open().is_ok());
    assert!(host.xen.fmem_open().is_ok());
}

/// With CHILD = an empty directory to build in, and pkg-config finding no packages.
#[test]
fn child_build_without_headers() {
    let Some(out_dir) = std::env::var_os(CHILD) else {
        return;
    };
    match double::build(Path::new(&out_dir)) {
        Err(e @ double::BuildError::NoHeaders(_)) => {
            assert!(e.to_string().contains("apt-get install libxen-dev"), "{e}");
        }
        other => panic!("expected NoHeaders, got {other:?}"),
    }
}

#[test]
fn build_without_headers_says_what_to_install() {
    let out_dir = build_dir().join(format!("no-headers-{}", std::process::id()));
    let _ = fs::remove_dir_all(&out_dir);
    let no_packages = [
        ("PKG_CONFIG_LIBDIR", "/nonexistent"),
        ("PKG_CONFIG_PATH", ""),
    ];
    run_child("child_build_without_headers", None, &out_dir, &no_packages);
    assert!(!out_dir.join("libxen_double.so").exists());
}

/// With CHILD = a domain id: what a migration source does to it, from another process.
#[test]
fn child_pause_and_clean() {
    let Some(domid) = std::env::var_os(CHILD) else {
        return;
    };
    let domid: u32 = domid.to_str().unwrap().parse().unwrap();
    let so = double::build(&build_dir()).unwrap();
    let xen = Xen::load(&so);
    let xc = xen.open().unwrap();
    xc.pause(domid).unwrap();
    assert_eq!(xc.clean(domid, 16).dirty, set(&[1]));
    xc.unpause(domid).unwrap();
}

#[test]
fn processes_share_a_domain() {
    let host = host();
    let xc = host.xen.open().unwrap();
    let dom = create(191, 16);
    xc.shadow_control(191, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();
    dom.write(1, 0, b"guest").unwrap();
    run_child(
        "child_pause_and_clean",
        Some(&host.dir),
        Path::new("191"),
        &[],
    );
    assert_eq!(
        dom.status().dirty,
        0,
        "the child's CLEAN cleared this process's view too"
    );

    let events = dom.events();
    use EventKind::*;
    assert_eq!(kinds(&events), [LogdirtyEnable, Pause, Clean, Unpause]);
    let child = events[1].pid;
    assert_ne!(child, std::process::id());
    assert_eq!(events[0].pid, std::process::id());
    assert!(events[1..].iter().all(|e| e.pid == child));
    assert_eq!(events[2].arg1, 1);
    assert!(events.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
}

#[test]
fn defines_exactly_the_bound_xen_functions() {
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(host().double.path())
        .output()
        .expect("run nm");
    assert!(out.status.success());
    let defined: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(2))
        .filter(|name| !name.starts_with("xen_double_") && !name.starts_with('_'))
        .map(str::to_owned)
        .collect();
    let expected: BTreeSet<String> = XEN_FUNCTIONS.iter().map(|&s| s.to_owned()).collect();
    assert_eq!(defined, expected);
}

#[test]
fn hooks_create_write_read_holes_and_destroy() {
    let host = host();
    let dom = create(10, 8);
    assert_eq!(dom.status().nr_pages, 8);
    dom.write(3, 100, b"hello").unwrap();
    let page = dom.read(3).unwrap();
    assert_eq!(&page[100..105], b"hello");
    assert!(page[..100].iter().chain(&page[105..]).all(|&b| b == 0));
    // Writes stay within a frame of the domain.
    assert_eq!(os_error(dom.write(8, 0, b"x")), Some(EINVAL));
    assert_eq!(os_error(dom.write(0, 4095, b"xy")), Some(EINVAL));
    assert_eq!(os_error(dom.read(8)), Some(EINVAL));
    // A hole has no memory: it reads zeros, takes no writes, and comes back zeroed.
    dom.set_hole(3, true).unwrap();
    dom.set_hole(3, true).unwrap();
    assert_eq!(dom.status().holes, 1);
    assert!(dom.read(3).unwrap().iter().all(|&b| b == 0));
    assert_eq!(os_error(dom.write(3, 0, b"x")), Some(EINVAL));
    dom.set_hole(3, false).unwrap();
    assert_eq!(dom.status().holes, 0);
    assert!(dom.read(3).unwrap().iter().all(|&b| b == 0));
    // Replacing a domain starts it afresh; the old handle keeps the old one.
    dom.write(1, 0, b"old").unwrap();
    let new = create(10, 4);
    assert_eq!(&dom.read(1).unwrap()[..3], b"old");
    assert!(new.read(1).unwrap().iter().all(|&b| b == 0));
    assert_eq!(new.status().nr_pages, 4);
    host.double.destroy_domain(&host.dir, 10).unwrap();
    assert_eq!(
        os_error(host.double.open_domain(&host.dir, 10)),
        Some(ESRCH)
    );
    assert_eq!(
        os_error(host.double.destroy_domain(&host.dir, 10)),
        Some(ESRCH)
    );
    let reserved = host
        .double
        .create_domain(&host.dir, DOMID_FIRST_RESERVED, 4);
    assert_eq!(os_error(reserved), Some(EINVAL));
}

#[test]
fn getinfolist_and_nr_gpfns() {
    let xc = host().xen.open().unwrap();
    let _running = create(101, 16);
    let paused = create(102, 32);
    paused.set_hole(5, true).unwrap();
    paused.set_hole(6, true).unwrap();
    xc.pause(102).unwrap();

    let info = xc.getinfolist(101, 2).unwrap();
    let ids: Vec<u16> = info.iter().map(|i| i.domain).collect();
    assert_eq!(ids, [101, 102]);
    assert_eq!(info[0].flags, DOMINF_HVM_GUEST | DOMINF_RUNNING);
    assert_eq!((info[0].tot_pages, info[0].max_pages), (16, 16));
    assert_eq!(info[1].flags, DOMINF_HVM_GUEST | DOMINF_PAUSED);
    assert_eq!((info[1].tot_pages, info[1].max_pages), (30, 32));
    let info = xc.getinfolist(102, 1).unwrap();
    assert_eq!(info.len(), 1);
    assert_eq!(info[0].domain, 102);
    assert_eq!(xc.getinfolist(DOMID_FIRST_RESERVED, 8).unwrap().len(), 0);
    assert_eq!(xc.getinfolist(101, 0).unwrap().len(), 0);

    assert_eq!(xc.nr_gpfns(101), Ok(16));
    assert_eq!(xc.nr_gpfns(102), Ok(32));
    assert_eq!(xc.nr_gpfns(109), Err(ESRCH));
}

#[test]
fn pause_count_nests_and_is_logged() {
    let xc = host().xen.open().unwrap();
    let dom = create(111, 4);
    xc.pause(111).unwrap();
    xc.pause(111).unwrap();
    assert_eq!(dom.status().pause_count, 2);
    xc.unpause(111).unwrap();
    assert_eq!(dom.status().pause_count, 1);
    xc.unpause(111).unwrap();
    assert_eq!(xc.unpause(111), Err(EINVAL));
    assert_eq!(dom.status().pause_count, 0);
    assert_eq!(xc.pause(119), Err(ESRCH));
    assert_eq!(xc.unpause(119), Err(ESRCH));

    let events = dom.events();
    use EventKind::*;
    assert_eq!(kinds(&events), [Pause, Pause, Unpause, Unpause, Failed]);
    let counts: Vec<u64> = events[..4].iter().map(|e| e.arg0).collect();
    assert_eq!(counts, [1, 2, 1, 0]);
    assert_eq!(failures(&events), [(XenFunction::Unpause, EINVAL, false)]);
    assert!(events.iter().enumerate().all(|(i, e)| e.seq == i as u64));
    assert!(events.windows(2).all(|w| w[0].time_ns <= w[1].time_ns));
    assert!(events.iter().all(|e| e.pid == std::process::id()));

    // Injected: the next pause fails once, then pausing works again; unpause fails until
    // cleared.
    dom.set_fault(Fault::Pause, 1, EIO).unwrap();
    dom.set_fault(Fault::Unpause, 0, EAGAIN).unwrap();
    assert_eq!(xc.pause(111), Err(EIO));
    xc.pause(111).unwrap();
    assert_eq!(xc.unpause(111), Err(EAGAIN));
    assert_eq!(xc.unpause(111), Err(EAGAIN));
    dom.clear_faults();
    xc.unpause(111).unwrap();
    let events = dom.events_since(5);
    assert_eq!(kinds(&events), [Failed, Pause, Failed, Failed, Unpause]);
    assert_eq!(
        failures(&events),
        [
            (XenFunction::Pause, EIO, true),
            (XenFunction::Unpause, EAGAIN, true),
            (XenFunction::Unpause, EAGAIN, true)
        ]
    );

    // Xen caps the controller pause count at 255.
    for _ in 0..255 {
        xc.pause(111).unwrap();
    }
    assert_eq!(xc.pause(111), Err(EOVERFLOW));
    assert_eq!(dom.status().pause_count, 255);
}

fn set(frames: &[u64]) -> BTreeSet<u64> {
    frames.iter().copied().collect()
}

#[test]
fn logdirty_rounds() {
    let xc = host().xen.open().unwrap();
    let dom = create(121, 200);
    assert_eq!(
        xc.logdirty(121, SHADOW_OP_CLEAN, 200, 0).unwrap_err(),
        EINVAL,
        "log-dirty off"
    );
    dom.write(3, 0, b"before").unwrap();
    assert_eq!(
        dom.status().dirty,
        0,
        "no dirty bits while log-dirty is off"
    );

    xc.shadow_control(121, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();
    assert_eq!(
        xc.shadow_control(121, SHADOW_OP_ENABLE_LOGDIRTY),
        Err(EINVAL)
    );
    assert_eq!(xc.shadow_control(121, SHADOW_OP_ENABLE_TEST), Err(EINVAL));
    assert_eq!(dom.status().logdirty, 1);

    // A write shows up in exactly the next CLEAN.
    dom.write(3, 0, b"one").unwrap();
    dom.write(130, 9, b"two").unwrap();
    dom.write(199, 0, b"last").unwrap();
    let round = xc.clean(121, 200);
    assert_eq!(round.dirty, set(&[3, 130, 199]));
    assert_eq!(round.dirty_count, 3);
    let round = xc.clean(121, 200);
    assert_eq!(round.dirty, set(&[]));
    assert_eq!(round.dirty_count, 0);

    // PEEK does not clear.
    dom.write(7, 0, b"x").unwrap();
    assert_eq!(
        xc.logdirty(121, SHADOW_OP_PEEK, 200, 0).unwrap().dirty,
        set(&[7])
    );
    assert_eq!(
        xc.logdirty(121, SHADOW_OP_PEEK, 200, 0).unwrap().dirty,
        set(&[7])
    );
    assert_eq!(dom.status().dirty, 1);

    // A CLEAN of fewer frames leaves the others dirty; frames past the end read clean.
    dom.write(100, 0, b"y").unwrap();
    assert_eq!(xc.clean(121, 64).dirty, set(&[7]));
    assert_eq!(xc.clean(121, 1000).dirty, set(&[100]));

    dom.write(50, 0, b"z").unwrap();
    let round = xc
        .logdirty(121, SHADOW_OP_CLEAN, 200, SHADOW_LOGDIRTY_FINAL)
        .unwrap();
    assert_eq!(round.dirty, set(&[50]));
    assert_eq!(
        xc.logdirty(121, SHADOW_OP_CLEAN, 200, 2).unwrap_err(),
        EINVAL,
        "unknown mode"
    );
    assert_eq!(dom.status().rounds, 5);

    xc.shadow_control(121, SHADOW_OP_OFF).unwrap();
    dom.write(51, 0, b"off").unwrap();
    assert_eq!(
        dom.status(),
        double::Status {
            logdirty: 0,
            dirty: 0,
            ..dom.status()
        }
    );
    assert_eq!(
        xc.logdirty(121, SHADOW_OP_PEEK, 200, 0).unwrap_err(),
        EINVAL
    );
    xc.shadow_control(121, SHADOW_OP_OFF).unwrap();
    assert_eq!(xc.shadow_control(129, SHADOW_OP_OFF), Err(ESRCH));

    let events = dom.events();
    use EventKind::*;
    assert_eq!(
        kinds(&events),
        [
            Failed,
            LogdirtyEnable,
            Failed,
            Failed,
            Clean,
            Clean,
            Peek,
            Peek,
            Clean,
            Clean,
            Clean,
            Failed,
            LogdirtyOff,
            Failed,
            LogdirtyOff
        ]
    );
    let cleans: Vec<(u64, u64, bool)> = events
        .iter()
        .filter(|e| e.kind() == Some(Clean))
        .map(|e| (e.arg0, e.arg1, e.flags & EVF_FINAL != 0))
        .collect();
    assert_eq!(
        cleans,
        [
            (1, 3, false),
            (2, 0, false),
            (3, 1, false),
            (4, 1, false),
            (5, 1, true)
        ]
    );
    assert_eq!(
        (events[12].arg0, events[14].arg0),
        (1, 0),
        "OFF says whether it was on"
    );
    assert!(
        failures(&events)
            .iter()
            .all(|&(_, errno, injected)| errno == EINVAL && !injected)
    );
}

#[test]
fn logdirty_round_fault() {
    let xc = host().xen.open().unwrap();
    let dom = create(122, 64);
    xc.shadow_control(122, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();
    dom.set_fault(Fault::LogdirtyEnable, 0, EIO).unwrap();
    xc.shadow_control(122, SHADOW_OP_OFF).unwrap();
    assert_eq!(xc.shadow_control(122, SHADOW_OP_ENABLE_LOGDIRTY), Err(EIO));
    dom.clear_fault(Fault::LogdirtyEnable);
    xc.shadow_control(122, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();

    dom.set_fault(Fault::LogdirtyRound, 3, EIO).unwrap();
    xc.clean(122, 64);
    xc.clean(122, 64);
    assert_eq!(xc.logdirty(122, SHADOW_OP_CLEAN, 64, 0).unwrap_err(), EIO);
    assert_eq!(xc.logdirty(122, SHADOW_OP_PEEK, 64, 0).unwrap_err(), EIO);
    assert_eq!(dom.status().rounds, 2);
    dom.clear_faults();
    xc.clean(122, 64);
    assert_eq!(
        failures(&dom.events()),
        [
            (XenFunction::ShadowControl, EIO, true),
            (XenFunction::LogdirtyControl, EIO, true),
            (XenFunction::LogdirtyControl, EIO, true)
        ]
    );
}

/// The frames writes-per-round wrote after CLEAN round `round`: they start with the round and
/// their frame number.
fn written_in(dom: &Domain<'_>, round: u64) -> BTreeSet<u64> {
    (0..dom.status().nr_pages)
        .filter(|&gfn| {
            let page = dom.read(gfn).unwrap();
            page[..8] == round.to_le_bytes() && page[8..16] == gfn.to_le_bytes()
        })
        .collect()
}

#[test]
fn writes_per_round_dirty_the_next_round() {
    let xc = host().xen.open().unwrap();
    let dom = create(131, 64);
    let twin = create(132, 64);
    for (domid, d) in [(131, &dom), (132, &twin)] {
        xc.shadow_control(domid, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();
        d.set_writes_per_round(5, 42);
    }
    // A hole is never written: the double skips it.
    dom.set_hole(0, true).unwrap();
    twin.set_hole(0, true).unwrap();
    assert_eq!(dom.status().writes_per_round, 5);

    assert_eq!(xc.clean(131, 64).dirty, set(&[]));
    let written = written_in(&dom, 1);
    assert!((1..=5).contains(&written.len()), "{written:?}");
    assert_eq!(dom.status().dirty, written.len() as u64);
    let round = xc.clean(131, 64);
    assert_eq!(round.dirty, written);
    assert_eq!(round.dirty_count as usize, written.len());

    // The frames depend on the seed and round only.
    xc.clean(132, 64);
    assert_eq!(xc.clean(132, 64).dirty, written);

    // Round 2 wrote too: the final round returns them, and nothing is written after it.
    let written = written_in(&dom, 2);
    let before = dom.status().guest_writes;
    let round = xc
        .logdirty(131, SHADOW_OP_CLEAN, 64, SHADOW_LOGDIRTY_FINAL)
        .unwrap();
    assert_eq!(round.dirty, written);
    assert_eq!(dom.status().guest_writes, before);
    assert!(written_in(&dom, 3).is_empty());

    // A paused guest writes nothing either.
    xc.pause(131).unwrap();
    xc.clean(131, 64);
    assert_eq!(dom.status().guest_writes, before);
    assert_eq!(dom.status().dirty, 0);
    let guest_writes: Vec<(u64, u64)> = dom
        .events()
        .iter()
        .filter(|e| e.kind() == Some(EventKind::GuestWrites))
        .map(|e| (e.arg0, e.arg1))
        .collect();
    assert_eq!(guest_writes.iter().map(|g| g.0).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(guest_writes.iter().map(|g| g.1).sum::<u64>(), before);
}

#[test]
fn foreign_mappings_reach_guest_memory() {
    let host = host();
    let xc = host.xen.open().unwrap();
    let fmem = host.xen.fmem_open().unwrap();
    let dom = create(141, 16);
    dom.write(2, 0, &[2; PAGE_SIZE]).unwrap();
    dom.write(5, 0, &[5; PAGE_SIZE]).unwrap();
    xc.shadow_control(141, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();

    let (map, err) = fmem.map(141, PROT_READ, &[5, 2]).unwrap();
    assert_eq!(err, [0, 0]);
    assert_eq!(map.read(0), [5; PAGE_SIZE]);
    assert_eq!(map.read(1), [2; PAGE_SIZE]);
    // A guest write after mapping is seen through the mapping: it is the guest's memory.
    dom.write(2, 10, b"live").unwrap();
    assert_eq!(&map.read(1)[10..14], b"live");
    drop(map);

    // Writes through a foreign mapping reach the guest and are not logged as dirty.
    xc.clean(141, 16);
    let map = fmem.map_all(141, PROT_READ | PROT_WRITE, &[9]).unwrap();
    map.write(0, 4000, b"restored");
    assert_eq!(&dom.read(9).unwrap()[4000..4008], b"restored");
    assert_eq!(dom.status().dirty, 0);
    assert_eq!(xc.clean(141, 16).dirty, set(&[]));
    drop(map);

    let status = dom.status();
    assert_eq!((status.mapped_read, status.mapped_write), (2, 1));
}

#[test]
fn foreign_map_failures() {
    let fmem = host().xen.fmem_open().unwrap();
    let dom = create(151, 16);
    dom.write(1, 0, &[1; PAGE_SIZE]).unwrap();
    dom.write(2, 0, &[2; PAGE_SIZE]).unwrap();
    dom.set_hole(4, true).unwrap();
    dom.set_fault(Fault::MapFrame, 6, EIO).unwrap();

    // With err[]: per-page negative errnos, the other pages mapped.
    let (map, err) = fmem.map(151, PROT_READ, &[1, 4, 6, 99, 2]).unwrap();
    assert_eq!(err, [0, -EINVAL, -EIO, -EINVAL, 0]);
    assert_eq!(map.read(0), [1; PAGE_SIZE]);
    assert_eq!(map.read(4), [2; PAGE_SIZE]);
    drop(map);
    assert_eq!(dom.status().mapped_read, 2);

    // Without: all or nothing, errno positive.
    assert_eq!(fmem.map_all(151, PROT_READ, &[1, 4]).err(), Some(EINVAL));
    assert_eq!(fmem.map_all(151, PROT_READ, &[1, 6]).err(), Some(EIO));
    assert!(fmem.map_all(151, PROT_READ, &[1, 2]).is_ok());
    assert_eq!(fmem.map(159, PROT_READ, &[1]).err(), Some(ESRCH));
    assert_eq!(fmem.map_all(151, PROT_READ, &[]).err(), Some(EINVAL));

    dom.clear_fault(Fault::MapFrame);
    let (_map, err) = fmem.map(151, PROT_READ, &[6]).unwrap();
    assert_eq!(err, [0]);
    assert_eq!(
        failures(&dom.events()),
        [
            (XenFunction::ForeignMemoryMap, EINVAL, false),
            (XenFunction::ForeignMemoryMap, EIO, true),
            (XenFunction::ForeignMemoryMap, EINVAL, false)
        ]
    );
}

#[test]
fn hvm_context_round_trip() {
    let xc = host().xen.open().unwrap();
    let dom = create(161, 4);
    assert_eq!(xc.getcontext(161, None), Ok(0));
    let context: Vec<u8> = (0..=255u8)
        .cycle()
        .take(1000)
        .map(|b| b.wrapping_mul(7))
        .collect();
    xc.setcontext(161, &context).unwrap();
    assert_eq!(dom.context(), context);
    assert_eq!(dom.status().context_len, 1000);
    assert_eq!(xc.getcontext(161, None), Ok(1000));
    assert_eq!(xc.getcontext(161, Some(&mut [0; 999])), Err(ENOSPC));
    let mut buf = vec![0; 2000];
    assert_eq!(xc.getcontext(161, Some(&mut buf)), Ok(1000));
    assert_eq!(buf[..1000], context);
    assert_eq!(xc.setcontext(161, &vec![0; 65537]), Err(EINVAL));
    assert_eq!(xc.getcontext(169, None), Err(ESRCH));

    dom.set_context(b"from the hook").unwrap();
    let mut buf = [0; 13];
    assert_eq!(xc.getcontext(161, Some(&mut buf)), Ok(13));
    assert_eq!(&buf, b"from the hook");

    dom.set_fault(Fault::SetContext, 1, EIO).unwrap();
    dom.set_fault(Fault::GetContext, 1, EAGAIN).unwrap();
    assert_eq!(xc.setcontext(161, b"x"), Err(EIO));
    assert_eq!(xc.getcontext(161, None), Err(EAGAIN));
    xc.setcontext(161, b"x").unwrap();
    assert_eq!(xc.getcontext(161, None), Ok(1));

    let events = dom.events();
    use EventKind::*;
    assert_eq!(
        kinds(&events),
        [
            GetContext, SetContext, GetContext, Failed, GetContext, Failed, GetContext, Failed,
            Failed, SetContext, GetContext
        ]
    );
    let size_queries: Vec<bool> = events
        .iter()
        .filter(|e| e.kind() == Some(GetContext))
        .map(|e| e.flags & EVF_SIZE_QUERY != 0)
        .collect();
    assert_eq!(size_queries, [true, true, false, false, true]);
    assert_eq!(events[1].arg0, 1000);
}

#[test]
fn pfn_types_mark_holes_and_frames_out_of_range() {
    let xc = host().xen.open().unwrap();
    let dom = create(171, 8);
    dom.set_hole(3, true).unwrap();
    let mut frames = [0, 3, 7, 8, 100];
    xc.pfn_types(171, &mut frames).unwrap();
    assert_eq!(
        frames,
        [
            PFINFO_NOTAB,
            PFINFO_XTAB,
            PFINFO_NOTAB,
            PFINFO_XTAB,
            PFINFO_XTAB
        ]
    );
    assert_eq!(
        xc.pfn_types(171, &mut [0; 1025]),
        Err(E2BIG),
        "Xen takes 1024 at most"
    );
    assert_eq!(xc.pfn_types(179, &mut [0]), Err(ESRCH));
}

#[test]
fn hypercall_buffers_are_zeroed_pages() {
    let xc = host().xen.open().unwrap();
    let mut buf = xc.alloc(3);
    assert_eq!(buf.hbuf as usize % PAGE_SIZE, 0);
    // SAFETY: the buffer holds 3 pages.
    let bytes = unsafe { std::slice::from_raw_parts_mut(buf.hbuf.cast::<u8>(), 3 * PAGE_SIZE) };
    assert!(bytes.iter().all(|&b| b == 0));
    bytes.fill(0xff);
    xc.free(&mut buf, 3);
    assert!(buf.hbuf.is_null());

    // A freed buffer is refused, not silently skipped.
    let _dom = create(176, 16);
    xc.shadow_control(176, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();
    let mut stats = ShadowOpStats::default();
    // SAFETY: buf is a valid (freed) hypercall buffer struct; stats a valid out pointer.
    let ret = unsafe {
        (xc.xen.logdirty_control)(xc.xch, 176, SHADOW_OP_CLEAN, &mut buf, 16, 0, &mut stats)
    };
    assert_eq!((ret, errno()), (-1, EFAULT));
}

/// A guest writing while CLEANs run: copying the dirty frames after every round (as a migration
/// does) must end with an exact copy. Each frame is written once, so a dirty bit lost between
/// a CLEAN's read and its clear is not masked by a later write to the same frame.
#[test]
fn concurrent_writes_are_never_lost() {
    const PAGES: u64 = 4096;
    let xc = host().xen.open().unwrap();
    let dom = create(181, PAGES);
    xc.shadow_control(181, SHADOW_OP_ENABLE_LOGDIRTY).unwrap();
    let mut copy = vec![vec![0u8; PAGE_SIZE]; 4096];
    let done = AtomicBool::new(false);
    let mut rounds = 0;
    std::thread::scope(|s| {
        s.spawn(|| {
            for v in 0..PAGES {
                // Every frame once, in an order that hops between bitmap words.
                let gfn = v * 2_654_435_761 % PAGES;
                dom.write(gfn, 0, &(v + 1).to_le_bytes()).unwrap();
                for _ in 0..200 {
                    std::hint::spin_loop();
                }
            }
            done.store(true, Ordering::SeqCst);
        });
        loop {
            let last = done.load(Ordering::SeqCst);
            for gfn in xc.clean(181, PAGES).dirty {
                copy[usize::try_from(gfn).unwrap()] = dom.read(gfn).unwrap();
            }
            rounds += 1;
            if last {
                break;
            }
        }
    });
    assert!(rounds > 2, "the writes spanned {rounds} rounds");
    for (gfn, page) in copy.iter().enumerate() {
        assert!(
            *page == dom.read(gfn as u64).unwrap(),
            "frame {gfn} lost its write"
        );
    }
}

#[test]
fn a_paused_guest_does_not_write_and_the_toolstack_can_pause() {
    let xc = host().xen.open().unwrap();
    let dom = create(151, 4);
    dom.write(1, 0, b"before").unwrap();
    dom.toolstack_pause().unwrap();
    assert_eq!(dom.status().pause_count, 1);
    assert_eq!(os_error(dom.write(1, 0, b"paused")), Some(EAGAIN));
    assert_eq!(&dom.read(1).unwrap()[..6], b"before");
    xc.unpause(151).unwrap();
    dom.write(1, 0, b"after!").unwrap();
    assert_eq!(&dom.read(1).unwrap()[..6], b"after!");
    assert_eq!(kinds(&dom.events()), [EventKind::Pause, EventKind::Unpause]);
}

#[test]
fn pausing_waits_for_writes_in_flight() {
    // However a pause and a stream of guest writes interleave, no write lands after the
    // pause returned: memory read right after pausing stays as it is.
    let xc = host().xen.open().unwrap();
    let dom = create(152, 1);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let _ = dom.write(0, 0, &n.to_le_bytes());
            }
        });
        for _ in 0..200 {
            xc.pause(152).unwrap();
            let seen = dom.read(0).unwrap();
            std::thread::yield_now();
            assert_eq!(dom.read(0).unwrap(), seen, "a write landed while paused");
            xc.unpause(152).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

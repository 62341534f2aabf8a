//! The destination side: a RAM file that received pages are written into, and a QEMU that
//! waits with `-incoming defer` to load the device state and run the guest.
//!
//! The destination QEMU is either started by the operator before the migration (its RAM file
//! and QMP socket at the paths the config names), or by skyferryd from the command template
//! in its config, once the source's Hello says how large the guest is. Either way it must be
//! waiting for an incoming migration: it then runs no guest code and touches no guest RAM,
//! so skyferryd is the only writer of the file until the commit.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use memmap2::MmapMut;

use super::qmp::Qmp;
use super::ram_file::digest_file;
use super::{BACKEND, device_state, qmp_err};
use crate::codec::PageSink;
use crate::guest::claims::WriterClaims;
use crate::guest::{DestGuest, GuestError, PageWriter};
use crate::page::{PAGE_SIZE, Page, Pfn};

/// How the destination finds (or starts) the QEMU for an incoming guest. In paths and the
/// command, `{guest}` is the guest's name; the command may also use `{ram_file}`,
/// `{ram_bytes}`, `{ram_mib}` and `{qmp}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuDestConfig {
    /// The destination RAM file.
    pub ram_file: String,
    /// The destination QEMU's QMP socket.
    pub qmp: String,
    /// Command that starts the destination QEMU (waiting with `-incoming defer`); empty: the
    /// operator starts it before the migration.
    #[serde(default)]
    pub command: Vec<String>,
}

impl Default for QemuDestConfig {
    fn default() -> Self {
        QemuDestConfig {
            ram_file: "/dev/shm/skyferry/{guest}.ram".into(),
            qmp: "/run/skyferry/{guest}.qmp".into(),
            command: Vec::new(),
        }
    }
}

fn err(op: &'static str, message: impl Into<String>) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message: message.into(),
    }
}

/// A guest name usable in paths: letters, digits, `.`, `_`, `-`, not starting with `.`.
fn check_name(guest: &str) -> Result<(), GuestError> {
    let ok = !guest.is_empty()
        && guest.len() <= 64
        && !guest.starts_with('.')
        && guest
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(err(
            "prepare the destination",
            format!(
                "guest name {guest:?} cannot name files here: use 1-64 letters, digits, '.', '_' \
                 or '-', not starting with '.'"
            ),
        ))
    }
}

fn expand(template: &str, vars: &[(&str, String)]) -> String {
    vars.iter().fold(template.to_string(), |s, (k, v)| {
        s.replace(&format!("{{{k}}}"), v)
    })
}

struct Inner {
    /// Owns the mapping; pages are reached through `base` only.
    _map: MmapMut,
    base: *mut u8,
    file: File,
    ram_file: PathBuf,
    pages: u64,
    claims: WriterClaims,
    /// The file had no data when opened: pages no writer touched are zero.
    fresh: bool,
    started: AtomicBool,
}

// SAFETY: `base` points into `_map`, which `Inner` owns and which is not tied to a thread.
// Pages are handed out only as `&mut Page` to the one writer that claimed them in `claims`
// (see `QemuWriter::page_mut`); every other access goes through the file (`pread`).
unsafe impl Send for Inner {}
// SAFETY: as for `Send`: shared state is atomic, and page references are exclusive per claim.
unsafe impl Sync for Inner {}

/// The guest being built at the destination.
pub struct QemuTarget {
    inner: Arc<Inner>,
    /// Released once the guest runs here, so the operator's tools can connect (a QMP socket
    /// serves one client at a time).
    qmp: Mutex<Option<Qmp>>,
    timeout: Duration,
    /// The QEMU skyferryd started, if it did (killed, with its RAM file removed, if the
    /// migration fails).
    child: Mutex<Option<Child>>,
    created_file: bool,
}

impl std::fmt::Debug for QemuTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuTarget")
            .field("ram_file", &self.inner.ram_file)
            .field("pages", &self.inner.pages)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl QemuTarget {
    /// Prepares the destination of guest `guest` of `pages` pages: opens (or creates, when
    /// it starts the QEMU itself) the RAM file, starts the QEMU if configured, and checks
    /// that the QEMU waits for an incoming migration.
    pub fn prepare(
        config: &QemuDestConfig,
        guest: &str,
        pages: u64,
        timeout: Duration,
    ) -> Result<Self, GuestError> {
        check_name(guest)?;
        let bytes = pages
            .checked_mul(PAGE_SIZE as u64)
            .filter(|&b| b > 0)
            .ok_or_else(|| err("prepare the destination", format!("{pages} pages")))?;
        let vars = |ram: &Path, qmp: &Path| {
            vec![
                ("guest", guest.to_string()),
                ("ram_file", ram.display().to_string()),
                ("ram_bytes", bytes.to_string()),
                ("ram_mib", (bytes >> 20).to_string()),
                ("qmp", qmp.display().to_string()),
            ]
        };
        let base = [("guest", guest.to_string())];
        let ram_file = PathBuf::from(expand(&config.ram_file, &base));
        let qmp_path = PathBuf::from(expand(&config.qmp, &base));
        let launch = !config.command.is_empty();
        // What an operator-started QEMU must match, said with every error about it.
        let expected = |e: GuestError| match e {
            GuestError::Backend {
                backend,
                op,
                message,
            } if !launch => GuestError::Backend {
                backend,
                op,
                message: format!(
                    "{message}; expected a QEMU the operator started for guest {guest:?}, \
                     waiting with -incoming defer, its RAM in {} (memory-backend-file, \
                     share=on) and its QMP socket at {}: these paths come from the \
                     destination's [qemu] ram_file = {:?} and qmp = {:?} ({{guest}} is the \
                     source's --name); set them there to name others",
                    ram_file.display(),
                    qmp_path.display(),
                    config.ram_file,
                    config.qmp
                ),
            },
            e => e,
        };
        let file = if launch {
            create_ram_file(&ram_file, bytes)?
        } else {
            open_ram_file(&ram_file, bytes).map_err(expected)?
        };
        let mut target_child = None;
        if launch {
            match spawn(&config.command, &vars(&ram_file, &qmp_path), &qmp_path) {
                Ok(c) => target_child = Some(c),
                Err(e) => {
                    let _ = std::fs::remove_file(&ram_file);
                    return Err(e);
                }
            }
        }
        let cleanup = |child: Option<Child>| {
            if let Some(mut c) = child {
                let _ = c.kill();
                let _ = c.wait();
            }
            if launch {
                let _ = std::fs::remove_file(&ram_file);
            }
        };
        let connected =
            connect_when_up(&qmp_path, timeout, target_child.as_mut()).map_err(expected);
        let mut qmp = match connected {
            Ok(q) => q,
            Err(e) => {
                cleanup(target_child);
                return Err(e);
            }
        };
        match qmp.status() {
            Ok(s) if s.status == "inmigrate" => {}
            Ok(s) => {
                cleanup(target_child);
                return Err(err(
                    "prepare the destination",
                    format!(
                        "the destination QEMU at {} is {:?}, not waiting for a migration: start \
                         it with -incoming defer",
                        qmp_path.display(),
                        s.status
                    ),
                ));
            }
            Err(e) => {
                cleanup(target_child);
                return Err(qmp_err("query the destination QEMU")(e));
            }
        }
        let fresh = launch || !has_data(&file);
        // SAFETY: the file is mapped shared with the destination QEMU, which is waiting for an
        // incoming migration (checked just above): it runs no guest code and writes no guest
        // RAM until `start` (`cont`), after every page writer is gone. Within skyferryd the
        // mapping is reached only through `base`, under the per-page claims of the writers.
        let mut map = match unsafe { MmapMut::map_mut(&file) } {
            Ok(m) => m,
            Err(e) => {
                cleanup(target_child);
                return Err(err(
                    "map the RAM file",
                    format!("{}: {e}", ram_file.display()),
                ));
            }
        };
        let base_ptr = map.as_mut_ptr();
        Ok(QemuTarget {
            inner: Arc::new(Inner {
                _map: map,
                base: base_ptr,
                file,
                ram_file,
                pages,
                claims: WriterClaims::new(pages),
                fresh,
                started: AtomicBool::new(false),
            }),
            qmp: Mutex::new(Some(qmp)),
            timeout,
            child: Mutex::new(target_child),
            created_file: launch,
        })
    }
}

/// Creates the RAM file for a QEMU skyferryd will start: it must not exist (it could be
/// another guest's memory).
fn create_ram_file(path: &Path, bytes: u64) -> Result<File, GuestError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| err("create the RAM file", format!("{}: {e}", dir.display())))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            err(
                "create the RAM file",
                format!(
                    "{}: {e}{}",
                    path.display(),
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        " (a guest of that name already has memory here)"
                    } else {
                        ""
                    }
                ),
            )
        })?;
    file.set_len(bytes).map_err(|e| {
        let _ = std::fs::remove_file(path);
        err("size the RAM file", format!("{}: {e}", path.display()))
    })?;
    Ok(file)
}

/// Opens the RAM file of a QEMU the operator started; it must have the source's size.
fn open_ram_file(path: &Path, bytes: u64) -> Result<File, GuestError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| {
            err(
                "open the RAM file",
                format!(
                    "{}: {e} (start the destination QEMU with its memory backend there, or set \
                     [qemu] command)",
                    path.display()
                ),
            )
        })?;
    let len = file
        .metadata()
        .map_err(|e| err("open the RAM file", e.to_string()))?
        .len();
    if len != bytes {
        return Err(err(
            "open the RAM file",
            format!(
                "{} is {len} bytes but the source's guest has {bytes}: start the destination \
                 QEMU with the same memory size",
                path.display()
            ),
        ));
    }
    Ok(file)
}

/// True unless the file is all holes.
fn has_data(file: &File) -> bool {
    use std::os::fd::AsFd;
    !matches!(
        nix::unistd::lseek(file.as_fd(), 0, nix::unistd::Whence::SeekData),
        Err(nix::errno::Errno::ENXIO)
    )
}

fn spawn(command: &[String], vars: &[(&str, String)], qmp: &Path) -> Result<Child, GuestError> {
    if qmp.exists() {
        return Err(err(
            "start the destination QEMU",
            format!(
                "{} exists: another QEMU may be using it; remove it if not",
                qmp.display()
            ),
        ));
    }
    if let Some(dir) = qmp.parent() {
        std::fs::create_dir_all(dir).map_err(|e| {
            err(
                "start the destination QEMU",
                format!("{}: {e}", dir.display()),
            )
        })?;
    }
    let argv: Vec<String> = command.iter().map(|a| expand(a, vars)).collect();
    tracing::info!(?argv, "starting the destination QEMU");
    Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err("start the destination QEMU", format!("{}: {e}", argv[0])))
}

/// Connects to the QMP socket, waiting up to `timeout` for a just-started QEMU to create it.
fn connect_when_up(
    path: &Path,
    timeout: Duration,
    mut child: Option<&mut Child>,
) -> Result<Qmp, GuestError> {
    let deadline = Instant::now() + timeout;
    loop {
        match Qmp::connect(path, timeout) {
            Ok(q) => return Ok(q),
            Err(e) => {
                if let Some(c) = child.as_deref_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    let mut stderr = String::new();
                    if let Some(mut s) = c.stderr.take() {
                        use std::io::Read;
                        let _ = s.read_to_string(&mut stderr);
                    }
                    return Err(err(
                        "start the destination QEMU",
                        format!("it exited ({status}): {}", stderr.trim()),
                    ));
                }
                if child.is_none() || Instant::now() >= deadline {
                    return Err(qmp_err("connect to the destination QEMU")(e));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Writes one stream's pages into the RAM file.
struct QemuWriter {
    inner: Arc<Inner>,
    id: u32,
    owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
}

impl QemuWriter {
    fn check(&self, pfn: Pfn) {
        assert!(
            pfn < self.inner.pages,
            "{BACKEND}: page {pfn} is beyond the guest's {} pages",
            self.inner.pages
        );
        assert!(
            (self.owns)(pfn),
            "{BACKEND}: page {pfn} arrived on a stream whose writer does not own it"
        );
    }
}

impl PageSink for QemuWriter {
    fn page_mut(&mut self, pfn: Pfn) -> &mut Page {
        self.check(pfn);
        self.inner.claims.claim(pfn, self.id, BACKEND);
        let offset = usize::try_from(pfn).expect("checked") * PAGE_SIZE;
        // SAFETY: `pfn < pages`, so the page lies inside the mapping that `self.inner` keeps
        // alive; the mapping is page-aligned, so the address meets `Page`'s 64-byte alignment,
        // and any 4096 bytes are a valid `Page`. The reference is exclusive: the claim above
        // makes this writer the page's only writer for good, `&mut self` keeps it from
        // handing the page out twice at once, the destination QEMU does not touch guest RAM
        // before `start`, which refuses while writers live, and the digest reads the file
        // only once every writer is dropped.
        unsafe { &mut *self.inner.base.add(offset).cast::<Page>() }
    }

    fn zero_page(&mut self, pfn: Pfn) {
        self.check(pfn);
        let never_written = !self.inner.claims.written(pfn);
        if self.inner.fresh && never_written {
            return; // still a hole of a fresh file: zero, and left unallocated
        }
        let page = self.page_mut(pfn);
        if !page.is_zero() {
            page.0.fill(0);
        }
    }
}

impl PageWriter for QemuWriter {}

impl Drop for QemuWriter {
    fn drop(&mut self) {
        self.inner.claims.close();
    }
}

impl DestGuest for QemuTarget {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.inner.pages
    }

    fn writer(
        &self,
        owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    ) -> Result<Box<dyn PageWriter>, GuestError> {
        if self.inner.started.load(Ordering::Acquire) {
            return Err(err("open a page writer", "the guest already runs here"));
        }
        let id = self.inner.claims.open();
        Ok(Box::new(QemuWriter {
            inner: self.inner.clone(),
            id,
            owns,
        }))
    }

    fn set_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let source_bytes = device_state::ram_bytes(blob)?;
        let ours = self.inner.pages * PAGE_SIZE as u64;
        if source_bytes != ours {
            return Err(GuestError::SizeMismatch {
                source_pages: source_bytes / PAGE_SIZE as u64,
                dest_pages: self.inner.pages,
            });
        }
        match lock(&self.qmp).as_mut() {
            Some(q) => device_state::load(q, blob, self.timeout),
            None => Err(err("load device state", "the guest already runs here")),
        }
    }

    fn memory_digest(&self) -> u64 {
        self.memory_digest_with(&|_| None)
    }

    fn memory_digest_with(&self, known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> u64 {
        let live = self.inner.claims.live();
        assert_eq!(
            live, 0,
            "{BACKEND}: digest requested with {live} writers open"
        );
        let i = &self.inner;
        // A read error cannot be reported through this signature; a digest that cannot match
        // the source's fails the migration just the same.
        digest_file(&i.file, i.pages * PAGE_SIZE as u64, &i.ram_file, known).unwrap_or_else(|e| {
            tracing::error!("hashing the destination RAM file: {e}");
            0
        })
    }

    fn start(&self) -> Result<(), GuestError> {
        let live = self.inner.claims.live();
        if live != 0 {
            return Err(err("start", format!("{live} page writers are still open")));
        }
        let mut qmp = lock(&self.qmp);
        qmp.as_mut()
            .ok_or_else(|| err("start", "the guest already runs here"))?
            .cont()
            .map_err(qmp_err("start the guest at the destination"))?;
        self.inner.started.store(true, Ordering::Release);
        qmp.take();
        // A QEMU we started now outlives this migration: reap it when it exits.
        if let Some(mut c) = lock(&self.child).take() {
            let _ = std::thread::Builder::new()
                .name("sf-qemu-reap".into())
                .spawn(move || {
                    let _ = c.wait();
                });
        }
        Ok(())
    }
}

impl Drop for QemuTarget {
    fn drop(&mut self) {
        if self.inner.started.load(Ordering::Acquire) {
            return;
        }
        // The migration did not commit: the guest runs at the source. A QEMU we started is
        // ended and its memory freed; one the operator started is left as it was, unresumed.
        if let Some(mut c) = lock(&self.child).take() {
            if let Some(q) = lock(&self.qmp).as_mut() {
                let _ = q.execute("quit", None);
            }
            if c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(100));
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        if self.created_file {
            let _ = std::fs::remove_file(&self.inner.ram_file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_names_and_templates() {
        for bad in ["", "../etc", ".hidden", "a/b", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("web-1.prod_a").unwrap();
        assert_eq!(
            expand(
                "/dev/shm/{guest}.ram size={ram_mib}M {guest}",
                &[("guest", "g".into()), ("ram_mib", "256".into())]
            ),
            "/dev/shm/g.ram size=256M g"
        );
    }

    #[test]
    fn operator_files_must_exist_with_the_right_size() {
        let dir = super::super::testutil::TempDir::new("target");
        let p = dir.path().join("g.ram");
        let e = open_ram_file(&p, 8192).unwrap_err();
        assert!(e.to_string().contains("start the destination QEMU"), "{e}");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let e = open_ram_file(&p, 8192).unwrap_err();
        assert!(e.to_string().contains("is 4096 bytes but"), "{e}");
        let e = create_ram_file(&p, 8192).unwrap_err();
        assert!(e.to_string().contains("already has memory"), "{e}");
        let q = dir.path().join("new.ram");
        let f = create_ram_file(&q, 8192).unwrap();
        assert!(!has_data(&f));
        assert!(has_data(&File::open(&p).unwrap()));
    }
}

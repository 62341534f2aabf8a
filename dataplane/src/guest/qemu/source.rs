//! The source side: a running QEMU guest whose RAM skyferry reads from its shared file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::{Value, json};

use super::fingerprint::{Fingerprints, Sweeper};
use super::migration_settings;
use super::qmp::Qmp;
use super::ram_file::RamFile;
use super::{BACKEND, device_state, qmp_err};
use crate::guest::cpu_cgroup::CpuCgroup;
use crate::guest::{DirtyBitmap, GuestError, SourceGuest};
use crate::page::{PageBatch, Pfn};

/// Pages read with one `pread` at most.
const MAX_RUN: usize = 256;

/// Where the source guest is and how to treat it.
#[derive(Debug, Clone)]
pub struct QemuSourceConfig {
    /// The QEMU's QMP socket.
    pub qmp: PathBuf,
    /// The guest's RAM file (the `mem-path` of its shared memory backend).
    pub ram_file: PathBuf,
    /// Bounds each QMP reply and the device-state migration.
    pub timeout: Duration,
    /// After the commit, tell the source QEMU to quit, so nobody can `cont` a second copy.
    pub quit_after_handover: bool,
}

/// A running QEMU guest at the source.
#[derive(Debug)]
pub struct QemuGuest {
    config: QemuSourceConfig,
    ram: Arc<RamFile>,
    fps: Arc<Fingerprints>,
    /// Released once the migration ends, so the operator's tools can connect again (a QMP
    /// socket serves one client at a time).
    qmp: Mutex<Option<Qmp>>,
    sweeper: Mutex<Option<Sweeper>>,
    /// Set by `pause`: the next `collect_dirty` is the exact, final one.
    paused: AtomicBool,
    /// The guest ran before `pause` (a guest the operator had paused stays paused on resume).
    was_running: AtomicBool,
    handed_over: AtomicBool,
    device_state_bytes: AtomicU64,
    /// The operator's migration settings skyferry changed, put back when it lets go.
    changed_settings: Mutex<migration_settings::Changed>,
    /// Auto-converge's cgroup, while it throttles the QEMU process.
    cgroup: Mutex<Option<CpuCgroup>>,
}

fn err(op: &'static str, message: impl Into<String>) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message: message.into(),
    }
}

impl QemuGuest {
    /// Connects to the QEMU at `config.qmp` and checks that `config.ram_file` is its RAM: a
    /// shared file memory backend of the file's size, and the only shared one (QEMU leaves
    /// every shared backend out of its own migration, so another one would be lost).
    pub fn open(config: QemuSourceConfig) -> Result<Self, GuestError> {
        let mut qmp = Qmp::connect(&config.qmp, config.timeout)
            .map_err(qmp_err("connect to the source QEMU"))?;
        let ram = RamFile::open(&config.ram_file)?;
        let status = qmp.status().map_err(qmp_err("query the source QEMU"))?;
        if !matches!(status.status.as_str(), "running" | "paused") {
            return Err(err(
                "open the guest",
                format!(
                    "the source QEMU is {:?}; skyferry migrates a guest that is running or paused",
                    status.status
                ),
            ));
        }
        check_ram_backend(&mut qmp, &config.ram_file, ram.bytes())?;
        // Before pre-copy: a setting that breaks the device-state migration fails now, not
        // at the switchover.
        let changed = migration_settings::apply(&mut qmp)?;
        let mut seed = [0u8; 8];
        getrandom::fill(&mut seed).map_err(|e| err("seed fingerprints", e.to_string()))?;
        Ok(QemuGuest {
            fps: Arc::new(Fingerprints::new(ram.pages(), u64::from_le_bytes(seed))),
            ram: Arc::new(ram),
            qmp: Mutex::new(Some(qmp)),
            sweeper: Mutex::new(None),
            paused: AtomicBool::new(false),
            was_running: AtomicBool::new(status.running),
            handed_over: AtomicBool::new(false),
            device_state_bytes: AtomicU64::new(0),
            changed_settings: Mutex::new(changed),
            cgroup: Mutex::new(None),
            config,
        })
    }

    /// Bytes of QEMU's own device-state stream, once taken.
    pub fn device_state_bytes(&self) -> u64 {
        self.device_state_bytes.load(Ordering::Relaxed)
    }

    /// Runs `f` on the QMP session, unless the migration has ended and released it.
    fn with_qmp<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Qmp) -> Result<T, GuestError>,
    ) -> Result<T, GuestError> {
        match lock(&self.qmp).as_mut() {
            Some(q) => f(q),
            None => Err(err(
                op,
                "the migration has ended; skyferry no longer drives this QEMU",
            )),
        }
    }

    fn stop_sweeper(&self) {
        // Keep the last pass's figures; the thread itself ends here.
        let old = lock(&self.sweeper).take();
        drop(old);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks that `ram_file` backs a shared memory backend of `bytes` bytes in this QEMU, and
/// that no other shared backend exists.
fn check_ram_backend(qmp: &mut Qmp, ram_file: &Path, bytes: u64) -> Result<(), GuestError> {
    let ours = std::fs::canonicalize(ram_file)
        .map_err(|e| err("check the RAM file", format!("{}: {e}", ram_file.display())))?;
    let objects = qmp
        .execute("qom-list", Some(json!({ "path": "/objects" })))
        .map_err(qmp_err("list QEMU's objects"))?;
    let mut matched = None;
    let mut other_shared = Vec::new();
    let mut seen = Vec::new();
    for o in objects.as_array().into_iter().flatten() {
        let (Some(name), Some(ty)) = (
            o.get("name").and_then(Value::as_str),
            o.get("type").and_then(Value::as_str),
        ) else {
            continue;
        };
        if !ty.starts_with("child<memory-backend") {
            continue;
        }
        let path = format!("/objects/{name}");
        let mut get = |prop: &str| {
            qmp.execute("qom-get", Some(json!({ "path": path, "property": prop })))
                .ok()
        };
        let share = get("share").and_then(|v| v.as_bool()).unwrap_or(false);
        let size = get("size").and_then(|v| v.as_u64()).unwrap_or(0);
        let mem_path = get("mem-path").and_then(|v| v.as_str().map(PathBuf::from));
        let same = mem_path
            .as_ref()
            .and_then(|p| std::fs::canonicalize(p).ok())
            .is_some_and(|p| p == ours);
        seen.push(format!(
            "{name} ({}, {}share)",
            mem_path
                .as_ref()
                .map_or("anonymous".into(), |p| p.display().to_string()),
            if share { "" } else { "no " }
        ));
        if same {
            matched = Some((name.to_string(), share, size));
        } else if share {
            other_shared.push(name.to_string());
        }
    }
    let Some((name, share, size)) = matched else {
        return Err(err(
            "check the RAM file",
            format!(
                "no memory backend of this QEMU uses {} (backends: {}); start QEMU with \
                 -object memory-backend-file,id=ram0,mem-path={},size=...,share=on \
                 -machine memory-backend=ram0",
                ram_file.display(),
                if seen.is_empty() {
                    "none".into()
                } else {
                    seen.join(", ")
                },
                ram_file.display()
            ),
        ));
    };
    if !share {
        return Err(err(
            "check the RAM file",
            format!("memory backend {name} is not shared: add share=on"),
        ));
    }
    if size != bytes {
        return Err(err(
            "check the RAM file",
            format!(
                "memory backend {name} is {size} bytes but {} is {bytes}",
                ram_file.display()
            ),
        ));
    }
    if !other_shared.is_empty() {
        return Err(err(
            "check the RAM file",
            format!(
                "QEMU has other shared memory backends ({}); x-ignore-shared would leave them \
                 out and skyferry carries one RAM file",
                other_shared.join(", ")
            ),
        ));
    }
    Ok(())
}

impl SourceGuest for QemuGuest {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn page_count(&self) -> u64 {
        self.ram.pages()
    }

    fn start_dirty_log(&self) -> Result<(), GuestError> {
        let mut s = lock(&self.sweeper);
        if s.is_none() {
            *s = Some(Sweeper::start(self.fps.clone(), self.ram.clone())?);
        }
        Ok(())
    }

    fn collect_dirty(&self, bitmap: &mut DirtyBitmap) -> Result<(), GuestError> {
        if self.paused.load(Ordering::Acquire) {
            // Paused: nothing changes any more, so one full pass is exact.
            self.stop_sweeper();
            let stats = self.fps.final_pass(&self.ram)?;
            tracing::info!(
                changed = stats.changed,
                ms = stats.elapsed.as_millis(),
                ms_per_gib = stats.ms_per_gib(),
                "final fingerprint pass (guest paused)"
            );
        }
        self.fps.take_found(bitmap);
        Ok(())
    }

    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError> {
        let pages = self.ram.pages();
        if let Some(&pfn) = pfns.iter().find(|&&p| p >= pages) {
            return Err(GuestError::PageOutOfRange {
                pfn,
                page_count: pages,
            });
        }
        let mut rest = pfns;
        while let Some(&first) = rest.first() {
            // The longest run of consecutive pages, read with one pread.
            let run = rest
                .iter()
                .take(MAX_RUN)
                .enumerate()
                .take_while(|&(i, &p)| p == first + i as u64)
                .count();
            let (now, later) = rest.split_at(run);
            for &pfn in now {
                self.fps.reading(pfn);
            }
            let copies = batch.push_zeroed(now);
            self.ram.read(first, copies)?;
            for (&pfn, page) in now.iter().zip(copies.iter()) {
                self.fps.sent(pfn, self.fps.of(page));
            }
            rest = later;
        }
        Ok(())
    }

    fn pause(&self) -> Result<(), GuestError> {
        self.with_qmp("stop the guest", |q| {
            let before = q.status().map_err(qmp_err("query the source QEMU"))?;
            self.was_running.store(before.running, Ordering::Relaxed);
            q.stop().map_err(qmp_err("stop the guest"))
        })?;
        self.paused.store(true, Ordering::Release);
        Ok(())
    }

    fn resume(&self) -> Result<(), GuestError> {
        if self.handed_over.load(Ordering::Acquire) {
            return Err(err(
                "resume",
                "the guest was handed over to the destination",
            ));
        }
        self.stop_sweeper();
        self.paused.store(false, Ordering::Release);
        if self.was_running.load(Ordering::Relaxed) {
            self.with_qmp("resume the guest", |q| {
                q.cont().map_err(qmp_err("resume the guest"))
            })?;
        }
        lock(&self.qmp).take();
        Ok(())
    }

    fn state(&self) -> Result<Vec<u8>, GuestError> {
        let blob = self.with_qmp("save the device state", |q| {
            device_state::save(q, self.ram.bytes(), self.config.timeout)
        })?;
        self.device_state_bytes
            .store(device_state::stream_len(&blob) as u64, Ordering::Relaxed);
        Ok(blob)
    }

    fn memory_digest(&self) -> Result<u64, GuestError> {
        self.ram.digest(&|_| None)
    }

    fn memory_digest_with(
        &self,
        known: &(dyn Fn(usize) -> Option<u64> + Sync),
    ) -> Result<u64, GuestError> {
        self.ram.digest(known)
    }

    /// Caps the QEMU process's CPU time through a cgroup of skyferryd's own (QEMU's own
    /// `cpu-throttle` works only inside its own RAM migration); 0 moves it back.
    fn throttle(&self, percent: u8) -> Result<(), GuestError> {
        let mut cgroup = lock(&self.cgroup);
        if percent == 0 {
            return match cgroup.take() {
                Some(g) => g.release().map_err(|e| err("release the throttle", e)),
                None => Ok(()),
            };
        }
        if cgroup.is_none() {
            let (pid, vcpus) = self.with_qmp("throttle", |q| {
                let pid = q.peer_pid().map_err(qmp_err("find the QEMU process"))?;
                let cpus = q
                    .execute("query-cpus-fast", None)
                    .map_err(qmp_err("count the vCPUs"))?;
                let n = cpus.as_array().map_or(1, Vec::len);
                Ok((pid, u32::try_from(n).unwrap_or(u32::MAX)))
            })?;
            let g = CpuCgroup::create(&format!("qemu-{pid}"), pid, vcpus)
                .map_err(|e| err("throttle", e))?;
            *cgroup = Some(g);
        }
        cgroup
            .as_ref()
            .expect("created above")
            .set(percent)
            .map_err(|e| err("throttle", e))
    }

    fn release(&self) {
        if let Some(g) = lock(&self.cgroup).take()
            && let Err(e) = g.release()
        {
            tracing::warn!("releasing the QEMU process's CPU cgroup: {e}");
        }
        self.stop_sweeper();
        if let Some(mut q) = lock(&self.qmp).take() {
            migration_settings::restore(&mut q, &lock(&self.changed_settings));
        }
    }

    fn hand_over(&self) -> Result<(), GuestError> {
        self.handed_over.store(true, Ordering::Release);
        self.stop_sweeper();
        let mut qmp = lock(&self.qmp).take();
        if let (false, Some(q)) = (self.config.quit_after_handover, qmp.as_mut()) {
            migration_settings::restore(q, &lock(&self.changed_settings));
        }
        if let (true, Some(mut q)) = (self.config.quit_after_handover, qmp) {
            // The guest runs at the destination now; a source QEMU left in postmigrate could
            // be `cont`ed by hand into a second copy. Its RAM file stays for the operator.
            if let Err(e) = q.execute("quit", None) {
                tracing::warn!("source QEMU did not quit after the hand-over: {e}");
            }
        }
        Ok(())
    }
}

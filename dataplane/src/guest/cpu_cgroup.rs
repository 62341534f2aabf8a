//! Auto-converge for a guest that is another process (QEMU): a CPU cgroup of skyferryd's
//! own, created on the first throttle, the process moved into it, its CPU bandwidth capped
//! (`cpu.cfs_quota_us` under cgroup v1's `cpu` controller, `cpu.max` under cgroup v2), and
//! on release the process moved back where it was and the cgroup removed.
//!
//! The cap is for the whole process: `vcpus` CPUs' worth of time less the throttle, so
//! `percent` of each vCPU's time is taken away when the vCPUs are what runs. A guest whose
//! vCPU is a thread of skyferryd itself (the KVM micro-VM) has only that thread moved, which
//! cgroup v1 allows (`tasks`); cgroup v2 keeps a process's threads together outside threaded
//! subtrees, so there it is refused.

use std::path::{Path, PathBuf};

/// The cgroup v1 hierarchy with the `cpu` controller.
const V1_CPU: &str = "/sys/fs/cgroup/cpu";
/// Where a cgroup v2 hierarchy may be mounted.
const V2_MOUNTS: &[&str] = &["/sys/fs/cgroup/unified", "/sys/fs/cgroup"];
/// The quota period, µs (the kernel's default).
const PERIOD_US: u64 = 100_000;
/// The smallest quota the kernel takes, µs.
const MIN_QUOTA_US: u64 = 1_000;

/// Which cgroup version carries the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

/// What is moved into the cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Member {
    /// A whole process.
    Process(u32),
    /// One thread (a kernel thread id) of this process.
    Thread(u32),
}

impl Member {
    fn proc_dir(self) -> String {
        match self {
            Member::Process(pid) => format!("/proc/{pid}"),
            Member::Thread(tid) => format!("/proc/{}/task/{tid}", std::process::id()),
        }
    }

    fn id(self) -> u32 {
        match self {
            Member::Process(id) | Member::Thread(id) => id,
        }
    }
}

/// A process (or a thread) held in a CPU-capped cgroup until released (or dropped).
#[derive(Debug)]
pub struct CpuCgroup {
    version: Version,
    member: Member,
    vcpus: u32,
    /// The cgroup made for it.
    dir: PathBuf,
    /// The cgroup it came from, to go back to.
    home: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The cgroup `member` is in under `version`'s CPU controller, as a path below the mount.
fn current(member: Member, version: Version) -> Result<String, String> {
    let file = format!("{}/cgroup", member.proc_dir());
    let text = std::fs::read_to_string(&file).map_err(io(format!("reading {file}")))?;
    text.lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
            let hit = match version {
                Version::V1 => controllers.split(',').any(|c| c == "cpu"),
                Version::V2 => id == "0" && controllers.is_empty(),
            };
            hit.then(|| path.to_string())
        })
        .ok_or_else(|| format!("{member:?} is in no {version:?} CPU cgroup"))
}

/// The CPU controller's mount: cgroup v1's `cpu`, else a v2 hierarchy offering `cpu`.
fn controller() -> Result<(Version, PathBuf), String> {
    if Path::new(V1_CPU).join("cpu.cfs_quota_us").exists() {
        return Ok((Version::V1, PathBuf::from(V1_CPU)));
    }
    V2_MOUNTS
        .iter()
        .map(PathBuf::from)
        .find(|m| {
            std::fs::read_to_string(m.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|w| w == "cpu"))
        })
        .map(|m| (Version::V2, m))
        .ok_or_else(|| "this host has no CPU cgroup controller skyferryd can use".into())
}

/// The quota for `vcpus` CPUs less `percent`, µs per [`PERIOD_US`].
pub fn quota_us(vcpus: u32, percent: u8) -> u64 {
    let keep = u64::from(100 - percent.min(99));
    (PERIOD_US * u64::from(vcpus.max(1)) * keep / 100).max(MIN_QUOTA_US)
}

impl CpuCgroup {
    /// Moves `pid` (a guest with `vcpus` vCPUs) into a new cgroup named after `name`, not
    /// yet capped.
    pub fn create(name: &str, pid: u32, vcpus: u32) -> Result<Self, String> {
        Self::make(name, Member::Process(pid), vcpus)
    }

    /// Moves the thread `tid` of this process (one vCPU) into a new cgroup named after
    /// `name`, not yet capped.
    pub fn create_for_thread(name: &str, tid: u32) -> Result<Self, String> {
        Self::make(name, Member::Thread(tid), 1)
    }

    fn make(name: &str, member: Member, vcpus: u32) -> Result<Self, String> {
        let (version, mount) = controller()?;
        if version == Version::V2 && matches!(member, Member::Thread(_)) {
            return Err(
                "cgroup v2 cannot hold one thread of a process apart from the others \
                        outside a threaded subtree; this host has no cgroup v1 cpu controller"
                    .into(),
            );
        }
        let home = mount.join(current(member, version)?.trim_start_matches('/'));
        let dir = mount.join(format!("skyferry-{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by a skyferryd that died: reuse it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating {}", dir.display()))(e)),
        }
        let g = CpuCgroup {
            version,
            member,
            vcpus,
            dir,
            home,
        };
        g.move_to(&g.dir)?;
        Ok(g)
    }

    fn move_to(&self, cgroup: &Path) -> Result<(), String> {
        let file = cgroup.join(match self.member {
            Member::Process(_) => "cgroup.procs",
            Member::Thread(_) => "tasks",
        });
        std::fs::write(&file, self.member.id().to_string()).map_err(io(format!(
            "moving {:?} to {}",
            self.member,
            file.display()
        )))
    }

    /// Takes `percent` (0..=99) of the guest's CPU time away.
    pub fn set(&self, percent: u8) -> Result<(), String> {
        let (file, value) = match (self.version, percent) {
            (Version::V1, 0) => ("cpu.cfs_quota_us", "-1".to_string()),
            (Version::V1, p) => ("cpu.cfs_quota_us", quota_us(self.vcpus, p).to_string()),
            (Version::V2, 0) => ("cpu.max", format!("max {PERIOD_US}")),
            (Version::V2, p) => (
                "cpu.max",
                format!("{} {PERIOD_US}", quota_us(self.vcpus, p)),
            ),
        };
        if self.version == Version::V1 {
            let period = self.dir.join("cpu.cfs_period_us");
            std::fs::write(&period, PERIOD_US.to_string())
                .map_err(io(format!("writing {}", period.display())))?;
        }
        let path = self.dir.join(file);
        std::fs::write(&path, &value).map_err(io(format!("writing {value} to {}", path.display())))
    }

    /// The cgroup made for the guest.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the process back where it was and removes the cgroup.
    pub fn release(self) -> Result<(), String> {
        self.undo()
    }

    fn undo(&self) -> Result<(), String> {
        // A process (or thread) that ended meanwhile has nothing to move back.
        let moved = match self.move_to(&self.home) {
            Err(e) if Path::new(&self.member.proc_dir()).exists() => Err(e),
            _ => Ok(()),
        };
        let removed =
            std::fs::remove_dir(&self.dir).map_err(io(format!("removing {}", self.dir.display())));
        moved.and(removed)
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        if self.dir.exists()
            && let Err(e) = self.undo()
        {
            tracing::warn!("releasing the guest's CPU cgroup: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_takes_the_percentage_of_every_vcpu() {
        assert_eq!(quota_us(1, 20), 80_000);
        assert_eq!(quota_us(4, 50), 200_000);
        assert_eq!(quota_us(1, 99), 1_000);
        assert_eq!(quota_us(0, 99), 1_000, "at least the kernel's minimum");
    }

    /// On a host where this process may make CPU cgroups (root, a writable controller): a
    /// child is moved in, capped, and moved back; elsewhere it says why and checks nothing.
    #[test]
    fn a_process_is_capped_and_given_back() {
        let Ok((version, _)) = controller() else {
            eprintln!("no CPU cgroup controller here; skipped");
            return;
        };
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let before = current(Member::Process(pid), version).unwrap();
        let g = match CpuCgroup::create(&format!("test-{pid}"), pid, 2) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("cannot make CPU cgroups here ({e}); skipped");
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
        };
        let dir = g.path().to_owned();
        assert!(
            current(Member::Process(pid), version)
                .unwrap()
                .ends_with(&format!("skyferry-test-{pid}")),
            "moved in"
        );
        g.set(30).unwrap();
        let (file, want) = match version {
            Version::V1 => ("cpu.cfs_quota_us", "140000".to_string()),
            Version::V2 => ("cpu.max", format!("140000 {PERIOD_US}")),
        };
        assert_eq!(
            std::fs::read_to_string(dir.join(file)).unwrap().trim(),
            want
        );
        g.release().unwrap();
        assert_eq!(
            current(Member::Process(pid), version).unwrap(),
            before,
            "moved back"
        );
        assert!(!dir.exists(), "removed");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Where cgroup v1 is writable: one thread of this process is capped and given back,
    /// the others stay where they were.
    #[test]
    fn a_thread_of_this_process_is_capped_alone() {
        let Ok((Version::V1, _)) = controller() else {
            eprintln!("no cgroup v1 cpu controller here; skipped");
            return;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(u32::try_from(nix::unistd::gettid().as_raw()).unwrap())
                .unwrap();
            let _ = stop_rx.recv();
        });
        let tid = rx.recv().unwrap();
        let me = Member::Process(std::process::id());
        let mine = current(me, Version::V1).unwrap();
        let g = match CpuCgroup::create_for_thread(&format!("test-thread-{tid}"), tid) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("cannot make CPU cgroups here ({e}); skipped");
                drop(stop_tx);
                t.join().unwrap();
                return;
            }
        };
        let thread = Member::Thread(tid);
        assert!(
            current(thread, Version::V1)
                .unwrap()
                .contains("skyferry-test-thread")
        );
        assert_eq!(current(me, Version::V1).unwrap(), mine, "the process stays");
        g.set(50).unwrap();
        g.release().unwrap();
        assert_eq!(current(thread, Version::V1).unwrap(), mine, "moved back");
        drop(stop_tx);
        t.join().unwrap();
    }
}

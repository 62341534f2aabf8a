//! Auto-converge for a guest that is another process (QEMU): a CPU cgroup of skyferryd's
//! own, created on the first throttle, the process moved into it, its CPU bandwidth capped
//! (`cpu.cfs_quota_us` under cgroup v1's `cpu` controller, `cpu.max` under cgroup v2), and
//! on release the process moved back where it was and the cgroup removed.
//!
//! The cap is for the whole process: `vcpus` CPUs' worth of time less the throttle, so
//! `percent` of each vCPU's time is taken away when the vCPUs are what runs.

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

/// A process held in a CPU-capped cgroup until released (or dropped).
#[derive(Debug)]
pub struct CpuCgroup {
    version: Version,
    pid: u32,
    vcpus: u32,
    /// The cgroup made for it.
    dir: PathBuf,
    /// The cgroup it came from, to go back to.
    home: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// The cgroup `pid` is in under `version`'s CPU controller, as a path below the mount.
fn current(pid: u32, version: Version) -> Result<String, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map_err(io(format!("reading /proc/{pid}/cgroup")))?;
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
        .ok_or_else(|| format!("process {pid} is in no {version:?} CPU cgroup"))
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
        let (version, mount) = controller()?;
        let home = mount.join(current(pid, version)?.trim_start_matches('/'));
        let dir = mount.join(format!("skyferry-{name}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            // Left by a skyferryd that died: reuse it.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(format!("creating {}", dir.display()))(e)),
        }
        let g = CpuCgroup {
            version,
            pid,
            vcpus,
            dir,
            home,
        };
        g.move_to(&g.dir)?;
        Ok(g)
    }

    fn move_to(&self, cgroup: &Path) -> Result<(), String> {
        let procs = cgroup.join("cgroup.procs");
        std::fs::write(&procs, self.pid.to_string()).map_err(io(format!(
            "moving process {} to {}",
            self.pid,
            procs.display()
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
        // A process that ended meanwhile has nothing to move back.
        let moved = match self.move_to(&self.home) {
            Err(e) if Path::new(&format!("/proc/{}", self.pid)).exists() => Err(e),
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
        let before = current(pid, version).unwrap();
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
            current(pid, version)
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
        assert_eq!(current(pid, version).unwrap(), before, "moved back");
        assert!(!dir.exists(), "removed");
        let _ = child.kill();
        let _ = child.wait();
    }
}

//! Helpers for end-to-end tests: find (building if need be) the workspace's real binaries.

pub mod relay;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// Path of a workspace binary built in the same profile as the running test, built first
/// if it is missing (plain `cargo test -p skyferry-tests` does not build other packages'
/// binaries).
pub fn binary(package: &str, name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    // The test executable lives in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps layout");
    let path = profile_dir.join(name);
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A `skyferryd` process with its own config, key and control socket, killed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: std::process::Child,
    /// Its scratch directory.
    pub dir: PathBuf,
    /// Its control socket.
    pub socket: PathBuf,
    /// Where it receives migrations, if it does.
    pub listen: Option<std::net::SocketAddr>,
}

/// Pre-shared keys for tests (`psk(1) != psk(2)`).
pub fn psk(n: u8) -> String {
    format!("{}\n", format!("{n:02x}").repeat(32))
}

/// A TCP port free on loopback right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A free port on loopback.
fn free_address() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], free_port()))
}

impl Daemon {
    /// Starts a daemon; `listen` makes it a destination too. `extra` is appended to the
    /// config's `[source]` section (it may open further sections).
    pub fn start(name: &str, key: u8, listen: bool, extra: &str) -> Daemon {
        Self::start_with_env(name, key, listen, extra, &[])
    }

    /// [`start`](Self::start), with extra environment variables for the daemon.
    pub fn start_with_env(
        name: &str,
        key: u8,
        listen: bool,
        extra: &str,
        env: &[(&str, &std::path::Path)],
    ) -> Daemon {
        Self::launch(name, key, listen.then(free_address), "", extra, env, None)
    }

    /// A destination whose `[listen]` section gets `listen_extra` too (`max_migrations = 1`,
    /// say); `extra` as in [`start`](Self::start).
    pub fn start_listening_with(name: &str, key: u8, listen_extra: &str, extra: &str) -> Daemon {
        Self::launch(
            name,
            key,
            Some(free_address()),
            listen_extra,
            extra,
            &[],
            None,
        )
    }

    /// [`start`](Self::start) as a destination on `listen` (a daemon restarted where an
    /// earlier one listened).
    pub fn start_at(name: &str, key: u8, listen: std::net::SocketAddr, extra: &str) -> Daemon {
        Self::launch(name, key, Some(listen), "", extra, &[], None)
    }

    /// [`start`](Self::start) inside network namespace `netns` (`ip netns exec`); its
    /// control socket, a file, stays reachable from here.
    pub fn start_in_netns(netns: &str, name: &str, key: u8, listen: bool, extra: &str) -> Daemon {
        Self::launch(
            name,
            key,
            listen.then(free_address),
            "",
            extra,
            &[],
            Some(netns),
        )
    }

    fn launch(
        name: &str,
        key: u8,
        listen: Option<std::net::SocketAddr>,
        listen_extra: &str,
        extra: &str,
        env: &[(&str, &std::path::Path)],
        netns: Option<&str>,
    ) -> Daemon {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("skyferry-e2e-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let psk_path = dir.join("psk");
        std::fs::write(&psk_path, psk(key)).expect("key file");
        std::fs::set_permissions(&psk_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let socket = dir.join("control.sock");
        // The tests' own budget for reconnecting, unless `extra` sets one.
        let resume_within = if extra.contains("resume_within") {
            ""
        } else {
            "resume_within = \"10s\"\n"
        };
        let config = format!(
            "[daemon]\ncontrol_socket = {:?}\npsk_file = {:?}\nlog = \"info\"\n\n[listen]\naddress = \"{}\"\ntimeout = \"10s\"\nresume_window = \"20s\"\n{listen_extra}\n\n[source]\npin_threads = false\ntimeout = \"10s\"\n{resume_within}streams = 2\n{extra}\n",
            socket,
            psk_path,
            listen.map(|a| a.to_string()).unwrap_or_default(),
        );
        let config_path = dir.join("skyferryd.toml");
        std::fs::write(&config_path, config).expect("config");
        let log = std::fs::File::create(dir.join("skyferryd.log")).expect("log file");
        let daemon = binary("skyferry-dataplane", "skyferryd");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(daemon);
                c
            }
            None => Command::new(daemon),
        };
        let child = cmd
            .arg("--config")
            .arg(&config_path)
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stderr(log)
            .spawn()
            .expect("start skyferryd");
        let d = Daemon {
            child,
            dir,
            socket,
            listen,
        };
        // The socket file appears at bind(2), a moment before listen(2): wait until it
        // takes a connection (the bound only catches a daemon that never comes up).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let mut d = d;
        while std::time::Instant::now() < deadline && d.alive() {
            if std::os::unix::net::UnixStream::connect(&d.socket).is_ok() {
                return d;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        panic!("skyferryd {name} did not come up: {}", d.log());
    }

    /// Runs `skyferry` against this daemon.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(binary("skyferry-ctl", "skyferry"))
            .args(args)
            .env("SKYFERRY_SOCKET", &self.socket)
            .output()
            .expect("run skyferry")
    }

    /// `skyferry start --to TO --quiet ARGS...` against this (source) daemon; panics if the
    /// start is refused. Returns the migration id, also of one that failed at once (start
    /// then exits non-zero after printing it; its status says why).
    pub fn start_migration(&self, to: impl std::fmt::Display, args: &[&str]) -> String {
        let to = to.to_string();
        let mut all = vec!["start", "--to", &to, "--quiet"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success() || !out.stdout.is_empty(),
            "start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("the id is UTF-8")
            .trim()
            .to_string()
    }

    /// `skyferry status ID --json`, parsed.
    pub fn status(&self, id: &str) -> serde_json::Value {
        let out = self.cli(&["status", id, "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// Polls until `pred` holds for the migration's status (or panics after `secs`).
    pub fn wait_for(
        &self,
        id: &str,
        secs: u64,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let s = self.status(id);
            if pred(&s) {
                return s;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out; last status {s}\nlog:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("skyferryd.log")).unwrap_or_default()
    }

    /// Waits until the daemon's log contains `what` (an event the daemon logs); `secs` only
    /// bounds a wait for something that never comes.
    pub fn wait_log(&self, what: &str, secs: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !self.log().contains(what) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what:?} never logged:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills the daemon with SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id (of `ip netns exec`'s child too: it execs the daemon).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident memory so far (VmHWM), bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("VmHWM in kB")
            * 1024
    }

    /// Sends SIGTERM and waits for the daemon to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -TERM failed");
        self.child.wait().expect("wait for skyferryd")
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The final phases a migration can end in.
pub fn is_final(s: &serde_json::Value) -> bool {
    matches!(
        s["phase"].as_str(),
        Some("completed" | "aborted" | "failed" | "committed-unconfirmed")
    )
}

/// A file whose creation releases a daemon held at a named point (`SKYFERRY_HOLD=point:FILE`,
/// `dataplane/src/migrate/hold.rs`); removed on drop.
#[derive(Debug)]
pub struct Release(PathBuf);

impl Release {
    /// A release file for the test `name` (not created yet).
    pub fn new(name: &str) -> Release {
        let f = std::env::temp_dir().join(format!(
            "skyferry-e2e-{}-{name}-release",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&f);
        Release(f)
    }

    /// `SKYFERRY_HOLD`'s value for holding at `point` until [`go`](Self::go).
    pub fn hold(&self, point: &str) -> String {
        format!("{point}:{}", self.0.display())
    }

    /// Releases the daemon.
    pub fn go(&self) {
        std::fs::write(&self.0, b"go").expect("release file");
    }
}

impl Drop for Release {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `skyferry start` arguments for a guest slow enough to be caught mid-migration: a 40 MB/s
/// link and many iterations (the fault and metrics tests strike or scrape inside them).
pub const SLOW_GUEST: &[&str] = &[
    "--workload",
    "tpcw",
    "--mem",
    "48MiB",
    "--speed",
    "6",
    "--policy",
    "xen-default",
    "--max-bandwidth",
    "40MB/s",
];

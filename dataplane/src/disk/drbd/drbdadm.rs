//! Running drbdadm and drbdsetup: one command at a time, each with a time limit, its output
//! captured for the error that a failure becomes.
//!
//! Changes go through drbdadm, which reads the resource file and turns `net-options`,
//! `primary`, `secondary` into the drbdsetup calls the kernel takes. Queries go to
//! drbdsetup directly: `drbdadm status` takes no `--json`, and there is no drbdadm form of
//! `drbdsetup show`.

use std::io::Read;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::error::{DrbdError, Step};
use super::show::{NetOptions, parse_net_options};
use super::status::{ResourceStatus, parse_status};

/// What a finished command printed.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// How skyferryd runs drbdadm and drbdsetup.
#[derive(Debug, Clone)]
pub struct Drbdadm {
    program: PathBuf,
    drbdsetup: Option<PathBuf>,
    config: Option<PathBuf>,
    node: Option<String>,
    extra_args: Vec<String>,
    timeout: Duration,
}

impl Default for Drbdadm {
    fn default() -> Self {
        Drbdadm {
            program: "drbdadm".into(),
            drbdsetup: None,
            config: None,
            node: None,
            extra_args: Vec::new(),
            // Long enough for a promotion, which waits for the peers to agree (DRBD's
            // twopc-timeout is 30 s by default).
            timeout: Duration::from_secs(60),
        }
    }
}

impl Drbdadm {
    /// `drbdadm` and `drbdsetup` from `PATH`, the system's drbd.conf, 60 s per command.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs this drbdadm.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Uses this drbdsetup, both for skyferry's own queries and inside drbdadm (passed as
    /// `--drbdsetup=PROGRAM`), so both always talk to the same one.
    pub fn with_drbdsetup(mut self, program: impl Into<PathBuf>) -> Self {
        self.drbdsetup = Some(program.into());
        self
    }

    /// Reads this configuration file (`drbdadm -c FILE`) instead of `/etc/drbd.conf`.
    pub fn with_config(mut self, file: impl Into<PathBuf>) -> Self {
        self.config = Some(file.into());
        self
    }

    /// Makes drbdadm take this host to be the file's `on NAME` section instead of the one
    /// named by `uname -n` (drbdadm's `__DRBD_NODE__` environment variable): for a host
    /// whose DRBD node name differs from its host name, and for two simulated hosts on one
    /// machine.
    pub fn with_node(mut self, name: impl Into<String>) -> Self {
        self.node = Some(name.into());
        self
    }

    /// Passes `arg` to every drbdadm call, before the command (`--drbdmeta=...`, `-v`).
    pub fn with_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Kills a command still running after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The drbdsetup that queries go to.
    pub fn drbdsetup_program(&self) -> &Path {
        self.drbdsetup
            .as_deref()
            .unwrap_or_else(|| Path::new("drbdsetup"))
    }

    fn adm_command(&self, dry_run: bool, args: &[String]) -> Command {
        let mut cmd = Command::new(&self.program);
        if dry_run {
            cmd.arg("-d");
        }
        if let Some(c) = &self.config {
            cmd.arg("-c").arg(c);
        }
        if let Some(s) = &self.drbdsetup {
            let mut a = std::ffi::OsString::from("--drbdsetup=");
            a.push(s);
            cmd.arg(a);
        }
        if let Some(n) = &self.node {
            cmd.env("__DRBD_NODE__", n);
        }
        cmd.args(&self.extra_args).args(args);
        cmd
    }

    /// Runs `drbdadm ARGS` (`net-options --protocol=C web1`, `primary web1`).
    pub fn run(&self, step: Step, args: &[String]) -> Result<Captured, DrbdError> {
        run(step, self.adm_command(false, args), self.timeout)
    }

    /// `drbdadm -d ARGS`: what drbdadm would run, one drbdsetup command line per line,
    /// without running any of it.
    pub fn dry_run(&self, step: Step, args: &[String]) -> Result<String, DrbdError> {
        run(step, self.adm_command(true, args), self.timeout).map(|c| c.stdout)
    }

    /// Runs `drbdsetup ARGS`.
    pub fn drbdsetup(&self, step: Step, args: &[&str]) -> Result<Captured, DrbdError> {
        let mut cmd = Command::new(self.drbdsetup_program());
        cmd.args(args);
        run(step, cmd, self.timeout)
    }

    /// `drbdsetup status RESOURCE --json`, parsed.
    pub fn status(&self, step: Step, resource: &str) -> Result<ResourceStatus, DrbdError> {
        let args = ["status", resource, "--json"];
        let out = self.drbdsetup(step, &args)?;
        parse_status(&out.stdout, resource).map_err(|reason| DrbdError::Unreadable {
            step,
            command: self.drbdsetup_line(&args),
            reason,
        })
    }

    /// The network options of `resource`'s connection to node `peer`, from
    /// `drbdsetup show RESOURCE --show-defaults`.
    pub fn net_options(
        &self,
        step: Step,
        resource: &str,
        peer: u8,
    ) -> Result<NetOptions, DrbdError> {
        let args = ["show", resource, "--show-defaults"];
        let out = self.drbdsetup(step, &args)?;
        parse_net_options(&out.stdout, resource, peer).map_err(|reason| DrbdError::Unreadable {
            step,
            command: self.drbdsetup_line(&args),
            reason,
        })
    }

    /// The drbdadm command line for `args`, as errors and logs show it.
    pub fn command_line(&self, args: &[String]) -> String {
        line(&self.adm_command(false, args))
    }

    fn drbdsetup_line(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(self.drbdsetup_program());
        cmd.args(args);
        line(&cmd)
    }
}

fn line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion or until `timeout`, capturing its output.
///
/// The command gets a process group of its own, so a timeout kills drbdadm together with
/// the drbdsetup it is waiting for: killing drbdadm alone would leave drbdsetup running
/// and holding the output pipes open.
fn run(step: Step, mut cmd: Command, timeout: Duration) -> Result<Captured, DrbdError> {
    let command = line(&cmd);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    tracing::debug!(%step, %command, "running");
    let mut child = cmd.spawn().map_err(|source| DrbdError::Spawn {
        step,
        command: command.clone(),
        source,
    })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => break Err(()),
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(5));
            }
            Err(source) => {
                kill_group(&child);
                let _ = child.wait();
                return Err(DrbdError::Spawn {
                    step,
                    command,
                    source,
                });
            }
        }
    };
    let status = match status {
        Ok(s) => s,
        Err(()) => {
            // The child is not reaped yet, so its pid, and with it the group id, cannot
            // have been reused.
            kill_group(&child);
            let _ = child.wait();
            return Err(DrbdError::Timeout {
                step,
                command,
                after: timeout,
                stderr: join(stderr),
            });
        }
    };
    let out = Captured {
        stdout: join(stdout),
        stderr: join(stderr),
    };
    if status.success() {
        Ok(out)
    } else {
        Err(DrbdError::Command {
            step,
            command,
            status: describe(status),
            stderr: out.stderr,
            stdout: out.stdout,
        })
    }
}

fn kill_group(child: &std::process::Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Reads a pipe to its end on a thread of its own, so a chatty command never blocks on a
/// full pipe while we wait for it to exit.
fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        String::from_utf8_lossy(&buf).into_owned()
    })
}

fn join(h: std::thread::JoinHandle<String>) -> String {
    h.join().unwrap_or_default()
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_status_and_missing_programs() {
        let sh = |script: &str| {
            let mut c = Command::new("/bin/sh");
            c.args(["-c", script]);
            c
        };
        let out = run(
            Step::Finish,
            sh("echo out; echo err >&2"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(
            (out.stdout.as_str(), out.stderr.as_str()),
            ("out\n", "err\n")
        );

        let err = run(
            Step::Switchover,
            sh("echo 'web1: State change failed: (-2) Need access to UpToDate data' >&2; exit 17"),
            Duration::from_secs(5),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("disk step switchover: `/bin/sh -c"),
            "{msg}"
        );
        assert!(
            msg.contains("failed with exit status 17: web1: State change failed"),
            "{msg}"
        );

        let err = Drbdadm::new()
            .with_program("/nonexistent/drbdadm")
            .run(Step::BulkSync, &["primary".into(), "web1".into()])
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot run `/nonexistent/drbdadm primary web1`"),
            "{err}"
        );
    }

    #[test]
    fn a_hung_command_and_its_children_are_killed() {
        let start = Instant::now();
        let mut c = Command::new("/bin/sh");
        // The grandchild keeps the pipes open: only killing the whole group ends this.
        c.args(["-c", "echo started >&2; sleep 30 & sleep 30"]);
        let err = run(Step::BeforeMemory, c, Duration::from_millis(200)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
        let msg = err.to_string();
        assert!(
            msg.contains("did not finish within 200ms and was killed: started"),
            "{msg}"
        );
    }

    #[test]
    fn drbdadm_arguments_come_before_the_command() {
        let d = Drbdadm::new()
            .with_program("/usr/sbin/drbdadm")
            .with_config("/tmp/x.res")
            .with_drbdsetup("/tmp/fake")
            .with_arg("-v");
        assert_eq!(
            d.command_line(&["primary".into(), "web1".into()]),
            "/usr/sbin/drbdadm -c /tmp/x.res --drbdsetup=/tmp/fake -v primary web1"
        );
        assert_eq!(
            line(&d.adm_command(true, &[])),
            "/usr/sbin/drbdadm -d -c /tmp/x.res --drbdsetup=/tmp/fake -v"
        );
    }
}

//! Life under a service manager: systemd's notify protocol (READY, STATUS, WATCHDOG,
//! STOPPING, through the `sd-notify` crate; each call does nothing when the daemon was not
//! started by systemd) and a clean stop on SIGTERM or SIGINT.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use sd_notify::NotifyState;

use super::control::{Request, Response, request};
use crate::migrate::MigrationStatus;

/// Blocks SIGTERM and SIGINT in this thread and every thread it spawns from now on, so that
/// only [`stop_on_signal`]'s thread receives them (call it first thing in `main`).
pub fn block_stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    // Cannot fail with a valid `how` and set.
    let _ = set.thread_block();
    set
}

/// Spawns the thread that waits for SIGTERM or SIGINT, then logs it, tells systemd the
/// daemon is stopping, removes the control socket and exits 0. Migrations in flight end
/// with the process: a source's guest keeps running where it is (nothing commits without
/// this daemon), a destination's half-built copy is dropped.
pub fn stop_on_signal(set: SigSet, control_socket: PathBuf) {
    std::thread::Builder::new()
        .name("sf-signal".into())
        .spawn(move || {
            let signal = match set.wait() {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("waiting for signals failed ({e}); SIGTERM will not be clean");
                    return;
                }
            };
            tracing::info!("{signal:?} received: stopping");
            let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
            match std::fs::remove_file(&control_socket) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(
                    "cannot remove the control socket {}: {e}",
                    control_socket.display()
                ),
            }
            std::process::exit(0);
        })
        .expect("spawning the signal thread");
}

/// Tells systemd the daemon is ready (its control socket and listeners are up).
pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready, NotifyState::Status("ready")]);
}

/// Threads whose end means the daemon no longer does its job.
#[derive(Debug, Default)]
pub struct Loops {
    threads: Vec<(&'static str, JoinHandle<()>)>,
}

impl Loops {
    /// Watches a loop thread; `name` says which in the log.
    pub fn add(&mut self, name: &'static str, handle: JoinHandle<()>) {
        self.threads.push((name, handle));
    }

    fn dead(&self) -> Option<&'static str> {
        self.threads
            .iter()
            .find(|(_, h)| h.is_finished())
            .map(|(n, _)| *n)
    }
}

/// Spawns the watchdog: every half of systemd's WatchdogSec it asks the daemon's own control
/// socket for the status of its migrations (a real round trip through the accept loop and
/// the registry) and checks that the listener threads still run; only when all answer does
/// it send WATCHDOG=1, with a STATUS line counting the migrations running. Without
/// WatchdogSec it still updates STATUS, every few seconds.
pub fn watchdog(control_socket: PathBuf, loops: Loops) {
    let usec = watchdog_usec();
    let watchdog = usec.is_some();
    let period = usec.map_or(Duration::from_secs(5), |u| Duration::from_micros(u / 2));
    if !watchdog && std::env::var_os("NOTIFY_SOCKET").is_none() {
        return; // Not under systemd: nobody to tell.
    }
    std::thread::Builder::new()
        .name("sf-watchdog".into())
        .spawn(move || {
            let mut complained = false;
            loop {
                std::thread::sleep(period);
                match health(&control_socket, &loops) {
                    Ok(migrations) => {
                        complained = false;
                        let status = status_line(&migrations);
                        let mut states = vec![NotifyState::Status(&status)];
                        if watchdog {
                            states.push(NotifyState::Watchdog);
                        }
                        let _ = sd_notify::notify(false, &states);
                    }
                    Err(e) => {
                        // No WATCHDOG=1: systemd restarts the daemon after WatchdogSec.
                        if !complained {
                            tracing::error!("watchdog: {e}");
                            complained = true;
                        }
                        let status = format!("unhealthy: {e}");
                        let _ = sd_notify::notify(false, &[NotifyState::Status(&status)]);
                    }
                }
            }
        })
        .expect("spawning the watchdog");
}

/// WatchdogSec in microseconds, when systemd asks this process for pings. As libsystemd's
/// `sd_watchdog_enabled`: WATCHDOG_PID, when set, must be this process; when unset the
/// watchdog is ours (`sd_notify::watchdog_enabled` insists on WATCHDOG_PID).
fn watchdog_usec() -> Option<u64> {
    let usec = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse() != Ok(std::process::id()) => None,
        _ => Some(usec).filter(|&u| u > 0),
    }
}

fn health(control_socket: &Path, loops: &Loops) -> Result<Vec<MigrationStatus>, String> {
    if let Some(name) = loops.dead() {
        return Err(format!("the {name} thread has ended"));
    }
    match request(control_socket, &Request::Status { id: None })? {
        Response::Status { migrations } => Ok(migrations),
        other => Err(format!("the control socket answered {other:?}")),
    }
}

/// "2 migrations running", or "idle".
pub fn status_line(migrations: &[MigrationStatus]) -> String {
    match migrations.iter().filter(|m| !m.phase.is_final()).count() {
        0 => "idle".into(),
        1 => "1 migration running".into(),
        n => format!("{n} migrations running"),
    }
}

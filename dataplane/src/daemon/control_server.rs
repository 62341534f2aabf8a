//! Serving the control socket: one daemon per socket, a bounded number of clients, no thread
//! per client.
//!
//! - The socket belongs to the daemon holding the lock on `<socket>.lock` (flock, held for the
//!   daemon's life, with its pid inside). A second daemon naming the same socket is refused
//!   with the first one's pid; a socket left by a daemon that died (nobody holds the lock) is
//!   replaced.
//! - One thread polls the listener and every client still sending its request (nonblocking
//!   sockets). A client that has sent no whole request within the idle limit is closed with an
//!   error line. When `control_clients` are waiting already, the one waiting longest is closed
//!   with an error line to make room, so a newcomer (the CLI sends its request at once) always
//!   gets in.
//! - Whole requests go to a fixed pool of workers, which answer and close. A `watch` is a
//!   request every interval, each on a connection of its own.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::control::{Request, Response, peer_allowed};
use super::registry::Registry;

/// Largest request accepted.
const MAX_REQUEST: usize = 64 << 10;

/// Threads answering requests.
const WORKERS: usize = 4;

/// How many clients may wait and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientLimits {
    /// Clients sending their request at once (`daemon.control_clients`).
    pub clients: usize,
    /// How long a client may take to send its request, and a worker to write the answer
    /// (`daemon.control_idle`).
    pub idle: Duration,
}

/// The lock that makes a control socket this daemon's, held as long as it lives.
#[derive(Debug)]
pub struct SocketLock {
    _lock: Flock<File>,
    path: PathBuf,
}

impl SocketLock {
    /// The lock file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Why the control socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Another daemon, alive, holds the socket.
    #[error(
        "control socket {} belongs to a running skyferryd (pid {pid}, lock {}); stop it, \
         or give this daemon another daemon.control_socket",
        socket.display(), lock.display()
    )]
    Taken {
        /// The socket.
        socket: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// The holder's pid, as it wrote it.
        pid: String,
    },
    /// Any other failure.
    #[error("control socket {}: {source}", socket.display())]
    Io {
        /// The socket.
        socket: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Takes the lock of control socket `socket`: `<socket>.lock`, exclusive, with this process's
/// pid written in it.
pub fn lock(socket: &Path) -> Result<SocketLock, ServeError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| ServeError::Io {
        socket: socket.to_owned(),
        source,
    };
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut name = socket.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(l) => l,
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(ServeError::Taken {
                socket: socket.to_owned(),
                lock: path,
                pid: if pid.is_empty() { "unknown" } else { pid }.to_string(),
            });
        }
        Err((_, e)) => return Err(io(e.into())),
    };
    lock.set_len(0).map_err(io)?;
    writeln!(*lock, "{}", std::process::id()).map_err(io)?;
    Ok(SocketLock { _lock: lock, path })
}

/// Binds the control socket under `lock` (replacing a socket a dead daemon left) and serves it
/// forever.
pub fn serve(
    path: &Path,
    lock: &SocketLock,
    registry: &Arc<Registry>,
    limits: ClientLimits,
) -> Result<(), ServeError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |source| ServeError::Io {
        socket: path.to_owned(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        // We hold the lock, so no live daemon serves this socket; refuse to remove anything
        // but a socket.
        if !meta.file_type().is_socket() {
            return Err(io(std::io::Error::other("exists and is not a socket")));
        }
        std::fs::remove_file(path).map_err(io)?;
    }
    let listener = UnixListener::bind(path).map_err(io)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    listener.set_nonblocking(true).map_err(io)?;
    tracing::info!(
        "control socket {} (lock {}; at most {} clients waiting, {:?} each)",
        path.display(),
        lock.path().display(),
        limits.clients,
        limits.idle
    );

    let (work_tx, work_rx) = crossbeam_channel::bounded::<(UnixStream, String)>(limits.clients);
    for i in 0..WORKERS {
        let (rx, registry) = (work_rx.clone(), registry.clone());
        std::thread::Builder::new()
            .name(format!("sf-control-{i}"))
            .spawn(move || {
                for (conn, line) in rx {
                    let response = match serde_json::from_str::<Request>(&line) {
                        Ok(req) => registry.handle(req),
                        Err(e) => Response::Error {
                            message: format!("malformed request: {e}"),
                        },
                    };
                    if let Err(e) = answer(&conn, &response, limits.idle) {
                        tracing::warn!("control connection: {e}");
                    }
                }
            })
            .map_err(io)?;
    }
    poll_loop(&listener, &work_tx, limits).map_err(io)
}

/// A client still sending its request.
struct Waiting {
    conn: UnixStream,
    got: Vec<u8>,
    since: Instant,
}

fn poll_loop(
    listener: &UnixListener,
    work: &crossbeam_channel::Sender<(UnixStream, String)>,
    limits: ClientLimits,
) -> std::io::Result<()> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let mut waiting: VecDeque<Waiting> = VecDeque::with_capacity(limits.clients);
    let mut ready = Vec::with_capacity(limits.clients + 1);
    loop {
        let now = Instant::now();
        // Wake for the first client to run out of time.
        let timeout = waiting.front().map_or(PollTimeout::NONE, |w| {
            let left = (w.since + limits.idle).saturating_duration_since(now);
            PollTimeout::try_from(left.as_millis().saturating_add(1).min(60_000))
                .unwrap_or(PollTimeout::MAX)
        });
        ready.clear();
        {
            let mut fds: Vec<PollFd> = std::iter::once(listener.as_fd())
                .chain(waiting.iter().map(|w| w.conn.as_fd()))
                .map(|fd| PollFd::new(fd, PollFlags::POLLIN))
                .collect();
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
            ready.extend(
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty())),
            );
        }
        // Clients first (indexes shift once the listener adds some).
        let mut i = 0;
        waiting.retain_mut(|w| {
            i += 1;
            !ready[i] || read_request(w, work)
        });
        let now = Instant::now();
        while let Some(w) = waiting.front() {
            if now.duration_since(w.since) < limits.idle {
                break;
            }
            let w = waiting.pop_front().expect("front");
            refuse(
                &w.conn,
                &format!(
                    "no whole request within {:?} (daemon.control_idle): closed",
                    limits.idle
                ),
            );
        }
        if ready[0] {
            accept_all(listener, &mut waiting, limits);
        }
    }
}

/// Takes every pending connection; makes room for each by closing the longest-waiting client.
fn accept_all(listener: &UnixListener, waiting: &mut VecDeque<Waiting>, limits: ClientLimits) {
    loop {
        let conn = match listener.accept() {
            Ok((c, _)) => c,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, typically: the clients waiting keep theirs.
                tracing::warn!("control socket accept: {e}");
                return;
            }
        };
        if let Err(message) = peer_allowed(&conn) {
            refuse(&conn, &message);
            continue;
        }
        if conn.set_nonblocking(true).is_err() {
            continue;
        }
        if waiting.len() >= limits.clients.max(1)
            && let Some(old) = waiting.pop_front()
        {
            refuse(
                &old.conn,
                &format!(
                    "too many control clients ({} waiting, daemon.control_clients): the one \
                     waiting longest was closed",
                    limits.clients
                ),
            );
        }
        waiting.push_back(Waiting {
            conn,
            got: Vec::new(),
            since: Instant::now(),
        });
    }
}

/// Reads what `w` sent; false once it is done with (handed to a worker, refused or gone).
fn read_request(w: &mut Waiting, work: &crossbeam_channel::Sender<(UnixStream, String)>) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match (&w.conn).read(&mut buf) {
            Ok(0) => return false,
            Ok(n) => {
                let end = w.got.len();
                w.got.extend_from_slice(&buf[..n]);
                if let Some(nl) = w.got[end..].iter().position(|&b| b == b'\n') {
                    w.got.truncate(end + nl);
                    break;
                }
                if w.got.len() > MAX_REQUEST {
                    refuse(&w.conn, "request longer than 64 KiB");
                    return false;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    let line = match String::from_utf8(std::mem::take(&mut w.got)) {
        Ok(l) => l,
        Err(_) => {
            refuse(&w.conn, "malformed request: not UTF-8");
            return false;
        }
    };
    let Ok(conn) = w.conn.try_clone() else {
        return false;
    };
    if let Err(crossbeam_channel::TrySendError::Full((conn, _))) = work.try_send((conn, line)) {
        refuse(
            &conn,
            "the daemon is busy answering other requests; try again",
        );
    }
    false
}

/// Writes a short error line without blocking (a line fits any socket buffer) and closes.
fn refuse(conn: &UnixStream, message: &str) {
    tracing::debug!(fd = conn.as_raw_fd(), "control client refused: {message}");
    let _ = conn.set_nonblocking(true);
    let _ = (&*conn).write_all(&line(&Response::Error {
        message: message.to_string(),
    }));
}

fn line(response: &Response) -> Vec<u8> {
    let mut text = serde_json::to_vec(response).unwrap_or_else(|e| {
        format!("{{\"result\":\"error\",\"message\":\"response not serializable: {e}\"}}")
            .into_bytes()
    });
    text.push(b'\n');
    text
}

fn answer(conn: &UnixStream, response: &Response, within: Duration) -> std::io::Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_write_timeout(Some(within))?;
    (&*conn).write_all(&line(response))
}

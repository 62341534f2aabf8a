//! A QMP client: QEMU's JSON machine protocol over its Unix socket.
//!
//! One command at a time, each answered by one `return` or `error` line; asynchronous
//! `event` lines in between are skipped (this backend asks for state, it does not follow
//! events). Every read has a deadline, so a hung QEMU becomes an error, not a hung daemon.

use std::io::{BufRead, BufReader, IoSlice, Read as _, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use serde_json::{Value, json};

/// Longest line accepted from QEMU (replies here are small; `query-*` output is a few KiB).
const MAX_LINE: usize = 1 << 20;

/// What went wrong talking to QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// the socket could not be reached
    #[error("QMP socket {path}: {source}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// reading or writing the socket failed, or QEMU closed it
    #[error("QMP {context}: {message}")]
    Io {
        /// What was being done.
        context: String,
        /// What went wrong.
        message: String,
    },
    /// QEMU sent something that is not QMP
    #[error("QMP: unexpected reply to {command}: {reply}")]
    Protocol {
        /// The command.
        command: String,
        /// What came back (shortened).
        reply: String,
    },
    /// QEMU refused the command
    #[error("QEMU refused {command}: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
}

/// QEMU's run state, from `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunState {
    /// vCPUs are running.
    pub running: bool,
    /// QEMU's name for the state: `running`, `paused`, `inmigrate`, `postmigrate`,
    /// `prelaunch`, `finish-migrate`, ...
    pub status: String,
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
}

impl Qmp {
    /// Connects to `path`, reads QEMU's greeting and leaves capability negotiation mode.
    /// `timeout` bounds every later wait for a reply.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let writer = stream.try_clone().map_err(|e| QmpError::Io {
            context: "cloning the socket".into(),
            message: e.to_string(),
        })?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            timeout,
        };
        let greeting = qmp.read_message("waiting for the greeting")?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol {
                command: "(greeting)".into(),
                reply: shorten(&greeting),
            });
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// The process id of the QEMU at the other end (SO_PEERCRED).
    pub fn peer_pid(&self) -> Result<u32, QmpError> {
        let cred =
            nix::sys::socket::getsockopt(&self.writer, nix::sys::socket::sockopt::PeerCredentials)
                .map_err(|e| QmpError::Io {
                    context: "reading QEMU's credentials".into(),
                    message: e.to_string(),
                })?;
        u32::try_from(cred.pid()).map_err(|_| QmpError::Io {
            context: "reading QEMU's credentials".into(),
            message: format!("pid {}", cred.pid()),
        })
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value serialises");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| QmpError::Io {
            context: format!("sending {command}"),
            message: e.to_string(),
        })?;
        self.reply(command)
    }

    /// Hands QEMU a file descriptor under `name` (`getfd`, the descriptor travels as
    /// SCM_RIGHTS with the command), for URIs such as `fd:NAME`. No file system path is
    /// shared, so QEMU's user needs no access to ours.
    pub fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let msg = json!({ "execute": "getfd", "arguments": { "fdname": name } });
        let mut line = serde_json::to_vec(&msg).expect("a JSON value serialises");
        line.push(b'\n');
        let fds = [fd.as_raw_fd()];
        let sent = sendmsg::<()>(
            self.writer.as_raw_fd(),
            &[IoSlice::new(&line)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(|e| QmpError::Io {
            context: "sending getfd".into(),
            message: e.to_string(),
        })?;
        if sent != line.len() {
            // The descriptor went with the first byte; the rest is ordinary stream data.
            self.writer
                .write_all(&line[sent..])
                .map_err(|e| QmpError::Io {
                    context: "sending getfd".into(),
                    message: e.to_string(),
                })?;
        }
        self.reply("getfd").map(drop)
    }

    fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Io {
                    context: format!("waiting for the reply to {command}"),
                    message: format!("no reply within {:?}", self.timeout),
                });
            }
            let reply = self.read_message_within(&format!("waiting for {command}"), left)?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Refused {
                    command: command.into(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol {
                command: command.into(),
                reply: shorten(&reply),
            });
        }
    }

    /// `query-status`.
    pub fn status(&mut self) -> Result<RunState, QmpError> {
        let r = self.execute("query-status", None)?;
        match (
            r.get("running").and_then(Value::as_bool),
            r.get("status").and_then(Value::as_str),
        ) {
            (Some(running), Some(status)) => Ok(RunState {
                running,
                status: status.to_string(),
            }),
            _ => Err(QmpError::Protocol {
                command: "query-status".into(),
                reply: shorten(&r),
            }),
        }
    }

    /// `stop`: QEMU answers once every vCPU has left guest code, so no guest write is in
    /// flight when this returns. The state is checked, not assumed.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None)?;
        self.expect_running(false, "stop")
    }

    /// `cont`, then checks that the vCPUs run.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None)?;
        self.expect_running(true, "cont")
    }

    fn expect_running(&mut self, want: bool, after: &str) -> Result<(), QmpError> {
        let s = self.status()?;
        if s.running == want {
            Ok(())
        } else {
            Err(QmpError::Protocol {
                command: after.into(),
                reply: format!(
                    "QEMU reports status {:?} (running: {})",
                    s.status, s.running
                ),
            })
        }
    }

    /// Sets migration capabilities (`[("x-ignore-shared", true)]`).
    pub fn set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<Value, QmpError> {
        self.execute("query-migrate", None)
    }

    /// Polls `query-migrate` until the migration leaves its active states, and returns the
    /// last reply. `completed` is success; `failed` and `cancelled` become an error with
    /// QEMU's reason.
    pub fn wait_migration(&mut self, within: Duration) -> Result<Value, QmpError> {
        let deadline = Instant::now() + within;
        loop {
            let r = self.query_migrate()?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(r),
                Some(s @ ("failed" | "cancelled")) => {
                    let why = r
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .unwrap_or("QEMU gave no reason");
                    return Err(QmpError::Refused {
                        command: "migrate".into(),
                        class: s.into(),
                        desc: why.into(),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(QmpError::Io {
                    context: "waiting for the migration to finish".into(),
                    message: format!("still {} after {within:?}", shorten(&r)),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read_message(&mut self, context: &str) -> Result<Value, QmpError> {
        self.read_message_within(context, self.timeout)
    }

    fn read_message_within(&mut self, context: &str, within: Duration) -> Result<Value, QmpError> {
        let io = |message: String| QmpError::Io {
            context: context.into(),
            message,
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(within.max(Duration::from_millis(1))))
            .map_err(|e| io(e.to_string()))?;
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    io(format!("QEMU did not answer within {within:?}"))
                }
                _ => io(e.to_string()),
            })?;
        if n == 0 {
            return Err(io("QEMU closed the QMP connection".into()));
        }
        if line.last() != Some(&b'\n') {
            return Err(io(format!("a line longer than {MAX_LINE} bytes")));
        }
        serde_json::from_slice(&line).map_err(|e| io(format!("not JSON ({e})")))
    }
}

fn shorten(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(300) {
        Some((cut, _)) => format!("{}...", &s[..cut]),
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::qemu::testutil::TempDir;

    fn serve(replies: Vec<&'static str>) -> (TempDir, std::thread::JoinHandle<Vec<Value>>) {
        crate::guest::qemu::testutil::scripted_qmp(replies.into_iter().map(String::from).collect())
    }

    #[test]
    fn negotiates_skips_events_and_reports_refusals() {
        let (dir, server) = serve(vec![
            "{\"return\": {}}\n",
            "{\"event\": \"STOP\", \"timestamp\": {}}\n{\"return\": {}}\n",
            "{\"return\": {\"running\": false, \"status\": \"paused\"}}\n",
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no incoming\"}}\n",
        ]);
        let mut q = Qmp::connect(&dir.path().join("qmp"), Duration::from_secs(5)).unwrap();
        q.stop().unwrap();
        let err = q
            .execute("migrate-incoming", Some(json!({"uri": "unix:/x"})))
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("QEMU refused migrate-incoming: GenericError: no incoming"),
            "{err}"
        );
        let sent = server.join().unwrap();
        assert_eq!(sent[0]["execute"], "qmp_capabilities");
        assert_eq!(sent[1]["execute"], "stop");
        assert_eq!(sent[2]["execute"], "query-status");
        assert_eq!(sent[3]["arguments"]["uri"], "unix:/x");
    }

    #[test]
    fn a_state_that_did_not_change_is_an_error() {
        let (dir, server) = serve(vec![
            "{\"return\": {}}\n",
            "{\"return\": {}}\n",
            "{\"return\": {\"running\": true, \"status\": \"running\"}}\n",
        ]);
        let mut q = Qmp::connect(&dir.path().join("qmp"), Duration::from_secs(5)).unwrap();
        let err = q.stop().unwrap_err();
        assert!(err.to_string().contains("status \"running\""), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn silence_and_missing_sockets_are_clear_errors() {
        let (dir, server) = serve(vec!["{\"return\": {}}\n", "", ""]);
        let mut q = Qmp::connect(&dir.path().join("qmp"), Duration::from_millis(200)).unwrap();
        let err = q.execute("query-status", None).unwrap_err();
        assert!(err.to_string().contains("did not answer"), "{err}");
        drop(q);
        server.join().unwrap();
        let err = Qmp::connect(&dir.path().join("nothing"), Duration::from_secs(1)).unwrap_err();
        assert!(err.to_string().contains("QMP socket"), "{err}");
    }
}

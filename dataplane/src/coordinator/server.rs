//! The coordinator as a skyferryd serves it (`[coordinator] listen`): one thread per member
//! connection, every group's state behind one lock.

use std::collections::HashMap;
use std::io::BufReader;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::group::{Group, Verdict};
use super::wire::{HANDSHAKE_TIMEOUT, Reply, Request, recv, send, server_handshake};
use crate::crypto::PreSharedKey;

/// Longest paced wait a member may ask for.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Every group this daemon coordinates.
#[derive(Debug)]
pub struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
    changed: Condvar,
    epoch: Instant,
    psk: PreSharedKey,
}

impl Coordinator {
    /// A coordinator that admits holders of `psk`.
    pub fn new(psk: PreSharedKey) -> Arc<Self> {
        Arc::new(Coordinator {
            groups: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            epoch: Instant::now(),
            psk,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Group>> {
        self.groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A group's state, if it exists.
    pub fn show(&self, group: &str) -> Option<Group> {
        self.lock().get(group).cloned()
    }

    /// Accepts members forever.
    pub fn serve(self: &Arc<Self>, listener: &TcpListener) {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let me = Arc::clone(self);
            let _ = std::thread::Builder::new()
                .name("sf-coord".into())
                .spawn(move || {
                    let peer = conn.peer_addr().ok();
                    if let Err(e) = me.session(conn) {
                        tracing::debug!(?peer, "coordinator connection ended: {e}");
                    }
                });
        }
    }

    fn session(&self, mut s: TcpStream) -> std::io::Result<()> {
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
        let mut r = BufReader::new(s.try_clone()?);
        if let Err(e) = server_handshake(&mut s, &mut r, &self.psk) {
            tracing::warn!(peer = ?s.peer_addr().ok(), "coordinator refused a peer: {e}");
            return Err(e);
        }
        // Members report once per iteration; long silences are normal.
        s.set_read_timeout(None)?;
        loop {
            let req: Request = recv(&mut r)?;
            let reply = self.handle(req);
            send(&mut s, &reply)?;
        }
    }

    /// Answers one request.
    pub fn handle(&self, req: Request) -> Reply {
        let now = self.now_ms();
        let mut groups = self.lock();
        let verdict = |v| Reply::Verdict { verdict: v };
        let reply = match req {
            Request::Join {
                group,
                member,
                pages,
                size,
                on_failure,
            } => {
                groups
                    .entry(group.clone())
                    .or_insert_with(|| Group::new(&group, on_failure, now))
                    .join(&member, pages, size);
                Reply::Ok
            }
            Request::Report {
                group,
                member,
                progress,
            } => match groups.get_mut(&group) {
                Some(g) => verdict(g.report(&member, progress, now)),
                None => verdict(Verdict::Abort),
            },
            Request::Wait { group, member, ms } => {
                let deadline = Instant::now() + Duration::from_millis(ms).min(MAX_WAIT);
                loop {
                    let now = self.now_ms();
                    let Some(g) = groups.get_mut(&group) else {
                        break verdict(Verdict::Abort);
                    };
                    let v = g.verdict(&member, now);
                    let left = deadline.saturating_duration_since(Instant::now());
                    if v != Verdict::Hold {
                        break verdict(v);
                    }
                    if left.is_zero() {
                        g.paced(&member);
                        break verdict(Verdict::Hold);
                    }
                    groups = self
                        .changed
                        .wait_timeout(groups, left)
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .0;
                }
            }
            Request::Done { group, member } => {
                if let Some(g) = groups.get_mut(&group) {
                    g.done(&member, now);
                }
                Reply::Ok
            }
            Request::Fail { group, member, why } => {
                if let Some(g) = groups.get_mut(&group) {
                    g.fail(&member, &why);
                }
                Reply::Ok
            }
            Request::Show { group } => match groups.get(&group) {
                Some(g) => Reply::Group {
                    group: Box::new(g.clone()),
                },
                None => Reply::Error {
                    message: format!("no group {group:?} here"),
                },
            },
        };
        drop(groups);
        self.changed.notify_all();
        reply
    }
}

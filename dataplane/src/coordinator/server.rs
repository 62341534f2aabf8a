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
        // The member this connection joined, until it says how it ended.
        let mut joined: Option<(String, String)> = None;
        let result = loop {
            let req = match recv::<Request>(&mut r) {
                Ok(req) => req,
                Err(e) => break Err(e),
            };
            match &req {
                Request::Join { group, member, .. } => {
                    joined = Some((group.clone(), member.clone()))
                }
                Request::Done { .. } | Request::Fail { .. } => joined = None,
                _ => {}
            }
            let reply = self.handle(req);
            if let Err(e) = send(&mut s, &reply) {
                break Err(e);
            }
        };
        // A member whose daemon died or lost the network cannot hold the others forever.
        if let Some((group, member)) = joined {
            self.handle(Request::Fail {
                group,
                member,
                why: "lost contact with the coordinator".into(),
            });
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coordinator::{GroupFailure, GroupOptions, Member, Progress};

    fn serve(psk: &PreSharedKey) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let c = Coordinator::new(psk.clone());
        std::thread::spawn(move || c.serve(&listener));
        addr
    }

    fn opts(addr: std::net::SocketAddr) -> GroupOptions {
        GroupOptions {
            coordinator: addr,
            group: "g".into(),
            size: 2,
            on_failure: GroupFailure::Abort,
            pace: false,
        }
    }

    fn ready() -> Progress {
        Progress {
            ready: true,
            ..Progress::default()
        }
    }

    #[test]
    fn members_go_together_over_tcp_and_a_wrong_key_is_refused() {
        let psk = PreSharedKey::from_bytes([3; 32]);
        let addr = serve(&psk);
        let mut a = Member::join(&opts(addr), &psk, "a", 10).unwrap();
        let mut b = Member::join(&opts(addr), &psk, "b", 10).unwrap();
        assert_eq!(a.report(ready()).unwrap(), Verdict::Hold);
        // A paced wait ends as soon as the last member is ready.
        let waiter = std::thread::spawn(move || a.wait(Duration::from_secs(20)).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(b.report(ready()).unwrap(), Verdict::Go);
        assert_eq!(waiter.join().unwrap(), Verdict::Go);
        let e = Member::join(&opts(addr), &PreSharedKey::from_bytes([4; 32]), "c", 1).unwrap_err();
        assert!(e.to_string().contains("pre-shared key"), "{e}");
    }

    #[test]
    fn a_member_that_vanishes_releases_the_others() {
        let psk = PreSharedKey::from_bytes([5; 32]);
        let addr = serve(&psk);
        let mut a = Member::join(&opts(addr), &psk, "a", 10).unwrap();
        let b = Member::join(&opts(addr), &psk, "b", 10).unwrap();
        assert_eq!(a.report(ready()).unwrap(), Verdict::Hold);
        drop(b); // its daemon died: the connection closes without Done or Fail
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match a.report(ready()).unwrap() {
                Verdict::Abort => break,
                v => assert!(std::time::Instant::now() < deadline, "still {v:?}"),
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let g = crate::coordinator::show(addr, &psk, "g").unwrap();
        assert!(g.broken.unwrap().contains("lost contact"));
    }
}

//! A migration's side of Synchronized Arrival: one connection to the coordinator.

use std::io::BufReader;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::group::{Group, GroupFailure, Progress, Verdict};
use super::wire::{HANDSHAKE_TIMEOUT, Reply, Request, client_handshake, recv, send};
use crate::crypto::PreSharedKey;

/// How a migration takes part in a group.
#[derive(Debug, Clone)]
pub struct GroupOptions {
    /// The coordinator.
    pub coordinator: SocketAddr,
    /// The group's name.
    pub group: String,
    /// Members the group has (0: whoever has joined when all of them are ready).
    pub size: usize,
    /// What to do if another member fails.
    pub on_failure: GroupFailure,
    /// While held, wait instead of iterating (one iteration per wait keeps the final copy
    /// small).
    pub pace: bool,
}

/// A member's connection.
#[derive(Debug)]
pub struct Member {
    s: TcpStream,
    r: BufReader<TcpStream>,
    group: String,
    name: String,
}

fn unexpected(r: &Reply) -> std::io::Error {
    std::io::Error::other(format!("unexpected reply from the coordinator: {r:?}"))
}

fn connect(
    addr: SocketAddr,
    psk: &PreSharedKey,
) -> std::io::Result<(TcpStream, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT)?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    s.set_nodelay(true)?;
    let mut r = BufReader::new(s.try_clone()?);
    client_handshake(&mut s, &mut r, psk)?;
    Ok((s, r))
}

impl Member {
    /// Joins `opts.group` as `name`, a guest of `pages` pages.
    pub fn join(
        opts: &GroupOptions,
        psk: &PreSharedKey,
        name: &str,
        pages: u64,
    ) -> std::io::Result<Member> {
        let (s, r) = connect(opts.coordinator, psk)?;
        let mut m = Member {
            s,
            r,
            group: opts.group.clone(),
            name: name.to_string(),
        };
        match m.call(&Request::Join {
            group: m.group.clone(),
            member: m.name.clone(),
            pages,
            size: opts.size,
            on_failure: opts.on_failure,
        })? {
            Reply::Ok => Ok(m),
            other => Err(unexpected(&other)),
        }
    }

    fn call(&mut self, req: &Request) -> std::io::Result<Reply> {
        send(&mut self.s, req)?;
        recv(&mut self.r)
    }

    fn verdict(&mut self, req: &Request) -> std::io::Result<Verdict> {
        match self.call(req)? {
            Reply::Verdict { verdict } => Ok(verdict),
            other => Err(unexpected(&other)),
        }
    }

    /// Reports an iteration; the verdict says what to do next.
    pub fn report(&mut self, progress: Progress) -> std::io::Result<Verdict> {
        self.verdict(&Request::Report {
            group: self.group.clone(),
            member: self.name.clone(),
            progress,
        })
    }

    /// Waits (paced) up to `wait` for the group to go; `Hold` if it did not.
    pub fn wait(&mut self, wait: Duration) -> std::io::Result<Verdict> {
        self.s.set_read_timeout(Some(wait + HANDSHAKE_TIMEOUT))?;
        self.verdict(&Request::Wait {
            group: self.group.clone(),
            member: self.name.clone(),
            ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// The migration committed.
    pub fn done(&mut self) -> std::io::Result<()> {
        self.call(&Request::Done {
            group: self.group.clone(),
            member: self.name.clone(),
        })
        .map(drop)
    }

    /// The migration failed or was aborted.
    pub fn fail(&mut self, why: &str) -> std::io::Result<()> {
        self.call(&Request::Fail {
            group: self.group.clone(),
            member: self.name.clone(),
            why: why.to_string(),
        })
        .map(drop)
    }
}

/// A group's state, from the coordinator at `addr`.
pub fn show(addr: SocketAddr, psk: &PreSharedKey, group: &str) -> std::io::Result<Group> {
    let (mut s, mut r) = connect(addr, psk)?;
    send(
        &mut s,
        &Request::Show {
            group: group.to_string(),
        },
    )?;
    match recv(&mut r)? {
        Reply::Group { group } => Ok(*group),
        Reply::Error { message } => Err(std::io::Error::new(std::io::ErrorKind::NotFound, message)),
        other => Err(unexpected(&other)),
    }
}

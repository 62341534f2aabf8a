//! The migration port: one listener for every incoming migration, received at the same time.
//!
//! Nothing before the key. Every accepted connection is greeted at once with a fresh
//! challenge (`protocol::handshake`) and joins the pool of unauthenticated connections,
//! which one thread watches with poll(2) over nonblocking sockets: no thread, no buffer
//! sized by the peer (its bytes stay in the kernel, peeked into one buffer of
//! `MAX_OPENING` bytes shared by all), a fixed record of about 200 bytes, and a deadline
//! (`[listen] handshake_timeout`). Only an opening whose MAC over the connection's own
//! challenge verifies leaves the pool: a control connection's Hello starts a migration on a
//! thread of its own (which then takes a `max_migrations` slot and a status row); a data
//! stream's StreamHello goes to the migration it names, through the [`Router`], and so does
//! a source reconnecting to resume a migration whose link broke (a Hello with `resume` set).
//!
//! The pool is bounded per source address and overall ([`Limits`]). When a bound is reached
//! the oldest unauthenticated connection of that address (else the oldest of all) is
//! closed, not the newest: a real source answers its greeting within one round trip, so
//! keyless connections renewed as fast as they are closed cannot keep it out, where
//! refusing newcomers would. Drops are logged at most once per [`LOG_EVERY`] (then as counts
//! per reason), so a flood costs no log either.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::crypto::PreSharedKey;
use crate::migrate::MigrateError;
use crate::migrate::dest::{DataStreams, source_still_opening};
use crate::protocol::handshake::MAX_OPENING;
use crate::protocol::{
    AuthHello, Greeting, Opening, ProtocolError, Proven, StreamHello, opening, verify_opening,
};

/// At most one log line per this long about dropped unauthenticated connections.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Bounds of the pool of connections that have not proven the key (`[listen]`).
#[derive(Debug, Clone)]
pub struct Limits {
    /// The key every opening must prove.
    pub psk: PreSharedKey,
    /// How long a connection has to prove it (`handshake_timeout`).
    pub handshake_timeout: Duration,
    /// Unauthenticated connections at once (`max_unauthenticated`).
    pub max_unauthenticated: usize,
    /// Of those, from one address (`max_unauthenticated_per_address`).
    pub max_per_address: usize,
}

/// A connection on its way to the migration it belongs to (its opening proved the key).
#[derive(Debug)]
enum Routed {
    /// Data stream n.
    Data(u32, TcpStream),
    /// The source reconnecting, with its Hello.
    Resume(TcpStream, Box<AuthHello>),
}

/// Data streams and reconnections on their way to the migration that expects them.
#[derive(Debug, Default)]
pub struct Router {
    routes: Mutex<HashMap<u64, Sender<Routed>>>,
}

impl Router {
    /// Hands a data stream to its migration; false (the stream is dropped) if none expects it.
    fn route(&self, hello: StreamHello, stream: TcpStream) -> bool {
        self.send(hello.migration_id, Routed::Data(hello.stream, stream))
    }

    /// Hands a reconnection to its migration; gives it back if that is not being received
    /// here.
    fn route_resume(
        &self,
        control: TcpStream,
        auth: Box<AuthHello>,
    ) -> Result<(), (TcpStream, Box<AuthHello>)> {
        let routes = self.routes.lock().expect("router lock");
        match routes.get(&auth.hello.migration_id) {
            Some(tx) => tx
                .send(Routed::Resume(control, auth))
                .map_err(|e| match e.0 {
                    Routed::Resume(c, a) => (c, a),
                    Routed::Data(..) => unreachable!("sent a Resume"),
                }),
            None => Err((control, auth)),
        }
    }

    fn send(&self, id: u64, conn: Routed) -> bool {
        let routes = self.routes.lock().expect("router lock");
        routes.get(&id).is_some_and(|tx| tx.send(conn).is_ok())
    }
}

/// A migration's data streams, as the router delivers them.
#[derive(Debug)]
pub struct RoutedStreams {
    router: Arc<Router>,
    id: Option<u64>,
    rx: Option<Receiver<Routed>>,
    /// Streams that came before their turn.
    early: BTreeMap<u32, TcpStream>,
    /// A reconnection that arrived while an earlier one's streams opened: the source gave
    /// that one up, so this one is taken next.
    newer: Option<(TcpStream, Box<AuthHello>)>,
    /// The streams being opened are a reconnection's (not the migration's first session's).
    resuming: bool,
}

impl RoutedStreams {
    /// Streams for one migration, once it `expect`s its id.
    pub fn new(router: Arc<Router>) -> Self {
        RoutedStreams {
            router,
            id: None,
            rx: None,
            early: BTreeMap::new(),
            newer: None,
            resuming: false,
        }
    }
}

impl DataStreams for RoutedStreams {
    fn expect(&mut self, id: u64) -> Result<(), String> {
        let mut routes = self.router.routes.lock().expect("router lock");
        if routes.contains_key(&id) {
            return Err(format!(
                "migration {id:x} is already being received here (a replayed or duplicated Hello)"
            ));
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        routes.insert(id, tx);
        self.id = Some(id);
        self.rx = Some(rx);
        Ok(())
    }

    fn next(
        &mut self,
        control: &TcpStream,
        timeout: Duration,
        id: u64,
        want: u32,
    ) -> Result<TcpStream, MigrateError> {
        let rx = self.rx.as_ref().expect("expect() comes first");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.early.remove(&want) {
                return Ok(s);
            }
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(Routed::Data(n, s)) if n == want => return Ok(s),
                Ok(Routed::Data(n, s)) if n > want && !self.early.contains_key(&n) => {
                    self.early.insert(n, s);
                }
                Ok(Routed::Data(n, _)) => {
                    tracing::warn!("migration {id:x}: dropping a second data stream {n}");
                }
                Ok(Routed::Resume(..)) if !self.resuming => {
                    tracing::warn!(
                        "migration {id:x}: dropping a reconnection while its streams open"
                    );
                }
                Ok(Routed::Resume(c, auth)) => {
                    // The source gave up on the session being opened (it timed out on a
                    // loaded host, say) and reconnected again: take the newer one.
                    self.newer = Some((c, auth));
                    return Err(MigrateError::LinkLost(
                        "the source reconnected again before this session's streams opened; \
                         taking its newer reconnection"
                            .into(),
                    ));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the route holds a sender"),
            }
            source_still_opening(control, timeout, deadline)?;
        }
    }

    fn resumed(
        &mut self,
        id: u64,
        window: Duration,
        abort: &AtomicBool,
    ) -> Option<(TcpStream, Box<AuthHello>)> {
        let rx = self.rx.as_ref().expect("expect() comes first");
        // Streams of the broken session that had not been taken are of no use now.
        self.early.clear();
        self.resuming = true;
        if let Some(c) = self.newer.take() {
            return Some(c);
        }
        let deadline = Instant::now() + window;
        while !abort.load(Ordering::Relaxed) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            match rx.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(Routed::Resume(c, auth)) => return Some((c, auth)),
                Ok(Routed::Data(n, _)) => {
                    tracing::warn!("migration {id:x}: dropping data stream {n} of a broken link");
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the route holds a sender"),
            }
        }
        None
    }
}

impl Drop for RoutedStreams {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.router.routes.lock().expect("router lock").remove(&id);
        }
    }
}

/// What receives a control connection whose Hello proved the key (on a thread of its own).
pub type Receive = Arc<dyn Fn(TcpStream, Box<AuthHello>) + Send + Sync>;

/// A connection that has not proven the key yet.
struct Pending {
    conn: TcpStream,
    peer: SocketAddr,
    greeting: Greeting,
    deadline: Instant,
    /// Had part of its opening: not polled (its data keeps it readable) until then.
    resting_until: Option<Instant>,
}

/// Accepts connections on `listener` forever. A control connection is handed to
/// `receive` (on its own thread) once its Hello proved the key; a data stream goes to the
/// migration it names.
pub fn serve(listener: &TcpListener, router: &Arc<Router>, receive: &Receive, limits: Limits) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (router, receive) = (router.clone(), receive.clone());
    std::thread::Builder::new()
        .name("sf-classify".into())
        .spawn(move || Pool::new(limits).run(&rx, &router, &receive))
        .expect("spawning the connection classifier");
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                if tx.send(c).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("accepting on the migration port: {e}");
                // EMFILE and the like: give the other threads a moment to close something.
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// How long a connection that sent part of its opening rests before it is looked at again.
const REST: Duration = Duration::from_millis(50);

/// Why an unauthenticated connection was closed (the log counts them per reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum DropKind {
    /// Its header is not a skyferry opening of a version this host speaks.
    Refused,
    /// Its MAC did not verify.
    WrongKey,
    /// It did not prove the key within the handshake timeout.
    Timeout,
    /// The pool was full and it was the oldest (of its address, or of all).
    Evicted,
    /// Closed, reset, or the like.
    Gone,
}

impl DropKind {
    const ALL: [DropKind; 5] = [
        DropKind::Refused,
        DropKind::WrongKey,
        DropKind::Timeout,
        DropKind::Evicted,
        DropKind::Gone,
    ];

    fn name(self) -> &'static str {
        match self {
            DropKind::Refused => "refused",
            DropKind::WrongKey => "wrong key",
            DropKind::Timeout => "timed out",
            DropKind::Evicted => "evicted",
            DropKind::Gone => "closed",
        }
    }
}

/// The rate-limited log of dropped connections: the first in a while is logged at once,
/// the rest as counts per reason (with the last of each) at most once per [`LOG_EVERY`].
#[derive(Default)]
struct DropLog {
    last_line: Option<Instant>,
    counts: [(u64, String); 5],
}

impl DropLog {
    fn note(&mut self, kind: DropKind, peer: SocketAddr, why: &str) {
        // Every connection closed before it proved the key: the metric operators alert on.
        crate::daemon::metrics::count_keyless_refused();
        let now = Instant::now();
        if self.last_line.is_none_or(|t| now >= t + LOG_EVERY) && self.held() == 0 {
            self.last_line = Some(now);
            tracing::warn!(%peer, "dropping an unauthenticated connection ({}): {why}", kind.name());
            return;
        }
        let slot = &mut self.counts[kind as usize];
        slot.0 += 1;
        slot.1 = format!("{peer}: {why}");
    }

    fn held(&self) -> u64 {
        self.counts.iter().map(|c| c.0).sum()
    }

    /// When the held counts are due, if any are held.
    fn due(&self) -> Option<Instant> {
        (self.held() > 0).then(|| self.last_line.map_or_else(Instant::now, |t| t + LOG_EVERY))
    }

    fn flush(&mut self) {
        if self.due().is_none_or(|t| Instant::now() < t) {
            return;
        }
        let parts: Vec<String> = DropKind::ALL
            .iter()
            .filter(|k| self.counts[**k as usize].0 > 0)
            .map(|k| {
                let (n, last) = &self.counts[*k as usize];
                format!("{} {n} (last: {last})", k.name())
            })
            .collect();
        tracing::warn!(
            "dropped {} unauthenticated connections since the last such line: {}",
            self.held(),
            parts.join("; ")
        );
        self.counts = Default::default();
        self.last_line = Some(Instant::now());
    }
}

/// The unauthenticated connections, watched on one thread.
struct Pool {
    limits: Limits,
    pending: Vec<Pending>,
    log: DropLog,
    /// Where openings are peeked into: the largest opening, allocated once.
    buf: Vec<u8>,
}

enum Look {
    Wait,
    Proven(Proven, usize),
    Drop(DropKind, String),
}

impl Pool {
    fn new(limits: Limits) -> Self {
        Pool {
            limits,
            pending: Vec::new(),
            log: DropLog::default(),
            buf: vec![0; MAX_OPENING],
        }
    }

    /// Greets a new connection and takes it in, closing the oldest of its address (else
    /// the oldest of all) if the pool is full.
    fn add(&mut self, conn: TcpStream) {
        let Ok(peer) = conn.peer_addr() else {
            return;
        };
        let greeting = match Greeting::random() {
            Ok(g) => g,
            Err(e) => {
                tracing::error!("greeting a connection: {e}");
                return;
            }
        };
        // A fresh connection's send buffer takes the greeting whole; anything else is a
        // connection already gone.
        let greeted = conn
            .set_nonblocking(true)
            .and_then(|()| (&conn).write(greeting.as_bytes()));
        if !matches!(greeted, Ok(n) if n == greeting.as_bytes().len()) {
            self.log.note(DropKind::Gone, peer, "could not be greeted");
            return;
        }
        let (mut same, mut oldest_same) = (0, None);
        for (i, p) in self.pending.iter().enumerate() {
            if p.peer.ip() == peer.ip() {
                same += 1;
                oldest_same.get_or_insert(i);
            }
        }
        let evict = if same >= self.limits.max_per_address {
            oldest_same
        } else if self.pending.len() >= self.limits.max_unauthenticated {
            Some(0)
        } else {
            None
        };
        if let Some(i) = evict {
            let old = self.pending.remove(i);
            drain(&old.conn, &mut self.buf);
            self.log.note(
                DropKind::Evicted,
                old.peer,
                "the pool of unauthenticated connections was full; the oldest makes room",
            );
        }
        self.pending.push(Pending {
            conn,
            peer,
            greeting,
            deadline: Instant::now() + self.limits.handshake_timeout,
            resting_until: None,
        });
    }

    fn run(&mut self, rx: &Receiver<TcpStream>, router: &Router, receive: &Receive) {
        loop {
            if self.pending.is_empty() {
                let conn = match self.log.due() {
                    Some(t) => match rx.recv_timeout(t.saturating_duration_since(Instant::now())) {
                        Ok(c) => Some(c),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => return,
                    },
                    None => match rx.recv() {
                        Ok(c) => Some(c),
                        Err(_) => return,
                    },
                };
                if let Some(c) = conn {
                    self.add(c);
                }
            }
            while let Ok(c) = rx.try_recv() {
                self.add(c);
            }
            self.log.flush();
            self.turn(router, receive);
        }
    }

    /// One poll over the pool: takes the openings that arrived, drops the expired.
    fn turn(&mut self, router: &Router, receive: &Receive) {
        let now = Instant::now();
        // Wake for the next deadline, the next rest's end, or new connections.
        let wake = self
            .pending
            .iter()
            .map(|p| p.resting_until.unwrap_or(p.deadline).min(p.deadline))
            .min()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
            .min(Duration::from_millis(20));
        let watched: Vec<usize> = (0..self.pending.len())
            .filter(|&i| self.pending[i].resting_until.is_none_or(|t| t <= now))
            .collect();
        let mut fds: Vec<PollFd<'_>> = watched
            .iter()
            .map(|&i| PollFd::new(self.pending[i].conn.as_fd(), PollFlags::POLLIN))
            .collect();
        let timeout = PollTimeout::try_from(wake).unwrap_or(PollTimeout::ZERO);
        if let Err(e) = poll(&mut fds, timeout)
            && e != nix::errno::Errno::EINTR
        {
            tracing::error!("polling new connections: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ready: Vec<usize> = watched
            .iter()
            .zip(&fds)
            .filter(|(_, f)| f.any().unwrap_or(false))
            .map(|(&i, _)| i)
            .collect();
        drop(fds);
        let now = Instant::now();
        let mut done = vec![false; self.pending.len()];
        for i in ready {
            match self.look(i) {
                Look::Wait => self.pending[i].resting_until = Some(now + REST),
                Look::Proven(proven, len) => {
                    done[i] = true;
                    let p = &self.pending[i];
                    match take(&p.conn, &mut self.buf[..len]) {
                        Ok(conn) => dispatch(proven, conn, p.peer, router, receive),
                        Err(e) => {
                            tracing::warn!(peer = %p.peer, "dropping a connection that proved the key: {e}")
                        }
                    }
                }
                Look::Drop(kind, why) => {
                    done[i] = true;
                    let p = &self.pending[i];
                    drain(&p.conn, &mut self.buf);
                    if kind == DropKind::WrongKey {
                        // Tell a source whose key differs (a small fixed write, best effort).
                        let _ = crate::protocol::send_key_mismatch(&mut &p.conn);
                    }
                    self.log.note(kind, p.peer, &why);
                }
            }
        }
        for (i, p) in self.pending.iter().enumerate() {
            if !done[i] && now >= p.deadline {
                done[i] = true;
                drain(&p.conn, &mut self.buf);
                self.log.note(
                    DropKind::Timeout,
                    p.peer,
                    &format!(
                        "it did not prove the key within {} ms",
                        self.limits.handshake_timeout.as_millis()
                    ),
                );
            }
        }
        let mut i = 0;
        self.pending.retain(|_| {
            i += 1;
            !done[i - 1]
        });
    }

    /// Peeks at what connection `i` has sent so far, and checks its MAC once it is whole.
    fn look(&mut self, i: usize) -> Look {
        let p = &self.pending[i];
        let mut want = 8;
        loop {
            let n = match p.conn.peek(&mut self.buf[..want]) {
                Ok(0) => return Look::Drop(DropKind::Gone, "closed before proving the key".into()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Look::Wait,
                Err(e) => {
                    return Look::Drop(DropKind::Gone, format!("reading its first bytes: {e}"));
                }
            };
            match opening(&self.buf[..n]) {
                Opening::Complete(_, len) => {
                    return match verify_opening(&self.limits.psk, &p.greeting, &self.buf[..len]) {
                        Ok(proven) => Look::Proven(proven, len),
                        Err(ProtocolError::WrongKey) => Look::Drop(
                            DropKind::WrongKey,
                            "its MAC does not verify: its pre-shared key differs from ours".into(),
                        ),
                        Err(e) => Look::Drop(DropKind::Refused, e.to_string()),
                    };
                }
                Opening::Refused(why) => return Look::Drop(DropKind::Refused, why),
                Opening::Incomplete(more) if more > n && n == want => want = more,
                Opening::Incomplete(_) => return Look::Wait,
            }
        }
    }
}

/// Reads what a connection about to be closed has sent (what fits in `buf`, without
/// waiting): closing a socket with unread data resets it, and the peer would lose what was
/// written to it (the greeting, or the Welcome saying its key differs) before reading it.
fn drain(conn: &TcpStream, buf: &mut [u8]) {
    let _ = (&*conn).read(buf);
}

/// Consumes the opening (`buf.len()` bytes, already peeked, so this does not wait) and
/// gives the connection back in blocking mode.
fn take(conn: &TcpStream, buf: &mut [u8]) -> std::io::Result<TcpStream> {
    (&*conn).read_exact(buf)?;
    let c = conn.try_clone()?;
    c.set_nonblocking(false)?;
    Ok(c)
}

fn dispatch(proven: Proven, conn: TcpStream, peer: SocketAddr, router: &Router, receive: &Receive) {
    match proven {
        Proven::Data(h) => {
            if !router.route(h, conn) {
                tracing::warn!(
                    %peer,
                    "dropping data stream {} of migration {:x}: no such migration is being received",
                    h.stream,
                    h.migration_id
                );
            }
        }
        Proven::Control(auth) => {
            let (conn, auth) = if auth.hello.resume > 0 {
                match router.route_resume(conn, auth) {
                    Ok(()) => return,
                    // Its receive thread refuses it, with the reason.
                    Err(back) => back,
                }
            } else {
                (conn, auth)
            };
            let receive = receive.clone();
            let spawned = std::thread::Builder::new()
                .name("sf-receive".into())
                .spawn(move || receive(conn, auth));
            if let Err(e) = spawned {
                tracing::warn!(%peer, "cannot start a thread for a migration: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair of sockets on loopback.
    fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// A connection to `l` from `from` (a loopback address), and its accepted end.
    fn pair_from(l: &TcpListener, from: [u8; 4]) -> (TcpStream, TcpStream) {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&std::net::SocketAddr::from((from, 0)).into())
            .unwrap();
        sock.connect(&l.local_addr().unwrap().into()).unwrap();
        let (b, _) = l.accept().unwrap();
        (sock.into(), b)
    }

    #[test]
    fn a_full_pool_closes_the_oldest_of_the_address_then_the_oldest_of_all() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut pool = Pool::new(Limits {
            psk: PreSharedKey::from_bytes([1; 32]),
            handshake_timeout: Duration::from_secs(60),
            max_unauthenticated: 3,
            max_per_address: 2,
        });
        let mut peers = Vec::new();
        for from in [[127, 0, 0, 1], [127, 0, 0, 1], [127, 0, 0, 2]] {
            let (a, b) = pair_from(&l, from);
            pool.add(b);
            peers.push(a);
        }
        let ports = |pool: &Pool| {
            pool.pending
                .iter()
                .map(|p| p.peer.port())
                .collect::<Vec<_>>()
        };
        let port = |i: usize, peers: &[TcpStream]| peers[i].local_addr().unwrap().port();
        // A third from 127.0.0.1: that address's oldest goes.
        let (a, b) = pair_from(&l, [127, 0, 0, 1]);
        pool.add(b);
        peers.push(a);
        assert_eq!(
            ports(&pool),
            [port(1, &peers), port(2, &peers), port(3, &peers)]
        );
        // A second from 127.0.0.2: its address has room, the pool has not; the oldest goes.
        let (a, b) = pair_from(&l, [127, 0, 0, 2]);
        pool.add(b);
        peers.push(a);
        assert_eq!(
            ports(&pool),
            [port(2, &peers), port(3, &peers), port(4, &peers)]
        );
        // The evicted were greeted, then closed; the others only greeted.
        for (i, p) in peers.iter_mut().enumerate() {
            let mut greeting = [0u8; crate::protocol::handshake::GREETING_LEN];
            p.read_exact(&mut greeting).unwrap();
            assert!(Greeting::parse(&greeting).is_ok());
            p.set_nonblocking(true).unwrap();
            let more = p.read(&mut [0u8; 1]);
            if i < 2 {
                assert!(matches!(more, Ok(0)), "{i}: {more:?}");
            } else {
                assert!(
                    matches!(&more, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
                    "{i}: {more:?}"
                );
            }
        }
    }

    #[test]
    fn a_migration_id_is_received_once_at_a_time() {
        let router = Arc::new(Router::default());
        let mut first = RoutedStreams::new(router.clone());
        first.expect(7).unwrap();
        let mut again = RoutedStreams::new(router.clone());
        let e = again.expect(7).unwrap_err();
        assert!(e.contains("already being received"), "{e}");
        drop(first);
        RoutedStreams::new(router).expect(7).unwrap();
    }

    #[test]
    fn streams_arriving_out_of_order_are_handed_out_in_order() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let router = Arc::new(Router::default());
        let mut streams = RoutedStreams::new(router.clone());
        streams.expect(9).unwrap();
        let (_control_peer, control) = pair(&l);
        let (two_peer, two) = pair(&l);
        let (one_peer, one) = pair(&l);
        for (n, s) in [(2, two), (1, one)] {
            assert!(router.route(
                StreamHello {
                    migration_id: 9,
                    stream: n
                },
                s
            ));
        }
        let got = |streams: &mut RoutedStreams, want| {
            streams
                .next(&control, Duration::from_secs(2), 9, want)
                .unwrap()
                .peer_addr()
                .unwrap()
        };
        assert_eq!(got(&mut streams, 1), one_peer.local_addr().unwrap());
        assert_eq!(got(&mut streams, 2), two_peer.local_addr().unwrap());
        // Nobody expects migration 10.
        let (_p, s) = pair(&l);
        assert!(!router.route(
            StreamHello {
                migration_id: 10,
                stream: 1
            },
            s
        ));
    }

    /// A reconnection's Hello for migration `id`, proven as the acceptor proves it.
    fn resume_hello(id: u64) -> Box<AuthHello> {
        let psk = crate::crypto::PreSharedKey::from_bytes([5; 32]);
        let g = Greeting::with_challenge([1; 32]);
        let hello = crate::protocol::Hello {
            migration_id: id,
            source_nonce: [4; 32],
            guest_pages: 1 << 10,
            streams: 1,
            codec: crate::codec::CodecConfig::default(),
            frame_size: 65536,
            backend: "synthetic".into(),
            guest: "g".into(),
            destination: None,
            resume: 1,
        };
        let bytes = crate::protocol::handshake::hello_opening(&psk, &g, &hello).unwrap();
        match verify_opening(&psk, &g, &bytes).unwrap() {
            Proven::Control(auth) => auth,
            Proven::Data(_) => unreachable!("a Hello"),
        }
    }

    #[test]
    fn a_newer_reconnection_replaces_the_one_whose_streams_open() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let router = Arc::new(Router::default());
        let mut streams = RoutedStreams::new(router.clone());
        streams.expect(4).unwrap();
        let never = AtomicBool::new(false);
        let (_older_peer, older) = pair(&l);
        assert!(router.route_resume(older, resume_hello(4)).is_ok());
        let (taken, _) = streams.resumed(4, Duration::from_secs(60), &never).unwrap();
        // Its streams are awaited when the source gives it up and reconnects again.
        let (newer_peer, newer) = pair(&l);
        assert!(router.route_resume(newer, resume_hello(4)).is_ok());
        let e = streams
            .next(&taken, Duration::from_secs(60), 4, 1)
            .unwrap_err();
        assert!(e.to_string().contains("reconnected again"), "{e}");
        let (next, _) = streams.resumed(4, Duration::from_secs(60), &never).unwrap();
        assert_eq!(next.peer_addr().unwrap(), newer_peer.local_addr().unwrap());
    }

    #[test]
    fn a_source_that_hangs_up_ends_the_wait() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut streams = RoutedStreams::new(Arc::new(Router::default()));
        streams.expect(3).unwrap();
        let (peer, control) = pair(&l);
        drop(peer);
        let e = streams
            .next(&control, Duration::from_secs(5), 3, 1)
            .unwrap_err();
        assert!(e.to_string().contains("hung up"), "{e}");
    }
}

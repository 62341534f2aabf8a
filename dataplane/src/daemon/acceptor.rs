//! The migration port: one listener for every incoming migration, received at the same time.
//!
//! One thread watches every new connection (poll(2)) until its whole opening message has
//! arrived, within [`CLASSIFY_TIMEOUT`]: a control connection's Hello starts a migration on
//! a thread of its own; a data stream's StreamHello sends it to the migration it names,
//! through the [`Router`], and so does a source reconnecting to resume a migration whose
//! link broke (a Hello with `resume` set). Anything else, an oversized Hello, or a peer that
//! sends too little
//! too slowly, is dropped with a warning and never holds up the others: an idle connection
//! costs a descriptor, not a thread, and at most [`MAX_PENDING`] wait at once.

use std::collections::{BTreeMap, HashMap};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::migrate::MigrateError;
use crate::migrate::dest::{DataStreams, source_still_opening};
use crate::protocol::{ConnectionKind, Opening, StreamHello, accept_stream, opening};

/// How long a new connection has to say what it is (and a data stream to say whose).
pub const CLASSIFY_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections waiting to say what they are; beyond, the oldest is closed.
pub const MAX_PENDING: usize = 1024;

/// A connection on its way to the migration it belongs to.
#[derive(Debug)]
enum Routed {
    /// Data stream n.
    Data(u32, TcpStream),
    /// The source reconnecting (its Hello unread).
    Resume(TcpStream),
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

    /// Hands a reconnection to migration `id`; false if it is not being received here.
    fn route_resume(&self, id: u64, control: TcpStream) -> bool {
        self.send(id, Routed::Resume(control))
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
    newer: Option<TcpStream>,
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
                Ok(Routed::Resume(_)) if !self.resuming => {
                    tracing::warn!(
                        "migration {id:x}: dropping a reconnection while its streams open"
                    );
                }
                Ok(Routed::Resume(c)) => {
                    // The source gave up on the session being opened (it timed out on a
                    // loaded host, say) and reconnected again: take the newer one.
                    self.newer = Some(c);
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

    fn resumed(&mut self, id: u64, window: Duration, abort: &AtomicBool) -> Option<TcpStream> {
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
                Ok(Routed::Resume(c)) => return Some(c),
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

/// A connection that has not yet said all of its opening message.
struct Pending {
    conn: TcpStream,
    peer: String,
    deadline: Instant,
    /// Had part of its opening: not polled (its data keeps it readable) until then.
    resting_until: Option<Instant>,
}

/// Accepts connections on `listener` forever. A control connection is handed to
/// `receive` (on its own thread) once its whole Hello has arrived; a data stream goes to the
/// migration it names.
pub fn serve(
    listener: &TcpListener,
    router: &Arc<Router>,
    receive: &Arc<dyn Fn(TcpStream) + Send + Sync>,
) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (router, receive) = (router.clone(), receive.clone());
    std::thread::Builder::new()
        .name("sf-classify".into())
        .spawn(move || classify(&rx, &router, &receive))
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

/// Watches new connections until each has sent its opening message (or its time is up),
/// all on this one thread: idle or slow connections cost a descriptor each, nothing more.
fn classify(
    rx: &Receiver<TcpStream>,
    router: &Router,
    receive: &Arc<dyn Fn(TcpStream) + Send + Sync>,
) {
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        let add = |pending: &mut Vec<Pending>, conn: TcpStream| {
            let peer = conn
                .peer_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            if pending.len() >= MAX_PENDING {
                let old = pending.remove(0);
                tracing::warn!(peer = %old.peer, "{MAX_PENDING} connections are waiting to say what they are; closing the oldest");
            }
            pending.push(Pending {
                conn,
                peer,
                deadline: Instant::now() + CLASSIFY_TIMEOUT,
                resting_until: None,
            });
        };
        if pending.is_empty() {
            match rx.recv() {
                Ok(c) => add(&mut pending, c),
                Err(_) => return,
            }
        }
        while let Ok(c) = rx.try_recv() {
            add(&mut pending, c);
        }
        let now = Instant::now();
        // Wake for the next deadline, the next rest's end, or new connections.
        let wake = pending
            .iter()
            .map(|p| p.resting_until.unwrap_or(p.deadline).min(p.deadline))
            .min()
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
            .min(Duration::from_millis(20));
        let watched: Vec<usize> = (0..pending.len())
            .filter(|&i| pending[i].resting_until.is_none_or(|t| t <= now))
            .collect();
        let mut fds: Vec<PollFd<'_>> = watched
            .iter()
            .map(|&i| PollFd::new(pending[i].conn.as_fd(), PollFlags::POLLIN))
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
        let mut done = vec![false; pending.len()];
        for i in ready {
            let p = &mut pending[i];
            match look(&p.conn) {
                Look::Wait => p.resting_until = Some(now + REST),
                Look::Kind(kind) => {
                    done[i] = true;
                    dispatch(kind, &pending[i], router, receive);
                }
                Look::Resume(id) => {
                    done[i] = true;
                    let routed = p.conn.try_clone().is_ok_and(|c| router.route_resume(id, c));
                    if !routed {
                        // Its receive thread refuses it, with the reason.
                        dispatch(ConnectionKind::Control, &pending[i], router, receive);
                    }
                }
                Look::Drop(why) => {
                    done[i] = true;
                    tracing::warn!(peer = %p.peer, "dropping a connection: {why}");
                }
            }
        }
        for (i, p) in pending.iter().enumerate() {
            if !done[i] && now >= p.deadline {
                done[i] = true;
                tracing::warn!(
                    peer = %p.peer,
                    "dropping a connection that did not say what it is within {} s",
                    CLASSIFY_TIMEOUT.as_secs()
                );
            }
        }
        let mut i = 0;
        pending.retain(|_| {
            i += 1;
            !done[i - 1]
        });
    }
}

enum Look {
    Wait,
    Kind(ConnectionKind),
    /// A source reconnecting to migration `id`.
    Resume(u64),
    Drop(String),
}

/// Peeks at what `conn` has sent so far.
fn look(conn: &TcpStream) -> Look {
    let mut want = 8;
    loop {
        let mut buf = vec![0u8; want];
        let n = match conn
            .set_nonblocking(true)
            .and_then(|()| conn.peek(&mut buf))
        {
            Ok(0) => return Look::Drop("closed before saying what it is".into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Look::Wait,
            Err(e) => return Look::Drop(format!("reading its first bytes: {e}")),
        };
        match opening(&buf[..n]) {
            Opening::Complete(kind) => {
                if let Err(e) = conn.set_nonblocking(false) {
                    return Look::Drop(e.to_string());
                }
                // The whole Hello is in `buf`: a reconnection goes to its migration.
                return match crate::protocol::read_hello(&mut &buf[..n]) {
                    Ok(h) if kind == ConnectionKind::Control && h.resume > 0 => {
                        Look::Resume(h.migration_id)
                    }
                    _ => Look::Kind(kind),
                };
            }
            Opening::Refused(why) => return Look::Drop(why),
            Opening::Incomplete(more) if more > n && n == want => want = more,
            Opening::Incomplete(_) => return Look::Wait,
        }
    }
}

fn dispatch(
    kind: ConnectionKind,
    p: &Pending,
    router: &Router,
    receive: &Arc<dyn Fn(TcpStream) + Send + Sync>,
) {
    let conn = match p.conn.try_clone() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %p.peer, "dropping a connection: {e}");
            return;
        }
    };
    match kind {
        ConnectionKind::Data => data_stream(conn, router, &p.peer),
        ConnectionKind::Control => {
            let receive = receive.clone();
            let spawned = std::thread::Builder::new()
                .name("sf-receive".into())
                .spawn(move || receive(conn));
            if let Err(e) = spawned {
                tracing::warn!(peer = %p.peer, "cannot start a thread for a migration: {e}");
            }
        }
    }
}

/// Its whole StreamHello has arrived: reading it does not wait.
fn data_stream(mut conn: TcpStream, router: &Router, peer: &str) {
    match accept_stream(&mut conn) {
        Ok(h) if router.route(h, conn) => {}
        Ok(h) => tracing::warn!(
            %peer,
            "dropping data stream {} of migration {:x}: no such migration is being received",
            h.stream,
            h.migration_id
        ),
        Err(e) => tracing::warn!(%peer, "dropping a data connection: {e}"),
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

    #[test]
    fn a_newer_reconnection_replaces_the_one_whose_streams_open() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let router = Arc::new(Router::default());
        let mut streams = RoutedStreams::new(router.clone());
        streams.expect(4).unwrap();
        let never = AtomicBool::new(false);
        let (_older_peer, older) = pair(&l);
        assert!(router.route_resume(4, older));
        let taken = streams.resumed(4, Duration::from_secs(60), &never).unwrap();
        // Its streams are awaited when the source gives it up and reconnects again.
        let (newer_peer, newer) = pair(&l);
        assert!(router.route_resume(4, newer));
        let e = streams
            .next(&taken, Duration::from_secs(60), 4, 1)
            .unwrap_err();
        assert!(e.to_string().contains("reconnected again"), "{e}");
        let next = streams.resumed(4, Duration::from_secs(60), &never).unwrap();
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

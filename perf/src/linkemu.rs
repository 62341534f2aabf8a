//! A WAN link emulator: a user-space TCP relay with a rate and a one-way delay.
//!
//! This kernel has `tbf` shaping but no `netem`, so delay cannot come from `tc`. The relay
//! listens on a local port, connects each client it accepts to the upstream address, and
//! carries bytes both ways through a model of one link:
//!
//! - **Rate.** Each direction is one transmitter shared by every connection (one link, not a
//!   link per connection). A chunk of `len` bytes read at `now` starts when the transmitter is
//!   free, `start = max(now, free_at)`, and leaves at `start + len / rate`
//!   ([`Transmitter`]).
//! - **Delay.** The chunk is written to the other side `delay` after it left.
//! - **Buffer.** When the transmitter's backlog (`free_at - now`) exceeds the buffer time,
//!   readers stop reading, so the sender's TCP sees a full window (backpressure) and memory
//!   stays bounded: the link holds at most `rate x (buffer + delay)` bytes plus one chunk per
//!   connection, about one bandwidth-delay product plus a margin with the default buffer.
//!   Each connection's queue is bounded too, so a receiver that stops reading stalls only its
//!   own connection.
//! - **Ends.** EOF is carried as a half-close (`shutdown(Write)`) after the data before it; a
//!   read error closes the other side both ways; a write error closes both sockets of the
//!   connection.
//!
//! Four threads per connection (a reader and a writer per direction) and one accept thread;
//! std only. The relay's own sockets have small buffers, so it adds little queueing beyond
//! the modelled buffer.
//!
//! What it does not model, by construction: the sender's TCP talks to the relay over
//! loopback, so its congestion control sees a loopback RTT (acks come at once), never the
//! emulated one; there is no loss, no slow start over the emulated path, and the TCP
//! handshake takes no emulated round trip. It behaves like a perfectly tuned WAN path (or a
//! split-TCP WAN optimizer) of the given rate and delay. `skyferry-bench wan` measures its
//! accuracy before every run ([`crate::calibrate`]).

pub mod cli;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dataplane::transport::{Congestion, SocketOptions};

/// Socket buffer of the relay's own sockets: small, so queueing happens in the model and
/// not in kernel buffers (the kernel doubles it).
const RELAY_SOCKET_BUFFER: usize = 64 << 10;
/// Smallest and largest chunk read at once. A chunk is delivered whole, so at low rates a
/// smaller chunk keeps the delivery smooth; about 1 ms of the link's time between the two.
const MIN_CHUNK: usize = 4 << 10;
const MAX_CHUNK: usize = 64 << 10;
/// Longest a blocked reader sleeps before it checks again whether its connection ended.
const POLL: Duration = Duration::from_millis(10);

/// The link's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkConfig {
    /// Rate in bits per second, in each direction.
    pub rate_bits: u64,
    /// One-way delay, in each direction (the round trip is twice this).
    pub delay: Duration,
    /// Most queueing delay the link buffers before readers stop reading.
    pub buffer: Duration,
}

impl LinkConfig {
    /// A link of `rate_bits` bits/s and `rtt` round-trip time, with the default buffer: one
    /// one-way delay of queueing (at least 5 ms), so the link holds about one
    /// bandwidth-delay product.
    pub fn new(rate_bits: u64, rtt: Duration) -> Self {
        let delay = rtt / 2;
        LinkConfig {
            rate_bits,
            delay,
            buffer: delay.max(Duration::from_millis(5)),
        }
    }

    /// Bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.rate_bits.max(1) as f64 / 8.0
    }

    /// Bytes read at once: about 1 ms of the link's time.
    pub fn chunk(&self) -> usize {
        let ms = self.bytes_per_sec() / 1000.0;
        if ms >= MAX_CHUNK as f64 {
            MAX_CHUNK
        } else {
            // Below MAX_CHUNK, so the cast cannot truncate.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let c = ms as usize;
            c.max(MIN_CHUNK)
        }
    }

    /// Most bytes one connection's queue holds in one direction: what the link can hold
    /// (backlog plus propagation) and two chunks.
    pub fn queue_cap(&self) -> usize {
        let held = self.bytes_per_sec() * (self.buffer + self.delay).as_secs_f64();
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let held = held.min(1e12) as usize;
        held + 2 * self.chunk()
    }
}

/// One direction's transmitter: when each chunk's last bit leaves. Sans-IO: time is passed
/// in, so the schedule is tested without clocks.
#[derive(Debug, Clone)]
pub struct Transmitter {
    bytes_per_sec: f64,
    buffer: Duration,
    free_at: Option<Instant>,
}

impl Transmitter {
    /// A transmitter at `bytes_per_sec` that buffers up to `buffer` of backlog.
    pub fn new(bytes_per_sec: f64, buffer: Duration) -> Self {
        Transmitter {
            bytes_per_sec: bytes_per_sec.max(1.0),
            buffer,
            free_at: None,
        }
    }

    /// Time until the transmitter has sent everything queued.
    pub fn backlog(&self, now: Instant) -> Duration {
        self.free_at
            .map_or(Duration::ZERO, |f| f.saturating_duration_since(now))
    }

    /// How long a reader must wait before it may queue more (zero: now).
    pub fn wait(&self, now: Instant) -> Duration {
        self.backlog(now).saturating_sub(self.buffer)
    }

    /// Queues `len` bytes at `now`; returns when their last bit leaves.
    pub fn transmit(&mut self, len: usize, now: Instant) -> Instant {
        let start = self.free_at.map_or(now, |f| f.max(now));
        let done = start + Duration::from_secs_f64(len as f64 / self.bytes_per_sec);
        self.free_at = Some(done);
        done
    }
}

/// Bytes delivered so far, per direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkStats {
    /// Client to upstream.
    pub forward_bytes: u64,
    /// Upstream to client.
    pub reverse_bytes: u64,
    /// Connections accepted.
    pub connections: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The relay's threads never panic while holding a lock; if one did, the data is still
    // consistent enough to shut down.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One direction of the link, shared by every connection.
#[derive(Debug)]
struct Direction {
    tx: Mutex<Transmitter>,
    delivered: AtomicU64,
}

/// What travels through a connection's queue.
#[derive(Debug)]
enum Item {
    Data(Vec<u8>),
    /// The sender half-closed: half-close the receiver.
    Eof,
    /// Reading failed: close the receiver both ways.
    Reset,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<(Instant, Item)>,
    bytes: usize,
    /// Due time of the last item (items leave in order).
    last_due: Option<Instant>,
    /// The writer stopped (its socket failed): readers stop too.
    writer_gone: bool,
}

/// One direction of one connection: chunks waiting for their delivery time.
#[derive(Debug)]
struct Queue {
    state: Mutex<QueueState>,
    cv: Condvar,
    cap: usize,
}

impl Queue {
    fn new(cap: usize) -> Self {
        Queue {
            state: Mutex::new(QueueState::default()),
            cv: Condvar::new(),
            cap,
        }
    }

    /// Waits until the queue has room; false if the writer is gone.
    fn wait_room(&self) -> bool {
        let mut s = lock(&self.state);
        while s.bytes >= self.cap && !s.writer_gone {
            s = self
                .cv
                .wait_timeout(s, POLL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        !s.writer_gone
    }

    fn writer_gone(&self) -> bool {
        lock(&self.state).writer_gone
    }

    fn push(&self, due: Instant, item: Item) {
        let mut s = lock(&self.state);
        // In order: never due before what is already queued.
        let due = s.last_due.map_or(due, |l| l.max(due));
        s.last_due = Some(due);
        if let Item::Data(d) = &item {
            s.bytes += d.len();
        }
        s.items.push_back((due, item));
        drop(s);
        self.cv.notify_all();
    }

    /// The next item once it is due.
    fn pop_due(&self) -> Item {
        let mut s = lock(&self.state);
        loop {
            match s.items.front() {
                None => {
                    s = self.cv.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
                Some(&(due, _)) => {
                    let now = Instant::now();
                    if due <= now {
                        let (_, item) = s.items.pop_front().expect("front exists");
                        if let Item::Data(d) = &item {
                            s.bytes -= d.len();
                        }
                        drop(s);
                        self.cv.notify_all();
                        return item;
                    }
                    // Only this writer pops, so the head stays; sleep without the lock.
                    drop(s);
                    thread::sleep(due - now);
                    s = lock(&self.state);
                }
            }
        }
    }

    fn set_writer_gone(&self) {
        lock(&self.state).writer_gone = true;
        self.cv.notify_all();
    }
}

/// Reads `from`, puts chunks on the link, queues them for the writer.
fn pump_in(from: TcpStream, dir: &Direction, queue: &Queue, config: LinkConfig) {
    let mut from = from;
    let mut buf = vec![0u8; config.chunk()];
    loop {
        // The link's buffer is full: wait (the sender's TCP window closes meanwhile).
        loop {
            let wait = lock(&dir.tx).wait(Instant::now());
            if wait.is_zero() {
                break;
            }
            if queue.writer_gone() {
                return;
            }
            thread::sleep(wait.min(POLL));
        }
        if !queue.wait_room() {
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                queue.push(Instant::now() + config.delay, Item::Eof);
                return;
            }
            Ok(n) => {
                let left = lock(&dir.tx).transmit(n, Instant::now());
                queue.push(left + config.delay, Item::Data(buf[..n].to_vec()));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                queue.push(Instant::now() + config.delay, Item::Reset);
                return;
            }
        }
    }
}

/// Writes due chunks to `to`; `from` is the socket the data came from (closed if `to` fails).
fn pump_out(to: TcpStream, from: TcpStream, dir: &Direction, queue: &Queue) {
    let mut to = to;
    loop {
        match queue.pop_due() {
            Item::Data(d) => {
                if to.write_all(&d).is_err() {
                    queue.set_writer_gone();
                    let _ = to.shutdown(Shutdown::Both);
                    let _ = from.shutdown(Shutdown::Both);
                    return;
                }
                dir.delivered.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
            Item::Eof => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Item::Reset => {
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: LinkConfig,
    upstream: SocketAddr,
    forward: Direction,
    reverse: Direction,
    connections: AtomicU64,
    stop: AtomicBool,
    /// Live connections, to close them all on drop.
    conns: Mutex<Vec<Conn>>,
}

/// One relayed connection: its two sockets (to close on drop) and its four pumps.
#[derive(Debug)]
struct Conn {
    sockets: [TcpStream; 2],
    threads: Vec<JoinHandle<()>>,
}

impl Conn {
    fn finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    fn close_and_join(self) {
        for s in &self.sockets {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A running link emulator. Dropping it closes every connection and joins its threads.
#[derive(Debug)]
pub struct LinkEmu {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

fn relay_socket_options() -> SocketOptions {
    SocketOptions {
        send_buffer: RELAY_SOCKET_BUFFER,
        recv_buffer: RELAY_SOCKET_BUFFER,
        nodelay: true,
        // Both legs are loopback; Linux's default is always there.
        congestion: Congestion::Cubic,
    }
}

impl LinkEmu {
    /// Starts a relay on an ephemeral loopback port that forwards to `upstream`.
    pub fn start(upstream: SocketAddr, config: LinkConfig) -> io::Result<LinkEmu> {
        Self::bind(
            "127.0.0.1:0".parse().expect("literal address"),
            upstream,
            config,
        )
    }

    /// Starts a relay listening on `listen` that forwards to `upstream`.
    pub fn bind(
        listen: SocketAddr,
        upstream: SocketAddr,
        config: LinkConfig,
    ) -> io::Result<LinkEmu> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let dir = |buffer| Direction {
            tx: Mutex::new(Transmitter::new(config.bytes_per_sec(), buffer)),
            delivered: AtomicU64::new(0),
        };
        let shared = Arc::new(Shared {
            config,
            upstream,
            forward: dir(config.buffer),
            reverse: dir(config.buffer),
            connections: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let accept = {
            let shared = shared.clone();
            thread::Builder::new()
                .name("linkemu-accept".into())
                .spawn(move || accept_loop(&listener, &shared))?
        };
        Ok(LinkEmu {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Bytes delivered so far.
    pub fn stats(&self) -> LinkStats {
        LinkStats {
            forward_bytes: self.shared.forward.delivered.load(Ordering::Relaxed),
            reverse_bytes: self.shared.reverse.delivered.load(Ordering::Relaxed),
            connections: self.shared.connections.load(Ordering::Relaxed),
        }
    }
}

impl Drop for LinkEmu {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop with a connection of our own, which it drops.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let conns = std::mem::take(&mut *lock(&self.shared.conns));
        for c in conns {
            c.close_and_join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    for (n, client) in listener.incoming().enumerate() {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        let Ok(client) = client else { continue };
        // Connections that ended give back their threads and sockets (a standalone relay
        // runs for long).
        {
            let mut conns = lock(&shared.conns);
            let (done, live): (Vec<Conn>, Vec<Conn>) = std::mem::take(&mut *conns)
                .into_iter()
                .partition(Conn::finished);
            *conns = live;
            drop(conns);
            done.into_iter().for_each(Conn::close_and_join);
        }
        match connect(n, client, shared) {
            Ok(c) => lock(&shared.conns).push(c),
            // The client sees its connection closed; the relay goes on.
            Err(e) => eprintln!("linkemu: connection {n} not relayed: {e}"),
        }
    }
}

/// Connects an accepted client upstream and starts its four pumps.
fn connect(n: usize, client: TcpStream, shared: &Arc<Shared>) -> io::Result<Conn> {
    let server = TcpStream::connect(shared.upstream)?;
    let opts = relay_socket_options();
    opts.apply(&client)?;
    opts.apply(&server)?;
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let config = shared.config;
    let fwd = Arc::new(Queue::new(config.queue_cap()));
    let rev = Arc::new(Queue::new(config.queue_cap()));
    let mut conn = Conn {
        sockets: [client.try_clone()?, server.try_clone()?],
        threads: Vec::with_capacity(4),
    };
    let mut spawn = |name: String, f: Box<dyn FnOnce() + Send>| -> io::Result<()> {
        conn.threads
            .push(thread::Builder::new().name(name).spawn(f)?);
        Ok(())
    };
    let (c1, c2, c3) = (client.try_clone()?, client.try_clone()?, client);
    let (s1, s2, s3) = (server.try_clone()?, server.try_clone()?, server);
    let (sh, q) = (shared.clone(), fwd.clone());
    spawn(
        format!("linkemu-{n}-fwd-in"),
        Box::new(move || pump_in(c1, &sh.forward, &q, sh.config)),
    )?;
    let (sh, q) = (shared.clone(), fwd);
    spawn(
        format!("linkemu-{n}-fwd-out"),
        Box::new(move || pump_out(s1, c2, &sh.forward, &q)),
    )?;
    let (sh, q) = (shared.clone(), rev.clone());
    spawn(
        format!("linkemu-{n}-rev-in"),
        Box::new(move || pump_in(s2, &sh.reverse, &q, sh.config)),
    )?;
    let (sh, q) = (shared.clone(), rev);
    spawn(
        format!("linkemu-{n}-rev-out"),
        Box::new(move || pump_out(c3, s3, &sh.reverse, &q)),
    )?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitter_serialises_back_to_back() {
        let t0 = Instant::now();
        // 1 MB/s: 1000 bytes take 1 ms.
        let mut tx = Transmitter::new(1e6, Duration::from_millis(5));
        assert_eq!(tx.transmit(1000, t0), t0 + Duration::from_millis(1));
        // Queued behind the first.
        assert_eq!(tx.transmit(1000, t0), t0 + Duration::from_millis(2));
        // An idle link starts at once.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(tx.transmit(500, later), later + Duration::from_micros(500));
    }

    #[test]
    fn transmitter_holds_readers_beyond_its_buffer() {
        let t0 = Instant::now();
        let mut tx = Transmitter::new(1e6, Duration::from_millis(5));
        assert_eq!(tx.wait(t0), Duration::ZERO);
        tx.transmit(8000, t0); // 8 ms of backlog
        assert_eq!(tx.backlog(t0), Duration::from_millis(8));
        assert_eq!(tx.wait(t0), Duration::from_millis(3));
        assert_eq!(tx.wait(t0 + Duration::from_millis(3)), Duration::ZERO);
    }

    #[test]
    fn config_derives_chunk_and_cap() {
        let c = LinkConfig::new(100_000_000, Duration::from_millis(20));
        assert_eq!(c.delay, Duration::from_millis(10));
        assert_eq!(c.buffer, Duration::from_millis(10));
        assert_eq!(c.chunk(), 12_500);
        // 12.5 MB/s x 20 ms, plus two chunks.
        assert_eq!(c.queue_cap(), 250_000 + 25_000);
        assert_eq!(
            LinkConfig::new(10_000_000_000, Duration::ZERO).chunk(),
            MAX_CHUNK
        );
        assert_eq!(
            LinkConfig::new(1_000_000, Duration::ZERO).chunk(),
            MIN_CHUNK
        );
    }

    /// An echo server for `conns` connections: echoes until EOF, then half-closes.
    fn echo_server(conns: usize) -> (SocketAddr, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let h = thread::spawn(move || {
            let mut hs = Vec::new();
            for _ in 0..conns {
                let (mut s, _) = l.accept().unwrap();
                hs.push(thread::spawn(move || {
                    let mut r = s.try_clone().unwrap();
                    io::copy(&mut r, &mut s).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                }));
            }
            for h in hs {
                h.join().unwrap();
            }
        });
        (addr, h)
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed;
        (0..len)
            .map(|_| {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                (x >> 56) as u8
            })
            .collect()
    }

    #[test]
    fn concurrent_connections_arrive_intact_in_order_with_eof() {
        const CONNS: usize = 3;
        const LEN: usize = 1 << 20;
        let (addr, server) = echo_server(CONNS);
        let emu = LinkEmu::start(
            addr,
            LinkConfig::new(2_000_000_000, Duration::from_millis(2)),
        )
        .unwrap();
        let clients: Vec<_> = (0..CONNS)
            .map(|i| {
                let to = emu.local_addr();
                thread::spawn(move || {
                    let data = pattern(i as u64 + 1, LEN);
                    let mut s = TcpStream::connect(to).unwrap();
                    let mut w = s.try_clone().unwrap();
                    let sent = data.clone();
                    // Write on another thread: the echo comes back while we send.
                    let writer = thread::spawn(move || {
                        w.write_all(&sent).unwrap();
                        w.shutdown(Shutdown::Write).unwrap();
                    });
                    let mut back = Vec::new();
                    // read_to_end returns only at EOF: the half-close came through.
                    s.read_to_end(&mut back).unwrap();
                    writer.join().unwrap();
                    assert!(back == data, "connection {i}: echo differs");
                })
            })
            .collect();
        for c in clients {
            c.join().unwrap();
        }
        server.join().unwrap();
        let st = emu.stats();
        assert_eq!(st.connections, CONNS as u64);
        assert_eq!(st.forward_bytes, (CONNS * LEN) as u64);
        assert_eq!(st.reverse_bytes, (CONNS * LEN) as u64);
    }

    #[test]
    fn half_close_lets_the_other_side_answer() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap(); // until the client's half-close
            s.write_all(format!("got {}", got.len()).as_bytes())
                .unwrap();
        });
        let emu =
            LinkEmu::start(addr, LinkConfig::new(50_000_000, Duration::from_millis(4))).unwrap();
        let mut c = TcpStream::connect(emu.local_addr()).unwrap();
        c.write_all(&[7u8; 10_000]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "got 10000");
        server.join().unwrap();
    }

    #[test]
    fn nothing_arrives_before_the_delay() {
        // A lower bound only: the relay never delivers early, whatever the machine's load.
        let (addr, server) = echo_server(1);
        let delay = Duration::from_millis(25);
        let emu = LinkEmu::start(addr, LinkConfig::new(100_000_000, delay * 2)).unwrap();
        let mut c = TcpStream::connect(emu.local_addr()).unwrap();
        c.set_nodelay(true).unwrap();
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).unwrap();
        let rtt = t.elapsed();
        assert_eq!(&b, b"ping");
        assert!(
            rtt >= delay * 2,
            "round trip {rtt:?} shorter than 2 x {delay:?}"
        );
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn closed_upstream_closes_the_client() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            drop(s);
        });
        let emu =
            LinkEmu::start(addr, LinkConfig::new(100_000_000, Duration::from_millis(2))).unwrap();
        let mut c = TcpStream::connect(emu.local_addr()).unwrap();
        server.join().unwrap();
        // Generous bound, only so that a bug fails instead of hanging.
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 16];
        let n = c.read(&mut b).unwrap_or(0);
        assert_eq!(n, 0, "the upstream's close must reach the client");
    }

    #[test]
    fn drop_closes_live_connections() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (accepted_tx, accepted) = std::sync::mpsc::channel();
        // The upstream holds its socket open until the relay closes it.
        let server = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accepted_tx.send(()).unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap_or(0);
        });
        let emu =
            LinkEmu::start(addr, LinkConfig::new(100_000_000, Duration::from_millis(2))).unwrap();
        let mut c = TcpStream::connect(emu.local_addr()).unwrap();
        c.write_all(b"hello").unwrap();
        // Only a relayed connection is a live one.
        accepted.recv().unwrap();
        drop(emu); // joins every relay thread
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut b = [0u8; 16];
        assert_eq!(c.read(&mut b).unwrap_or(0), 0);
        server.join().unwrap();
    }

    #[test]
    fn a_receiver_that_stops_reading_stops_the_sender() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        // The upstream accepts and never reads.
        let server = thread::spawn(move || {
            let (_s, _) = l.accept().unwrap();
            done.recv().unwrap();
        });
        let config = LinkConfig::new(1_000_000_000, Duration::from_millis(2));
        let emu = LinkEmu::start(addr, config).unwrap();
        let mut c = TcpStream::connect(emu.local_addr()).unwrap();
        c.set_nonblocking(true).unwrap();
        // Write until the writes stop being taken. An unbounded relay would take it all.
        const LIMIT: usize = 256 << 20;
        let block = vec![1u8; 64 << 10];
        let (mut taken, mut idle) = (0usize, 0);
        while taken < LIMIT && idle < 20 {
            match c.write(&block) {
                Ok(n) => {
                    taken += n;
                    idle = 0;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    idle += 1;
                    thread::sleep(Duration::from_millis(25));
                }
                Err(e) => panic!("write: {e}"),
            }
        }
        // Kernel buffers on three sockets, the relay's queue and chunk: a few MiB at most.
        assert!(
            taken < 64 << 20,
            "relay took {taken} bytes without delivering them"
        );
        drop(c);
        done_tx.send(()).unwrap();
        drop(emu);
        server.join().unwrap();
    }
}

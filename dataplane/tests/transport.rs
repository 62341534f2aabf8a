//! io_uring transport over real loopback TCP: frames arrive whole, in order per stream, and a
//! broken peer is reported as such.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::thread;

use common::{Rng, keys};
use crossbeam_channel::{bounded, unbounded};
use dataplane::crypto::{Direction, Opener, Sealer};
use dataplane::frame::{DEFAULT_FRAME_SIZE, HEADER_LEN};
use dataplane::transport::{
    FramePool, Outgoing, SocketOptions, TransportError, receive_frames, send_frames,
};

fn pairs(n: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for _ in 0..n {
        let c = TcpStream::connect(addr).unwrap();
        let (s, _) = listener.accept().unwrap();
        let opts = SocketOptions {
            send_buffer: 64 << 10, // small, so writes are short and partial now and then
            ..SocketOptions::default()
        };
        opts.apply(&c).unwrap();
        senders.push(c);
        receivers.push(s);
    }
    (senders, receivers)
}

#[test]
fn frames_arrive_whole_and_in_order() {
    const STREAMS: usize = 3;
    const STREAM_IDS: std::ops::Range<u32> = 0..3;
    const FRAMES: usize = 200;
    let (tx_socks, rx_socks) = pairs(STREAMS);
    let k = keys(9);

    let send_pool = FramePool::new(8, DEFAULT_FRAME_SIZE);
    let (out_tx, out_rx) = bounded::<Outgoing>(4);
    let sender = {
        let pool = send_pool.clone();
        thread::spawn(move || send_frames(&tx_socks, &pool, &out_rx, None, &AtomicU64::new(0)))
    };

    let recv_pool = FramePool::new(8, DEFAULT_FRAME_SIZE);
    let openers: Vec<Opener> = STREAM_IDS
        .map(|s| {
            Opener::new(
                &k.stream_key(s, Direction::SourceToDest),
                DEFAULT_FRAME_SIZE,
            )
        })
        .collect();
    let checkers: Vec<_> = openers.iter().map(Opener::header_checker).collect();
    let (in_txs, in_rxs): (Vec<_>, Vec<_>) = (0..STREAMS).map(|_| unbounded()).unzip();
    let receiver = {
        let pool = recv_pool.clone();
        thread::spawn(move || {
            receive_frames(&rx_socks, &pool, &checkers, &in_txs, &AtomicU64::new(0))
        })
    };

    // Produce on a thread of its own, so the consumer below drains while it runs: with
    // 8-buffer pools, backpressure would otherwise stall both ends (as it should).
    let body = |s: usize, i: usize| {
        let mut rng = Rng((s * 1000 + i) as u64);
        let mut b = vec![0u8; 1 + rng.below(5000)];
        rng.fill(&mut b);
        b
    };
    let producer = {
        let pool = send_pool.clone();
        let k = keys(9);
        thread::spawn(move || {
            let mut sealers: Vec<Sealer> = STREAM_IDS
                .map(|s| Sealer::new(&k.stream_key(s, Direction::SourceToDest)))
                .collect();
            for i in 0..FRAMES {
                for (s, sealer) in sealers.iter_mut().enumerate() {
                    let mut f = pool.take();
                    f.frame.append_raw_records(&body(s, i), 1);
                    let len = sealer.seal(&mut f.frame).len();
                    out_tx
                        .send(Outgoing {
                            stream: s,
                            frame: f,
                            len,
                        })
                        .unwrap();
                }
            }
        })
    };

    // Consume round-robin, as the producer sends: each stream's frames hold pool buffers
    // until consumed (in skyferry every stream has its own consumer thread).
    let mut openers = openers;
    for i in 0..FRAMES {
        for (s, (rx, opener)) in in_rxs.iter().zip(&mut openers).enumerate() {
            let mut inc = rx.recv().unwrap();
            assert_eq!(inc.stream, s);
            let opened = opener
                .open(&mut inc.frame.frame.raw_mut()[..inc.len])
                .unwrap();
            assert_eq!(opened.body, &body(s, i)[..], "stream {s} frame {i}");
            recv_pool.give(inc.frame);
        }
    }
    producer.join().unwrap();
    let sent = sender.join().unwrap().expect("send");
    assert_eq!(sent.frames, vec![FRAMES as u64; STREAMS]);
    let got = receiver.join().unwrap().expect("receive");
    assert_eq!(got.frames, vec![FRAMES as u64; STREAMS]);
    assert_eq!(got.bytes, sent.bytes);
    assert_eq!(send_pool.free(), 8, "every send buffer came back");
}

fn receive_one(wire: Vec<u8>) -> Result<(), TransportError> {
    let (mut tx, rx) = pairs(1);
    let k = keys(9);
    let opener = Opener::new(
        &k.stream_key(0, Direction::SourceToDest),
        DEFAULT_FRAME_SIZE,
    );
    let pool = FramePool::new(2, DEFAULT_FRAME_SIZE);
    let (in_tx, _in_rx) = unbounded();
    let t = thread::spawn(move || {
        tx[0].write_all(&wire).unwrap();
        // Dropping the socket closes it: mid-frame if `wire` is cut short.
    });
    let r = receive_frames(
        &rx,
        &pool,
        &[opener.header_checker()],
        &[in_tx],
        &AtomicU64::new(0),
    );
    t.join().unwrap();
    r.map(|_| ())
}

#[test]
fn peer_dying_mid_frame_is_a_truncation() {
    let k = keys(9);
    let mut sealer = Sealer::new(&k.stream_key(0, Direction::SourceToDest));
    let pool = FramePool::new(1, DEFAULT_FRAME_SIZE);
    let mut f = pool.take();
    f.frame.append_raw_records(&[7; 3000], 1);
    let wire = sealer.seal(&mut f.frame).to_vec();
    for cut in [10, HEADER_LEN, 1000] {
        let err = receive_one(wire[..cut].to_vec()).unwrap_err();
        assert!(
            matches!(err, TransportError::Truncated { got, .. } if got == cut),
            "cut at {cut}: {err}"
        );
        assert!(err.is_disconnect());
    }
    assert!(receive_one(wire).is_ok());
}

#[test]
fn garbage_is_refused_at_the_header() {
    let err = receive_one(vec![0x47; 100]).unwrap_err();
    assert!(matches!(err, TransportError::BadFrame { .. }), "{err}");
    assert!(!err.is_disconnect());
}

/// Blocks until the kernel reports an error or hang-up on `sock` (the peer reset it).
fn wait_for_reset(sock: &TcpStream) {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLERR | libc::POLLHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, for the duration of the call.
    while unsafe { libc::poll(&mut p, 1, -1) } != 1 {}
}

/// True if any buffer of `pool` holds a run of 64 bytes of `byte` (all taken, then given back).
fn pool_holds(pool: &FramePool, count: usize, byte: u8) -> bool {
    let frames: Vec<_> = (0..count).map(|_| pool.take()).collect();
    let found = frames.iter().any(|f| {
        f.frame
            .raw(f.frame.capacity())
            .windows(64)
            .any(|w| w.iter().all(|&b| b == byte))
    });
    frames.into_iter().for_each(|f| pool.give(f));
    found
}

/// A receive that fails on one stream while a read is in flight on another: that read is
/// cancelled and reaped before `receive_frames` returns, so every buffer is back in the pool
/// and bytes the peer sends afterwards land in the socket, not in a pool buffer.
#[test]
fn a_receive_error_with_reads_in_flight_gives_every_buffer_back() {
    use std::io::Read;
    const BUFFERS: usize = 4;
    let (mut tx, rx) = pairs(2);
    let k = keys(9);
    let checkers: Vec<_> = (0..2)
        .map(|s| {
            Opener::new(
                &k.stream_key(s, Direction::SourceToDest),
                DEFAULT_FRAME_SIZE,
            )
        })
        .map(|o| o.header_checker())
        .collect();
    let pool = FramePool::new(BUFFERS, DEFAULT_FRAME_SIZE);
    let (txs, _rxs): (Vec<_>, Vec<_>) = (0..2).map(|_| unbounded()).unzip();
    // Stream 0 gets a header that cannot be ours; stream 1 nothing, so its read stays in flight.
    tx[0].write_all(&[0x47; HEADER_LEN]).unwrap();
    let err = receive_frames(&rx, &pool, &checkers, &txs, &AtomicU64::new(0)).unwrap_err();
    assert!(
        matches!(err, TransportError::BadFrame { stream: 0, .. }),
        "{err}"
    );
    assert_eq!(pool.free(), BUFFERS, "every buffer is back in the pool");
    // The read that was in flight on stream 1 is gone: what the peer sends now is still in
    // the socket for whoever reads it next, and in no pool buffer.
    let canary = [0xC5u8; 256];
    tx[1].write_all(&canary).unwrap();
    let mut got = [0u8; 256];
    (&rx[1]).read_exact(&mut got).unwrap();
    assert_eq!(got, canary);
    assert!(!pool_holds(&pool, BUFFERS, 0xC5));
}

/// A send that fails on one stream (its peer reset the connection) while a write is in flight
/// on another (its peer stopped reading): the write is cancelled and reaped before
/// `send_frames` returns, so every buffer is back in the pool, and reusing them at once (here:
/// overwriting them) changes nothing the peer then receives.
#[test]
fn a_send_error_with_writes_in_flight_gives_every_buffer_back() {
    use std::io::Read;
    const BUFFERS: usize = 4;
    let (mut tx, mut rx) = pairs(2);
    // Stream 1: fill the socket until the kernel takes no more; its peer reads nothing yet.
    tx[1].set_nonblocking(true).unwrap();
    let mut prefill = 0usize;
    loop {
        match tx[1].write(&[0x11; 4096]) {
            Ok(n) => prefill += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    tx[1].set_nonblocking(false).unwrap();
    // Stream 0: the peer closes with unread data, which resets the connection.
    tx[0].write_all(b"unread").unwrap();
    drop(rx.remove(0));
    wait_for_reset(&tx[0]);

    let pool = FramePool::new(BUFFERS, DEFAULT_FRAME_SIZE);
    let (out_tx, out_rx) = unbounded();
    for (stream, byte) in [(1, 0xA1u8), (0, 0xB0)] {
        let mut f = pool.take();
        let len = DEFAULT_FRAME_SIZE;
        f.frame.raw_mut()[..len].fill(byte);
        out_tx
            .send(Outgoing {
                stream,
                frame: f,
                len,
            })
            .unwrap();
    }
    // `out_tx` stays open: the send loop ends on the error, not on a closed channel.
    let err = send_frames(&tx, &pool, &out_rx, None, &AtomicU64::new(0)).unwrap_err();
    assert!(matches!(err, TransportError::Io { stream: 0, .. }), "{err}");
    assert_eq!(pool.free(), BUFFERS, "every buffer is back in the pool");
    // Reuse every buffer at once, then let the peer of stream 1 read all it was sent.
    let reused: Vec<_> = (0..BUFFERS)
        .map(|_| {
            let mut f = pool.take();
            f.frame.raw_mut().fill(0xEE);
            f
        })
        .collect();
    tx[1].shutdown(std::net::Shutdown::Write).unwrap();
    let mut wire = Vec::new();
    rx[0].read_to_end(&mut wire).unwrap();
    assert!(wire.len() >= prefill);
    assert!(wire[..prefill].iter().all(|&b| b == 0x11));
    let tail = &wire[prefill..];
    assert!(
        tail.len() <= DEFAULT_FRAME_SIZE,
        "{} bytes after the prefill",
        tail.len()
    );
    assert!(
        tail.iter().all(|&b| b == 0xA1),
        "the peer received bytes of a reused buffer"
    );
    drop(out_tx);
    drop(reused);
}

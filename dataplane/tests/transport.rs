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

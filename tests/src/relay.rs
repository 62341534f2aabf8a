//! A TCP relay between two daemons that a test can cut or freeze: the broken and the
//! silent link of a WAN, on loopback.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A TCP relay from the source to the destination's migration port.
#[derive(Debug)]
pub struct Relay {
    /// Where the source connects.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    frozen: AtomicBool,
    /// Each new connection: forward the greeting and the client's first bytes, then close
    /// both ends.
    cut_after_first: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
}

impl Relay {
    /// A relay to `upstream`.
    pub fn new(upstream: SocketAddr) -> Relay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let shared = Arc::new(Shared {
            frozen: AtomicBool::new(false),
            cut_after_first: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                let Ok(mut u) = TcpStream::connect(upstream) else {
                    continue; // the destination is gone: the source sees the close
                };
                if sh.cut_after_first.load(Ordering::SeqCst) {
                    let mut c = c;
                    // The destination speaks first (its greeting); the source answers with
                    // its Hello. Both pass, then the connection is cut.
                    let mut greeting = [0u8; dataplane::protocol::handshake::GREETING_LEN];
                    if u.read_exact(&mut greeting).is_ok() {
                        let _ = c.write_all(&greeting);
                    }
                    let mut buf = [0u8; 4096];
                    if let Ok(n) = c.read(&mut buf) {
                        let _ = u.write_all(&buf[..n]);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    let _ = c.shutdown(Shutdown::Both);
                    let _ = u.shutdown(Shutdown::Both);
                    continue;
                }
                {
                    let mut conns = sh.conns.lock().unwrap();
                    conns.push(c.try_clone().unwrap());
                    conns.push(u.try_clone().unwrap());
                }
                for (from, to) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)] {
                    let sh = sh.clone();
                    std::thread::spawn(move || pump(from, to, &sh));
                }
            }
        });
        Relay { addr, shared }
    }

    /// Closes every relayed connection, both ways.
    pub fn cut(&self) {
        for s in self.shared.conns.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Stops forwarding anything, keeping the connections open.
    pub fn freeze(&self) {
        self.shared.frozen.store(true, Ordering::SeqCst);
    }

    /// From now on each new connection passes the destination's greeting and the source's
    /// first bytes (its Hello), and is closed.
    pub fn cut_after_first_bytes(&self) {
        self.shared.cut_after_first.store(true, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: &Shared) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Frozen: what was read is never delivered, and nothing more is read.
        while sh.frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

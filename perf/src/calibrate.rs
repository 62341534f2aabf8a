//! The link emulator measured against its settings, so every `wan` run carries its own
//! emulator accuracy: bulk throughput against the set rate, and ping-pong round trips
//! against twice the one-way delay.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::linkemu::{LinkConfig, LinkEmu};

/// One bulk transfer through the emulator.
#[derive(Debug, Clone, Serialize)]
pub struct RateCheck {
    /// The link's rate, Mb/s.
    pub set_mbps: f64,
    /// The link's round trip, ms.
    pub rtt_ms: f64,
    /// Concurrent connections sharing the link.
    pub connections: usize,
    /// Bytes sent in all.
    pub bytes: u64,
    /// Bytes over (time to the last byte's arrival minus one one-way delay), Mb/s.
    pub measured_mbps: f64,
    /// (measured - set) / set, %.
    pub error_pct: f64,
}

/// Ping-pong round trips through the emulator, idle otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct RttCheck {
    /// The link's rate, Mb/s.
    pub rate_mbps: f64,
    /// Twice the one-way delay, ms.
    pub set_ms: f64,
    /// Round trips measured.
    pub samples: usize,
    /// Bytes each way per round trip.
    pub message_bytes: usize,
    /// Shortest, median and longest round trip, ms.
    pub min_ms: f64,
    pub median_ms: f64,
    pub max_ms: f64,
}

/// All checks of one run.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Calibration {
    pub rates: Vec<RateCheck>,
    pub rtts: Vec<RttCheck>,
}

fn mbps(bits: u64) -> f64 {
    bits as f64 / 1e6
}

/// Sends `secs` worth of the link's rate through it, split over `connections`, and measures
/// the rate at which it arrives.
pub fn measure_rate(
    rate_bits: u64,
    rtt: Duration,
    connections: usize,
    secs: f64,
) -> io::Result<RateCheck> {
    let config = LinkConfig::new(rate_bits, rtt);
    let per_conn = (config.bytes_per_sec() * secs / connections as f64).round();
    // Bounded by the f64 above, which is at most a few GB.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let per_conn = per_conn as usize;
    let sink = TcpListener::bind("127.0.0.1:0")?;
    let sink_addr = sink.local_addr()?;
    let emu = LinkEmu::start(sink_addr, config)?;
    let readers = thread::spawn(move || -> io::Result<Instant> {
        let mut hs = Vec::new();
        for _ in 0..connections {
            let (mut s, _) = sink.accept()?;
            hs.push(thread::spawn(move || -> io::Result<Instant> {
                let mut buf = vec![0u8; 256 << 10];
                let mut last = Instant::now();
                loop {
                    match s.read(&mut buf)? {
                        0 => return Ok(last),
                        _ => last = Instant::now(),
                    }
                }
            }));
        }
        let mut last = None::<Instant>;
        for h in hs {
            let t = h
                .join()
                .map_err(|_| io::Error::other("sink thread panicked"))??;
            last = Some(last.map_or(t, |l| l.max(t)));
        }
        last.ok_or_else(|| io::Error::other("no connection"))
    });
    let start = Instant::now();
    let writers: Vec<_> = (0..connections)
        .map(|_| {
            let to = emu.local_addr();
            thread::spawn(move || -> io::Result<()> {
                let mut s = TcpStream::connect(to)?;
                let block = vec![0xa5u8; 256 << 10];
                let mut left = per_conn;
                while left > 0 {
                    let n = left.min(block.len());
                    s.write_all(&block[..n])?;
                    left -= n;
                }
                s.shutdown(Shutdown::Write)
            })
        })
        .collect();
    for w in writers {
        w.join()
            .map_err(|_| io::Error::other("sender thread panicked"))??;
    }
    let last = readers
        .join()
        .map_err(|_| io::Error::other("sink panicked"))??;
    let took = last
        .saturating_duration_since(start)
        .saturating_sub(config.delay);
    let bytes = (per_conn * connections) as u64;
    let measured = bytes as f64 * 8.0 / took.as_secs_f64().max(1e-9) / 1e6;
    let set = mbps(rate_bits);
    Ok(RateCheck {
        set_mbps: set,
        rtt_ms: rtt.as_secs_f64() * 1e3,
        connections,
        bytes,
        measured_mbps: measured,
        error_pct: (measured - set) / set * 100.0,
    })
}

/// `samples` ping-pongs of `message` bytes through an otherwise idle link.
pub fn measure_rtt(
    rate_bits: u64,
    rtt: Duration,
    samples: usize,
    message: usize,
) -> io::Result<RttCheck> {
    let echo = TcpListener::bind("127.0.0.1:0")?;
    let echo_addr = echo.local_addr()?;
    let server = thread::spawn(move || -> io::Result<()> {
        let (mut s, _) = echo.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; message];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&buf)?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let emu = LinkEmu::start(echo_addr, LinkConfig::new(rate_bits, rtt))?;
    let mut c = TcpStream::connect(emu.local_addr())?;
    c.set_nodelay(true)?;
    let mut buf = vec![0x5au8; message];
    let mut times = Vec::with_capacity(samples);
    // One untimed exchange first: connection set-up at the far end is not a round trip.
    c.write_all(&buf)?;
    c.read_exact(&mut buf)?;
    for _ in 0..samples {
        let t = Instant::now();
        c.write_all(&buf)?;
        c.read_exact(&mut buf)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    c.shutdown(Shutdown::Write)?;
    server
        .join()
        .map_err(|_| io::Error::other("echo panicked"))??;
    times.sort_by(f64::total_cmp);
    Ok(RttCheck {
        rate_mbps: mbps(rate_bits),
        set_ms: rtt.as_secs_f64() * 1e3,
        samples,
        message_bytes: message,
        min_ms: times.first().copied().unwrap_or(f64::NAN),
        median_ms: times.get(times.len() / 2).copied().unwrap_or(f64::NAN),
        max_ms: times.last().copied().unwrap_or(f64::NAN),
    })
}

/// The checks `wan` runs first: each rate with one and two connections, and each round
/// trip; `secs` of traffic per rate check.
pub fn calibrate(
    rates_bits: &[u64],
    rtts: &[Duration],
    secs: f64,
    samples: usize,
) -> io::Result<Calibration> {
    let mut c = Calibration::default();
    let rtt0 = rtts.first().copied().unwrap_or(Duration::from_millis(20));
    for &r in rates_bits {
        for conns in [1, 2] {
            c.rates.push(measure_rate(r, rtt0, conns, secs)?);
        }
    }
    let rate0 = rates_bits.first().copied().unwrap_or(100_000_000);
    for &rtt in rtts {
        c.rtts.push(measure_rtt(rate0, rtt, samples, 64)?);
    }
    Ok(c)
}

/// The calibration as a table.
pub fn print(c: &Calibration) {
    println!("Link emulator accuracy (measured now, through the same relay the runs use)");
    println!(
        "  {:>9} {:>7} {:>5} {:>10} {:>13} {:>8}",
        "rate Mb/s", "RTT ms", "conns", "MB sent", "measured Mb/s", "error"
    );
    for r in &c.rates {
        println!(
            "  {:>9.0} {:>7.1} {:>5} {:>10.1} {:>13.2} {:>7.2}%",
            r.set_mbps,
            r.rtt_ms,
            r.connections,
            r.bytes as f64 / 1e6,
            r.measured_mbps,
            r.error_pct
        );
    }
    println!(
        "  {:>9} {:>9} {:>7} {:>8} {:>9} {:>8}",
        "rate Mb/s", "set RTT", "samples", "min ms", "median ms", "max ms"
    );
    for r in &c.rtts {
        println!(
            "  {:>9.0} {:>7.1}ms {:>7} {:>8.2} {:>9.2} {:>8.2}",
            r.rate_mbps, r.set_ms, r.samples, r.min_ms, r.median_ms, r.max_ms
        );
    }
    println!();
}

//! The processes `skyferry-bench pipeline` starts: one end of a migration, or one end of the
//! reference transfer (sealed frames over the same number of TCP streams, nothing else).
//!
//! Each prints what it measured as one JSON line on stdout; a listening end first prints its
//! port on a line of its own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use clap::{Args as ClapArgs, ValueEnum};
use dataplane::codec::CodecConfig;
use dataplane::crypto::{Direction, Opener, Sealer};
use dataplane::frame::{FrameBuf, HEADER_LEN};
use dataplane::guest::SourceGuest;
use dataplane::guest::image::ImageGuest;
use dataplane::guest::shm::SharedMemory;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticOptions};
use dataplane::guest::workload::Workload;
use dataplane::migrate::policy::Policy;
use dataplane::migrate::source::{SourceOptions, migrate};
use dataplane::migrate::status::{MigrationStatus, Role};
use dataplane::page::PAGE_SIZE;
use dataplane::transport::SocketOptions;
use serde::{Deserialize, Serialize};

use crate::peer::{TIMEOUT, emit, listen, psk, receive_one};
use crate::procstat::cpu_seconds;
use crate::workload::Rng;

/// Which end this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PeerRole {
    /// Migration source: builds the guest, migrates it.
    Source,
    /// Migration destination: receives into a preallocated guest.
    Dest,
    /// Reference sender: seals frames and writes them.
    RefSend,
    /// Reference receiver: reads frames and opens them.
    RefRecv,
}

/// A page mix held as a static memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixName {
    /// Distinct random pages: nothing to save, every byte crosses.
    Unique,
    /// All-zero pages.
    Zero,
    /// In each 2 MiB run, one page in eight is random; the others are made of four of their
    /// 1 KiB blocks, half of them with an 8-64 byte edit.
    Redundant,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct PeerArgs {
    /// This process's role.
    #[arg(long, value_enum)]
    pub role: PeerRole,
    /// Guest pages.
    #[arg(long)]
    pub pages: u64,
    /// Static page mix (source).
    #[arg(long, value_enum)]
    pub mix: Option<MixName>,
    /// Workload model whose initial memory the guest holds, static (source).
    #[arg(long)]
    pub workload: Option<String>,
    /// TCP streams.
    #[arg(long)]
    pub streams: u32,
    /// Frame size in bytes.
    #[arg(long)]
    pub frame_size: usize,
    /// Pin pipeline threads.
    #[arg(long)]
    pub pin: bool,
    /// Content seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Port of the listening end (source and reference sender).
    #[arg(long)]
    pub port: Option<u16>,
    /// No running cache digest in frame headers (source).
    #[arg(long)]
    pub no_verify_caches: bool,
    /// AES-256-GCM implementation.
    #[arg(long, default_value = "aws-lc-rs")]
    pub cipher: dataplane::crypto::AeadImpl,
}

/// What a migration source measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceReport {
    pub elapsed_s: f64,
    pub cpu_s: f64,
    pub wire_bytes: u64,
    pub pause_ms: u64,
    pub iterations: usize,
    pub verified: bool,
}

/// What a migration destination measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct DestReport {
    pub cpu_s: f64,
    pub verified: bool,
}

/// What a reference end measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct RefReport {
    /// Receiver: from the first connection accepted to the last frame opened.
    pub elapsed_s: f64,
    pub cpu_s: f64,
    pub bytes: u64,
}

pub fn run(args: &PeerArgs) -> Result<(), String> {
    dataplane::crypto::set_default_impl(args.cipher);
    match args.role {
        PeerRole::Source => source(args),
        PeerRole::Dest => dest(args),
        PeerRole::RefSend => ref_send(args),
        PeerRole::RefRecv => ref_recv(args),
    }
}

/// Fills 1 KiB block `i` of page `pfn` with random bytes that depend only on (seed, pfn, i).
fn random_block(seed: u64, pfn: u64, i: u64, out: &mut [u8]) {
    Rng(seed ^ (pfn * 4 + i).wrapping_mul(0x9e37_79b9_7f4a_7c15)).fill(out);
}

/// Fills page `pfn` of mix `mix`.
fn fill_mix(mix: MixName, seed: u64, pfn: u64, page: &mut [u8]) {
    const RUN: u64 = 512; // pages per 2 MiB run: one stream's share, whatever the stream count
    const POOL: u64 = RUN / 8;
    let random_page = |pfn: u64, page: &mut [u8]| {
        for (i, b) in (0..).zip(page.chunks_exact_mut(1024)) {
            random_block(seed, pfn, i, b);
        }
    };
    match mix {
        MixName::Zero => {}
        MixName::Unique => random_page(pfn, page),
        MixName::Redundant if pfn % RUN < POOL => random_page(pfn, page),
        MixName::Redundant => {
            let mut rng = Rng(seed.rotate_left(17) ^ pfn);
            for b in page.chunks_exact_mut(1024) {
                let from = pfn - pfn % RUN + rng.next() % POOL;
                random_block(seed, from, rng.next() % 4, b);
            }
            if pfn.is_multiple_of(2) {
                let len = 8 + rng.below(57);
                let at = rng.below(PAGE_SIZE - len + 1);
                rng.fill(&mut page[at..at + len]);
            }
        }
    }
}

fn source(args: &PeerArgs) -> Result<(), String> {
    let guest: Arc<dyn SourceGuest> = match (&args.mix, &args.workload) {
        (Some(mix), None) => Arc::new(
            ImageGuest::new(args.pages, |pfn, page| fill_mix(*mix, args.seed, pfn, page))
                .map_err(|e| e.to_string())?,
        ),
        (None, Some(w)) => {
            let w: Workload = w.parse().map_err(|e| format!("{e}"))?;
            let opts = SyntheticOptions {
                speed: 0.0, // static memory: the pipeline's speed, not the guest's
                writers: 1,
            };
            let g = SyntheticGuest::with_options(args.pages, w, args.seed, opts)
                .map_err(|e| e.to_string())?;
            g.preallocate().map_err(|e| e.to_string())?;
            Arc::new(g)
        }
        _ => return Err("give exactly one of --mix and --workload".into()),
    };
    let port = args.port.ok_or("--port is required")?;
    let mut codec = CodecConfig::default();
    codec.set_optimizations("all")?;
    codec.verify_caches = !args.no_verify_caches;
    let opts = SourceOptions {
        resume: Default::default(),
        peer: SocketAddr::from(([127, 0, 0, 1], port)),
        psk: psk(),
        streams: args.streams,
        codec,
        policy: Policy::Smart,
        max_downtime: None,
        converge: Default::default(),
        max_bandwidth: None,
        socket: SocketOptions::default(),
        frame_size: args.frame_size,
        pin_threads: args.pin,
        timeout: TIMEOUT,
        guest_label: "bench".into(),
        group: None,
        disk: None,
        network: None,
    };
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        1,
        Role::Source,
        "bench",
        args.pages,
    )));
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let summary =
        migrate(guest, &opts, 1, &status, &AtomicBool::new(false)).map_err(|e| e.to_string())?;
    let elapsed_s = t0.elapsed().as_secs_f64();
    emit(&SourceReport {
        elapsed_s,
        cpu_s: cpu_seconds() - cpu0,
        wire_bytes: summary.status.wire_bytes,
        pause_ms: summary.status.pause_ms.unwrap_or(0),
        iterations: summary.iterations.len(),
        verified: summary.status.verified == Some(true),
    });
    Ok(())
}

fn dest(args: &PeerArgs) -> Result<(), String> {
    let (summary, cpu_s) = receive_one(args.pages, args.pin)?;
    emit(&DestReport {
        cpu_s,
        verified: summary.status.verified == Some(true),
    });
    Ok(())
}

/// Stream keys for the reference, derived as a migration's are.
fn ref_keys(stream: u32) -> dataplane::crypto::StreamKey {
    use dataplane::crypto::{HandshakeNonce, MigrationKeys};
    MigrationKeys::derive(
        &psk(),
        &[7; 32],
        &HandshakeNonce([1; 32]),
        &HandshakeNonce([2; 32]),
    )
    .stream_key(stream, Direction::SourceToDest)
}

/// The guest's bytes for the reference, resident, built before the clock starts.
fn reference_memory(args: &PeerArgs, fill: bool) -> Result<SharedMemory, String> {
    let len = usize::try_from(args.pages).map_err(|e| e.to_string())? * PAGE_SIZE;
    let mut mem =
        SharedMemory::new("skyferry-bench-reference", len, false).map_err(|e| e.to_string())?;
    if fill {
        for (pfn, page) in (0..).zip(mem.as_mut_slice().chunks_exact_mut(PAGE_SIZE)) {
            fill_mix(MixName::Unique, args.seed, pfn, page);
        }
    }
    mem.populate().map_err(|e| e.to_string())?;
    Ok(mem)
}

/// Each stream's share of the guest's bytes: contiguous, the remainder on the last.
fn shares(len: usize, streams: usize) -> Vec<std::ops::Range<usize>> {
    let per = len / streams;
    (0..streams)
        .map(|s| s * per..if s + 1 == streams { len } else { (s + 1) * per })
        .collect()
}

fn ref_send(args: &PeerArgs) -> Result<(), String> {
    let port = args.port.ok_or("--port is required")?;
    let mem = reference_memory(args, true)?;
    let socket = SocketOptions::default();
    let n = usize::try_from(args.streams).map_err(|e| e.to_string())?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let bytes = std::thread::scope(|scope| -> Result<u64, String> {
        let threads: Vec<_> = (0u32..)
            .zip(shares(mem.len(), n))
            .map(|(s, range)| {
                let (share, socket) = (&mem.as_slice()[range], socket.clone());
                let frame_size = args.frame_size;
                scope.spawn(move || -> Result<u64, String> {
                    let mut conn =
                        TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                    socket.apply(&conn).map_err(|e| e.to_string())?;
                    // Connections may be accepted in any order: say which stream this is.
                    conn.write_all(&s.to_le_bytes())
                        .map_err(|e| e.to_string())?;
                    let mut sealer = Sealer::new(&ref_keys(s));
                    let mut frame = FrameBuf::new(frame_size);
                    // Read from memory, seal, send: what any encrypted transfer must do.
                    for body in share.chunks(frame.body_capacity()) {
                        frame.clear();
                        frame.append_raw_records(body, 1);
                        conn.write_all(sealer.seal(&mut frame))
                            .map_err(|e| e.to_string())?;
                    }
                    conn.shutdown(std::net::Shutdown::Write)
                        .map_err(|e| e.to_string())?;
                    Ok(share.len() as u64)
                })
            })
            .collect();
        let mut bytes = 0;
        for t in threads {
            bytes += t.join().map_err(|_| "sender thread panicked")??;
        }
        Ok(bytes)
    })?;
    emit(&RefReport {
        elapsed_s: t0.elapsed().as_secs_f64(),
        cpu_s: cpu_seconds() - cpu0,
        bytes,
    });
    Ok(())
}

fn ref_recv(args: &PeerArgs) -> Result<(), String> {
    let mut mem = reference_memory(args, false)?;
    let listener = listen()?;
    let socket = SocketOptions::default();
    let n = usize::try_from(args.streams).map_err(|e| e.to_string())?;
    let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut t0 = None;
    for _ in 0..n {
        let (mut c, _) = listener.accept().map_err(|e| e.to_string())?;
        t0.get_or_insert_with(Instant::now);
        socket.apply(&c).map_err(|e| e.to_string())?;
        let mut id = [0u8; 4];
        c.read_exact(&mut id).map_err(|e| e.to_string())?;
        let s = usize::try_from(u32::from_le_bytes(id)).map_err(|e| e.to_string())?;
        *conns.get_mut(s).ok_or("stream id out of range")? = Some(c);
    }
    let (t0, cpu0) = (t0.expect("at least one stream"), cpu_seconds());
    let len = mem.len();
    let mut regions: Vec<&mut [u8]> = Vec::with_capacity(n);
    let mut rest = mem.as_mut_slice();
    for r in shares(len, n) {
        let (head, tail) = rest.split_at_mut(r.len());
        regions.push(head);
        rest = tail;
    }
    let bytes = std::thread::scope(|scope| -> Result<u64, String> {
        let threads: Vec<_> = (0u32..)
            .zip(conns.into_iter().zip(regions))
            .map(|(s, (conn, region))| {
                let frame_size = args.frame_size;
                scope.spawn(move || -> Result<u64, String> {
                    let mut conn = conn.ok_or("a stream never connected")?;
                    let mut opener = Opener::new(&ref_keys(s), frame_size);
                    let mut buf = vec![0u8; frame_size];
                    let mut at = 0;
                    loop {
                        match conn.read_exact(&mut buf[..HEADER_LEN]) {
                            Ok(()) => {}
                            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
                            Err(e) => return Err(e.to_string()),
                        }
                        let len = opener.check_header(&buf).map_err(|e| e.to_string())?;
                        conn.read_exact(&mut buf[HEADER_LEN..len])
                            .map_err(|e| e.to_string())?;
                        let body = opener
                            .open(&mut buf[..len])
                            .map_err(|e| e.to_string())?
                            .body;
                        // Into destination memory: the transfer's other end.
                        let dst = region
                            .get_mut(at..at + body.len())
                            .ok_or("more bytes than the guest holds")?;
                        dst.copy_from_slice(body);
                        at += body.len();
                    }
                    Ok(at as u64)
                })
            })
            .collect();
        let mut bytes = 0;
        for t in threads {
            bytes += t.join().map_err(|_| "receiver thread panicked")??;
        }
        Ok(bytes)
    })?;
    emit(&RefReport {
        elapsed_s: t0.elapsed().as_secs_f64(),
        cpu_s: cpu_seconds() - cpu0,
        bytes,
    });
    Ok(())
}

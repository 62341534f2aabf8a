//! The processes `skyferry-bench compress` starts: the source or the destination of one live
//! migration (a running synthetic guest, its writers on), each reporting its own CPU time as
//! one JSON line on stdout; the destination first prints its port on a line of its own.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args as ClapArgs, ValueEnum};
use dataplane::codec::{CodecConfig, CodecStats, Compression};
use dataplane::guest::SourceGuest;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticOptions};
use dataplane::guest::workload::Workload;
use dataplane::migrate::policy::Policy;
use dataplane::migrate::source::{SourceOptions, migrate};
use dataplane::migrate::status::{MigrationStatus, Role};
use dataplane::transport::SocketOptions;
use serde::{Deserialize, Serialize};

use crate::peer::{TIMEOUT, emit, psk, receive_one};
use crate::procstat::cpu_seconds;

/// Which end this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum End {
    /// Builds the running guest and migrates it.
    Source,
    /// Receives it.
    Dest,
}

#[derive(ClapArgs, Debug, Clone)]
pub struct PeerArgs {
    /// This process's end.
    #[arg(long, value_enum)]
    pub end: End,
    /// Guest pages.
    #[arg(long)]
    pub pages: u64,
    /// Workload model (source).
    #[arg(long, default_value = "kernel")]
    pub workload: Workload,
    /// Guest write-rate multiplier (source).
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Content and write seed (source).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// TCP streams.
    #[arg(long, default_value_t = 2)]
    pub streams: u32,
    /// Codec optimizations (source): all, none, or a list.
    #[arg(long, default_value = "all")]
    pub optimizations: String,
    /// Frame compression (source).
    #[arg(long, default_value = "off")]
    pub compression: Compression,
    /// Stop policy (source).
    #[arg(long, default_value = "smart")]
    pub policy: Policy,
    /// Send-side rate limit in bytes per second (source); absent: unlimited.
    #[arg(long)]
    pub max_bandwidth: Option<u64>,
    /// Port of the destination (source).
    #[arg(long)]
    pub port: Option<u16>,
}

/// What the source measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct SourceReport {
    /// Connect to commit.
    pub elapsed_s: f64,
    /// CPU of the migration: the whole process minus the guest's own writer threads.
    pub cpu_s: f64,
    /// CPU the guest's writers used meanwhile (excluded above).
    pub guest_cpu_s: f64,
    pub wire_bytes: u64,
    pub pause_ms: u64,
    pub iterations: usize,
    pub verified: bool,
    pub codec: CodecStats,
}

/// What the destination measured.
#[derive(Debug, Serialize, Deserialize)]
pub struct DestReport {
    pub cpu_s: f64,
    pub verified: bool,
    pub codec: CodecStats,
}

pub fn run(args: &PeerArgs) -> Result<(), String> {
    // RUST_LOG=info shows the auto controller's decisions (on stderr).
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .try_init();
    match args.end {
        End::Source => source(args),
        End::Dest => dest(args),
    }
}

/// CPU time used so far by this process's live threads whose name starts with `prefix`, in
/// the 1/100 s ticks /proc counts in.
fn threads_ticks(prefix: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let ticks: u64 = dir
        .filter_map(|e| {
            let path = e.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            if !comm.starts_with(prefix) {
                return None;
            }
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let rest = &stat[stat.rfind(')')? + 1..];
            let mut f = rest.split_whitespace().skip(11);
            Some(f.next()?.parse::<u64>().ok()? + f.next()?.parse::<u64>().ok()?)
        })
        .sum();
    ticks
}

fn source(args: &PeerArgs) -> Result<(), String> {
    let guest = Arc::new(
        SyntheticGuest::with_options(
            args.pages,
            args.workload,
            args.seed,
            SyntheticOptions {
                speed: args.speed,
                writers: 1,
            },
        )
        .map_err(|e| e.to_string())?,
    );
    let port = args.port.ok_or("--port is required")?;
    let mut codec = CodecConfig {
        compression: args.compression,
        ..CodecConfig::default()
    };
    codec.set_optimizations(&args.optimizations)?;
    let opts = SourceOptions {
        resume: Default::default(),
        peer: SocketAddr::from(([127, 0, 0, 1], port)),
        psk: psk(),
        streams: args.streams,
        codec,
        policy: args.policy,
        max_downtime: None,
        converge: Default::default(),
        max_bandwidth: args.max_bandwidth,
        socket: SocketOptions::default(),
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE,
        pin_threads: true,
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
    // The writers end when the guest is handed over, taking their CPU time out of /proc with
    // them: sample it meanwhile (they are parked from the pause on, so the last sample is
    // their whole share).
    let guest_ticks = Arc::new(AtomicU64::new(0));
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (ticks, on) = (guest_ticks.clone(), sampling.clone());
        std::thread::spawn(move || {
            while on.load(Ordering::Relaxed) {
                ticks.fetch_max(threads_ticks("synth-writer"), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let (cpu0, guest0) = (cpu_seconds(), threads_ticks("synth-writer"));
    let t0 = Instant::now();
    let summary = migrate(
        guest.clone() as Arc<dyn SourceGuest>,
        &opts,
        1,
        &status,
        &AtomicBool::new(false),
    )
    .map_err(|e| e.to_string())?;
    let elapsed_s = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_seconds();
    guest_ticks.fetch_max(threads_ticks("synth-writer"), Ordering::Relaxed);
    sampling.store(false, Ordering::Relaxed);
    sampler.join().map_err(|_| "sampler thread panicked")?;
    let guest_cpu_s = guest_ticks.load(Ordering::Relaxed).saturating_sub(guest0) as f64 / 100.0;
    let cpu_s = cpu1 - cpu0 - guest_cpu_s;
    drop(guest);
    emit(&SourceReport {
        elapsed_s,
        cpu_s,
        guest_cpu_s,
        wire_bytes: summary.status.wire_bytes,
        pause_ms: summary.status.pause_ms.unwrap_or(0),
        iterations: summary.iterations.len(),
        verified: summary.status.verified == Some(true),
        codec: summary.codec,
    });
    Ok(())
}

fn dest(args: &PeerArgs) -> Result<(), String> {
    let (summary, cpu_s) = receive_one(args.pages, true)?;
    emit(&DestReport {
        cpu_s,
        verified: summary.status.verified == Some(true),
        codec: summary.codec,
    });
    Ok(())
}

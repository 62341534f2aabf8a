//! One live migration through the link emulator: a synthetic guest running its workload
//! model, the source and the destination on threads of this process, the emulated link
//! between them. The link, not the CPU, is the bottleneck, so one process is enough.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::guest::SourceGuest;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticOptions};
use dataplane::guest::workload::{REFERENCE_PAGES, Workload};
use dataplane::migrate::dest::{DestOptions, DestSummary, receive_synthetic};
use dataplane::migrate::source::{IterationRecord, SourceOptions, migrate};
use dataplane::migrate::{MigrateError, MigrationStatus, Policy, Role, StopReason};
use dataplane::page::PAGE_SIZE;
use dataplane::transport::SocketOptions;
use serde::Serialize;

use crate::linkemu::{LinkConfig, LinkEmu};

/// How long either end waits on a silent peer. Generous: at 50 Mb/s the source's socket
/// buffers alone hold over a second of data.
const TIMEOUT: Duration = Duration::from_secs(120);

/// A stop policy and the codec optimizations on: one bar of Fig. 11.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    /// Short name (JSON, tables).
    pub name: &'static str,
    /// What it is, for the tables.
    pub about: &'static str,
    pub policy: Policy,
    pub zero: bool,
    pub cbr: bool,
    pub delta: bool,
}

/// Xen's default: its stop rules, full pages (the paper's baseline).
pub const BASELINE: Setup = Setup {
    name: "baseline",
    about: "xen-default, no optimizations",
    policy: Policy::XenDefault,
    zero: false,
    cbr: false,
    delta: false,
};
/// Smart Stop alone.
pub const SMART: Setup = Setup {
    name: "smart",
    about: "Smart Stop",
    policy: Policy::Smart,
    ..BASELINE
};
/// Zero pages alone (in the paper part of CBR; skyferry can switch it separately).
pub const ZERO: Setup = Setup {
    name: "zero",
    about: "zero pages",
    zero: true,
    ..BASELINE
};
/// The block cache alone (it also finds zero blocks, as a cache hit).
pub const CBR: Setup = Setup {
    name: "cbr",
    about: "CBR",
    cbr: true,
    ..BASELINE
};
/// Page deltas alone.
pub const DELTA: Setup = Setup {
    name: "delta",
    about: "page deltas",
    delta: true,
    ..BASELINE
};
/// CloudNet: Smart Stop and every codec optimization.
pub const ALL: Setup = Setup {
    name: "all",
    about: "smart, all optimizations",
    policy: Policy::Smart,
    zero: true,
    cbr: true,
    delta: true,
};

/// One migration to run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSpec {
    pub workload: Workload,
    pub setup: Setup,
    /// Guest memory, bytes.
    pub mem: u64,
    pub seed: u64,
    /// Multiplier of the model's write rates.
    pub speed: f64,
    /// Link rate, bits/s.
    pub rate_bits: u64,
    /// Link round trip.
    pub rtt: Duration,
    /// Data streams.
    pub streams: u32,
    /// Block cache per stream, bytes.
    pub cache_bytes: u64,
    /// The source's SO_SNDBUF request, bytes.
    pub send_buffer: usize,
}

impl RunSpec {
    fn codec(&self) -> CodecConfig {
        CodecConfig {
            zero_pages: self.setup.zero,
            cbr: self.setup.cbr,
            delta: self.setup.delta,
            cache_bytes: self.cache_bytes,
            ..CodecConfig::default()
        }
    }

    /// One line for progress reports.
    pub fn label(&self) -> String {
        format!(
            "{} {} ({}) at {:.0} Mb/s, {:.0} ms RTT",
            self.workload,
            self.setup.name,
            self.setup.about,
            self.rate_bits as f64 / 1e6,
            self.rtt.as_secs_f64() * 1e3
        )
    }
}

/// What one migration did.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub workload: &'static str,
    pub setup: &'static str,
    pub policy: Policy,
    pub optimizations: String,
    pub rate_mbps: f64,
    pub rtt_ms: f64,
    pub mem_bytes: u64,
    pub streams: u32,
    pub cache_bytes: u64,
    pub send_buffer: usize,
    pub speed: f64,
    pub seed: u64,
    /// Sealed bytes the source put on its data streams.
    pub data_bytes: u64,
    /// Bytes the emulated link delivered, source to destination (all connections, control
    /// included) and back.
    pub link_forward_bytes: u64,
    pub link_reverse_bytes: u64,
    /// Source's start to the destination's confirmation that the guest runs there, s.
    pub total_s: f64,
    /// Guest paused at the source to resumed at the destination, s.
    pub pause_s: f64,
    /// Filling the guest's memory before the migration (not in `total_s`), s.
    pub fill_s: f64,
    /// Pre-copy iterations (the final stop-and-copy not counted).
    pub iterations: usize,
    pub stop_reason: Option<StopReason>,
    pub verified: bool,
    /// Wire bytes of iteration 1, and of every later iteration including the final copy.
    pub iter1_bytes: u64,
    pub later_bytes: u64,
    /// The final stop-and-copy: pages, wire bytes, and ms from the pause until the last
    /// message went out (the rest of the pause is the destination's check and the commit).
    pub final_pages: u64,
    pub final_bytes: u64,
    pub final_ms: u64,
    /// Payload bytes the codec saved by zero pages/blocks, block-cache hits and deltas.
    pub saved_zero: u64,
    pub saved_cbr: u64,
    pub saved_delta: u64,
    /// Page writes per second the guest made while it ran, and what its model asks for: a
    /// check that the writers got their CPU on a busy machine.
    pub writes_per_s: f64,
    pub model_writes_per_s: f64,
    pub per_iteration: Vec<IterationRecord>,
}

/// The model's nominal page writes per second for this guest (its rate modulation averages
/// to about 1).
fn model_writes_per_s(spec: &RunSpec) -> f64 {
    let pages = spec.mem / PAGE_SIZE as u64;
    let per_gib: f64 = spec.workload.params().tiers.iter().map(|t| t.rate).sum();
    per_gib * pages as f64 / REFERENCE_PAGES as f64 * spec.speed
}

type DestThread = JoinHandle<Result<DestSummary, MigrateError>>;

fn spawn_destination(
    listener: TcpListener,
    psk: PreSharedKey,
    pages: u64,
    streams: u32,
    abort: &Arc<AtomicBool>,
) -> std::io::Result<DestThread> {
    let abort = abort.clone();
    let opts = DestOptions {
        resume_window: std::time::Duration::from_secs(120),
        psk,
        socket: SocketOptions::default(),
        pin_threads: false,
        timeout: TIMEOUT,
        max_guest_pages: pages,
        max_streams: streams,
        drbd: None,
        announce: None,
    };
    thread::Builder::new()
        .name("wan-dest".into())
        .spawn(move || receive_synthetic(&listener, &opts, &abort))
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1e3
}

/// Runs one migration through a fresh emulated link.
pub fn run(spec: &RunSpec, id: u64) -> Result<RunResult, String> {
    let pages = spec.mem / PAGE_SIZE as u64;
    let psk = PreSharedKey::from_bytes([0x5f; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("listen: {e}"))?;
    let dest_addr = listener.local_addr().map_err(|e| e.to_string())?;
    let link = LinkEmu::start(dest_addr, LinkConfig::new(spec.rate_bits, spec.rtt))
        .map_err(|e| format!("link emulator: {e}"))?;

    let filling = Instant::now();
    let guest = Arc::new(
        SyntheticGuest::with_options(
            pages,
            spec.workload,
            spec.seed,
            SyntheticOptions {
                speed: spec.speed,
                writers: 1,
            },
        )
        .map_err(|e| format!("guest: {e}"))?,
    );
    let fill_s = filling.elapsed().as_secs_f64();

    let dest_abort = Arc::new(AtomicBool::new(false));
    let dest = spawn_destination(listener, psk.clone(), pages, spec.streams, &dest_abort)
        .map_err(|e| format!("destination thread: {e}"))?;
    let opts = SourceOptions {
        resume: Default::default(),
        peer: link.local_addr(),
        psk,
        streams: spec.streams,
        codec: spec.codec(),
        policy: spec.setup.policy,
        max_downtime: None,
        converge: Default::default(),
        // The emulated link is the limit.
        max_bandwidth: None,
        socket: SocketOptions {
            send_buffer: spec.send_buffer,
            ..SocketOptions::default()
        },
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE,
        // Two shared cores: let the scheduler place the threads.
        pin_threads: false,
        timeout: TIMEOUT,
        guest_label: format!("wan-{}", spec.workload),
        group: None,
        disk: None,
        network: None,
    };
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        id,
        Role::Source,
        "",
        pages,
    )));
    let writes_before = guest.writes();
    let source = migrate(
        guest.clone() as Arc<dyn SourceGuest>,
        &opts,
        id,
        &status,
        &AtomicBool::new(false),
    );
    let writes = guest.writes() - writes_before;
    if source.is_err() {
        // The destination may still wait for a connection: stop it and wake its accept.
        dest_abort.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&dest_addr, Duration::from_secs(1));
    }
    let dest = dest
        .join()
        .map_err(|_| "the destination thread panicked".to_string())?;
    let link_stats = link.stats();
    drop(link);
    drop(guest);
    let summary = source.map_err(|e| format!("source: {e}"))?;
    dest.map_err(|e| format!("destination: {e}"))?;

    let st = &summary.status;
    let total_s = secs(st.elapsed_ms);
    let pause_s = secs(st.pause_ms.unwrap_or(0));
    let its = &summary.iterations;
    let codec = &summary.codec;
    Ok(RunResult {
        workload: spec.workload.name(),
        setup: spec.setup.name,
        policy: spec.setup.policy,
        optimizations: spec.codec().optimizations(),
        rate_mbps: spec.rate_bits as f64 / 1e6,
        rtt_ms: spec.rtt.as_secs_f64() * 1e3,
        mem_bytes: spec.mem,
        streams: spec.streams,
        cache_bytes: spec.cache_bytes,
        send_buffer: spec.send_buffer,
        speed: spec.speed,
        seed: spec.seed,
        data_bytes: st.wire_bytes,
        link_forward_bytes: link_stats.forward_bytes,
        link_reverse_bytes: link_stats.reverse_bytes,
        total_s,
        pause_s,
        fill_s,
        iterations: its.len().saturating_sub(1),
        stop_reason: st.stop_reason,
        verified: st.verified == Some(true),
        iter1_bytes: its.first().map_or(0, |i| i.wire_bytes),
        later_bytes: its.iter().skip(1).map(|i| i.wire_bytes).sum(),
        final_pages: its.last().map_or(0, |i| i.sent),
        final_bytes: its.last().map_or(0, |i| i.wire_bytes),
        final_ms: its.last().map_or(0, |i| i.ms),
        saved_zero: codec.saved_zero,
        saved_cbr: codec.saved_cbr,
        saved_delta: codec.saved_delta,
        writes_per_s: writes as f64 / (total_s - pause_s).max(1e-3),
        model_writes_per_s: model_writes_per_s(spec),
        per_iteration: its.clone(),
    })
}

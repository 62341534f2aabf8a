//! `skyferry demo`: a whole live migration on this host, with the embedded defaults.
//!
//! A destination and a source run in this process on their own threads and talk over real
//! loopback TCP, with the real handshake, sealed frames, codec, pipelines and stop policy.
//! The guest is the synthetic backend: memory filled and rewritten like the paper's
//! workloads. The main thread polls the source's status for the live display, then prints
//! the summary and whether the destination's memory matched the source's.
//!
//! `--guest qemu` migrates a real QEMU guest instead (`demo_qemu.rs`).
//!
//! The default rate limit is 1 Gbit/s: the workload models are calibrated against a 1 Gbit/s
//! link (their hot sets are rewritten faster than its ~30k pages/s, so pre-copy levels off
//! after a few iterations and the stop policy has a decision to make), it is the top of the
//! paper's bandwidth sweep (Fig. 15: 50-1000 Mb/s), and a 1 GiB guest then migrates in
//! about ten seconds. Unlimited loopback would finish in one or two iterations and show no
//! policy at work; the paper's 100 Mbit/s would take one and a half minutes for iteration 1.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dataplane::codec::{CodecConfig, CodecStats, Compression};
use dataplane::crypto::PreSharedKey;
use dataplane::guest::SourceGuest;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticOptions};
use dataplane::guest::workload::Workload;
use dataplane::migrate::dest::{DestOptions, DestSummary, receive_synthetic};
use dataplane::migrate::source::{SourceOptions, SourceSummary, migrate};
use dataplane::migrate::{MigrateError, MigrationStatus, Phase, Policy, Role};
use dataplane::page::PAGE_SIZE;
use dataplane::transport::SocketOptions;
use dataplane::units::{format_duration, format_rate, format_size, parse_duration, parse_size};
use serde_json::json;

use crate::progress::{Progress, stop_reason_name, summary_table};
use crate::testguest::Accel;

/// How often the main thread polls the source's status.
pub(crate) const POLL: Duration = Duration::from_millis(200);
/// How long either end waits on a silent peer.
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);
/// The synthetic guest's memory unless `--mem` says otherwise.
const SYNTHETIC_MEM: u64 = 1 << 30;
/// The smallest guest the demo runs (the workload models lay memory out in 64 KiB extents
/// and several tiers).
const MIN_MEM: u64 = 1 << 20;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The guest: synthetic (memory filled and rewritten like the paper's workloads, in this
    /// process), qemu (the QEMU test guest, booted here and live-migrated between two
    /// QEMUs; see `skyferry test-guest`) or kvm (a KVM micro-VM running the self-checking
    /// test guest, whose writes follow --workload at --speed).
    #[arg(long, value_enum, default_value_t = GuestKind::Synthetic, value_name = "KIND")]
    pub(crate) guest: GuestKind,
    /// QEMU accelerator (--guest qemu): tcg works everywhere, kvm needs /dev/kvm.
    #[arg(long, value_enum, default_value_t = Accel::Tcg)]
    pub(crate) accel: Accel,
    /// Workload of the synthetic guest: kernel (compile), tpcw (database), specjbb (Java
    /// heap) or idle.
    #[arg(long, default_value = "tpcw", value_name = "NAME")]
    pub(crate) workload: Workload,
    /// Guest memory (binary units: 1G = 1GiB = 1024 MiB) [default: 1GiB synthetic, 256MiB
    /// qemu, 4MiB kvm].
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_size,
        allow_hyphen_values = true,
    )]
    pub(crate) mem: Option<u64>,
    /// Stop policy: smart (CloudNet's Smart Stop) or xen-default.
    #[arg(long, default_value = "smart", value_name = "POLICY")]
    pub(crate) policy: Policy,
    /// Codec optimizations: all, none, or a comma list of zero, cbr, delta.
    #[arg(long, default_value = "all", value_name = "LIST", value_parser = parse_optimizations)]
    pub(crate) optimizations: Optimizations,
    /// Frame compression after the codec: off, lz4, zstd1, zstd3, or auto (on only while the
    /// link, not the CPU, is the bottleneck).
    #[arg(long, default_value = "off", value_name = "MODE")]
    pub(crate) compression: Compression,
    /// Data streams (TCP connections).
    #[arg(
        long,
        default_value_t = 2,
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..=16),
    )]
    pub(crate) streams: u32,
    /// Send rate limit, like 1Gbit, 100Mbit or 500MB/s; `none` for unlimited loopback. The
    /// default 1 Gbit/s is the link the workload models are calibrated for: pre-copy takes a
    /// few iterations and the stop policy has something to decide.
    #[arg(
        long,
        default_value = "1Gbit",
        value_name = "RATE",
        value_parser = parse_bandwidth,
        allow_hyphen_values = true,
    )]
    pub(crate) max_bandwidth: Bandwidth,
    /// Stop pre-copy as soon as what remains can be sent within this pause (e.g. 300ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
    pub(crate) downtime_limit: Option<Duration>,
    /// Multiplies the synthetic guest's write rates (0 = a guest that never writes).
    #[arg(
        long,
        default_value_t = 1.0,
        value_name = "FACTOR",
        value_parser = parse_speed,
        allow_hyphen_values = true,
    )]
    pub(crate) speed: f64,
    /// Seed of the synthetic guest's content and writes (the same seed makes the same guest).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub(crate) seed: u64,
    /// Who checks the KVM guest's memory once it runs at the destination (--guest kvm):
    /// guest (its own sweep; about 1.5 MiB/s where KVM emulates guest instructions), host
    /// (by the guest's rules, at native speed, while the guest waits) or off.
    #[arg(long, default_value = "guest", value_name = "WHO")]
    pub(crate) arrival_check: dataplane::guest::kvm::ArrivalCheck,
    /// Print one JSON object with the results on standard output (progress, if any, goes to
    /// standard error when it is a terminal).
    #[arg(long)]
    pub(crate) json: bool,
    /// Where to draw the migration's timeline (SVG) at the end [default: a file named
    /// after the migration in the temporary directory].
    #[arg(long, value_name = "FILE")]
    pub(crate) svg: Option<std::path::PathBuf>,
}

/// Which guest `skyferry demo` migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum GuestKind {
    /// The synthetic guest, in this process.
    Synthetic,
    /// The QEMU test guest, between two QEMUs on this host.
    Qemu,
    /// A KVM micro-VM running the project's self-checking test guest, in this process.
    Kvm,
}

impl Args {
    /// Guest memory: `--mem`, else the default of the chosen guest.
    pub(crate) fn mem(&self) -> u64 {
        self.mem.unwrap_or(match self.guest {
            GuestKind::Synthetic => SYNTHETIC_MEM,
            GuestKind::Qemu => crate::demo_qemu::DEFAULT_MEM,
            GuestKind::Kvm => crate::demo_kvm::DEFAULT_MEM,
        })
    }
}

/// Which codec optimizations run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Optimizations {
    zero: bool,
    cbr: bool,
    delta: bool,
}

impl Optimizations {
    pub(crate) fn codec(self) -> CodecConfig {
        CodecConfig {
            zero_pages: self.zero,
            cbr: self.cbr,
            delta: self.delta,
            ..CodecConfig::baseline()
        }
    }

    pub(crate) fn names(self) -> Vec<&'static str> {
        [
            ("zero", self.zero),
            ("cbr", self.cbr),
            ("delta", self.delta),
        ]
        .into_iter()
        .filter_map(|(n, on)| on.then_some(n))
        .collect()
    }
}

fn parse_optimizations(s: &str) -> Result<Optimizations, String> {
    let none = Optimizations {
        zero: false,
        cbr: false,
        delta: false,
    };
    match s.trim().to_ascii_lowercase().as_str() {
        "all" => {
            return Ok(Optimizations {
                zero: true,
                cbr: true,
                delta: true,
            });
        }
        "none" => return Ok(none),
        _ => {}
    }
    let mut o = none;
    for part in s.split(',') {
        match part.trim().to_ascii_lowercase().as_str() {
            "zero" => o.zero = true,
            "cbr" => o.cbr = true,
            "delta" => o.delta = true,
            other => {
                return Err(format!(
                    "unknown optimization {other:?}; use all, none, or a comma list of zero, \
                     cbr, delta"
                ));
            }
        }
    }
    Ok(o)
}

/// A send rate limit in bytes per second; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bandwidth(pub(crate) Option<u64>);

fn parse_bandwidth(s: &str) -> Result<Bandwidth, dataplane::units::UnitError> {
    dataplane::units::parse_rate_limit(s).map(Bandwidth)
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!(
            "invalid speed {s:?}: use a number from 0 up, like 0.5, 1 or 4 (a multiplier of \
             the workload's write rates)"
        )),
    }
}

/// What the demo hands back from its two threads.
pub(crate) struct Outcome {
    pub(crate) source: Result<SourceSummary, MigrateError>,
    /// `None` when the destination thread did not finish in time (it is left behind).
    pub(crate) dest: Option<Result<DestSummary, MigrateError>>,
    pub(crate) status: MigrationStatus,
    pub(crate) setup: Duration,
    pub(crate) wall: Duration,
}

pub fn run(args: &Args) -> Result<(), String> {
    match args.guest {
        GuestKind::Qemu => return crate::demo_qemu::run(args),
        GuestKind::Kvm => return crate::demo_kvm::run(args),
        GuestKind::Synthetic => {}
    }
    let mem = args.mem();
    let page = PAGE_SIZE as u64;
    if mem < MIN_MEM || !mem.is_multiple_of(page) {
        return Err(format!(
            "--mem is {mem} bytes: the guest needs a whole number of 4 KiB pages, at least {}",
            format_size(MIN_MEM)
        ));
    }
    let pages = mem / page;
    let codec = CodecConfig {
        compression: args.compression,
        ..args.optimizations.codec()
    };
    check_memory(mem, args.streams, &codec)?;

    let mut view = if args.json {
        Progress::stderr()
    } else {
        Progress::new()
    };
    let chatty = !args.json;
    if chatty {
        println!(
            "skyferry demo: a {} synthetic {} guest (seed {}, speed {}) live-migrated over \
             loopback TCP",
            format_size(mem),
            args.workload,
            args.seed,
            args.speed
        );
        println!("{}", settings_line(args));
        println!("  filling guest memory...");
    }

    let outcome = migrate_here(args, pages, codec, &mut view)?;
    report(args, pages, &outcome)
}

/// The migration settings, one line, for the demo's header.
pub(crate) fn settings_line(args: &Args) -> String {
    format!(
        "  policy {} | optimizations {} | compression {} | {} stream{} | rate limit {}{}",
        args.policy,
        optimizations_text(args.optimizations),
        args.compression,
        args.streams,
        if args.streams == 1 { "" } else { "s" },
        args.max_bandwidth
            .0
            .map_or("none".into(), |r| format_rate(r as f64)),
        args.downtime_limit
            .map(|d| format!(" | downtime limit {}", format_duration(d)))
            .unwrap_or_default()
    )
}

fn optimizations_text(o: Optimizations) -> String {
    let names = o.names();
    if names.is_empty() {
        "none (full pages)".into()
    } else {
        names.join(", ")
    }
}

/// Refuses a demo this host cannot hold: two copies of the guest (source and destination)
/// plus a block cache per stream at each end.
pub(crate) fn check_memory(mem: u64, streams: u32, codec: &CodecConfig) -> Result<(), String> {
    use dataplane::limits::{HostMemory, MigrationMemory, check_guest_size, check_streams};
    check_guest_size(mem).map_err(|e| format!("--mem: {e}"))?;
    check_streams("--streams", streams).map_err(|e| e.to_string())?;
    let end = MigrationMemory {
        guest_bytes: mem,
        streams,
        cache_bytes: if codec.uses_cache() {
            codec.cache_bytes
        } else {
            0
        },
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE as u64,
    };
    HostMemory::read()
        .and_then(|host| {
            host.check(
                format!(
                    "a demo of a {} guest (a copy at each end plus the block caches)",
                    format_size(mem)
                ),
                end.bytes().saturating_mul(2),
            )
        })
        .map_err(|e| format!("{e}; try a smaller --mem"))
}

fn migrate_here(
    args: &Args,
    pages: u64,
    codec: CodecConfig,
    view: &mut Progress,
) -> Result<Outcome, String> {
    let started = Instant::now();
    let psk = PreSharedKey::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let id = getrandom::u64().map_err(|e| format!("cannot make a migration id: {e}"))?;
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the loopback address: {e}"))?;
    let label = format!("{}-demo", args.workload);

    let guest = Arc::new(
        SyntheticGuest::with_options(
            pages,
            args.workload,
            args.seed,
            SyntheticOptions {
                speed: args.speed,
                writers: 1,
            },
        )
        .map_err(|e| format!("cannot create the guest: {e}"))?,
    );
    let setup = started.elapsed();

    let dest_abort = Arc::new(AtomicBool::new(false));
    let dest = spawn_destination(listener, psk.clone(), pages, args.streams, &dest_abort)?;

    let opts = source_options(args, addr, psk, codec, &label);
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        id,
        Role::Source,
        &label,
        pages,
    )));
    let source = spawn_source(guest.clone(), opts, id, &status)?;
    let snapshot = || snapshot(&status);
    while !source.is_finished() {
        view.update(&snapshot());
        thread::sleep(POLL);
    }
    let source = source
        .join()
        .map_err(|_| "the source thread panicked".to_string())?;
    // The summary's own status when there is one, so the closing line and the summary
    // table give the same total time.
    let last = source
        .as_ref()
        .map_or_else(|_| snapshot(), |s| s.status.clone());
    view.finish(&last);

    let dest = join_destination(dest, source.is_ok(), &dest_abort, addr);
    drop(guest);
    Ok(Outcome {
        source,
        dest,
        status: last,
        setup,
        wall: started.elapsed(),
    })
}

type DestThread = JoinHandle<Result<DestSummary, MigrateError>>;

fn spawn_destination(
    listener: TcpListener,
    psk: PreSharedKey,
    pages: u64,
    streams: u32,
    abort: &Arc<AtomicBool>,
) -> Result<DestThread, String> {
    let abort = abort.clone();
    let opts = dest_options(psk, pages, streams);
    thread::Builder::new()
        .name("sf-demo-dest".into())
        .spawn(move || receive_synthetic(&listener, &opts, &abort))
        .map_err(|e| format!("cannot start the destination thread: {e}"))
}

/// What every demo's destination runs with: a guest of at most `pages` pages over at most
/// `streams` streams, no disk or network steering.
pub(crate) fn dest_options(psk: PreSharedKey, pages: u64, streams: u32) -> DestOptions {
    DestOptions {
        resume_window: std::time::Duration::from_secs(120),
        psk,
        socket: SocketOptions::default(),
        pin_threads: true,
        timeout: TIMEOUT,
        max_guest_pages: pages,
        max_streams: streams,
        drbd: None,
        announce: None,
    }
}

/// What every demo's source runs with: the demo's flags, one loopback peer, no disk, network
/// or group.
pub(crate) fn source_options(
    args: &Args,
    peer: std::net::SocketAddr,
    psk: PreSharedKey,
    codec: CodecConfig,
    label: &str,
) -> SourceOptions {
    SourceOptions {
        resume: Default::default(),
        peer,
        psk,
        streams: args.streams,
        codec,
        policy: args.policy,
        max_downtime: args.downtime_limit,
        converge: Default::default(),
        max_bandwidth: args.max_bandwidth.0,
        socket: SocketOptions::default(),
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE,
        pin_threads: true,
        timeout: TIMEOUT,
        guest_label: label.into(),
        group: None,
        disk: None,
        network: None,
    }
}

/// Runs the source end of the migration on its own thread.
pub(crate) fn spawn_source(
    guest: Arc<dyn SourceGuest>,
    opts: SourceOptions,
    id: u64,
    status: &Arc<Mutex<MigrationStatus>>,
) -> Result<JoinHandle<Result<SourceSummary, MigrateError>>, String> {
    let status = status.clone();
    thread::Builder::new()
        .name("sf-demo-source".into())
        .spawn(move || migrate(guest, &opts, id, &status, &AtomicBool::new(false)))
        .map_err(|e| format!("cannot start the source thread: {e}"))
}

/// The status now (a panicked writer leaves it readable).
pub(crate) fn snapshot(status: &Mutex<MigrationStatus>) -> MigrationStatus {
    status
        .lock()
        .map_or_else(|e| e.into_inner().clone(), |s| s.clone())
}

/// Joins the destination thread. It ends with the source; if the source failed early it may
/// still wait for a connection: it is told to stop and its accept is woken.
pub(crate) fn join_destination<T>(
    dest: JoinHandle<T>,
    source_ok: bool,
    dest_abort: &AtomicBool,
    addr: std::net::SocketAddr,
) -> Option<T> {
    if !source_ok {
        dest_abort.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
    }
    let limit = if source_ok {
        TIMEOUT
    } else {
        Duration::from_secs(5)
    };
    join_within(dest, limit)
}

/// Joins `t` if it ends within `limit`; otherwise leaves it (the process exit ends it).
fn join_within<T>(t: JoinHandle<T>, limit: Duration) -> Option<T> {
    let deadline = Instant::now() + limit;
    while !t.is_finished() {
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
    t.join().ok()
}

/// Whether both ends completed and confirmed the memory digests, and if not, why.
pub(crate) fn verdict(o: &Outcome) -> (bool, Option<String>) {
    let status = o.source.as_ref().map_or(&o.status, |s| &s.status);
    let dest_status = match &o.dest {
        Some(Ok(d)) => Some(&d.status),
        _ => None,
    };
    let dest_error = match &o.dest {
        Some(Err(e)) => Some(e.to_string()),
        Some(Ok(_)) => None,
        None => Some("the destination did not finish".to_string()),
    };
    let verified = status.phase == Phase::Completed
        && status.verified == Some(true)
        && dest_status.is_some_and(|d| d.phase == Phase::Completed && d.verified == Some(true));
    let error = match (&o.source, &dest_error) {
        (Err(e), _) => Some(format!("migration failed: {e}")),
        (Ok(_), _) if status.phase != Phase::Completed => Some(format!(
            "migration ended {}: {}",
            crate::progress::phase_name(status.phase),
            status.error.as_deref().unwrap_or("no reason given")
        )),
        (Ok(_), Some(d)) => Some(format!(
            "the source completed but the destination reports: {d}"
        )),
        (Ok(_), None) if !verified => {
            Some("memory verification failed: the destination did not confirm it".into())
        }
        _ => None,
    };
    (verified, error)
}

/// Prints the result (table or JSON) and decides the exit status.
fn report(args: &Args, pages: u64, o: &Outcome) -> Result<(), String> {
    let summary = o.source.as_ref().ok();
    let status = summary.map_or(&o.status, |s| &s.status);
    let (verified, error) = verdict(o);
    if args.json {
        let codec = summary.map(|s| &s.codec);
        let obj = json_report(args, pages, o, status, codec, verified, error.as_deref());
        println!("{obj}");
    } else {
        let codec = summary.map(|s| &s.codec);
        let iterations = summary.map_or(&[][..], |s| &s.iterations[..]);
        println!();
        print!("{}", summary_table(status, codec, iterations));
        // One total time (the migration's, above); the set-up before it is not part of it.
        println!(
            "  {:<17}  {} to fill guest memory before the migration began",
            "set-up",
            format_duration(o.setup)
        );
        println!();
        if verified {
            println!(
                "verified: the destination's memory matches the source's (digests of all {} \
                 pages agree at both ends); the guest now runs at the destination",
                crate::progress::group(pages)
            );
        }
        let svg = args.svg.clone().unwrap_or_else(|| {
            std::env::temp_dir().join(format!(
                "skyferry-demo-{}.svg",
                dataplane::migrate::MigrationId(status.id)
            ))
        });
        match crate::timeline::write_svg(status, &svg) {
            Ok(()) => println!("timeline: {}", svg.display()),
            Err(e) => eprintln!("skyferry: no timeline: {e}"),
        }
    }
    error.map_or(Ok(()), Err)
}

pub(crate) fn json_report(
    args: &Args,
    pages: u64,
    o: &Outcome,
    status: &MigrationStatus,
    codec: Option<&CodecStats>,
    verified: bool,
    error: Option<&str>,
) -> serde_json::Value {
    let summary = o.source.as_ref().ok();
    let iterations = summary.map_or(&[][..], |s| &s.iterations[..]);
    let precopy = iterations
        .len()
        .saturating_sub(usize::from(status.stop_reason.is_some()));
    json!({
        "verified": verified,
        "phase": crate::progress::phase_name(status.phase),
        "workload": args.workload.name(),
        "policy": args.policy.name(),
        "optimizations": args.optimizations.names(),
        "compression": args.compression.name(),
        "streams": args.streams,
        "seed": args.seed,
        "speed": args.speed,
        "max_bandwidth_bps": args.max_bandwidth.0,
        "downtime_limit_ms": args.downtime_limit.map(|d| d.as_secs_f64() * 1e3),
        "guest_bytes": args.mem(),
        "guest_pages": pages,
        "iterations": iterations.len(),
        "precopy_iterations": precopy,
        "pages_sent": status.pages_sent,
        "bytes_on_wire": status.wire_bytes,
        "total_ms": status.elapsed_ms,
        "pause_ms": status.pause_ms,
        "saved_bytes": {
            "zero": status.saved.zero,
            "cbr": status.saved.cbr,
            "delta": status.saved.delta,
            "compress": status.saved.compress,
        },
        "stop_reason": status.stop_reason.map(stop_reason_name),
        "link_rate_bps": status.job.link_rate_bps,
        "per_iteration": iterations,
        "records": codec.map(|c| json!({
            "zero": c.pages[0],
            "full": c.pages[1],
            "blocks": c.pages[2],
            "delta": c.pages[3],
        })),
        "codec": codec,
        "setup_ms": millis(o.setup),
        "wall_ms": millis(o.wall),
        "error": error,
    })
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::progress::Style;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        Cli::try_parse_from(std::iter::once("demo").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.workload, Workload::Tpcw);
        assert_eq!(a.mem(), 1 << 30);
        assert_eq!(a.guest, GuestKind::Synthetic);
        assert_eq!(a.accel, Accel::Tcg);
        assert_eq!(a.policy, Policy::Smart);
        assert_eq!(a.optimizations.names(), ["zero", "cbr", "delta"]);
        assert_eq!(a.streams, 2);
        assert_eq!(a.max_bandwidth, Bandwidth(Some(125_000_000)));
        assert_eq!(a.downtime_limit, None);
        assert!((a.speed - 1.0).abs() < f64::EPSILON);
        assert!(!a.json);
        assert_eq!(a.optimizations.codec(), CodecConfig::default());
        assert_eq!(a.compression, Compression::Off);
    }

    #[test]
    fn compression_flag() {
        let a = parse(&["--compression", "auto"]).unwrap();
        assert_eq!(a.compression, Compression::Auto);
        assert_eq!(
            parse(&["--compression", "zstd3"]).unwrap().compression,
            Compression::Zstd3
        );
        let msg = parse(&["--compression", "gzip"]).unwrap_err().to_string();
        assert!(msg.contains("gzip") && msg.contains("auto"), "{msg}");
    }

    #[test]
    fn flags() {
        let a = parse(&[
            "--workload",
            "specjbb",
            "--mem",
            "512M",
            "--policy",
            "xen-default",
            "--optimizations",
            "zero,delta",
            "--streams",
            "4",
            "--max-bandwidth",
            "none",
            "--downtime-limit",
            "300ms",
            "--speed",
            "2.5",
            "--seed",
            "9",
            "--json",
        ])
        .unwrap();
        assert_eq!(a.workload, Workload::Specjbb);
        assert_eq!(a.mem(), 512 << 20);
        assert_eq!(a.policy, Policy::XenDefault);
        assert_eq!(a.optimizations.names(), ["zero", "delta"]);
        assert_eq!(a.max_bandwidth, Bandwidth(None));
        assert_eq!(a.downtime_limit, Some(Duration::from_millis(300)));
        assert!(a.json);
        let none = parse(&["--optimizations", "none"]).unwrap();
        assert_eq!(none.optimizations.codec(), CodecConfig::baseline());
    }

    #[test]
    fn malformed_values_are_refused_with_the_units_message() {
        let e = parse(&["--mem", "12XB"]).err().unwrap();
        assert_eq!(e.exit_code(), 2);
        let msg = e.to_string();
        assert!(
            msg.contains("invalid size \"12XB\": unknown unit \"XB\"; use a number"),
            "{msg}"
        );
        let msg = parse(&["--max-bandwidth", "fast"])
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("invalid rate \"fast\""), "{msg}");
        let msg = parse(&["--downtime-limit", "300"])
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("the unit is missing"), "{msg}");
        let msg = parse(&["--optimizations", "zero,gzip"])
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("unknown optimization \"gzip\""), "{msg}");
        let msg = parse(&["--speed", "-1"]).err().unwrap().to_string();
        assert!(msg.contains("invalid speed"), "{msg}");
        let msg = parse(&["--mem", "-1G"]).err().unwrap().to_string();
        assert!(
            msg.contains("invalid size \"-1G\": it cannot be negative"),
            "{msg}"
        );
        let msg = parse(&["--workload", "redis"]).err().unwrap().to_string();
        assert!(msg.contains("unknown workload"), "{msg}");
        assert!(parse(&["--streams", "0"]).is_err());
    }

    #[test]
    fn guest_size_is_checked() {
        let a = parse(&["--mem", "1000"]).unwrap();
        let e = run(&a).unwrap_err();
        assert!(e.contains("whole number of 4 KiB pages"), "{e}");
    }

    /// A small whole demo: both ends, real loopback TCP, verified.
    #[test]
    fn small_demo_verifies() {
        let a = parse(&[
            "--mem",
            "16MiB",
            "--max-bandwidth",
            "400Mbit",
            "--speed",
            "4",
            "--json",
        ])
        .unwrap();
        let codec = a.optimizations.codec();
        let mut view = Progress::with_writer(Box::new(std::io::sink()), Style::Quiet, 80);
        let o = migrate_here(&a, 4096, codec, &mut view).unwrap();
        let s = o.source.as_ref().expect("source");
        assert_eq!(s.status.phase, Phase::Completed);
        let v = json_report(&a, 4096, &o, &s.status, Some(&s.codec), true, None);
        assert_eq!(v["guest_pages"], 4096);
        assert!(v["iterations"].as_u64().unwrap() >= 2, "{v}");
        assert!(v["pages_sent"].as_u64().unwrap() >= 4096);
        assert!(v["per_iteration"].as_array().unwrap().len() >= 2);
        assert!(v["saved_bytes"]["zero"].as_u64().unwrap() > 0, "{v}");
        assert!(report(&a, 4096, &o).is_ok());
    }
}

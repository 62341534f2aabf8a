//! `skyferry-bench compress`: the paper's comparison with a compressed tunnel (VI-K, Fig. 18),
//! and `compression = auto` beside it.
//!
//! The same live migration (a running synthetic guest, kernel compile by default, 1 GiB,
//! through the source's 100 Mbit/s rate limit) is run with:
//!
//! - `none`: no optimization, no compression (the reference the reductions are against);
//! - `tunnel-lz4`, `tunnel-zstd1`, `tunnel-zstd3`: no zero pages, CBR or deltas, every frame
//!   compressed: what a compressed tunnel under a plain migration would carry;
//! - `skyferry`: zero pages, CBR and deltas, no compression;
//! - `skyferry+auto`: the same, with the adaptive controller deciding about compression.
//!
//! Then, on an unlimited loopback link, `skyferry`, `skyferry+auto` and `skyferry+zstd1`: there
//! the CPU is the bottleneck, and `auto` should stay off and cost nothing.
//!
//! Source and destination are separate processes (role `compress-peer`), each measuring its
//! own CPU time; the source's excludes the guest's writer threads. Before the migrations, the
//! compressors' speed and ratio on this workload's frames are measured in-process (the
//! priors of the controller come from this table).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use clap::Args as ClapArgs;
use dataplane::codec::compress::{Compressor, Decompressor};
use dataplane::codec::{CodecConfig, Compression, Encoder, Level};
use dataplane::frame::{DEFAULT_FRAME_SIZE, FrameBuf, HEADER_LEN, TAG_LEN};
use dataplane::guest::SourceGuest;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticOptions};
use dataplane::guest::workload::Workload;
use dataplane::page::{PAGE_SIZE, PageBatch};
use dataplane::units::{format_rate, format_size};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::compress_peer::{DestReport, SourceReport};

/// CPU seconds this thread has used: unlike wall time, not inflated when neighbours on a
/// shared machine take the core away.
fn thread_cpu() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_THREAD).expect("getrusage(RUSAGE_THREAD)");
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    secs(u.user_time()) + secs(u.system_time())
}

/// The least CPU time `f` took in `reps` runs.
fn best_cpu(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = thread_cpu();
            f();
            thread_cpu() - t
        })
        .fold(f64::INFINITY, f64::min)
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Guest memory (default 1GiB, or 256MiB with --quick).
    #[arg(long, value_parser = dataplane::units::parse_size)]
    mem: Option<u64>,
    /// Workload model of the running guest.
    #[arg(long, default_value = "kernel")]
    workload: Workload,
    /// Link rate for the comparison (the source's send-side rate limit).
    #[arg(long, default_value = "100Mbit", value_parser = dataplane::units::parse_rate)]
    rate: u64,
    /// TCP streams.
    #[arg(long, default_value_t = 2)]
    streams: u32,
    /// Guest write-rate multiplier.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Content and write seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A run of a few minutes: a 256 MiB guest unless --mem says otherwise.
    #[arg(long)]
    quick: bool,
    /// Skip the unlimited-link runs.
    #[arg(long)]
    no_fast: bool,
    /// Only the compressors' speed and ratio table, no migrations.
    #[arg(long)]
    levels_only: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// One configuration of the data path.
#[derive(Debug, Clone, Copy)]
struct Setup {
    name: &'static str,
    optimizations: &'static str,
    compression: Compression,
}

const LINK_SETUPS: [Setup; 6] = [
    Setup {
        name: "none",
        optimizations: "none",
        compression: Compression::Off,
    },
    Setup {
        name: "tunnel-lz4",
        optimizations: "none",
        compression: Compression::Lz4,
    },
    Setup {
        name: "tunnel-zstd1",
        optimizations: "none",
        compression: Compression::Zstd1,
    },
    Setup {
        name: "tunnel-zstd3",
        optimizations: "none",
        compression: Compression::Zstd3,
    },
    Setup {
        name: "skyferry",
        optimizations: "all",
        compression: Compression::Off,
    },
    Setup {
        name: "skyferry+auto",
        optimizations: "all",
        compression: Compression::Auto,
    },
];

const FAST_SETUPS: [Setup; 3] = [
    Setup {
        name: "skyferry",
        optimizations: "all",
        compression: Compression::Off,
    },
    Setup {
        name: "skyferry+auto",
        optimizations: "all",
        compression: Compression::Auto,
    },
    Setup {
        name: "skyferry+zstd1",
        optimizations: "all",
        compression: Compression::Zstd1,
    },
];

/// One migration's figures.
#[derive(Debug, Serialize)]
struct CaseResult {
    /// `limited` (the --rate link) or `unlimited`.
    link: &'static str,
    setup: &'static str,
    optimizations: &'static str,
    compression: &'static str,
    wire_bytes: u64,
    /// 1 - wire_bytes / the `none` run's (limited link only).
    data_reduction: Option<f64>,
    total_s: f64,
    /// 1 - total_s / the `none` run's (limited link only).
    time_reduction: Option<f64>,
    pause_ms: u64,
    iterations: usize,
    src_cpu_s: f64,
    dst_cpu_s: f64,
    /// Source CPU over the migration's time: cores busy on average.
    src_cpu_share: f64,
    /// The guest's writers, excluded from src_cpu_s.
    guest_cpu_s: f64,
    frames_compressed: u64,
    saved_by_compression: u64,
    verified: bool,
}

/// A compressor's speed and ratio on frames as one data path makes them.
#[derive(Debug, Serialize)]
struct LevelResult {
    /// `skyferry` (records after zero/CBR/delta) or `tunnel` (full pages).
    frames: &'static str,
    level: String,
    /// Body bytes in per CPU-second, GB/s (best of three runs, thread CPU time).
    compress_gbps: f64,
    /// Body bytes out per CPU-second, GB/s.
    decompress_gbps: f64,
    /// Bytes out / bytes in (frames left uncompressed count as they are).
    ratio: f64,
    /// CPU seconds per byte in (the controller's cost unit).
    cost_s_per_byte: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    workload: &'static str,
    mem_bytes: u64,
    rate_bytes_per_s: u64,
    streams: u32,
    speed: f64,
    seed: u64,
    levels: Vec<LevelResult>,
    cases: Vec<CaseResult>,
}

/// A child process of this binary in one role.
struct Peer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    what: &'static str,
}

impl Peer {
    fn spawn(what: &'static str, args: &[String]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .arg("compress-peer")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the {what} process: {e}"))?;
        let out = BufReader::new(child.stdout.take().expect("piped"));
        Ok(Peer { child, out, what })
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .map_err(|e| format!("{} output: {e}", self.what))?;
        if line.is_empty() {
            return Err(format!("{} process ended without a report", self.what));
        }
        Ok(line)
    }

    fn finish<T: DeserializeOwned>(mut self) -> Result<T, String> {
        let line = self.line()?;
        let report = serde_json::from_str(&line)
            .map_err(|e| format!("{} report {line:?}: {e}", self.what))?;
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("{} process exited with {status}", self.what));
        }
        Ok(report)
    }
}

fn run_case(
    args: &Args,
    pages: u64,
    link: &'static str,
    rate: Option<u64>,
    setup: Setup,
) -> Result<CaseResult, String> {
    let common = vec!["--pages".to_string(), pages.to_string()];
    let mut dest = Peer::spawn(
        "destination",
        &[common.clone(), vec!["--end".into(), "dest".into()]].concat(),
    )?;
    let port = dest.line()?.trim().to_string();
    let mut src_args = common;
    src_args.extend([
        "--end".into(),
        "source".into(),
        "--port".into(),
        port,
        "--workload".into(),
        args.workload.name().into(),
        "--speed".into(),
        args.speed.to_string(),
        "--seed".into(),
        args.seed.to_string(),
        "--streams".into(),
        args.streams.to_string(),
        "--optimizations".into(),
        setup.optimizations.into(),
        "--compression".into(),
        setup.compression.name().into(),
    ]);
    if let Some(r) = rate {
        src_args.extend(["--max-bandwidth".into(), r.to_string()]);
    }
    let source = Peer::spawn("source", &src_args)?;
    let src: SourceReport = source.finish()?;
    let dst: DestReport = dest.finish()?;
    if src.codec.frames_compressed != dst.codec.frames_compressed {
        return Err(format!(
            "{}: {} frames compressed at the source, {} decompressed at the destination",
            setup.name, src.codec.frames_compressed, dst.codec.frames_compressed
        ));
    }
    Ok(CaseResult {
        link,
        setup: setup.name,
        optimizations: setup.optimizations,
        compression: setup.compression.name(),
        wire_bytes: src.wire_bytes,
        data_reduction: None,
        total_s: src.elapsed_s,
        time_reduction: None,
        pause_ms: src.pause_ms,
        iterations: src.iterations,
        src_cpu_s: src.cpu_s,
        dst_cpu_s: dst.cpu_s,
        src_cpu_share: src.cpu_s / src.elapsed_s,
        guest_cpu_s: src.guest_cpu_s,
        frames_compressed: src.codec.frames_compressed,
        saved_by_compression: src.codec.saved_compress,
        verified: src.verified && dst.verified,
    })
}

/// The bodies of the frames a data path makes from the workload's initial memory.
fn frame_bodies(args: &Args, pages: u64, optimizations: &str) -> Result<Vec<Vec<u8>>, String> {
    let guest = SyntheticGuest::with_options(
        pages,
        args.workload,
        args.seed,
        SyntheticOptions {
            speed: 0.0,
            writers: 1,
        },
    )
    .map_err(|e| e.to_string())?;
    let mut codec = CodecConfig::default();
    codec.set_optimizations(optimizations)?;
    let mut enc = Encoder::new(codec).map_err(|e| e.to_string())?;
    let mut bodies = Vec::new();
    let mut frame = FrameBuf::new(DEFAULT_FRAME_SIZE);
    let mut batch = PageBatch::with_capacity(64);
    let all: Vec<u64> = (0..pages).collect();
    for pfns in all.chunks(64) {
        guest
            .read_pages(pfns, &mut batch)
            .map_err(|e| e.to_string())?;
        enc.encode_batch(&batch, &mut frame, |f| {
            bodies.push(f.body().to_vec());
            f.clear();
        });
        batch.clear();
    }
    if !frame.is_empty() {
        bodies.push(frame.body().to_vec());
    }
    Ok(bodies)
}

fn measure_levels(args: &Args, pages: u64) -> Result<Vec<LevelResult>, String> {
    let body_max = DEFAULT_FRAME_SIZE - HEADER_LEN - TAG_LEN;
    let mut out = Vec::new();
    for (frames, opts) in [("skyferry", "all"), ("tunnel", "none")] {
        let bodies = frame_bodies(args, pages, opts)?;
        let bytes_in: usize = bodies.iter().map(Vec::len).sum();
        for level in Level::ALL {
            let mut c = Compressor::new(body_max);
            let mut packed: Vec<Option<Vec<u8>>> = Vec::with_capacity(bodies.len());
            let mut bytes_out = 0usize;
            for b in &bodies {
                let p = c.compress(level, b).map(<[u8]>::to_vec);
                bytes_out += p.as_ref().map_or(b.len(), Vec::len);
                packed.push(p);
            }
            let t_c = best_cpu(3, || {
                for b in &bodies {
                    std::hint::black_box(c.compress(level, b));
                }
            });
            let mut d = Decompressor::new(body_max);
            let plain: usize = packed.iter().flatten().count();
            let t_d = best_cpu(3, || {
                for p in packed.iter().flatten() {
                    std::hint::black_box(d.decompress(level.algorithm(), p).expect("own data"));
                }
            });
            let restored: usize = bodies
                .iter()
                .zip(&packed)
                .filter(|(_, p)| p.is_some())
                .map(|(b, _)| b.len())
                .sum();
            out.push(LevelResult {
                frames,
                level: level.to_string(),
                compress_gbps: bytes_in as f64 / t_c / 1e9,
                decompress_gbps: if plain == 0 {
                    0.0
                } else {
                    restored as f64 / t_d / 1e9
                },
                ratio: bytes_out as f64 / bytes_in as f64,
                cost_s_per_byte: t_c / bytes_in as f64,
            });
        }
    }
    Ok(out)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    format!("{cores} x {cpu}")
}

pub fn run(args: &Args) -> Result<(), String> {
    let mem = args
        .mem
        .unwrap_or(if args.quick { 256 << 20 } else { 1 << 30 });
    let pages = mem / PAGE_SIZE as u64;
    if pages < 1024 || args.streams == 0 {
        return Err("--mem must be at least 4MiB and --streams at least 1".into());
    }
    let say = |s: String| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say("compress: compressor speed and ratio on this workload's frames ...".into());
    let started = Instant::now();
    let levels = measure_levels(args, pages.min(16 << 10))?;
    let mut cases = Vec::new();
    if !args.levels_only {
        for setup in LINK_SETUPS {
            say(format!(
                "compress: {} at {} ...",
                setup.name,
                format_rate(args.rate as f64)
            ));
            cases.push(run_case(args, pages, "limited", Some(args.rate), setup)?);
        }
        if !args.no_fast {
            for setup in FAST_SETUPS {
                say(format!("compress: {} on an unlimited link ...", setup.name));
                cases.push(run_case(args, pages, "unlimited", None, setup)?);
            }
        }
    }
    if let Some(base) = cases
        .iter()
        .find(|c| c.link == "limited" && c.setup == "none")
        .map(|c| (c.wire_bytes as f64, c.total_s))
    {
        for c in cases.iter_mut().filter(|c| c.link == "limited") {
            c.data_reduction = Some(1.0 - c.wire_bytes as f64 / base.0);
            c.time_reduction = Some(1.0 - c.total_s / base.1);
        }
    }
    if let Some(c) = cases.iter().find(|c| !c.verified) {
        return Err(format!("{} ({}): not verified", c.setup, c.link));
    }
    say(format!(
        "compress: done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    let report = Report {
        machine: machine(),
        workload: args.workload.name(),
        mem_bytes: mem,
        rate_bytes_per_s: args.rate,
        streams: args.streams,
        speed: args.speed,
        seed: args.seed,
        levels,
        cases,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
    } else {
        print_tables(&report);
    }
    Ok(())
}

fn pct(x: Option<f64>) -> String {
    x.map_or("-".into(), |x| format!("{:.0}%", 100.0 * x))
}

fn print_tables(r: &Report) {
    println!(
        "compress: {} {} guest, {} stream(s), speed {}, on {}",
        format_size(r.mem_bytes),
        r.workload,
        r.streams,
        r.speed,
        r.machine
    );
    println!();
    println!("compressors on this workload's frames (per CPU-second of one thread):");
    println!(
        "{:<10} {:<6} {:>12} {:>14} {:>7}",
        "frames", "level", "compress GB/s", "decompress GB/s", "ratio"
    );
    for l in &r.levels {
        println!(
            "{:<10} {:<6} {:>12.2} {:>14.2} {:>7.3}",
            l.frames, l.level, l.compress_gbps, l.decompress_gbps, l.ratio
        );
    }
    println!();
    println!(
        "{:<10} {:<15} {:>10} {:>6} {:>8} {:>6} {:>8} {:>6} {:>7} {:>7} {:>8}",
        "link",
        "setup",
        "data",
        "less",
        "total s",
        "less",
        "pause ms",
        "iters",
        "src cpu",
        "dst cpu",
        "z-frames"
    );
    for c in &r.cases {
        let link = if c.link == "limited" {
            format_rate(r.rate_bytes_per_s as f64)
        } else {
            "unlimited".into()
        };
        println!(
            "{:<10} {:<15} {:>10} {:>6} {:>8.1} {:>6} {:>8} {:>6} {:>7.2} {:>7.2} {:>8}",
            link,
            c.setup,
            format_size(c.wire_bytes),
            pct(c.data_reduction),
            c.total_s,
            pct(c.time_reduction),
            c.pause_ms,
            c.iterations,
            c.src_cpu_s,
            c.dst_cpu_s,
            c.frames_compressed
        );
    }
    println!(
        "data: bytes on the wire; less: reduction against `none` on the same link; cpu: CPU-seconds\n\
         of each process over the migration (source without the guest's writers); z-frames:\n\
         frames sent compressed. tunnel-*: no zero pages, CBR or deltas, every frame compressed."
    );
}

//! `skyferry-bench wan`: the paper's emulated-WAN experiments (VI-F, VI-G) through the link
//! emulator, with synthetic guests running their workload models.
//!
//! - Table I: kernel, tpcw, specjbb; 1 GiB guests; 100 Mb/s, 20 ms RTT; `xen-default`
//!   without optimizations vs `smart` with all of them: data sent, total time, pause time.
//! - Fig. 11: Smart Stop, zero pages, CBR and page deltas each alone, then all, as
//!   reductions against that baseline (the paper's CBR includes zero pages; skyferry can
//!   switch them separately, so both are shown).
//! - Fig. 14: 50-1000 Mb/s at 10 ms RTT, total time and data for both configurations, for
//!   TPC-W and SPECjbb as in the paper.
//! - Table II: wire bytes of iteration 1 and of the later ones with deltas (xen-default,
//!   deltas only), and what the deltas saved.
//!
//! The emulator's accuracy is measured first, so every run carries its own calibration.
//! Runs shared by several experiments (the baselines) run once.
//!
//! `--quick` compresses time instead of changing the dynamics: guest memory / k, link rates
//! / m, write speed x k/m keeps every ratio of dirty rate, tier size and link rate while all
//! durations shrink by m/k (32 MiB guests, half the rates, speed 16: 1/16 of the time). The
//! block cache and the source's send buffer shrink with the guest. What does not scale (the
//! pipeline's 1 MiB of frames per stream, Xen's 50-page stop rule, round trips, fixed costs
//! of the switchover) weighs 32 times more, so quick figures are a smoke test, not the
//! paper's.

mod migration;
mod tables;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use dataplane::guest::workload::Workload;
use dataplane::page::PAGE_SIZE;
use dataplane::transport::SocketOptions;
use dataplane::units::{format_size, parse_size};
use serde::Serialize;

use crate::calibrate::{self, Calibration};
use migration::{ALL, BASELINE, CBR, DELTA, RunResult, RunSpec, SMART, Setup, ZERO};
use tables::Runs;

const GIB: u64 = 1 << 30;
/// The paper's setting for Table I, Fig. 11 and Table II (VI-F).
const TABLE_RATE_MBPS: f64 = 100.0;
const TABLE_RTT_MS: u64 = 20;
/// Fig. 14's round trip (VI-G).
const SWEEP_RTT_MS: u64 = 10;
/// The paper's block cache, 100 MB for a 1 GB guest.
const CACHE_PER_GIB: u64 = 100 << 20;

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experiment {
    Table1,
    Fig11,
    Fig14,
    Table2,
    All,
}

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Which experiment to run.
    #[arg(long, value_enum, default_value = "all")]
    experiment: Experiment,
    /// Guest memory (default 1GiB, or 32MiB with --quick).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    mem: Option<u64>,
    /// Seed of the guests' content and writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Multiplier of the workload models' write rates (default 1, real speed; with --quick,
    /// link-scale x 1GiB / mem, which keeps the dynamics of a 1 GiB guest).
    #[arg(long, value_name = "FACTOR")]
    speed: Option<f64>,
    /// Multiplier of every link rate (default 1, or 0.5 with --quick).
    #[arg(long, value_name = "FACTOR")]
    link_scale: Option<f64>,
    /// Block cache per stream (default 100 MiB per GiB of guest, the paper's 100 MB).
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    cache: Option<u64>,
    /// Data streams per migration (the paper's Xen used one TCP connection).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    streams: u32,
    /// The source's socket send buffer (SO_SNDBUF; the kernel caps it at net.core.wmem_max
    /// and doubles it). Default: skyferry's default (scaled with the guest under --quick).
    /// Data still waiting there when the guest pauses is sent during the pause.
    #[arg(long, value_parser = parse_size, value_name = "SIZE")]
    send_buffer: Option<u64>,
    /// Workloads of Table I, Fig. 11 and Table II.
    #[arg(long, value_delimiter = ',', default_value = "kernel,tpcw,specjbb")]
    workloads: Vec<Workload>,
    /// Workloads of Fig. 14 (the paper shows TPC-W and SPECjbb).
    #[arg(long, value_delimiter = ',', default_value = "tpcw,specjbb")]
    fig14_workloads: Vec<Workload>,
    /// Link rates of Fig. 14, Mb/s (before --link-scale).
    #[arg(long, value_delimiter = ',', default_value = "50,100,250,500,1000")]
    fig14_rates: Vec<f64>,
    /// Scaled down to run in minutes: 32 MiB guests, half the link rates, time compressed
    /// (see --speed).
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of tables (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Also write the JSON object to this file, rewritten after every run.
    #[arg(long, value_name = "PATH")]
    save_json: Option<PathBuf>,
}

/// The resolved settings.
#[derive(Debug, Clone, Serialize)]
struct Settings {
    experiment: String,
    quick: bool,
    mem_bytes: u64,
    seed: u64,
    speed: f64,
    link_scale: f64,
    cache_bytes: u64,
    streams: u32,
    send_buffer: usize,
    /// Table I, Fig. 11, Table II: link rate and round trip.
    table_rate_mbps: f64,
    table_rtt_ms: u64,
    fig14_rates_mbps: Vec<f64>,
    fig14_rtt_ms: u64,
}

fn resolve(a: &Args) -> Result<Settings, String> {
    let mem = a.mem.unwrap_or(if a.quick { 32 << 20 } else { GIB });
    if mem < (1 << 20) || !mem.is_multiple_of(PAGE_SIZE as u64) {
        return Err(format!(
            "--mem {}: use a whole number of 4 KiB pages, at least 1 MiB",
            format_size(mem)
        ));
    }
    let link_scale = a.link_scale.unwrap_or(if a.quick { 0.5 } else { 1.0 });
    let speed = a.speed.unwrap_or(if a.quick {
        link_scale * GIB as f64 / mem as f64
    } else {
        1.0
    });
    let valid = link_scale.is_finite() && link_scale > 0.0 && speed.is_finite() && speed >= 0.0;
    if !valid {
        return Err("--link-scale must be above 0 and --speed at least 0".into());
    }
    let cache = a.cache.unwrap_or_else(|| {
        let c = u128::from(CACHE_PER_GIB) * u128::from(mem) / u128::from(GIB);
        u64::try_from(c).unwrap_or(u64::MAX).max(1 << 20)
    });
    let default_send_buffer = SocketOptions::default().send_buffer;
    let send_buffer = match a.send_buffer {
        Some(b) => usize::try_from(b).unwrap_or(usize::MAX),
        // Scaled with the guest, or the sealed-but-unsent backlog would be a quarter of a
        // 32 MiB guest.
        None if a.quick => {
            let scaled = u128::from(mem) * default_send_buffer as u128 / u128::from(GIB);
            usize::try_from(scaled)
                .unwrap_or(default_send_buffer)
                .max(64 << 10)
        }
        None => default_send_buffer,
    };
    Ok(Settings {
        experiment: format!("{:?}", a.experiment).to_lowercase(),
        quick: a.quick,
        mem_bytes: mem,
        seed: a.seed,
        speed,
        link_scale,
        cache_bytes: cache,
        streams: a.streams,
        send_buffer,
        table_rate_mbps: TABLE_RATE_MBPS * link_scale,
        table_rtt_ms: TABLE_RTT_MS,
        fig14_rates_mbps: a.fig14_rates.iter().map(|r| r * link_scale).collect(),
        fig14_rtt_ms: SWEEP_RTT_MS,
    })
}

/// Bits per second from Mb/s.
fn bits(mbps: f64) -> u64 {
    // Rates are positive and far below u64's range.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let b = (mbps * 1e6).round() as u64;
    b.max(1)
}

/// The migrations the chosen experiments need, each once.
fn plan(a: &Args, s: &Settings) -> Vec<RunSpec> {
    let spec = |workload, setup, rate_bits, rtt_ms| RunSpec {
        workload,
        setup,
        mem: s.mem_bytes,
        seed: s.seed,
        speed: s.speed,
        rate_bits,
        rtt: Duration::from_millis(rtt_ms),
        streams: s.streams,
        cache_bytes: s.cache_bytes,
        send_buffer: s.send_buffer,
    };
    let wants = |e| a.experiment == e || a.experiment == Experiment::All;
    let table_rate = bits(s.table_rate_mbps);
    let mut specs: Vec<RunSpec> = Vec::new();
    let mut add = |r: RunSpec| {
        if !specs.iter().any(|q| same_run(q, &r)) {
            specs.push(r);
        }
    };
    for &w in &a.workloads {
        if wants(Experiment::Table1) {
            for setup in [BASELINE, ALL] {
                add(spec(w, setup, table_rate, TABLE_RTT_MS));
            }
        }
        if wants(Experiment::Fig11) {
            for setup in [BASELINE, SMART, ZERO, CBR, DELTA, ALL] {
                add(spec(w, setup, table_rate, TABLE_RTT_MS));
            }
        }
        if wants(Experiment::Table2) {
            for setup in [BASELINE, DELTA] {
                add(spec(w, setup, table_rate, TABLE_RTT_MS));
            }
        }
    }
    if wants(Experiment::Fig14) {
        for &w in &a.fig14_workloads {
            for &r in &s.fig14_rates_mbps {
                for setup in [BASELINE, ALL] {
                    add(spec(w, setup, bits(r), SWEEP_RTT_MS));
                }
            }
        }
    }
    specs
}

fn same_run(a: &RunSpec, b: &RunSpec) -> bool {
    a.workload == b.workload && a.setup == b.setup && a.rate_bits == b.rate_bits && a.rtt == b.rtt
}

/// Finished runs and failures.
struct Done {
    runs: Vec<(RunSpec, Result<RunResult, String>)>,
}

impl Runs for Done {
    fn get(&self, w: Workload, setup: Setup, rate_bits: u64, rtt_ms: u64) -> Option<&RunResult> {
        self.runs.iter().find_map(|(s, r)| {
            (s.workload == w
                && s.setup == setup
                && s.rate_bits == rate_bits
                && s.rtt == Duration::from_millis(rtt_ms))
            .then_some(r.as_ref().ok())
            .flatten()
        })
    }
}

#[derive(Debug, Serialize)]
struct Host {
    cpus: usize,
    cpu_model: String,
}

fn host() -> Host {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    Host {
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: model,
    }
}

#[derive(Debug, Serialize)]
struct Failure {
    run: String,
    error: String,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    bench: &'static str,
    host: Host,
    settings: &'a Settings,
    calibration: &'a Calibration,
    table1: Vec<tables::Table1Row>,
    fig11: Vec<tables::Fig11Row>,
    fig14: Vec<tables::Fig14Row>,
    table2: Vec<tables::Table2Row>,
    redundancy: Vec<tables::RedundancyRow>,
    runs: Vec<&'a RunResult>,
    failures: Vec<Failure>,
    wall_s: f64,
}

fn progress(r: &Result<RunResult, String>, took: Duration) -> String {
    match r {
        Ok(r) => format!(
            "{:.3} GiB, total {:.1} s, pause {:.2} s, {} iterations ({}), writes {:.0}% of the model's, {}",
            r.data_bytes as f64 / GIB as f64,
            r.total_s,
            r.pause_s,
            r.iterations,
            r.stop_reason
                .map_or("-".into(), |s| format!("{s:?}").to_lowercase()),
            r.writes_per_s / r.model_writes_per_s.max(1e-9) * 100.0,
            if r.verified { "verified" } else { "NOT verified" }
        ),
        Err(e) => format!("FAILED: {e}"),
    }
    .to_string()
        + &format!(" [{:.0} s]", took.as_secs_f64())
}

/// Builds the report from the runs done so far.
fn report<'a>(
    a: &Args,
    s: &'a Settings,
    cal: &'a Calibration,
    done: &'a Done,
    wall_s: f64,
) -> Report<'a> {
    let wants = |e| a.experiment == e || a.experiment == Experiment::All;
    let table_rate = bits(s.table_rate_mbps);
    let fig14_rates: Vec<u64> = s.fig14_rates_mbps.iter().map(|&r| bits(r)).collect();
    Report {
        bench: "wan",
        host: host(),
        settings: s,
        calibration: cal,
        table1: if wants(Experiment::Table1) {
            tables::table1(done, &a.workloads, table_rate, TABLE_RTT_MS)
        } else {
            Vec::new()
        },
        fig11: if wants(Experiment::Fig11) {
            tables::fig11(
                done,
                &a.workloads,
                &[SMART, ZERO, CBR, DELTA, ALL],
                table_rate,
                TABLE_RTT_MS,
            )
        } else {
            Vec::new()
        },
        fig14: if wants(Experiment::Fig14) {
            tables::fig14(done, &a.fig14_workloads, &fig14_rates, SWEEP_RTT_MS)
        } else {
            Vec::new()
        },
        table2: if wants(Experiment::Table2) {
            tables::table2(done, &a.workloads, table_rate, TABLE_RTT_MS)
        } else {
            Vec::new()
        },
        redundancy: tables::redundancy(done, &a.workloads, table_rate, TABLE_RTT_MS),
        runs: done
            .runs
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .collect(),
        failures: done
            .runs
            .iter()
            .filter_map(|(spec, r)| {
                r.as_ref().err().map(|e| Failure {
                    run: spec.label(),
                    error: e.clone(),
                })
            })
            .collect(),
        wall_s,
    }
}

fn save(path: &Path, r: &Report<'_>) -> Result<(), String> {
    let out = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(path, out + "\n").map_err(|e| format!("writing {}: {e}", path.display()))
}

pub fn run(a: &Args) -> Result<(), String> {
    let started = Instant::now();
    let s = resolve(a)?;
    let specs = plan(a, &s);
    let wants = |e| a.experiment == e || a.experiment == Experiment::All;

    // Calibrate at every rate and round trip the runs use.
    let mut rates: Vec<u64> = specs.iter().map(|r| r.rate_bits).collect();
    rates.sort_unstable();
    rates.dedup();
    let mut rtts: Vec<Duration> = specs.iter().map(|r| r.rtt).collect();
    rtts.sort_unstable();
    rtts.dedup();
    let secs = if s.quick { 1.0 } else { 3.0 };
    eprintln!(
        "wan: measuring the link emulator ({} rates, {} round trips)...",
        rates.len(),
        rtts.len()
    );
    let cal = calibrate::calibrate(&rates, &rtts, secs, 20)
        .map_err(|e| format!("calibrating the link emulator: {e}"))?;

    let mut done = Done { runs: Vec::new() };
    for (i, spec) in specs.iter().enumerate() {
        eprintln!("wan: [{}/{}] {} ...", i + 1, specs.len(), spec.label());
        let t = Instant::now();
        let r = migration::run(spec, 0x3a4e_0000 + i as u64);
        eprintln!(
            "wan: [{}/{}]   {}",
            i + 1,
            specs.len(),
            progress(&r, t.elapsed())
        );
        done.runs.push((*spec, r));
        // Kept current, so a long suite that dies part-way still leaves its runs.
        if let Some(path) = &a.save_json {
            save(
                path,
                &report(a, &s, &cal, &done, started.elapsed().as_secs_f64()),
            )?;
        }
    }

    let r = report(a, &s, &cal, &done, started.elapsed().as_secs_f64());
    if a.json {
        let out = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
        println!("{out}");
        return Ok(());
    }
    let (t1, f11, f14, t2, red) = (&r.table1, &r.fig11, &r.fig14, &r.table2, &r.redundancy);
    let wall_s = r.wall_s;

    let h = host();
    println!(
        "skyferry-bench wan: {} guests (seed {}, write speed x{}), block cache {} per stream, {} stream{}, send buffer {}, link rates x{}{}",
        format_size(s.mem_bytes),
        s.seed,
        s.speed,
        format_size(s.cache_bytes),
        s.streams,
        if s.streams == 1 { "" } else { "s" },
        format_size(s.send_buffer as u64),
        s.link_scale,
        if s.quick {
            " (--quick: time-compressed smoke test)"
        } else {
            ""
        }
    );
    println!("host: {} x {}", h.cpus, h.cpu_model);
    println!();
    calibrate::print(&cal);
    let caption = format!(
        "{:.0} Mb/s, {} ms RTT, {} guests",
        s.table_rate_mbps,
        TABLE_RTT_MS,
        format_size(s.mem_bytes)
    );
    if wants(Experiment::Table1) {
        tables::print_table1(t1, &caption);
    }
    if wants(Experiment::Fig11) {
        tables::print_fig11(f11, &caption);
    }
    if wants(Experiment::Fig14) {
        tables::print_fig14(
            f14,
            &format!("{SWEEP_RTT_MS} ms RTT, {} guests", format_size(s.mem_bytes)),
        );
    }
    if wants(Experiment::Table2) {
        tables::print_table2(t2, &caption);
    }
    if !red.is_empty() {
        tables::print_redundancy(red, &caption);
    }
    println!("Runs");
    println!(
        "  {:<8} {:<9} {:>6} {:>4} {:>9} {:>8} {:>7} {:>5} {:<16} {:>11} {:>7} {:>7}",
        "workload",
        "setup",
        "Mb/s",
        "RTT",
        "data GiB",
        "total s",
        "pause s",
        "iters",
        "stop",
        "final pages",
        "fill s",
        "writes"
    );
    for (spec, r) in &done.runs {
        match r {
            Ok(r) => println!(
                "  {:<8} {:<9} {:>6.0} {:>4.0} {:>9.3} {:>8.1} {:>7.2} {:>5} {:<16} {:>11} {:>7.1} {:>6.0}%{}",
                r.workload,
                r.setup,
                r.rate_mbps,
                r.rtt_ms,
                r.data_bytes as f64 / GIB as f64,
                r.total_s,
                r.pause_s,
                r.iterations,
                r.stop_reason
                    .map_or("-".into(), |s| format!("{s:?}").to_lowercase()),
                r.final_pages,
                r.fill_s,
                r.writes_per_s / r.model_writes_per_s.max(1e-9) * 100.0,
                if r.verified { "" } else { " NOT VERIFIED" }
            ),
            Err(e) => println!("  {}: FAILED: {e}", spec.label()),
        }
    }
    println!(
        "  (writes: page writes per second the guest made while running, as % of its model's nominal rate)"
    );
    println!("wall time {:.0} s", wall_s);
    Ok(())
}

//! `skyferry-bench kvm`: the downtime a KVM guest sees on its own clock beside the pause the
//! migration driver reports, per stop policy.
//!
//! Each run is one `skyferry demo --guest kvm --json` (the binary beside this one): a micro-VM
//! running the project's self-checking test guest, migrated over loopback. The driver's
//! pause (`pause_ms`: from pausing the vCPU to the commit) is the reference measured in the
//! same run; the guest's figure (`guest_downtime_ms`: TSC between its last tick at the
//! source and its first at the destination) adds what the driver does not see, such as
//! starting the vCPU after the commit. The host checks every page at the destination by the
//! guest's rules (`--arrival-check host`), so each run also proves the guest arrived intact.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Args as ClapArgs;
use serde::Serialize;
use serde_json::Value;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Runs per case and policy; medians are printed.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// The `skyferry` binary (default: beside this one; build it with `cargo build
    /// --release --bins`).
    #[arg(long)]
    skyferry: Option<PathBuf>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// One guest and link: memory, workload, write-rate factor, link rate.
struct Case {
    mem: &'static str,
    workload: &'static str,
    speed: &'static str,
    link: &'static str,
}

/// Small guests (the test guest runs under instruction emulation on nested hosts), writing
/// hard enough, over links slow enough, that pre-copy takes several iterations.
const CASES: [Case; 3] = [
    Case {
        mem: "4MiB",
        workload: "tpcw",
        speed: "1",
        link: "1Gbit",
    },
    Case {
        mem: "16MiB",
        workload: "kernel",
        speed: "3",
        link: "100Mbit",
    },
    Case {
        mem: "64MiB",
        workload: "specjbb",
        speed: "2",
        link: "1Gbit",
    },
];

const POLICIES: [&str; 2] = ["smart", "xen-default"];

#[derive(Debug, Serialize)]
struct Row {
    mem: &'static str,
    workload: &'static str,
    speed: &'static str,
    link: &'static str,
    policy: &'static str,
    runs: usize,
    /// Medians over the runs.
    driver_pause_ms: f64,
    guest_downtime_ms: f64,
    /// Median of each run's guest-seen minus driver-reported.
    guest_minus_driver_ms: f64,
    /// guest-seen over driver-reported, of the medians.
    ratio: f64,
    iterations: f64,
    wire_mib: f64,
    /// Summed over the runs (the host's check at the destination).
    bad_pages: u64,
}

pub fn run(a: &Args) -> Result<(), String> {
    if a.reps == 0 {
        return Err("--reps must be at least 1".into());
    }
    let skyferry = match &a.skyferry {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this benchmark's path: {e}"))?
            .with_file_name("skyferry"),
    };
    if !skyferry.exists() {
        return Err(format!(
            "{} is missing: build it with cargo build --release --bins",
            skyferry.display()
        ));
    }
    let mut rows = Vec::new();
    for case in &CASES {
        for policy in POLICIES {
            let runs = (0..a.reps)
                .map(|rep| demo(&skyferry, case, policy, rep))
                .collect::<Result<Vec<_>, _>>()?;
            rows.push(row(case, policy, &runs));
        }
    }
    if a.json {
        let v = serde_json::json!({ "reps": a.reps, "rows": rows });
        println!("{v}");
        return Ok(());
    }
    println!(
        "KVM test guest: downtime on the guest's own clock vs. the driver's pause (median of \
         {} runs each; the host checked every page at the destination)",
        a.reps
    );
    println!(
        "{:<7} {:<8} {:>5} {:<8} {:<11} {:>6} {:>10} {:>10} {:>10} {:>6} {:>9} {:>4}",
        "mem",
        "workload",
        "speed",
        "link",
        "policy",
        "iters",
        "driver ms",
        "guest ms",
        "diff ms",
        "ratio",
        "wire MiB",
        "bad"
    );
    for r in &rows {
        println!(
            "{:<7} {:<8} {:>5} {:<8} {:<11} {:>6.0} {:>10.1} {:>10.1} {:>10.1} {:>6.2} {:>9.1} {:>4}",
            r.mem,
            r.workload,
            r.speed,
            r.link,
            r.policy,
            r.iterations,
            r.driver_pause_ms,
            r.guest_downtime_ms,
            r.guest_minus_driver_ms,
            r.ratio,
            r.wire_mib,
            r.bad_pages
        );
    }
    Ok(())
}

/// What one demo run measured.
struct Run {
    driver_ms: f64,
    guest_ms: f64,
    iterations: f64,
    wire_bytes: f64,
    bad_pages: u64,
}

fn demo(skyferry: &Path, c: &Case, policy: &str, rep: usize) -> Result<Run, String> {
    let seed = (rep + 1).to_string();
    let out = Command::new(skyferry)
        .args([
            "demo",
            "--guest",
            "kvm",
            "--json",
            "--arrival-check",
            "host",
        ])
        .args(["--mem", c.mem, "--workload", c.workload, "--speed", c.speed])
        .args([
            "--max-bandwidth",
            c.link,
            "--policy",
            policy,
            "--seed",
            &seed,
        ])
        .output()
        .map_err(|e| format!("cannot run {}: {e}", skyferry.display()))?;
    let what = format!("{} {} x{} {policy}", c.mem, c.workload, c.speed);
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        format!(
            "{what}: the demo printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if !out.status.success() || v["phase"] != "completed" || v["guest_resumed"] != true {
        return Err(format!(
            "{what}: the migration did not complete cleanly: {v}"
        ));
    }
    let num = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("{what}: no {k} in {v}"))
    };
    Ok(Run {
        driver_ms: num("pause_ms")?,
        guest_ms: num("guest_downtime_ms")?,
        iterations: num("iterations")?,
        wire_bytes: num("bytes_on_wire")?,
        bad_pages: v["guest_bad_pages"]
            .as_u64()
            .ok_or_else(|| format!("{what}: the host's check never reported: {v}"))?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn row(c: &Case, policy: &'static str, runs: &[Run]) -> Row {
    let of = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let driver = of(|r| r.driver_ms);
    let guest = of(|r| r.guest_ms);
    Row {
        mem: c.mem,
        workload: c.workload,
        speed: c.speed,
        link: c.link,
        policy,
        runs: runs.len(),
        driver_pause_ms: driver,
        guest_downtime_ms: guest,
        guest_minus_driver_ms: of(|r| r.guest_ms - r.driver_ms),
        ratio: if driver > 0.0 { guest / driver } else { 0.0 },
        iterations: of(|r| r.iterations),
        wire_mib: of(|r| r.wire_bytes) / f64::from(1u32 << 20),
        bad_pages: runs.iter().map(|r| r.bad_pages).sum(),
    }
}

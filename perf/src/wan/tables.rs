//! The paper's tables and figures, built from finished runs and printed.

use dataplane::guest::workload::Workload;
use serde::Serialize;

use super::migration::{ALL, BASELINE, DELTA, RunResult, Setup};

/// Finished runs, looked up by what they ran.
pub trait Runs {
    /// The run of `workload` with `setup` over `rate_bits` and `rtt_ms`, if it succeeded.
    fn get(
        &self,
        workload: Workload,
        setup: Setup,
        rate_bits: u64,
        rtt_ms: u64,
    ) -> Option<&RunResult>;
}

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// The headline figures of one run.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Figures {
    pub data_bytes: u64,
    pub total_s: f64,
    pub pause_s: f64,
    pub iterations: usize,
}

impl Figures {
    fn of(r: &RunResult) -> Self {
        Figures {
            data_bytes: r.data_bytes,
            total_s: r.total_s,
            pause_s: r.pause_s,
            iterations: r.iterations,
        }
    }
}

/// Reductions of an optimized run against the baseline, %.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Reduction {
    pub data_pct: f64,
    pub total_pct: f64,
    pub pause_pct: f64,
}

fn pct(base: f64, new: f64) -> f64 {
    if base > 0.0 {
        (base - new) / base * 100.0
    } else {
        f64::NAN
    }
}

/// `part` of `whole`, %.
fn share(part: u64, whole: u64) -> f64 {
    if whole > 0 {
        part as f64 / whole as f64 * 100.0
    } else {
        f64::NAN
    }
}

impl Reduction {
    fn between(base: &Figures, new: &Figures) -> Self {
        Reduction {
            data_pct: pct(base.data_bytes as f64, new.data_bytes as f64),
            total_pct: pct(base.total_s, new.total_s),
            pause_pct: pct(base.pause_s, new.pause_s),
        }
    }
}

/// The paper's Table I for one workload: (data GB, total s, pause s), Xen then CloudNet.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PaperTable1 {
    pub data_gb: (f64, f64),
    pub total_s: (f64, f64),
    pub pause_s: (f64, f64),
}

fn paper_table1(w: Workload) -> Option<PaperTable1> {
    let (data_gb, total_s, pause_s) = match w {
        Workload::Tpcw => ((1.5, 0.9), (135.0, 78.0), (3.7, 2.3)),
        Workload::Kernel => ((1.5, 1.1), (133.0, 101.0), (5.9, 3.5)),
        Workload::Specjbb => ((1.2, 0.4), (112.0, 35.0), (7.8, 6.5)),
        Workload::Idle => return None,
    };
    Some(PaperTable1 {
        data_gb,
        total_s,
        pause_s,
    })
}

/// The paper's Table II for one workload, MB: iteration 1, iterations 2-30, delta savings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PaperTable2 {
    pub iter1_mb: f64,
    pub later_mb: f64,
    pub savings_mb: f64,
}

fn paper_table2(w: Workload) -> Option<PaperTable2> {
    let (iter1_mb, later_mb, savings_mb) = match w {
        Workload::Tpcw => (954.0, 315.0, 172.0),
        Workload::Kernel => (877.0, 394.0, 187.0),
        Workload::Specjbb => (932.0, 163.0, 127.0),
        Workload::Idle => return None,
    };
    Some(PaperTable2 {
        iter1_mb,
        later_mb,
        savings_mb,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct Table1Row {
    pub workload: &'static str,
    pub baseline: Figures,
    pub cloudnet: Figures,
    pub reduction: Reduction,
    pub paper: Option<PaperTable1>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fig11Row {
    pub workload: &'static str,
    pub optimization: &'static str,
    pub figures: Figures,
    pub reduction: Reduction,
}

#[derive(Debug, Clone, Serialize)]
pub struct Fig14Row {
    pub workload: &'static str,
    pub rate_mbps: f64,
    pub baseline: Figures,
    pub cloudnet: Figures,
    pub reduction: Reduction,
}

#[derive(Debug, Clone, Serialize)]
pub struct Table2Row {
    pub workload: &'static str,
    /// The deltas-only run (xen-default): wire bytes of iteration 1 and of the later ones.
    pub iter1_bytes: u64,
    pub later_bytes: u64,
    /// Bytes the deltas saved, and what the later iterations would have cost without them.
    pub delta_savings_bytes: u64,
    pub later_without_deltas_bytes: u64,
    /// Savings over `later_without_deltas_bytes`, %.
    pub later_reduction_pct: f64,
    pub iterations: usize,
    /// The baseline run's later iterations, for scale (a different run: its iterations
    /// differ).
    pub baseline_later_bytes: Option<u64>,
    pub paper: Option<PaperTable2>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RedundancyRow {
    pub workload: &'static str,
    /// Payload bytes saved in the all-optimizations run.
    pub saved_zero: u64,
    pub saved_cbr: u64,
    pub saved_delta: u64,
    /// Zero pages' share of what zero pages and the block cache saved, %.
    pub zero_share_pct: f64,
}

pub fn table1(runs: &dyn Runs, workloads: &[Workload], rate: u64, rtt: u64) -> Vec<Table1Row> {
    workloads
        .iter()
        .filter_map(|&w| {
            let b = Figures::of(runs.get(w, BASELINE, rate, rtt)?);
            let c = Figures::of(runs.get(w, ALL, rate, rtt)?);
            Some(Table1Row {
                workload: w.name(),
                baseline: b,
                cloudnet: c,
                reduction: Reduction::between(&b, &c),
                paper: paper_table1(w),
            })
        })
        .collect()
}

pub fn fig11(
    runs: &dyn Runs,
    workloads: &[Workload],
    setups: &[Setup],
    rate: u64,
    rtt: u64,
) -> Vec<Fig11Row> {
    let mut rows = Vec::new();
    for &w in workloads {
        let Some(base) = runs.get(w, BASELINE, rate, rtt).map(Figures::of) else {
            continue;
        };
        for &s in setups {
            if let Some(r) = runs.get(w, s, rate, rtt) {
                let f = Figures::of(r);
                rows.push(Fig11Row {
                    workload: w.name(),
                    optimization: s.name,
                    figures: f,
                    reduction: Reduction::between(&base, &f),
                });
            }
        }
    }
    rows
}

pub fn fig14(runs: &dyn Runs, workloads: &[Workload], rates: &[u64], rtt: u64) -> Vec<Fig14Row> {
    let mut rows = Vec::new();
    for &w in workloads {
        for &rate in rates {
            let (Some(b), Some(c)) = (
                runs.get(w, BASELINE, rate, rtt),
                runs.get(w, ALL, rate, rtt),
            ) else {
                continue;
            };
            let (b, c) = (Figures::of(b), Figures::of(c));
            rows.push(Fig14Row {
                workload: w.name(),
                rate_mbps: rate as f64 / 1e6,
                baseline: b,
                cloudnet: c,
                reduction: Reduction::between(&b, &c),
            });
        }
    }
    rows
}

pub fn table2(runs: &dyn Runs, workloads: &[Workload], rate: u64, rtt: u64) -> Vec<Table2Row> {
    workloads
        .iter()
        .filter_map(|&w| {
            let d = runs.get(w, DELTA, rate, rtt)?;
            let without = d.later_bytes + d.saved_delta;
            Some(Table2Row {
                workload: w.name(),
                iter1_bytes: d.iter1_bytes,
                later_bytes: d.later_bytes,
                delta_savings_bytes: d.saved_delta,
                later_without_deltas_bytes: without,
                later_reduction_pct: pct(without as f64, d.later_bytes as f64),
                iterations: d.iterations,
                baseline_later_bytes: runs.get(w, BASELINE, rate, rtt).map(|b| b.later_bytes),
                paper: paper_table2(w),
            })
        })
        .collect()
}

pub fn redundancy(
    runs: &dyn Runs,
    workloads: &[Workload],
    rate: u64,
    rtt: u64,
) -> Vec<RedundancyRow> {
    workloads
        .iter()
        .filter_map(|&w| {
            let r = runs.get(w, ALL, rate, rtt)?;
            Some(RedundancyRow {
                workload: w.name(),
                saved_zero: r.saved_zero,
                saved_cbr: r.saved_cbr,
                saved_delta: r.saved_delta,
                zero_share_pct: share(r.saved_zero, r.saved_zero + r.saved_cbr),
            })
        })
        .collect()
}

fn gib(b: u64) -> f64 {
    b as f64 / GIB
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB
}

pub fn print_table1(rows: &[Table1Row], caption: &str) {
    println!("Table I: xen-default without optimizations -> smart with all ({caption})");
    println!(
        "  {:<8} {:>16} {:>5} {:>16} {:>5} {:>14} {:>5} {:>8}",
        "workload", "data GiB", "red.", "total s", "red.", "pause s", "red.", "iters"
    );
    for r in rows {
        let (b, c, x) = (&r.baseline, &r.cloudnet, &r.reduction);
        println!(
            "  {:<8} {:>7.2} -> {:>5.2} {:>4.0}% {:>7.1} -> {:>5.1} {:>4.0}% {:>6.2} -> {:>4.2} {:>4.0}% {:>3} -> {:<2}",
            r.workload,
            gib(b.data_bytes),
            gib(c.data_bytes),
            x.data_pct,
            b.total_s,
            c.total_s,
            x.total_pct,
            b.pause_s,
            c.pause_s,
            x.pause_pct,
            b.iterations,
            c.iterations
        );
        if let Some(p) = r.paper {
            println!(
                "  {:<8} {:>7.2} -> {:>5.2} {:>4.0}% {:>7.1} -> {:>5.1} {:>4.0}% {:>6.2} -> {:>4.2} {:>4.0}%",
                "  paper",
                p.data_gb.0,
                p.data_gb.1,
                pct(p.data_gb.0, p.data_gb.1),
                p.total_s.0,
                p.total_s.1,
                pct(p.total_s.0, p.total_s.1),
                p.pause_s.0,
                p.pause_s.1,
                pct(p.pause_s.0, p.pause_s.1)
            );
        }
    }
    println!("  (paper's data in GB as printed; ours in GiB)");
    println!();
}

pub fn print_fig11(rows: &[Fig11Row], caption: &str) {
    println!(
        "Fig. 11: each optimization alone, then all: reduction vs xen-default without optimizations ({caption})"
    );
    println!(
        "  {:<8} {:<12} {:>6} {:>6} {:>6}   {:>8} {:>8} {:>8} {:>5}",
        "workload",
        "optimization",
        "data",
        "total",
        "pause",
        "data GiB",
        "total s",
        "pause s",
        "iters"
    );
    for r in rows {
        println!(
            "  {:<8} {:<12} {:>5.0}% {:>5.0}% {:>5.0}%   {:>8.3} {:>8.1} {:>8.2} {:>5}",
            r.workload,
            r.optimization,
            r.reduction.data_pct,
            r.reduction.total_pct,
            r.reduction.pause_pct,
            gib(r.figures.data_bytes),
            r.figures.total_s,
            r.figures.pause_s,
            r.figures.iterations
        );
    }
    println!(
        "  (baseline: xen-default, full pages; smart: Smart Stop, full pages; zero, cbr, delta: xen-default with that one codec optimization; all: Smart Stop with zero+cbr+delta)"
    );
    println!();
}

pub fn print_fig14(rows: &[Fig14Row], caption: &str) {
    println!(
        "Fig. 14: bandwidth sweep, xen-default without optimizations vs smart with all ({caption})"
    );
    println!(
        "  {:<8} {:>6} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6} {:>6} {:>6}",
        "workload",
        "Mb/s",
        "total s",
        "pause s",
        "data GiB",
        "total s",
        "pause s",
        "data GiB",
        "total",
        "pause",
        "data"
    );
    println!(
        "  {:<8} {:>6} | {:^26} | {:^26} | {:^20}",
        "", "", "xen-default, none", "smart, all", "reduction"
    );
    for r in rows {
        let (b, c, x) = (&r.baseline, &r.cloudnet, &r.reduction);
        println!(
            "  {:<8} {:>6.0} | {:>8.1} {:>8.2} {:>8.3} | {:>8.1} {:>8.2} {:>8.3} | {:>5.0}% {:>5.0}% {:>5.0}%",
            r.workload,
            r.rate_mbps,
            b.total_s,
            b.pause_s,
            gib(b.data_bytes),
            c.total_s,
            c.pause_s,
            gib(c.data_bytes),
            x.total_pct,
            x.pause_pct,
            x.data_pct
        );
    }
    println!();
}

pub fn print_table2(rows: &[Table2Row], caption: &str) {
    println!("Table II: page deltas (xen-default, deltas only; {caption})");
    println!(
        "  {:<8} {:>10} {:>12} {:>14} {:>14} {:>6} {:>6} {:>14}",
        "workload",
        "iter 1 MiB",
        "iters 2+ MiB",
        "delta saved MiB",
        "2+ w/o deltas",
        "red.",
        "iters",
        "baseline 2+"
    );
    for r in rows {
        println!(
            "  {:<8} {:>10.1} {:>12.1} {:>14.1} {:>14.1} {:>5.0}% {:>6} {:>14}",
            r.workload,
            mib(r.iter1_bytes),
            mib(r.later_bytes),
            mib(r.delta_savings_bytes),
            mib(r.later_without_deltas_bytes),
            r.later_reduction_pct,
            r.iterations,
            r.baseline_later_bytes
                .map_or("-".into(), |b| format!("{:.1}", mib(b)))
        );
        if let Some(p) = r.paper {
            println!(
                "  {:<8} {:>10.0} {:>12.0} {:>14.0} {:>14.0} {:>5.0}%",
                "  paper",
                p.iter1_mb,
                p.later_mb,
                p.savings_mb,
                p.later_mb + p.savings_mb,
                pct(p.later_mb + p.savings_mb, p.later_mb)
            );
        }
    }
    println!(
        "  (iters 2+ includes the final stop-and-copy; paper in MB as printed, its iters 2-30)"
    );
    println!();
}

pub fn print_redundancy(rows: &[RedundancyRow], caption: &str) {
    println!("Savings by optimization in the all-optimizations runs ({caption})");
    println!(
        "  {:<8} {:>12} {:>12} {:>14} {:>22}",
        "workload", "zero MiB", "CBR MiB", "deltas MiB", "zero share of zero+CBR"
    );
    for r in rows {
        println!(
            "  {:<8} {:>12.1} {:>12.1} {:>14.1} {:>21.0}%",
            r.workload,
            mib(r.saved_zero),
            mib(r.saved_cbr),
            mib(r.saved_delta),
            r.zero_share_pct
        );
    }
    println!(
        "  (paper Fig. 13a: kernel ~13% redundancy, under half of it zero pages; SPECjbb mostly zero pages)"
    );
    println!();
}

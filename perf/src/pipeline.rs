//! `skyferry-bench pipeline`: end-to-end throughput of a whole migration on this host.
//!
//! Source and destination are separate processes (this binary, role `pipeline-peer`) over
//! loopback TCP; the guest's memory is static, so every page crosses once and the figure is
//! the pipeline's speed. Each case is followed, in the same run, by its reference: the same
//! number of TCP streams carrying the guest's bytes from memory to memory as frames sealed
//! and opened with the same cipher, and nothing else (each sender thread copies its share
//! into a frame, seals and writes it; each receiver reads, opens and copies it into place):
//! the limit of encrypted transfer on this machine. The ratio of the two is the figure that
//! travels between machines.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use clap::Args as ClapArgs;
use dataplane::frame::DEFAULT_FRAME_SIZE;
use dataplane::guest::workload::Workload;
use dataplane::page::PAGE_SIZE;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::pipeline_peer::{DestReport, MixName, PeerRole, RefReport, SourceReport};
use crate::procstat::{PeakRss, RssSampler};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Guest memory size (default 4GiB, or 1GiB with --quick).
    #[arg(long, value_parser = dataplane::units::parse_size)]
    mem: Option<u64>,
    /// Run only this page mix.
    #[arg(long, value_enum, conflicts_with = "workload")]
    mix: Option<MixName>,
    /// Run only this workload model's memory (static).
    #[arg(long)]
    workload: Option<Workload>,
    /// TCP streams (each with its own encode/seal and open/decode threads).
    #[arg(long, default_value_t = 2)]
    streams: u32,
    /// Frame size in bytes.
    #[arg(long, default_value_t = DEFAULT_FRAME_SIZE)]
    frame_size: usize,
    /// Leave threads unpinned.
    #[arg(long)]
    no_pin: bool,
    /// Turn off the running cache digest in frame headers (the decoder then hashes no
    /// inserted block; the end-to-end memory digest still checks everything).
    #[arg(long)]
    no_verify_caches: bool,
    /// AES-256-GCM implementation, for the migration and its reference alike.
    #[arg(long, default_value = "aws-lc-rs")]
    cipher: dataplane::crypto::AeadImpl,
    /// A short run: 1 GiB guests unless --mem says otherwise.
    #[arg(long)]
    quick: bool,
    /// Content seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Also draw the table as a picture into FILE (SVG).
    #[arg(long, value_name = "FILE")]
    svg: Option<std::path::PathBuf>,
}

/// One case's figures.
#[derive(Debug, Serialize)]
struct CaseResult {
    /// Page mix (`unique`, `zero`, `redundant`) or `workload:<name>`.
    mix: String,
    streams: u32,
    guest_bytes: u64,
    wire_bytes: u64,
    /// Whole migration, connect to commit, at the source.
    elapsed_s: f64,
    /// Guest memory moved, GB/s (10^9 bytes).
    guest_gbps: f64,
    /// Bytes on the wire, Gbit/s.
    wire_gbps: f64,
    /// The reference's GB/s (guest bytes sealed, sent, opened; nothing else).
    reference_gbps: f64,
    /// guest_gbps / reference_gbps.
    ratio: f64,
    src_cpu_s_per_gb: f64,
    dst_cpu_s_per_gb: f64,
    ref_src_cpu_s_per_gb: f64,
    ref_dst_cpu_s_per_gb: f64,
    /// Peak resident memory of the source process, guest memory excluded, MiB.
    src_peak_rss_mib: f64,
    dst_peak_rss_mib: f64,
    /// The same including guest memory (kernel high-water mark), MiB.
    src_hwm_mib: f64,
    dst_hwm_mib: f64,
    pause_ms: u64,
    verified: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    cipher: &'static str,
    mem_bytes: u64,
    streams: u32,
    frame_size: usize,
    pinned: bool,
    cases: Vec<CaseResult>,
    /// When exactly one case ran, its figures again at the top level.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    only: Option<serde_json::Value>,
}

enum Case {
    Mix(MixName),
    Workload(Workload),
}

impl Case {
    fn label(&self) -> String {
        match self {
            Case::Mix(m) => format!("{m:?}").to_lowercase(),
            Case::Workload(w) => format!("workload:{}", w.name()),
        }
    }
    fn peer_args(&self) -> Vec<String> {
        match self {
            Case::Mix(m) => vec!["--mix".into(), format!("{m:?}").to_lowercase()],
            Case::Workload(w) => vec!["--workload".into(), w.name().into()],
        }
    }
}

/// A child process of this binary in one role, with its memory sampled while it runs.
struct Peer {
    child: Child,
    out: BufReader<std::process::ChildStdout>,
    rss: RssSampler,
    role: PeerRole,
}

impl Peer {
    fn spawn(role: PeerRole, common: &[String], extra: &[String]) -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let role_name = match role {
            PeerRole::Source => "source",
            PeerRole::Dest => "dest",
            PeerRole::RefSend => "ref-send",
            PeerRole::RefRecv => "ref-recv",
        };
        let mut child = Command::new(exe)
            .arg("pipeline-peer")
            .args(["--role", role_name])
            .args(common)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the {role_name} process: {e}"))?;
        let out = BufReader::new(child.stdout.take().expect("piped"));
        let rss = RssSampler::start(child.id());
        Ok(Peer {
            child,
            out,
            rss,
            role,
        })
    }

    fn line(&mut self) -> Result<String, String> {
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .map_err(|e| format!("{:?} output: {e}", self.role))?;
        if line.is_empty() {
            return Err(format!("{:?} process ended without a report", self.role));
        }
        Ok(line)
    }

    fn port(&mut self) -> Result<String, String> {
        Ok(self.line()?.trim().to_string())
    }

    fn finish<T: DeserializeOwned>(mut self) -> Result<(T, PeakRss), String> {
        let line = self.line()?;
        let report = serde_json::from_str(&line)
            .map_err(|e| format!("{:?} report {line:?}: {e}", self.role))?;
        let rss = self.rss.finish();
        let status = self.child.wait().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("{:?} process exited with {status}", self.role));
        }
        Ok((report, rss))
    }
}

fn run_case(args: &Args, case: &Case, pages: u64) -> Result<CaseResult, String> {
    let mut common = vec![
        "--pages".to_string(),
        pages.to_string(),
        "--streams".into(),
        args.streams.to_string(),
        "--frame-size".into(),
        args.frame_size.to_string(),
        "--seed".into(),
        args.seed.to_string(),
        "--cipher".into(),
        args.cipher.name().into(),
    ];
    if !args.no_pin {
        common.push("--pin".into());
    }
    let guest_bytes = pages * PAGE_SIZE as u64;
    let gb = guest_bytes as f64 / 1e9;

    let mut dest = Peer::spawn(PeerRole::Dest, &common, &[])?;
    let port = dest.port()?;
    let mut extra = case.peer_args();
    if args.no_verify_caches {
        extra.push("--no-verify-caches".into());
    }
    extra.extend(["--port".into(), port]);
    let source = Peer::spawn(PeerRole::Source, &common, &extra)?;
    let (src, src_rss): (SourceReport, _) = source.finish()?;
    let (dst, dst_rss): (DestReport, _) = dest.finish()?;

    let mut recv = Peer::spawn(PeerRole::RefRecv, &common, &[])?;
    let port = recv.port()?;
    let send = Peer::spawn(PeerRole::RefSend, &common, &["--port".into(), port])?;
    let (rs, _): (RefReport, _) = send.finish()?;
    let (rr, _): (RefReport, _) = recv.finish()?;
    if rr.bytes != rs.bytes {
        return Err(format!(
            "reference: {} bytes sent, {} opened",
            rs.bytes, rr.bytes
        ));
    }
    let guest_gbps = gb / src.elapsed_s;
    let reference_gbps = rr.bytes as f64 / 1e9 / rr.elapsed_s;
    let ref_gb = rr.bytes as f64 / 1e9;
    Ok(CaseResult {
        mix: case.label(),
        streams: args.streams,
        guest_bytes,
        wire_bytes: src.wire_bytes,
        elapsed_s: src.elapsed_s,
        guest_gbps,
        wire_gbps: src.wire_bytes as f64 * 8.0 / 1e9 / src.elapsed_s,
        reference_gbps,
        ratio: guest_gbps / reference_gbps,
        src_cpu_s_per_gb: src.cpu_s / gb,
        dst_cpu_s_per_gb: dst.cpu_s / gb,
        ref_src_cpu_s_per_gb: rs.cpu_s / ref_gb,
        ref_dst_cpu_s_per_gb: rr.cpu_s / ref_gb,
        src_peak_rss_mib: src_rss.own_mib,
        dst_peak_rss_mib: dst_rss.own_mib,
        src_hwm_mib: src_rss.hwm_mib,
        dst_hwm_mib: dst_rss.hwm_mib,
        pause_ms: src.pause_ms,
        verified: src.verified && dst.verified,
    })
}

pub fn run(args: &Args) -> Result<(), String> {
    let mem = args
        .mem
        .unwrap_or(if args.quick { 1 << 30 } else { 4 << 30 });
    let pages = mem / PAGE_SIZE as u64;
    if pages == 0 || args.streams == 0 {
        return Err("--mem must hold a page and --streams must be at least 1".into());
    }
    let cases: Vec<Case> = match (args.mix, args.workload) {
        (Some(m), _) => vec![Case::Mix(m)],
        (None, Some(w)) => vec![Case::Workload(w)],
        (None, None) => [MixName::Unique, MixName::Zero, MixName::Redundant]
            .into_iter()
            .map(Case::Mix)
            .chain(Workload::ALL.into_iter().map(Case::Workload))
            .collect(),
    };
    let mut results = Vec::new();
    for case in &cases {
        if !args.json {
            eprintln!("pipeline: {} ...", case.label());
        }
        let r = run_case(args, case, pages)?;
        if !r.verified {
            return Err(format!("{}: the migration was not verified", r.mix));
        }
        results.push(r);
    }
    let only =
        (results.len() == 1).then(|| serde_json::to_value(&results[0]).expect("serialisable"));
    let report = Report {
        cipher: args.cipher.name(),
        mem_bytes: pages * PAGE_SIZE as u64,
        streams: args.streams,
        frame_size: args.frame_size,
        pinned: !args.no_pin,
        cases: results,
        only,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report).expect("serialisable"));
    } else {
        print_table(&report);
    }
    if let Some(path) = &args.svg {
        let bars: Vec<_> = report
            .cases
            .iter()
            .map(|c| crate::pipeline_plot::Bars {
                case: c.mix.clone(),
                guest_gbps: c.guest_gbps,
                reference_gbps: c.reference_gbps,
                src_cpu_s_per_gb: c.src_cpu_s_per_gb,
                dst_cpu_s_per_gb: c.dst_cpu_s_per_gb,
                pause_ms: c.pause_ms,
            })
            .collect();
        let title = format!(
            "skyferry-bench pipeline: {} guest, {} stream(s), {} KiB frames, {}",
            dataplane::units::format_size(report.mem_bytes),
            report.streams,
            report.frame_size >> 10,
            report.cipher
        );
        crate::pipeline_plot::write_svg(&title, &bars, path)?;
        eprintln!("picture: {}", path.display());
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "pipeline: {} guest, {} stream(s), {} KiB frames, {}, threads {}",
        dataplane::units::format_size(r.mem_bytes),
        r.streams,
        r.frame_size >> 10,
        r.cipher,
        if r.pinned { "pinned" } else { "unpinned" }
    );
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "case",
        "guest GB/s",
        "wire Gb/s",
        "ref GB/s",
        "ratio",
        "src s/GB",
        "dst s/GB",
        "ref src",
        "ref dst",
        "src MiB",
        "dst MiB",
        "pause ms"
    );
    for c in &r.cases {
        println!(
            "{:<18} {:>10.2} {:>9.2} {:>9.2} {:>6.2} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>9.1} {:>8}",
            c.mix,
            c.guest_gbps,
            c.wire_gbps,
            c.reference_gbps,
            c.ratio,
            c.src_cpu_s_per_gb,
            c.dst_cpu_s_per_gb,
            c.ref_src_cpu_s_per_gb,
            c.ref_dst_cpu_s_per_gb,
            c.src_peak_rss_mib,
            c.dst_peak_rss_mib,
            c.pause_ms
        );
    }
    println!(
        "guest GB/s: guest memory over the whole migration (connect to commit); ref: the same\n\
         bytes from memory to memory as sealed frames over the same streams, nothing else;\n\
         s/GB: CPU-seconds per GB of guest memory (ref src/dst: the reference's); MiB: peak\n\
         resident memory of each process, guest memory excluded."
    );
}

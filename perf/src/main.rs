//! `skyferry-bench`: benchmarks that print a table, or one JSON object with `--json`.
//!
//! Every throughput is printed beside a reference measured in the same run (memcpy of the same
//! bytes, the same bytes sealed over the same sockets, the link emulator's measured rate),
//! because absolute figures on a shared machine mean little; the ratio travels.

mod calibrate;
mod cipher;
mod codec;
mod compress;
mod compress_peer;
mod fingerprint;
mod kvm;
mod linkemu;
mod measure;
mod peer;
mod pipeline;
mod pipeline_peer;
mod pipeline_plot;
mod procstat;
mod wan;
mod workload;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "skyferry-bench", about = "skyferry benchmarks", version)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Page codec and sealing: encode/decode/seal/open GB/s and bytes out per byte in, for
    /// several page mixes, beside memcpy.
    Codec(codec::Args),
    /// AES-256-GCM implementations and block hashes on one core, beside memcpy: the figures
    /// behind the choice of cipher and build flags.
    Cipher(cipher::Args),
    /// Whole migrations between two processes over loopback, for page mixes and workload
    /// models, beside the same run's encrypted-transfer reference.
    Pipeline(pipeline::Args),
    /// The paper's compressed-tunnel comparison (Fig. 18) through a rate-limited link, with
    /// skyferry's adaptive compression beside it, and at an unlimited link.
    Compress(compress::Args),
    /// The QEMU backend's content-based dirty detection: a full fingerprint pass over a RAM
    /// file, on all cores and on one, beside plain pread of the same file.
    Fingerprint(fingerprint::Args),
    /// The downtime a KVM guest sees on its own clock beside the driver's pause, per stop
    /// policy (runs `skyferry demo --guest kvm`; needs /dev/kvm).
    Kvm(kvm::Args),
    /// One end of a `compress` run (started by `compress` itself).
    #[command(hide = true)]
    CompressPeer(compress_peer::PeerArgs),
    /// One end of a `pipeline` run (started by `pipeline` itself).
    #[command(hide = true)]
    PipelinePeer(pipeline_peer::PeerArgs),
    /// The paper's emulated-WAN experiments (Table I, Fig. 11, Fig. 14, Table II) through a
    /// user-space link emulator, after measuring the emulator's accuracy.
    Wan(wan::Args),
    /// Run the link emulator alone: a TCP relay with a rate and a one-way delay.
    #[command(hide = true)]
    Linkemu(linkemu::cli::Args),
}

fn main() {
    let cli = Cli::parse();
    match cli.bench {
        Bench::Codec(args) => codec::run(&args),
        Bench::Cipher(args) => cipher::run(&args),
        Bench::Pipeline(args) => exit_on_error(pipeline::run(&args)),
        Bench::PipelinePeer(args) => exit_on_error(pipeline_peer::run(&args)),
        Bench::Compress(args) => exit_on_error(compress::run(&args)),
        Bench::CompressPeer(args) => exit_on_error(compress_peer::run(&args)),
        Bench::Wan(args) => exit_on_error(wan::run(&args)),
        Bench::Fingerprint(args) => exit_on_error(fingerprint::run(&args)),
        Bench::Kvm(args) => exit_on_error(kvm::run(&args)),
        Bench::Linkemu(args) => exit_on_error(linkemu::cli::run(&args)),
    }
}

fn exit_on_error(r: Result<(), String>) {
    if let Err(e) = r {
        eprintln!("skyferry-bench: {e}");
        std::process::exit(1);
    }
}

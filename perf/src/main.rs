//! `skyferry-bench`: benchmarks that print a table, or one JSON object with `--json`.
//!
//! Every throughput is printed beside a reference measured in the same run (memcpy of the same
//! bytes), because absolute figures on a shared machine mean little; the ratio travels.

mod calibrate;
mod codec;
mod linkemu;
mod measure;
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
        Bench::Wan(args) => exit_on_error(wan::run(&args)),
        Bench::Linkemu(args) => exit_on_error(linkemu::cli::run(&args)),
    }
}

fn exit_on_error(r: Result<(), String>) {
    if let Err(e) = r {
        eprintln!("skyferry-bench: {e}");
        std::process::exit(1);
    }
}

//! `skyferry-bench`: benchmarks that print a table, or one JSON object with `--json`.
//!
//! Every throughput is printed beside a reference measured in the same run (memcpy of the same
//! bytes), because absolute figures on a shared machine mean little; the ratio travels.

mod codec;
mod measure;
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
}

fn main() {
    let cli = Cli::parse();
    match cli.bench {
        Bench::Codec(args) => codec::run(&args),
    }
}

//! `skyferry`: the operator CLI.

mod keygen;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "skyferry",
    version,
    about = "Live-migrate virtual machines over wide-area links"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the pre-shared key both hosts need (copy it to the peer over a secure channel).
    Keygen(keygen::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Keygen(args) => keygen::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("skyferry: {message}");
            ExitCode::FAILURE
        }
    }
}

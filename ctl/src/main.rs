//! `skyferry`: the operator CLI.

mod daemon_cmds;
mod demo;
mod demo_kvm;
mod demo_qemu;
mod keygen;
mod progress;
mod report;
mod testguest;
mod timeline;

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
    /// Run a whole migration on this host (a destination and a source over loopback TCP).
    Demo(demo::Args),
    /// Start migrating a guest hosted by the local skyferryd to another host's skyferryd.
    Start(Box<daemon_cmds::StartArgs>),
    /// Abort a migration before its commit: the guest keeps running at the source.
    Abort(daemon_cmds::AbortArgs),
    /// At a destination: settle a migration held in doubt (the source was lost after the
    /// destination said it was ready) by starting the guest here or discarding it.
    Resolve(daemon_cmds::ResolveArgs),
    /// Show migrations on this host.
    Status(daemon_cmds::StatusArgs),
    /// Follow a migration live.
    Watch(daemon_cmds::WatchArgs),
    /// Draw a migration's timeline: per iteration the pages sent, dirtied and left, the
    /// link rate, the pause and the bytes each optimization saved.
    Report(report::ReportArgs),
    /// Create the pre-shared key both hosts need (copy it to the peer over a secure channel).
    Keygen(keygen::Args),
    /// Build (or reuse) the small Linux guest that QEMU migration tests boot, and show how to
    /// run it.
    TestGuest(testguest::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(&a),
        Command::Start(a) => daemon_cmds::start(&a),
        Command::Abort(a) => daemon_cmds::abort(&a),
        Command::Resolve(a) => daemon_cmds::resolve(&a),
        Command::Status(a) => daemon_cmds::status(&a),
        Command::Watch(a) => daemon_cmds::watch(&a),
        Command::Report(a) => report::run(&a),
        Command::Keygen(args) => keygen::run(&args),
        Command::TestGuest(args) => testguest::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("skyferry: {message}");
            ExitCode::FAILURE
        }
    }
}

//! `skyferry`: the operator CLI.

mod daemon_cmds;
mod demo;
mod demo_kvm;
mod demo_qemu;
mod gen_docs;
mod keygen;
mod progress;
mod report;
mod testguest;
mod timeline;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "skyferry",
    version,
    about = "Live-migrate virtual machines over wide-area links"
)]
struct Cli {
    /// The daemon's control socket (for start, abort, resolve, status, watch, report); before or
    /// after the subcommand.
    #[arg(
        long,
        global = true,
        env = "SKYFERRY_SOCKET",
        default_value = "/run/skyferry/control.sock",
        value_name = "PATH"
    )]
    socket: PathBuf,
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
    /// Write the man pages and shell completions of skyferry and skyferryd into a directory
    /// (for packagers: they are built from the same definitions the programs parse).
    #[command(hide = true)]
    GenDocs(gen_docs::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(a) => demo::run(&a),
        Command::Start(a) => daemon_cmds::start(&cli.socket, &a),
        Command::Abort(a) => daemon_cmds::abort(&cli.socket, &a),
        Command::Resolve(a) => daemon_cmds::resolve(&cli.socket, &a),
        Command::Status(a) => daemon_cmds::status(&cli.socket, &a),
        Command::Watch(a) => daemon_cmds::watch(&cli.socket, &a),
        Command::Report(a) => report::run(&cli.socket, &a),
        Command::Keygen(args) => keygen::run(&args),
        Command::TestGuest(args) => testguest::run(&args),
        Command::GenDocs(args) => gen_docs::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("skyferry: {message}");
            ExitCode::FAILURE
        }
    }
}

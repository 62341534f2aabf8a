//! `skyferryd`: the skyferry daemon. One per host; see `configs/*.toml`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use dataplane::daemon::config::read_psk;
use dataplane::daemon::control_server;
use dataplane::daemon::{DaemonConfig, Registry};

#[derive(Parser)]
#[command(
    name = "skyferryd",
    version,
    about = "skyferry daemon: sends and receives live migrations"
)]
struct Args {
    /// Configuration file.
    #[arg(long, short, default_value = "/etc/skyferry/skyferryd.toml")]
    config: PathBuf,
    /// Check the configuration and the key file, then exit.
    #[arg(long)]
    check_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let settings = match DaemonConfig::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skyferryd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let psk = match read_psk(&settings.psk_file) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("skyferryd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        println!("skyferryd: {} is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    // Before anything is bound: a second daemon on this socket stops here, naming the first.
    let lock = match control_server::lock(&settings.control_socket) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skyferryd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&settings.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();

    let registry = Registry::new(settings.clone(), psk);
    if let Some(addr) = settings.metrics_listen {
        let r = registry.clone();
        let scrape = std::sync::Arc::new(move || {
            dataplane::daemon::metrics::render(&r.snapshot(), Some(r.admission()))
        });
        match dataplane::daemon::metrics::serve(addr, scrape) {
            Ok(bound) => tracing::info!("metrics on http://{bound}/metrics"),
            Err(e) => {
                eprintln!("skyferryd: cannot serve {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if let (Some(addr), Some(coordinator)) = (settings.coordinator.listen, registry.coordinator()) {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skyferryd: cannot serve the coordinator on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!("coordinator on {addr}");
        let c = coordinator.clone();
        std::thread::Builder::new()
            .name("sf-coordinator".into())
            .spawn(move || c.serve(&listener))
            .expect("spawning the coordinator");
    }
    if let Some(addr) = settings.listen {
        let listener = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("skyferryd: cannot listen on {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(
            "receiving migrations on {}",
            listener.local_addr().map_or(addr, |a| a)
        );
        let r = registry.clone();
        std::thread::Builder::new()
            .name("sf-listen".into())
            .spawn(move || r.listen(&listener))
            .expect("spawning the listener");
    }
    match control_server::serve(
        &settings.control_socket,
        &lock,
        &registry,
        settings.control_clients,
    ) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("skyferryd: {e}");
            ExitCode::FAILURE
        }
    }
}

//! `skyferryd`: the skyferry daemon. One per host; see `configs/*.toml`.

use std::io::IsTerminal;
use std::net::TcpListener;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;
use dataplane::daemon::cli::DaemonArgs;
use dataplane::daemon::config::read_psk;
use dataplane::daemon::control::{Request, Response, request};
use dataplane::daemon::control_server;
use dataplane::daemon::service::{self, Loops};
use dataplane::daemon::{DaemonConfig, Registry};

/// How long the control socket may take to answer its first request after it was bound.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn main() -> ExitCode {
    // Before any thread exists, so that all inherit the mask.
    let stop_signals = service::block_stop_signals();
    let args = DaemonArgs::parse();
    let settings = match DaemonConfig::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skyferryd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let psk = match read_psk(&settings.psk_file) {
        Ok(k) => k,
        Err(e) if !settings.psk_file.exists() => {
            eprintln!(
                "skyferryd: {e}\nskyferryd: create the key with `skyferry keygen --out {}` \
                 (and copy it to the peers over a secure channel), or set psk_file in [daemon]",
                settings.psk_file.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("skyferryd: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        println!(
            "skyferryd: {} is valid, and so is its key file {}",
            args.config.display(),
            settings.psk_file.display()
        );
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
    // Colour only for a person at a terminal: not in log files, the journal or with NO_COLOR.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr)
        .init();
    service::stop_on_signal(stop_signals, settings.control_socket.clone());

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
    let mut loops = Loops::default();
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
        let thread = std::thread::Builder::new()
            .name("sf-coordinator".into())
            .spawn(move || c.serve(&listener))
            .expect("spawning the coordinator");
        loops.add("coordinator", thread);
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
        let thread = std::thread::Builder::new()
            .name("sf-listen".into())
            .spawn(move || r.listen(&listener))
            .expect("spawning the listener");
        loops.add("listener", thread);
    }
    let socket = settings.control_socket.clone();
    let (r, clients) = (registry.clone(), settings.control_clients);
    let control = std::thread::Builder::new()
        .name("sf-control".into())
        // The lock moves with the thread that serves the socket: held for the daemon's life.
        .spawn(move || control_server::serve(&socket, &lock, &r, clients))
        .expect("spawning the control socket");
    if let Err(e) = wait_until_answering(&settings.control_socket, &control) {
        // When the thread ended, its own error says why (a bind that failed).
        let why = match control.is_finished().then(|| control.join()) {
            Some(Ok(Err(bind))) => bind.to_string(),
            _ => e,
        };
        eprintln!(
            "skyferryd: control socket {}: {why}",
            settings.control_socket.display()
        );
        return ExitCode::FAILURE;
    }
    service::ready();
    service::watchdog(settings.control_socket.clone(), loops);
    match control.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!(
                "skyferryd: control socket {}: {e}",
                settings.control_socket.display()
            );
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("skyferryd: the control socket's thread panicked");
            ExitCode::FAILURE
        }
    }
}

/// Waits until the control socket answers a status request: then the daemon is ready. An
/// error when its thread ended first (the bind failed) or it never answered.
fn wait_until_answering(
    socket: &Path,
    control: &std::thread::JoinHandle<Result<(), control_server::ServeError>>,
) -> Result<(), String> {
    let since = Instant::now();
    loop {
        if control.is_finished() {
            return Err("could not be served".into());
        }
        if let Ok(Response::Status { .. }) = request(socket, &Request::Status { id: None }) {
            return Ok(());
        }
        if since.elapsed() > READY_WITHIN {
            return Err(format!("did not answer within {READY_WITHIN:?}"));
        }
        // The bind is microseconds away; this only spaces the retries.
        std::thread::sleep(Duration::from_millis(5));
    }
}

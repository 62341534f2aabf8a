//! What every benchmark child process shares: the key both ends use, how a child reports (one
//! JSON line on stdout, after its port if it listens), and the destination end of a migration.

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::crypto::PreSharedKey;
use dataplane::guest::DestGuest;
use dataplane::guest::synthetic::SyntheticTarget;
use dataplane::migrate::dest::{DestOptions, DestSummary, receive};
use dataplane::migrate::status::{MigrationStatus, Role};
use dataplane::transport::SocketOptions;
use serde::Serialize;

use crate::procstat::cpu_seconds;

/// How long either end waits on a silent peer.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The pre-shared key of benchmark migrations (both ends are this binary).
pub fn psk() -> PreSharedKey {
    PreSharedKey::from_bytes([0x5c; 32])
}

/// Writes `report` as one JSON line on stdout.
pub fn emit<T: Serialize>(report: &T) {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, report).expect("stdout");
    writeln!(out).expect("stdout");
    out.flush().expect("stdout");
}

/// Binds a loopback port and prints it on a line of its own, for the parent to read.
pub fn listen() -> Result<TcpListener, String> {
    let l =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a loopback port: {e}"))?;
    println!("{}", l.local_addr().map_err(|e| e.to_string())?.port());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    Ok(l)
}

/// Receives one migration of a `pages`-page guest into a synthetic target whose memory is
/// faulted in before the clock starts; returns the summary and the CPU-seconds it took.
pub fn receive_one(pages: u64, pin: bool) -> Result<(DestSummary, f64), String> {
    let target = SyntheticTarget::preallocated(pages).map_err(|e| e.to_string())?;
    let listener = listen()?;
    let opts = DestOptions {
        resume_window: std::time::Duration::from_secs(120),
        psk: psk(),
        socket: SocketOptions::default(),
        pin_threads: pin,
        timeout: TIMEOUT,
        max_guest_pages: pages,
        max_streams: 64,
        drbd: None,
        announce: None,
    };
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        1,
        Role::Destination,
        "bench",
        pages,
    )));
    let cpu0 = cpu_seconds();
    let summary = receive(
        &listener,
        &opts,
        Box::new(move |_| Ok(Arc::new(target) as Arc<dyn DestGuest>)),
        &status,
        &AtomicBool::new(false),
    )
    .map_err(|e| e.to_string())?;
    Ok((summary, cpu_seconds() - cpu0))
}

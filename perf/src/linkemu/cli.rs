//! `skyferry-bench linkemu` (hidden): the link emulator alone, for trying a migration between
//! two `skyferryd`s or any TCP pair through an emulated WAN. Runs until killed.

use std::net::SocketAddr;
use std::time::Duration;

use dataplane::units::{format_rate, parse_duration, parse_rate};

use super::{LinkConfig, LinkEmu};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Address every accepted connection is relayed to.
    #[arg(long)]
    to: SocketAddr,
    /// Link rate in each direction, like 100Mbit or 1Gbit.
    #[arg(long, value_parser = parse_rate, default_value = "100Mbit")]
    rate: u64,
    /// One-way delay in each direction (the round trip is twice this), like 10ms.
    #[arg(long, value_parser = parse_duration, default_value = "10ms")]
    delay: Duration,
    /// Most queueing the link buffers before it stops reading (default: the delay, at
    /// least 5 ms).
    #[arg(long, value_parser = parse_duration)]
    buffer: Option<Duration>,
}

pub fn run(a: &Args) -> Result<(), String> {
    let mut config = LinkConfig::new(a.rate.saturating_mul(8), a.delay * 2);
    if let Some(b) = a.buffer {
        config.buffer = b;
    }
    let emu = LinkEmu::bind(a.listen, a.to, config).map_err(|e| format!("listen: {e}"))?;
    println!(
        "linkemu: {} -> {} at {}, {:?} one way, {:?} buffer",
        emu.local_addr(),
        a.to,
        format_rate(config.bytes_per_sec()),
        config.delay,
        config.buffer
    );
    let mut last = emu.stats();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = emu.stats();
        eprintln!(
            "linkemu: {} connections, forward {}, reverse {}",
            now.connections,
            format_rate((now.forward_bytes - last.forward_bytes) as f64),
            format_rate((now.reverse_bytes - last.reverse_bytes) as f64)
        );
        last = now;
    }
}

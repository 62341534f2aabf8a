//! The configuration files the docs point operators at parse as the daemon parses them, and
//! the one-host trial's two daemons do not step on each other.

use std::path::Path;

use dataplane::daemon::DaemonConfig;
use dataplane::daemon::config::Settings;

fn parse(rel: &str) -> Settings {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

#[test]
fn the_commented_examples_parse() {
    let source = parse("configs/source.toml");
    assert!(source.listen.is_none(), "the source example only sends");
    let dest = parse("configs/destination.toml");
    assert!(dest.listen.is_some(), "the destination example receives");
    assert!(dest.kvm.receive && dest.qemu.receive && dest.xen.receive && dest.drbd.is_some());
}

#[test]
fn the_trial_pair_is_two_daemons_on_one_host() {
    let source = parse("configs/trial/source.toml");
    let dest = parse("configs/trial/destination.toml");
    assert!(source.listen.is_none());
    let listen = dest.listen.expect("the trial destination listens");
    assert!(
        listen.ip().is_loopback(),
        "the trial stays on loopback: {listen}"
    );
    assert_ne!(source.control_socket, dest.control_socket);
    assert_eq!(source.psk_file, dest.psk_file, "both daemons share one key");
}

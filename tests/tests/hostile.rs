//! What a destination daemon does with connections to its migration port that are not
//! migrations: each is dropped on its own, and migrations go on meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use skyferry_tests::{Daemon, is_final};

fn migrate_small(src: &Daemon, dst: &Daemon) -> serde_json::Value {
    let to = dst.listen.unwrap().to_string();
    let out = src.cli(&[
        "start",
        "--to",
        &to,
        "--quiet",
        "--workload",
        "idle",
        "--mem",
        "8MiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    src.wait_for(&id, 60, is_final)
}

/// Waits until the daemon closes `s` (or panics after `secs`).
fn closed_within(s: &mut TcpStream, secs: u64) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Ok(n) => panic!("the daemon answered {n} bytes"),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "still open after {secs} s");
    }
}

#[test]
fn the_migration_port_takes_no_control_commands_and_no_garbage() {
    let dst = Daemon::start("hostile-port-dst", 1, true, "");
    let src = Daemon::start("hostile-port-src", 1, false, "");
    let addr = dst.listen.unwrap();
    // A control-socket request sent to the migration port.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"{\"cmd\":\"abort\",\"id\":1}\n").unwrap();
    closed_within(&mut c, 3);
    // A Hello claiming 4 GiB.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"SKYFCTL1\xff\xff\xff\xff").unwrap();
    closed_within(&mut c, 3);
    // A data stream for a migration nobody receives.
    let mut c = TcpStream::connect(addr).unwrap();
    let mut hello = b"SKYFDAT1".to_vec();
    hello.extend_from_slice(&0x1234_u64.to_le_bytes());
    hello.extend_from_slice(&1_u32.to_le_bytes());
    c.write_all(&hello).unwrap();
    closed_within(&mut c, 3);
    let log = dst.log();
    for why in [
        "not a skyferry connection",
        "a Hello of 4294967295 bytes",
        "no such migration is being received",
    ] {
        assert!(log.contains(why), "{why:?} not logged:\n{log}");
    }
    let s = migrate_small(&src, &dst);
    assert_eq!(s["phase"], "completed", "{s}");
}

#[test]
fn idle_and_trickling_connections_do_not_hold_up_migrations() {
    let dst = Daemon::start("hostile-loris-dst", 1, true, "");
    let src = Daemon::start("hostile-loris-src", 1, false, "");
    let addr = dst.listen.unwrap();
    let mut idle: Vec<TcpStream> = (0..200)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // Some send part of a Hello's header and stop there.
    for s in idle.iter_mut().take(50) {
        s.write_all(b"SKYFC").unwrap();
    }
    let started = Instant::now();
    let s = migrate_small(&src, &dst);
    assert_eq!(s["phase"], "completed", "{s}\n{}", dst.log());
    eprintln!(
        "migration beside 200 idle connections took {} ms",
        started.elapsed().as_millis()
    );
    // Each is closed once its time to say what it is has passed.
    for s in &mut idle {
        closed_within(s, 10);
    }
    let mut dst = dst;
    assert!(dst.alive());
}

//! What a destination daemon does with connections to its migration port that are not
//! migrations: each is dropped on its own, and migrations go on meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use skyferry_tests::{Daemon, is_final};

fn migrate_small(src: &Daemon, dst: &Daemon) -> serde_json::Value {
    let id = src.start_migration(
        dst.listen.unwrap(),
        &["--workload", "idle", "--mem", "8MiB"],
    );
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

#[test]
fn a_peer_without_the_key_makes_the_destination_allocate_nothing() {
    use dataplane::codec::CodecConfig;
    use dataplane::crypto::PreSharedKey;
    use dataplane::protocol::{Hello, StreamHello, VERSION, open_stream, send_hello};

    let dst = Daemon::start("hostile-nokey-dst", 1, true, "");
    let src = Daemon::start("hostile-nokey-src", 1, false, "");
    let addr = dst.listen.unwrap();
    let before = dst.peak_rss();
    // The largest cache a Hello may ask for, on the most streams: 16 GiB if the
    // destination allocated before the peer proved it holds the key.
    let hello = Hello {
        version: VERSION,
        migration_id: 0x5eed,
        source_nonce: [7; 32],
        guest_pages: 1024,
        streams: 16,
        codec: CodecConfig {
            cache_bytes: 1 << 30,
            ..CodecConfig::default()
        },
        frame_size: 65536,
        backend: "synthetic".into(),
        guest: "intruder".into(),
        destination: None,
        resume: 0,
    };
    let mut control = TcpStream::connect(addr).unwrap();
    // Our key is wrong: the Welcome's key check fails here, and we go on regardless.
    let wrong = PreSharedKey::from_bytes([0x42; 32]);
    assert!(send_hello(&mut control, &wrong, &hello).is_err());
    let _streams: Vec<TcpStream> = (1..=16)
        .map(|n| {
            let mut d = TcpStream::connect(addr).unwrap();
            open_stream(
                &mut d,
                StreamHello {
                    migration_id: 0x5eed,
                    stream: n,
                },
            )
            .unwrap();
            d
        })
        .collect();
    // A "sealed" control frame that is not one.
    control.write_all(&[0x55; 4096]).unwrap();
    let d = dst.wait_for("5eed", 30, is_final);
    assert_eq!(d["phase"], "failed", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("first sealed message"),
        "{d}"
    );
    let grew = dst.peak_rss().saturating_sub(before);
    eprintln!("the destination's peak RSS grew by {} MiB", grew >> 20);
    assert!(grew < 64 << 20, "grew by {} MiB", grew >> 20);
    // And it still receives.
    let s = migrate_small(&src, &dst);
    assert_eq!(s["phase"], "completed", "{s}");
}

#[test]
fn a_reconnection_is_taken_only_from_the_source_with_the_key() {
    use dataplane::codec::CodecConfig;
    use dataplane::crypto::PreSharedKey;
    use dataplane::protocol::{Hello, ProtocolError, VERSION, send_hello};

    let dst = Daemon::start("hostile-resume-dst", 1, true, "");
    let mut src = Daemon::start("hostile-resume-src", 1, false, "");
    let addr = dst.listen.unwrap();
    let id = src.start_migration(
        addr,
        &[
            "--workload",
            "tpcw",
            "--mem",
            "64MiB",
            "--max-bandwidth",
            "40MB/s",
            "--policy",
            "xen-default",
        ],
    );
    src.wait_for(&id, 60, |s| {
        s["iteration"].as_u64() >= Some(2) || is_final(s)
    });
    // The source dies in pre-copy: the destination holds what arrived, for its return.
    src.kill();
    let d = dst.wait_for(&id, 30, |s| s["phase"] == "reconnecting" || is_final(s));
    assert_eq!(d["phase"], "reconnecting", "{d}");
    let id_num = u64::from_str_radix(&id, 16).unwrap();
    let intruder = |migration_id: u64, guest_pages: u64| {
        let hello = Hello {
            version: VERSION,
            migration_id,
            source_nonce: [3; 32],
            guest_pages,
            streams: 2,
            codec: CodecConfig::default(),
            frame_size: 65536,
            backend: "synthetic".into(),
            guest: "intruder".into(),
            destination: None,
            resume: 1,
        };
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send_hello(&mut c, &PreSharedKey::from_bytes([0x42; 32]), &hello)
    };
    // A reconnection to a migration nobody holds: refused, with the reason.
    match intruder(0xdead, 16384) {
        Err(ProtocolError::Refused(why)) => {
            assert!(why.contains("not held here for resuming"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // To the held one, describing another migration, or without the key: refused, and
    // the wait goes on.
    let refused = intruder(id_num, 1);
    assert!(
        matches!(&refused, Err(ProtocolError::Refused(w)) if w.contains("same migration")),
        "{refused:?}"
    );
    let no_key = intruder(id_num, 16384);
    assert!(no_key.is_err(), "{no_key:?}");
    let d = dst.status(&id);
    assert_eq!(d["phase"], "reconnecting", "{d}");
    // Nobody with the key came back: discarded once the window (20 s here) has passed.
    let d = dst.wait_for(&id, 60, is_final);
    assert_eq!(d["phase"], "failed", "{d}");
    assert!(
        d["error"]
            .as_str()
            .unwrap()
            .contains("did not reconnect within"),
        "{d}"
    );
    let src = Daemon::start("hostile-resume-src2", 1, false, "");
    assert_eq!(migrate_small(&src, &dst)["phase"], "completed");
}

//! What a destination daemon does with connections to its migration port that are not
//! migrations, or not from a holder of the key: each is dropped on its own, nothing is
//! kept for it, and migrations go on meanwhile.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::protocol::handshake::GREETING_LEN;
use dataplane::protocol::{Hello, ProtocolError, StreamHello, open_stream, send_hello};
use skyferry_tests::{Daemon, is_final};

fn migrate_small(src: &Daemon, dst: &Daemon) -> serde_json::Value {
    let id = src.start_migration(
        dst.listen.unwrap(),
        &["--workload", "idle", "--mem", "8MiB"],
    );
    src.wait_for(&id, 60, is_final)
}

/// The key of the test daemons started with key `n`.
fn key(n: u8) -> PreSharedKey {
    PreSharedKey::from_hex(&skyferry_tests::psk(n)).unwrap()
}

fn hello(migration_id: u64, guest: &str, resume: u32) -> Hello {
    Hello {
        migration_id,
        source_nonce: [7; 32],
        guest_pages: 1024,
        streams: 2,
        codec: CodecConfig::default(),
        frame_size: 65536,
        backend: "synthetic".into(),
        guest: guest.into(),
        destination: None,
        resume,
    }
}

/// Waits until the daemon closes `s` (or panics after `secs`); the greeting (and a
/// Welcome saying the key differs) may come first, nothing else.
fn closed_within(s: &mut TcpStream, secs: u64) {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 64];
    let mut got = 0;
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Ok(n) => {
                got += n;
                assert!(got <= GREETING_LEN + 16, "the daemon answered {got} bytes");
            }
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "still open after {secs} s");
    }
}

/// Waits until the daemon's log says `what` (or panics after `secs`).
/// Rows in the daemon's `status --json`.
fn rows(d: &Daemon) -> Vec<serde_json::Value> {
    let out = d.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["migrations"].as_array().cloned().unwrap_or_default()
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so read after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Resident memory now (VmRSS), bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[test]
fn the_migration_port_takes_no_control_commands_and_no_garbage() {
    let dst = Daemon::start("hostile-port-dst", 1, true, "");
    let src = Daemon::start("hostile-port-src", 1, false, "");
    let addr = dst.listen.unwrap();
    // A control-socket request sent to the migration port.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"{\"cmd\":\"abort\",\"id\":1}\n").unwrap();
    closed_within(&mut c, 10);
    // A Hello claiming 4 GiB.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"SKYFHELO\x07\x00\xff\xff\xff\xff").unwrap();
    closed_within(&mut c, 10);
    // A data stream, with the key, for a migration nobody receives.
    let mut c = TcpStream::connect(addr).unwrap();
    open_stream(
        &mut c,
        &key(1),
        StreamHello {
            migration_id: 0x1234,
            stream: 1,
        },
    )
    .unwrap();
    closed_within(&mut c, 10);
    // The first drop is logged at once, the others as counts within a few seconds.
    for why in [
        "not a skyferry connection",
        "a Hello of 4294967295 bytes",
        "no such migration is being received",
    ] {
        dst.wait_log(why, 120);
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
        s.write_all(b"SKYFH").unwrap();
    }
    let started = Instant::now();
    let s = migrate_small(&src, &dst);
    assert_eq!(s["phase"], "completed", "{s}\n{}", dst.log());
    eprintln!(
        "migration beside 200 idle connections took {} ms",
        started.elapsed().as_millis()
    );
    // Each is closed once its time to prove the key (5 s by default) has passed.
    for s in &mut idle {
        closed_within(s, 30);
    }
    dst.wait_log("did not prove the key within 5000 ms", 120);
    let mut dst = dst;
    assert!(dst.alive());
}

#[test]
fn a_peer_without_the_key_makes_the_destination_allocate_nothing() {
    let dst = Daemon::start("hostile-nokey-dst", 1, true, "");
    let src = Daemon::start("hostile-nokey-src", 1, false, "");
    let addr = dst.listen.unwrap();
    let before = dst.peak_rss();
    // The largest cache a Hello may ask for, on the most streams: 16 GiB if the
    // destination allocated before the peer proved it holds the key.
    let mut big = hello(0x5eed, "intruder", 0);
    big.streams = 16;
    big.guest_pages = 1 << 26;
    big.codec.cache_bytes = 1 << 30;
    let mut control = TcpStream::connect(addr).unwrap();
    // Our key is wrong: the destination says so, and that is all it does.
    let r = send_hello(&mut control, &key(2), &big);
    assert!(matches!(r, Err(ProtocolError::WrongKey)), "{r:?}");
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("pre-shared key differs")
    );
    let mut streams: Vec<TcpStream> = (1..=16)
        .map(|n| {
            let mut d = TcpStream::connect(addr).unwrap();
            open_stream(
                &mut d,
                &key(2),
                StreamHello {
                    migration_id: 0x5eed,
                    stream: n,
                },
            )
            .unwrap();
            d
        })
        .collect();
    for s in &mut streams {
        closed_within(s, 10);
    }
    dst.wait_log("wrong key", 120);
    assert!(rows(&dst).is_empty(), "{:?}", rows(&dst));
    let grew = dst.peak_rss().saturating_sub(before);
    eprintln!("the destination's peak RSS grew by {} KiB", grew >> 10);
    assert!(grew < 16 << 20, "grew by {} MiB", grew >> 20);
    // And it still receives.
    let s = migrate_small(&src, &dst);
    assert_eq!(s["phase"], "completed", "{s}");
}

#[test]
fn a_reconnection_is_taken_only_from_the_source_with_the_key() {
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
    let intruder = |psk: &PreSharedKey, migration_id: u64, guest_pages: u64| {
        let mut h = hello(migration_id, "intruder", 1);
        h.guest_pages = guest_pages;
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        send_hello(&mut c, psk, &h)
    };
    // With the key, a reconnection to a migration nobody holds: refused, with the reason.
    match intruder(&key(1), 0xdead, 16384) {
        Err(ProtocolError::Refused(why)) => {
            assert!(why.contains("not held here for resuming"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // To the held one, describing another migration, or without the key: refused, and
    // the wait goes on.
    let refused = intruder(&key(1), id_num, 1);
    assert!(
        matches!(&refused, Err(ProtocolError::Refused(w)) if w.contains("same migration")),
        "{refused:?}"
    );
    let no_key = intruder(&key(2), id_num, 16384);
    assert!(matches!(no_key, Err(ProtocolError::WrongKey)), "{no_key:?}");
    let d = dst.status(&id);
    assert_eq!(d["phase"], "reconnecting", "{d}");
    // The refused reconnection left no row of its own.
    assert_eq!(rows(&dst).len(), 1, "{:?}", rows(&dst));
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

/// A destination that would start a QEMU for an incoming `qemu` guest (a shell that sleeps
/// stands in for it: if anything started it, it would show as a child of the daemon).
const QEMU_THAT_WOULD_START: &str = "[qemu]\nram_file = \"/dev/shm/skyferry-hostile-{guest}\"\nqmp = \"/tmp/skyferry-hostile-{guest}.qmp\"\ncommand = [\"/bin/sh\", \"-c\", \"sleep 600\", \"-incoming\", \"defer\"]\n";

/// Issue 17's lock-out, and what keyless connections cost: 1000 connections held open
/// and renewed as the destination closes them (a quarter send part of a Hello's header),
/// beside a stream of Hellos under a wrong key. None of them gets a child process, a status
/// row or more than 16 MiB of the daemon's memory, and a real migration completes while
/// they are held.
#[test]
fn a_thousand_keyless_connections_cost_nothing_and_lock_no_one_out() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    let dst = Daemon::start("hostile-flood-dst", 1, true, QEMU_THAT_WOULD_START);
    let src = Daemon::start("hostile-flood-src", 1, false, "");
    let addr = dst.listen.unwrap();
    let pid = dst.pid();
    let (rss_before, peak_before) = (rss(pid), dst.peak_rss());
    let stop = Arc::new(AtomicBool::new(false));
    let renewed = Arc::new(AtomicU64::new(0));
    let wrong_key = Arc::new(AtomicU64::new(0));

    let holder = {
        let (stop, renewed) = (stop.clone(), renewed.clone());
        std::thread::spawn(move || {
            let open = |i: usize| {
                let s = TcpStream::connect(addr).ok()?;
                s.set_nonblocking(true).ok()?;
                if i.is_multiple_of(4) {
                    let _ = (&s).write(b"SKYFHELO\x07\x00\x40\x00\x00\x00");
                }
                Some(s)
            };
            let mut conns: Vec<Option<TcpStream>> = (0..1000).map(open).collect();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                for (i, c) in conns.iter_mut().enumerate() {
                    let gone = match c {
                        None => true,
                        Some(s) => loop {
                            match s.read(&mut buf) {
                                Ok(0) => break true,
                                // The greeting.
                                Ok(_) => {}
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                                    break false;
                                }
                                Err(_) => break true,
                            }
                        },
                    };
                    if gone {
                        *c = open(i);
                        renewed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // The attacker's pace between sweeps; nothing is timed by it.
                std::thread::sleep(Duration::from_millis(20));
            }
            conns.iter().flatten().count()
        })
    };
    let prober = {
        let (stop, wrong_key) = (stop.clone(), wrong_key.clone());
        std::thread::spawn(move || {
            let mut h = hello(0xbad, "intruder", 0);
            h.guest_pages = 1 << 26;
            h.backend = "qemu".into();
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut c) = TcpStream::connect(addr) else {
                    continue;
                };
                let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
                if let Err(ProtocolError::WrongKey) = send_hello(&mut c, &key(2), &h) {
                    wrong_key.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    // Until every one of the first 1000 has been closed by the destination (its time to
    // prove the key passed, or the pool made room) and opened again.
    let deadline = Instant::now() + Duration::from_secs(180);
    while renewed.load(Ordering::Relaxed) < 1000 || wrong_key.load(Ordering::Relaxed) < 16 {
        assert!(
            Instant::now() < deadline,
            "renewed {renewed:?}, wrong key {wrong_key:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let grew = rss(pid).saturating_sub(rss_before);
    let peak = dst.peak_rss().saturating_sub(peak_before);
    eprintln!(
        "after {} renewals and {} wrong-key Hellos: RSS grew by {} KiB (peak by {} KiB)",
        renewed.load(Ordering::Relaxed),
        wrong_key.load(Ordering::Relaxed),
        grew >> 10,
        peak >> 10
    );
    assert!(peak <= 16 << 20, "peak RSS grew by {} MiB", peak >> 20);
    assert!(children(pid).is_empty(), "children: {:?}", children(pid));
    assert!(rows(&dst).is_empty(), "{:?}", rows(&dst));

    // A real source, on the same address, meanwhile.
    let s = migrate_small(&src, &dst);
    assert_eq!(s["phase"], "completed", "{s}\n{}", dst.log());
    assert_eq!(rows(&dst).len(), 1, "{:?}", rows(&dst));
    assert!(children(pid).is_empty(), "children: {:?}", children(pid));

    stop.store(true, Ordering::Relaxed);
    let held = holder.join().unwrap();
    prober.join().unwrap();
    eprintln!("{held} keyless connections were open at the end");
    let mut dst = dst;
    assert!(dst.alive());
}

#[test]
fn an_old_protocol_peer_and_a_wrong_key_peer_are_told_why() {
    let dst = Daemon::start("hostile-old-dst", 1, true, "");
    let addr = dst.listen.unwrap();
    // A source of protocol 6 sends its Hello at once (magic, length, a body whose first
    // byte is its version) and reads a Welcome.
    let mut c = TcpStream::connect(addr).unwrap();
    c.write_all(b"SKYFCTL1\x03\x00\x00\x00\x06\x01\x02")
        .unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    c.read_exact(&mut head).unwrap();
    assert_eq!(&head[..8], b"SKYFCTL1");
    let len = usize::try_from(u32::from_le_bytes(head[8..].try_into().unwrap())).unwrap();
    let mut body = vec![0u8; len];
    c.read_exact(&mut body).unwrap();
    // Protocol 6's Welcome::Refuse { reason }: variant 1, then the text.
    assert_eq!(body[0], 1, "{body:?}");
    let reason = std::str::from_utf8(&body[2..2 + usize::from(body[1])]).unwrap();
    assert!(reason.contains("newer skyferry protocol"), "{reason}");
    eprintln!("a protocol 6 source reads: destination refused the migration: {reason}");
    closed_within(&mut c, 10);
    dst.wait_log("a source of skyferry protocol 6 or earlier", 120);

    // A source daemon whose key differs: its migration fails, saying so.
    let other = Daemon::start("hostile-old-src", 2, false, "");
    let id = other.start_migration(addr, &["--workload", "idle", "--mem", "8MiB"]);
    let s = other.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    let why = s["error"].as_str().unwrap();
    assert!(why.contains("pre-shared key differs"), "{why}");
    eprintln!("a source with another key: {why}");
    dst.wait_log("wrong key", 120);
    assert!(rows(&dst).is_empty(), "{:?}", rows(&dst));
}

#[test]
fn a_label_with_a_newline_is_refused_at_both_edges() {
    let dst = Daemon::start("hostile-label-dst", 1, true, "");
    let src = Daemon::start("hostile-label-src", 1, false, "");
    let addr = dst.listen.unwrap().to_string();
    // At the request's edge: `skyferry start --name`.
    let out = src.cli(&[
        "start",
        "--to",
        &addr,
        "--workload",
        "idle",
        "--mem",
        "8MiB",
        "--name",
        "a\nb",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the guest label"), "{err}");
    assert!(rows(&src).is_empty(), "{:?}", rows(&src));
    // At the peer's edge: a source with the key whose Hello carries a forged row.
    let forged = "x\n0000000000000001 destination completed";
    let mut c = TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match send_hello(&mut c, &key(1), &hello(0x77, forged, 0)) {
        Err(ProtocolError::Refused(why)) => {
            assert!(why.contains("the guest label"), "{why}");
            assert!(!why.contains('\n'), "{why:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(rows(&dst).is_empty(), "{:?}", rows(&dst));
    let table = dst.cli(&["status"]);
    assert_eq!(
        String::from_utf8_lossy(&table.stdout),
        "no migrations on this host\n"
    );
    dst.wait_log("refused a migration: the guest label", 120);
    // An escape sequence is refused the same way.
    let mut c = TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let r = send_hello(&mut c, &key(1), &hello(0x78, "\u{1b}[2Jx", 0));
    assert!(
        matches!(&r, Err(ProtocolError::Refused(w)) if w.contains("the guest label")),
        "{r:?}"
    );
    assert_eq!(migrate_small(&src, &dst)["phase"], "completed");
}

#[test]
fn ended_rows_expire_by_count() {
    let dst = Daemon::start("hostile-rows-dst", 1, true, "");
    let src = Daemon::start(
        "hostile-rows-src",
        1,
        false,
        "\n[status]\nmax_finished = 2\n",
    );
    let ids: Vec<String> = (0..3)
        .map(|_| {
            let s = migrate_small(&src, &dst);
            assert_eq!(s["phase"], "completed", "{s}");
            s["id"].as_str().expect("a hex id").to_string()
        })
        .collect();
    // The source keeps the last two; the first (ended, holding no guest) is forgotten once
    // the third's thread has ended too. (The deadline only guards against a hang.)
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let kept: Vec<String> = rows(&src)
            .iter()
            .map(|r| r["id"].as_str().expect("a hex id").to_string())
            .collect();
        if kept == ids[1..] {
            break;
        }
        assert!(Instant::now() < deadline, "{kept:?} of {ids:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The destination keeps all three: each holds the guest that now runs there.
    assert_eq!(rows(&dst).len(), 3);
}

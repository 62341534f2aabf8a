//! The announcement on a real kernel: two network namespaces joined by a veth pair. The
//! announcer runs in namespace A (a thread that `setns`es into it; `setns` moves only the
//! calling thread), and namespace B plays the switch and the neighbour: it captures what
//! arrives and keeps an ARP cache entry for the guest.
//!
//! Needs root and iproute2; without them the tests skip with a reason, unless
//! `SKYFERRY_REQUIRE_NETNS` is set, when they fail instead.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dataplane::network::{
    AnnounceConfig, AnnounceError, AnnounceReport, GuestIdentity, MacAddr, announce,
};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockProtocol, SockType, recvmsg, setsockopt,
    socket, sockopt,
};
use nix::sys::time::TimeVal;

#[path = "common/netns.rs"]
mod netns;
use netns::{Pair, VETH_A, VETH_B, can_run, ip, locktime_for_old_kernels, neighbour_mac};

const GUEST_MAC: &str = "52:54:00:12:34:56";
const STALE_MAC: &str = "02:00:00:00:00:99";
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Env var that makes the child of `not_permitted_without_cap_net_raw` do its part.
const CHILD_NETNS: &str = "SKYFERRY_ANNOUNCE_CHILD_NETNS";

/// Moves the calling thread into namespace `ns` (only this thread: see setns(2)).
fn enter(ns: &str) {
    let f = File::open(format!("/run/netns/{ns}")).unwrap_or_else(|e| panic!("netns {ns}: {e}"));
    setns(f.as_fd(), CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// Runs `f` on a thread inside namespace `ns`.
fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// A frame as namespace B saw it.
#[derive(Debug)]
struct Seen {
    bytes: Vec<u8>,
    /// Kernel receive time.
    at: Duration,
    /// `PACKET_BROADCAST`, `PACKET_HOST`, ...
    pkttype: u8,
}

impl Seen {
    fn ethertype(&self) -> u16 {
        u16::from_be_bytes([self.bytes[12], self.bytes[13]])
    }
    fn opcode(&self) -> u16 {
        u16::from_be_bytes([self.bytes[20], self.bytes[21]])
    }
}

/// A packet socket on every interface of the calling thread's namespace.
fn capture_socket() -> OwnedFd {
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("capture socket");
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(0, 100_000)).expect("SO_RCVTIMEO");
    // Kernel timestamps, so the gaps measured are the wire's, not this thread's scheduling.
    setsockopt(&fd, sockopt::ReceiveTimestampns, &true).expect("SO_TIMESTAMPNS");
    fd
}

/// Reads frames from `guest` until `done` is set and the queue is drained (or 10 s pass).
fn capture(fd: &OwnedFd, guest: MacAddr, done: &AtomicBool) -> Vec<Seen> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    while Instant::now() < deadline {
        // Read `done` before the receive: a timeout after it was set means nothing is left.
        let finished = done.load(Ordering::Acquire);
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let msg =
            match recvmsg::<LinkAddr>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
            {
                Ok(m) => m,
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) if !finished => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(e) => panic!("capture: {e}"),
            };
        let len = msg.bytes;
        let pkttype = msg.address.map_or(u8::MAX, |a| a.pkttype());
        let mut at = None;
        for c in msg.cmsgs().expect("control messages") {
            if let nix::sys::socket::ControlMessageOwned::ScmTimestampns(ts) = c {
                at = Some(Duration::from(ts));
            }
        }
        let bytes = buf[..len].to_vec();
        // Only the guest's frames: B's own IPv6 chatter shows up here too.
        if len >= 14 && bytes[6..12] == guest.octets() {
            seen.push(Seen {
                bytes,
                at: at.expect("a receive timestamp"),
                pkttype,
            });
        }
    }
    seen
}

/// Runs the announcer in `pair.a` while capturing in `pair.b`.
fn announce_and_capture(
    pair: &Pair,
    cfg: &AnnounceConfig,
    guest: &GuestIdentity,
) -> (Result<AnnounceReport, AnnounceError>, Vec<Seen>, Duration) {
    let done = AtomicBool::new(false);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        let cap = s.spawn(|| {
            enter(&pair.b);
            let fd = capture_socket();
            ready_tx.send(()).expect("test thread waits");
            capture(&fd, guest.mac, &done)
        });
        // The capture socket must exist before the first frame is sent.
        ready_rx.recv().expect("capture thread started");
        let started = Instant::now();
        let result = in_netns(&pair.a, || announce(cfg, guest, &AtomicBool::new(false)));
        let took = started.elapsed();
        done.store(true, Ordering::Release);
        let seen = cap.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        (result, seen, took)
    })
}

fn guest_mac() -> MacAddr {
    GUEST_MAC.parse().expect("test MAC")
}

#[test]
fn garp_and_rarp_reach_the_neighbour_and_update_its_cache() {
    if !can_run("garp_and_rarp_reach_the_neighbour_and_update_its_cache") {
        return;
    }
    let pair = Pair::new(true);
    locktime_for_old_kernels(&pair.b, VETH_B);
    // The neighbour still believes the guest is at its old MAC (the source host's port).
    ip(&[
        "-n",
        &pair.b,
        "neigh",
        "replace",
        &GUEST_IP.to_string(),
        "lladdr",
        STALE_MAC,
        "dev",
        VETH_B,
        "nud",
        "stale",
    ]);
    assert_eq!(
        neighbour_mac(&pair.b, GUEST_IP, VETH_B).as_deref(),
        Some(STALE_MAC)
    );

    let cfg = AnnounceConfig {
        rounds: 3,
        initial: Duration::from_millis(20),
        step: Duration::from_millis(30),
        max: Duration::from_millis(40),
        ..AnnounceConfig::new(VETH_A)
    };
    let pauses = cfg.pauses();
    assert_eq!(
        pauses,
        [Duration::from_millis(20), Duration::from_millis(40)]
    );
    let guest = GuestIdentity {
        mac: guest_mac(),
        ip: Some(GUEST_IP),
    };
    let (result, seen, took) = announce_and_capture(&pair, &cfg, &guest);
    let report = result.expect("announce");
    assert_eq!(
        report,
        AnnounceReport {
            rounds: 3,
            frames: 6,
            cancelled: false
        }
    );
    assert!(took >= Duration::from_millis(60), "took {took:?}");

    // Each round: the gratuitous ARP, then the RARP; nothing else from the guest's MAC.
    assert_eq!(seen.len(), 6, "{seen:#?}");
    let mac = guest_mac().octets();
    for (i, f) in seen.iter().enumerate() {
        // Padded to Ethernet's minimum by the sender: veth passes frames on as they are.
        assert_eq!(f.bytes.len(), 60, "frame {i}");
        assert!(f.bytes[42..].iter().all(|&b| b == 0), "frame {i} padding");
        assert_eq!(f.bytes[..6], [0xff; 6], "frame {i}: broadcast destination");
        assert_eq!(f.pkttype, libc::PACKET_BROADCAST, "frame {i}");
        assert_eq!(f.bytes[6..12], mac, "frame {i}: Ethernet source");
        assert_eq!(
            f.bytes[14..20],
            [0, 1, 8, 0, 6, 4],
            "frame {i}: Ethernet/IPv4"
        );
        assert_eq!(f.bytes[22..28], mac, "frame {i}: sender MAC");
        if i % 2 == 0 {
            assert_eq!(f.ethertype(), 0x0806, "frame {i}: ARP");
            assert_eq!(f.opcode(), 1, "frame {i}: request");
            assert_eq!(f.bytes[28..32], GUEST_IP.octets(), "frame {i}: sender IP");
            assert_eq!(f.bytes[32..38], [0; 6], "frame {i}: target MAC");
            assert_eq!(f.bytes[38..42], GUEST_IP.octets(), "frame {i}: target IP");
        } else {
            assert_eq!(f.ethertype(), 0x8035, "frame {i}: RARP");
            assert_eq!(f.opcode(), 3, "frame {i}: reverse request");
            assert_eq!(f.bytes[28..32], [0; 4], "frame {i}: sender IP");
            assert_eq!(f.bytes[32..38], mac, "frame {i}: target MAC");
            assert_eq!(f.bytes[38..42], [0; 4], "frame {i}: target IP");
        }
    }
    // Rounds are apart by at least the schedule's pauses (kernel receive times; a sleep
    // never ends early, so only clock granularity is allowed for).
    for (r, pause) in pauses.iter().enumerate() {
        let gap = seen[2 * (r + 1)].at.saturating_sub(seen[2 * r].at);
        assert!(
            gap + Duration::from_millis(1) >= *pause,
            "round {r} to {}: {gap:?} < {pause:?}",
            r + 1
        );
    }

    // The neighbour now sends to the guest's new location.
    assert_eq!(
        neighbour_mac(&pair.b, GUEST_IP, VETH_B).as_deref(),
        Some(GUEST_MAC)
    );
}

#[test]
fn mac_only_guest_gets_rarp_only() {
    if !can_run("mac_only_guest_gets_rarp_only") {
        return;
    }
    let pair = Pair::new(true);
    let cfg = AnnounceConfig {
        rounds: 2,
        initial: Duration::from_millis(10),
        ..AnnounceConfig::new(VETH_A)
    };
    let guest = GuestIdentity::mac_only(guest_mac());
    let (result, seen, _) = announce_and_capture(&pair, &cfg, &guest);
    assert_eq!(
        result.expect("announce"),
        AnnounceReport {
            rounds: 2,
            frames: 2,
            cancelled: false
        }
    );
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert!(
        seen.iter()
            .all(|f| f.ethertype() == 0x8035 && f.opcode() == 3)
    );
}

#[test]
fn down_interface_and_unknown_name_are_reported() {
    if !can_run("down_interface_and_unknown_name_are_reported") {
        return;
    }
    let pair = Pair::new(false);
    let guest = GuestIdentity::mac_only(guest_mac());
    let stop = AtomicBool::new(false);
    let e = in_netns(&pair.a, || {
        announce(&AnnounceConfig::new(VETH_A), &guest, &stop)
    })
    .expect_err("announcing on a down interface");
    assert!(
        matches!(&e, AnnounceError::InterfaceDown { interface } if interface == VETH_A),
        "{e:?}"
    );
    assert!(e.to_string().contains("down"), "{e}");
    // B's end exists only in B: from A it is unknown.
    let e = in_netns(&pair.a, || {
        announce(&AnnounceConfig::new(VETH_B), &guest, &stop)
    })
    .expect_err("announcing on another namespace's interface");
    assert!(
        matches!(&e, AnnounceError::NoSuchInterface { interface } if interface == VETH_B),
        "{e:?}"
    );
}

#[test]
fn stop_flag_ends_the_announcement_between_rounds() {
    if !can_run("stop_flag_ends_the_announcement_between_rounds") {
        return;
    }
    let pair = Pair::new(true);
    // Ten rounds a long second apart: only the stop flag ends this quickly.
    let cfg = AnnounceConfig {
        rounds: 10,
        initial: Duration::from_secs(1),
        max: Duration::from_secs(1),
        step: Duration::ZERO,
        ..AnnounceConfig::new(VETH_A)
    };
    let guest = GuestIdentity {
        mac: guest_mac(),
        ip: Some(GUEST_IP),
    };
    let stop = AtomicBool::new(false);
    let (report, took) = std::thread::scope(|s| {
        let t = s.spawn(|| {
            enter(&pair.a);
            let started = Instant::now();
            (announce(&cfg, &guest, &stop), started.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
    assert_eq!(
        report.expect("announce"),
        AnnounceReport {
            rounds: 1,
            frames: 2,
            cancelled: true
        }
    );
    assert!(took < Duration::from_millis(900), "took {took:?}");

    // Raised before the start, it sends nothing.
    let stop = AtomicBool::new(true);
    let report = in_netns(&pair.a, || announce(&cfg, &guest, &stop)).expect("announce");
    assert_eq!(
        report,
        AnnounceReport {
            rounds: 0,
            frames: 0,
            cancelled: true
        }
    );
}

/// Runs this test binary's `not_permitted_child` under `setpriv` without CAP_NET_RAW (the
/// capability must be gone from the bounding set, or root would get it back at exec).
#[test]
fn not_permitted_without_cap_net_raw() {
    if !can_run("not_permitted_without_cap_net_raw") {
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("SKYFERRY_REQUIRE_NETNS").is_none(),
            "SKYFERRY_REQUIRE_NETNS is set but util-linux's setpriv is missing"
        );
        eprintln!("skipping not_permitted_without_cap_net_raw: setpriv is missing");
        return;
    }
    // A namespace of its own, so that if the capability were not dropped after all, the
    // frames would go nowhere that matters.
    let pair = Pair::new(true);
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("setpriv")
        .args(["--bounding-set", "-net_raw", "--inh-caps", "-net_raw", "--"])
        .arg(exe)
        .args([
            "--exact",
            "not_permitted_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_NETNS, &pair.a)
        .output()
        .expect("run setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("child: not permitted, as expected"),
        "child did not run:\n{stdout}\n{stderr}"
    );
}

/// Only does something when started by `not_permitted_without_cap_net_raw`.
#[test]
fn not_permitted_child() {
    let Some(ns) = std::env::var_os(CHILD_NETNS) else {
        return;
    };
    let ns = ns.into_string().expect("netns name is UTF-8");
    let guest = GuestIdentity::mac_only(guest_mac());
    let e = in_netns(&ns, || {
        announce(
            &AnnounceConfig::new(VETH_A),
            &guest,
            &AtomicBool::new(false),
        )
    })
    .expect_err("announce without CAP_NET_RAW");
    assert!(matches!(&e, AnnounceError::NotPermitted { .. }), "{e:?}");
    assert!(e.to_string().contains("CAP_NET_RAW"), "{e}");
    println!("child: not permitted, as expected");
}

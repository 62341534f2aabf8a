//! Network namespaces for the tests that need a real kernel's network: a pair joined by a
//! veth link (`dataplane/tests/announce.rs`, `tests/tests/switchover.rs`).
//!
//! Needs root and iproute2; without them the tests skip with a reason, unless
//! `SKYFERRY_REQUIRE_NETNS` is set, when they fail instead.

#![allow(dead_code)] // each including test uses a different part

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Namespace B's own address, on the guest's subnet, as any neighbour on its LAN has. It
/// matters: a namespace with no IPv4 address at all has no local routing table, and then
/// Linux does not count an ARP as gratuitous (see `locktime_for_old_kernels`).
pub const B_ADDR: &str = "192.0.2.2/24";
/// The veth ends; each lives in its own namespace, so the names cannot collide.
pub const VETH_A: &str = "sfann-a";
/// See [`VETH_A`].
pub const VETH_B: &str = "sfann-b";

/// Runs `ip` with `args`, panicking with its stderr if it fails.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("ip prints UTF-8")
}

/// Why this host cannot run the netns tests, if it cannot.
pub fn missing_facility() -> Option<String> {
    if !effective_uid_is_root() {
        return Some("not root (network namespaces and raw sockets need it)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ip -V` failed: {}", o.status)),
        Err(e) => Some(format!("iproute2's `ip` is missing: {e}")),
    }
}

/// From /proc, so that every including crate can use it without a dependency.
fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let uids = s.lines().find_map(|l| l.strip_prefix("Uid:"))?.to_string();
            uids.split_whitespace().nth(1).map(|e| e == "0")
        })
        .unwrap_or(false)
}

/// True when the test should go on; prints the reason and returns false when it should
/// skip, or panics if skipping is not allowed.
pub fn can_run(test: &str) -> bool {
    let Some(why) = missing_facility() else {
        return true;
    };
    assert!(
        std::env::var_os("SKYFERRY_REQUIRE_NETNS").is_none(),
        "{test}: SKYFERRY_REQUIRE_NETNS is set but {why}"
    );
    eprintln!("skipping {test}: {why}");
    false
}

/// Two namespaces, `a` and `b`, joined by a veth pair; deleted on drop, panics included.
/// Deleting a namespace destroys the veth end in it, and with it the peer.
pub struct Pair {
    /// Namespace A: where the announcer runs.
    pub a: String,
    /// Namespace B: the switch and the neighbour.
    pub b: String,
}

impl Pair {
    /// Creates the namespaces and the link; `a_up`: bring namespace A's end up.
    pub fn new(a_up: bool) -> Pair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = format!("skyferry-announce-{}-{n}", std::process::id());
        // The guard exists before anything it deletes, so a failure halfway is cleaned up.
        let pair = Pair {
            a: format!("{base}-a"),
            b: format!("{base}-b"),
        };
        ip(&["netns", "add", &pair.a]);
        ip(&["netns", "add", &pair.b]);
        // Created directly inside the namespaces, so nothing ever appears in the host's.
        ip(&[
            "link", "add", VETH_A, "netns", &pair.a, "type", "veth", "peer", "name", VETH_B,
            "netns", &pair.b,
        ]);
        ip(&["-n", &pair.b, "addr", "add", B_ADDR, "dev", VETH_B]);
        ip(&["-n", &pair.b, "link", "set", VETH_B, "up"]);
        if a_up {
            ip(&["-n", &pair.a, "link", "set", VETH_A, "up"]);
        }
        pair
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// Linux keeps a neighbour entry's MAC for `locktime` (default 1 s) after it last changed,
/// and the entry the test plants has just changed. A gratuitous ARP (sender IP == target IP,
/// an address the receiver classifies as ordinary unicast) overrides it at once since Linux
/// 4.13 ("arp: always override existing neigh entries with gratuitous ARP"), which is what
/// the test wants to see. Older kernels would take only a round sent after the second: there
/// the test sets locktime to 0 rather than sleep. (`ip ntable` takes milliseconds; the same
/// knob is /proc/sys/net/ipv4/neigh/DEV/locktime, in hundredths of a second.)
pub fn locktime_for_old_kernels(ns: &str, dev: &str) {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut v = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let version = (v.next().unwrap_or(0), v.next().unwrap_or(0));
    if version < (4, 13) {
        eprintln!(
            "kernel {}: setting {dev}'s ARP locktime to 0",
            release.trim()
        );
        ip(&[
            "-n",
            ns,
            "ntable",
            "change",
            "name",
            "arp_cache",
            "dev",
            dev,
            "locktime",
            "0",
        ]);
    }
}

/// The MAC namespace `ns` holds for `ip` on `dev`, from `ip -j neigh`.
pub fn neighbour_mac(ns: &str, ip_addr: Ipv4Addr, dev: &str) -> Option<String> {
    let out = ip(&[
        "-n",
        ns,
        "-j",
        "neigh",
        "show",
        &ip_addr.to_string(),
        "dev",
        dev,
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j prints JSON");
    v.as_array()?
        .iter()
        .find_map(|e| e.get("lladdr")?.as_str().map(str::to_string))
}

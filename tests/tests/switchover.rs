//! What moves with the guest, through two real skyferryd and the real `skyferry` CLI: its
//! DRBD disk, steered through the real drbdadm (with a recording drbdsetup stand-in per
//! "host": there is no DRBD kernel module here), and its network identity, announced from
//! the destination's side of a veth pair in a network namespace.
//!
//! Both daemons run on this machine. Each plays one DRBD node: `[drbd] node` makes drbdadm
//! take the resource file's `on skyferry-src` or `on skyferry-dst` section as its own.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dataplane::disk::drbd::Side;
use skyferry_tests::{Daemon, is_final};

#[path = "../../dataplane/tests/common/fake_drbd.rs"]
mod fake_drbd;
#[path = "../../dataplane/tests/common/netns.rs"]
mod netns;

use fake_drbd::{DST_NAME, FakeDrbd, RES, SRC_NAME, status_json};

const DRBDADM: &str = "/usr/sbin/drbdadm";

/// Whether drbdadm is here; panics if it is required and missing.
fn have_drbdadm() -> bool {
    if Path::new(DRBDADM).exists() {
        return true;
    }
    assert!(
        std::env::var_os("SKYFERRY_REQUIRE_DRBD").is_none(),
        "{DRBDADM} is required here (SKYFERRY_REQUIRE_DRBD is set): install drbd-utils"
    );
    eprintln!("skipped: {DRBDADM} is missing (install drbd-utils to run the DRBD tests)");
    false
}

/// Scratch space for the two fake DRBD hosts and the disk file, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("skyferry-switch-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's disk, as `skyferry start --disk` reads it: both nodes on this machine.
fn disk_file(dir: &Path) -> PathBuf {
    let f = dir.join("disk.toml");
    std::fs::write(
        &f,
        format!(
            r#"[disk]
resource = "{RES}"
device = "/dev/drbd10"
disk = "/dev/vg0/web1"
port = 7790
nodes = [
  {{ name = "{SRC_NAME}", address = "127.0.0.1:7790", node_id = 0 }},
  {{ name = "{DST_NAME}", address = "127.0.0.1:7791", node_id = 1 }},
]
"#
        ),
    )
    .unwrap();
    f
}

/// A daemon's `[drbd]` section for the fake host `fake`, playing node `node`.
fn drbd_section(fake: &FakeDrbd, node: &str) -> String {
    std::fs::create_dir_all(fake.dir.join("res")).unwrap();
    format!(
        "[drbd]\ndrbdadm = {DRBDADM:?}\ndrbdsetup = {:?}\nresource_dir = {:?}\nnode = {node:?}\n\
         sync_deadline = \"20s\"\npoll_interval = \"20ms\"\nrole_wait = \"3s\"\n\
         command_timeout = \"10s\"\n",
        fake.drbdsetup(),
        fake.dir.join("res"),
    )
}

/// Two fake DRBD hosts, each seeing the other's role as its peer's, and the disk file.
struct Disks {
    scratch: Scratch,
    src: FakeDrbd,
    dst: FakeDrbd,
}

impl Disks {
    fn new(name: &str) -> Disks {
        let scratch = Scratch::new(name);
        let src = FakeDrbd::new(scratch.0.join("src"), Side::Source);
        let dst = FakeDrbd::new(scratch.0.join("dst"), Side::Destination);
        FakeDrbd::link(&src, &dst);
        Disks { scratch, src, dst }
    }

    fn file(&self) -> PathBuf {
        disk_file(&self.scratch.0)
    }
}

/// Starts a migration of a small synthetic guest with `args` and returns its id.
fn start(src: &Daemon, dst: &Daemon, args: &[&str]) -> String {
    let mut all = vec!["--workload", "idle", "--mem", "16MiB"];
    all.extend_from_slice(args);
    src.start_migration(dst.listen.expect("destination listens"), &all)
}

/// What a host's drbdsetup was told to change, shortly: `A`, `C`, `C,yes`, `A,no` for
/// net-options (protocol, allow-two-primaries), `primary`, `secondary`.
fn steps(fake: &FakeDrbd) -> Vec<String> {
    fake.changes()
        .iter()
        .map(|c| {
            if c.starts_with("net-options ") {
                let opt = |k: &str| {
                    c.split_whitespace()
                        .find_map(|a| a.strip_prefix(k))
                        .map(str::to_string)
                };
                let mut s = opt("--protocol=").unwrap_or_default();
                if let Some(two) = opt("--allow-two-primaries=") {
                    s = format!("{s},{two}");
                }
                s
            } else {
                c.split_whitespace().next().unwrap_or_default().to_string()
            }
        })
        .collect()
}

/// Polls the destination until its own record of the migration satisfies `pred`.
fn wait_dest(dst: &Daemon, id: &str, pred: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = dst.cli(&["status", id, "--json"]);
        if out.status.success() {
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            if pred(&s) {
                return;
            }
            assert!(Instant::now() < deadline, "destination: {s}\n{}", dst.log());
        }
        assert!(Instant::now() < deadline, "destination: {}", dst.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_disk_follows_the_guest() {
    if !have_drbdadm() {
        return;
    }
    let disks = Disks::new("follow");
    let dst = Daemon::start(
        "disk-follow-dst",
        1,
        true,
        &drbd_section(&disks.dst, DST_NAME),
    );
    let src = Daemon::start(
        "disk-follow-src",
        1,
        false,
        &drbd_section(&disks.src, SRC_NAME),
    );
    let file = disks.file();
    let id = start(&src, &dst, &["--disk", file.to_str().unwrap()]);
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "completed", "{s}\n{}", src.log());
    assert_eq!(s["disk"]["phase"], "done", "{s}");
    assert_eq!(s["disk"]["side"], "source");
    assert!(s["disk_error"].is_null(), "{s}");
    wait_dest(&dst, &id, |d| d["disk"]["phase"] == "done");

    // The guest's disk is Primary where the guest now runs, one primary, asynchronous.
    assert_eq!(
        disks.src.drbd(),
        ("Secondary".into(), "A".into(), "no".into())
    );
    assert_eq!(
        disks.dst.drbd(),
        ("Primary".into(), "A".into(), "no".into())
    );
    // The documented sequence, on each host.
    assert_eq!(steps(&disks.src), ["A", "C", "secondary", "A,no"]);
    assert_eq!(steps(&disks.dst), ["A", "C", "C,yes", "primary", "A,no"]);
    // Both hosts wrote the same resource file, named after the resource.
    let res = |f: &FakeDrbd| std::fs::read_to_string(f.dir.join("res/skyferry-web1.res")).unwrap();
    assert_eq!(res(&disks.src), res(&disks.dst));

    // `status` shows the disk; `watch` of a finished migration too.
    let out = src.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("disk web1 (source): done"), "{text}");
}

/// Runs a migration that a DRBD step fails, and checks the guest stayed at the source and
/// both disks are as they were: the source Primary, one primary, protocol A.
fn failing(name: &str, fail_at: Side, pattern: &str, expect_error: &str) {
    let disks = Disks::new(name);
    let fake = match fail_at {
        Side::Source => &disks.src,
        Side::Destination => &disks.dst,
    };
    fake.set("fail-on", &format!("{pattern}\n"));
    let dst = Daemon::start(
        &format!("{name}-dst"),
        1,
        true,
        &drbd_section(&disks.dst, DST_NAME),
    );
    let src = Daemon::start(
        &format!("{name}-src"),
        1,
        false,
        &drbd_section(&disks.src, SRC_NAME),
    );
    let file = disks.file();
    let id = start(&src, &dst, &["--disk", file.to_str().unwrap()]);
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{name}: {s}\n{}", src.log());
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains(expect_error),
        "{name}: error {err:?} lacks {expect_error:?}"
    );
    assert_eq!(s["disk"]["phase"], "rolled-back", "{name}: {s}");
    wait_dest(&dst, &id, |d| {
        d["phase"] == "failed" && d["disk"]["phase"] != "dual-primary"
    });
    assert_eq!(
        disks.src.drbd(),
        ("Primary".into(), "A".into(), "no".into()),
        "{name}: source disk"
    );
    assert_eq!(
        disks.dst.drbd(),
        ("Secondary".into(), "A".into(), "no".into()),
        "{name}: destination disk"
    );
}

#[test]
fn a_failing_disk_step_leaves_guest_and_disks_at_the_source() {
    if !have_drbdadm() {
        return;
    }
    // Before iteration 1: the source cannot make replication synchronous.
    failing("disk-c", Side::Source, "--protocol=C$", "before-memory");
    // At the switchover, with the guest paused at the source: the destination cannot be
    // promoted. The source resumes the guest.
    failing("disk-primary", Side::Destination, "^primary", "switchover");
}

#[test]
fn a_destination_without_drbd_refuses_the_disk() {
    if !have_drbdadm() {
        return;
    }
    let disks = Disks::new("nodrbd");
    let dst = Daemon::start("nodrbd-dst", 1, true, "");
    let src = Daemon::start("nodrbd-src", 1, false, &drbd_section(&disks.src, SRC_NAME));
    let file = disks.file();
    let id = start(&src, &dst, &["--disk", file.to_str().unwrap()]);
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("no [drbd] section"),
        "{s}"
    );
    assert_eq!(
        disks.src.drbd(),
        ("Primary".into(), "A".into(), "no".into())
    );

    // A source without [drbd] refuses --disk at once.
    let plain = Daemon::start("nodrbd-src2", 1, false, "");
    let to = dst.listen.unwrap().to_string();
    let out = plain.cli(&["start", "--to", &to, "--disk", file.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[drbd]"), "{err}");
}

#[test]
fn a_bulk_sync_shows_its_progress_and_can_be_aborted() {
    if !have_drbdadm() {
        return;
    }
    let disks = Disks::new("sync");
    // The source's disk is 40% in sync and stays so.
    disks.src.set(
        "status.json",
        &status_json(0, "UpToDate", "SyncSource", "Inconsistent", 6_291_242, 40.0),
    );
    let dst = Daemon::start("sync-dst", 1, true, &drbd_section(&disks.dst, DST_NAME));
    let src = Daemon::start("sync-src", 1, false, &drbd_section(&disks.src, SRC_NAME));
    let file = disks.file();
    let id = start(&src, &dst, &["--disk", file.to_str().unwrap()]);
    let s = src.wait_for(&id, 30, |s| s["disk"]["sync_percent"] == 40.0);
    assert_eq!(s["phase"], "preparing", "{s}");
    assert_eq!(s["disk"]["phase"], "bulk-sync", "{s}");
    assert_eq!(
        s["iteration"], 0,
        "no memory is sent before the disks are in sync"
    );
    let out = src.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("disk web1 (source): bulk-sync, 40.0% in sync"),
        "{text}"
    );

    let out = src.cli(&["abort", &id]);
    assert!(out.status.success());
    let s = src.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "aborted", "{s}");
    assert_eq!(s["disk"]["phase"], "rolled-back", "{s}");
    wait_dest(&dst, &id, is_final);
    assert_eq!(
        disks.src.drbd(),
        ("Primary".into(), "A".into(), "no".into())
    );
    assert_eq!(
        disks.dst.drbd(),
        ("Secondary".into(), "A".into(), "no".into())
    );
}

const GUEST_MAC: &str = "52:54:00:12:34:56";
const GUEST_IP: &str = "192.0.2.10";
const STALE_MAC: &str = "02:00:00:00:00:99";

/// Both daemons in namespace A (the destination announces on A's veth end); namespace B
/// is the neighbour, with a stale ARP entry for the guest.
struct Lan {
    pair: netns::Pair,
}

impl Lan {
    fn new() -> Lan {
        let pair = netns::Pair::new(true);
        netns::ip(&["-n", &pair.a, "link", "set", "lo", "up"]);
        netns::ip(&[
            "-n",
            &pair.b,
            "neigh",
            "add",
            GUEST_IP,
            "lladdr",
            STALE_MAC,
            "dev",
            netns::VETH_B,
            "nud",
            "stale",
        ]);
        netns::locktime_for_old_kernels(&pair.b, netns::VETH_B);
        Lan { pair }
    }

    fn neighbour(&self) -> Option<String> {
        netns::neighbour_mac(&self.pair.b, GUEST_IP.parse().unwrap(), netns::VETH_B)
    }
}

fn announce_section() -> String {
    format!("[announce]\ninterface = {:?}\n", netns::VETH_A)
}

#[test]
fn the_destination_announces_the_guest_at_the_pause() {
    if !netns::can_run("the_destination_announces_the_guest_at_the_pause") {
        return;
    }
    let lan = Lan::new();
    assert_eq!(lan.neighbour().as_deref(), Some(STALE_MAC));
    let dst = Daemon::start_in_netns(&lan.pair.a, "ann-dst", 1, true, &announce_section());
    let src = Daemon::start_in_netns(&lan.pair.a, "ann-src", 1, false, "");
    let id = start(&src, &dst, &["--mac", GUEST_MAC, "--ip", GUEST_IP]);
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "completed", "{s}\n{}", src.log());
    wait_dest(&dst, &id, |d| {
        d["network"].as_str().is_some_and(|n| n.contains("rounds"))
    });
    let d = dst.status(&id);
    assert_eq!(
        d["network"],
        format!(
            "destination announced {GUEST_MAC} ({GUEST_IP}) on {}: 5 rounds, 10 frames",
            netns::VETH_A
        ),
        "{d}"
    );
    // The neighbour now sends the guest's traffic to the guest's MAC at its new port.
    assert_eq!(lan.neighbour().as_deref(), Some(GUEST_MAC));

    // A destination without [announce] refuses a guest it should announce, before any
    // memory moves.
    let plain = Daemon::start_in_netns(&lan.pair.a, "ann-plain", 1, true, "");
    let id = start(&src, &plain, &["--mac", GUEST_MAC]);
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("no [announce]"),
        "{s}"
    );
    assert_eq!(s["pages_sent"], 0, "{s}");
}

#[test]
fn a_failure_after_the_pause_announces_the_guest_back_at_the_source() {
    if !netns::can_run("a_failure_after_the_pause_announces_the_guest_back_at_the_source")
        || !have_drbdadm()
    {
        return;
    }
    let lan = Lan::new();
    let disks = Disks::new("back");
    // The destination's disk cannot be promoted: the migration fails at the switchover,
    // after the destination began announcing the guest.
    disks.dst.set("fail-on", "^primary\n");
    let dst = Daemon::start_in_netns(
        &lan.pair.a,
        "back-dst",
        1,
        true,
        &format!(
            "{}{}",
            drbd_section(&disks.dst, DST_NAME),
            announce_section()
        ),
    );
    let src = Daemon::start_in_netns(
        &lan.pair.a,
        "back-src",
        1,
        false,
        &format!(
            "{}{}",
            drbd_section(&disks.src, SRC_NAME),
            announce_section()
        ),
    );
    let file = disks.file();
    let id = start(
        &src,
        &dst,
        &[
            "--disk",
            file.to_str().unwrap(),
            "--mac",
            GUEST_MAC,
            "--ip",
            GUEST_IP,
        ],
    );
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{s}\n{}", src.log());
    // The source announced the guest again where it resumed it.
    let s = src.wait_for(&id, 10, |s| {
        s["network"].as_str().is_some_and(|n| n.contains("rounds"))
    });
    assert_eq!(
        s["network"],
        format!(
            "source announced {GUEST_MAC} ({GUEST_IP}) on {}: 5 rounds, 10 frames",
            netns::VETH_A
        ),
        "{s}"
    );
    // The destination had started announcing, and stopped or finished by now.
    wait_dest(&dst, &id, |d| {
        d["network"]
            .as_str()
            .is_some_and(|n| n.starts_with("destination announced"))
    });
    assert_eq!(
        disks.src.drbd(),
        ("Primary".into(), "A".into(), "no".into())
    );
}

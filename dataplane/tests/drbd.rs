//! DRBD steering against the real drbdadm (drbd-utils 9), on a machine without the DRBD
//! kernel module.
//!
//! Three levels: the rendered resource file must pass `drbdadm dump`; `drbdadm -d` must turn
//! every command of the sequence into the drbdsetup calls DRBD needs; and the steering code
//! runs the whole sequence through the real drbdadm with `--drbdsetup=` pointing at a
//! stand-in (`FAKE_DRBDSETUP` below) that records its arguments and plays one host's DRBD:
//! roles, protocol, two-primaries, and a status the test writes. Two stand-ins, each reading
//! the other's role as its peer's, make a source and a destination on this one machine.
//!
//! drbdadm picks its `on NAME` section by `uname -n` and checks that section's address is
//! on this host, so the host each test plays is named after this machine at 127.0.0.1, and
//! its peer is a made-up name at a documentation address.
//!
//! Skipped, with the reason printed, where drbdadm is missing, unless SKYFERRY_REQUIRE_DRBD
//! is set.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane::disk::drbd::steer::{AdmCommand, planned};
use dataplane::disk::drbd::{
    DiskPhase, DrbdDisk, DrbdError, DrbdNode, Drbdadm, Side, Steer, SteerTiming, Step,
    local_hostname,
};

const DRBDADM: &str = "/usr/sbin/drbdadm";

#[path = "common/fake_drbd.rs"]
mod fake_drbd;
use fake_drbd::{DST_NAME, FakeDrbd, RES, SRC_NAME, in_sync, status_json};

/// Whether drbdadm is here; panics if it is required and missing.
fn have_drbdadm() -> bool {
    if Path::new(DRBDADM).exists() {
        return true;
    }
    if std::env::var_os("SKYFERRY_REQUIRE_DRBD").is_some() {
        panic!("{DRBDADM} is required here (SKYFERRY_REQUIRE_DRBD is set): install drbd-utils");
    }
    eprintln!("skipped: {DRBDADM} is missing (install drbd-utils to run the DRBD tests)");
    false
}

/// A private directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "drbd-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The guest's disk as the host playing `side` sees it: that side's node is this machine.
fn disk_as(side: Side) -> DrbdDisk {
    let me = local_hostname().unwrap();
    let (src, dst) = match side {
        Side::Source => (
            (me, ip("127.0.0.1")),
            (DST_NAME.to_string(), ip("192.0.2.20")),
        ),
        Side::Destination => (
            (SRC_NAME.to_string(), ip("192.0.2.10")),
            (me, ip("127.0.0.1")),
        ),
    };
    DrbdDisk {
        resource: RES.into(),
        device: "/dev/drbd10".into(),
        disk: "/dev/vg0/web1".into(),
        meta_disk: "internal".into(),
        port: 7790,
        nodes: vec![
            DrbdNode {
                name: src.0,
                address: SocketAddr::new(src.1, 7790),
                node_id: 0,
            },
            DrbdNode {
                name: dst.0,
                address: SocketAddr::new(dst.1, 7790),
                node_id: 1,
            },
        ],
    }
}

/// What the progress callback was told, in order.
type Seen = Arc<Mutex<Vec<(DiskPhase, Option<f64>)>>>;

/// One simulated host: its resource file, its drbdsetup stand-in and its steering.
struct Host {
    fake: FakeDrbd,
    steer: Steer,
    progress: Seen,
}

impl std::ops::Deref for Host {
    type Target = FakeDrbd;

    fn deref(&self) -> &FakeDrbd {
        &self.fake
    }
}

fn timing() -> SteerTiming {
    SteerTiming {
        sync_deadline: Duration::from_secs(5),
        poll_interval: Duration::from_millis(5),
        role_wait: Duration::from_millis(300),
    }
}

impl Host {
    fn new(tmp: &TempDir, side: Side) -> Host {
        Host::with_timeout(tmp, side, Duration::from_secs(10))
    }

    fn with_timeout(tmp: &TempDir, side: Side, timeout: Duration) -> Host {
        let fake = FakeDrbd::new(tmp.0.join(side.to_string()), side);
        let disk = disk_as(side);
        let res_file = disk.write_resource_file(&fake.dir).unwrap();
        let drbdadm = Drbdadm::new()
            .with_program(DRBDADM)
            .with_config(&res_file)
            .with_drbdsetup(fake.drbdsetup())
            .with_timeout(timeout);
        let progress: Seen = Arc::default();
        let seen = Arc::clone(&progress);
        let steer = Steer::new(disk, side, &local_hostname().unwrap(), drbdadm)
            .unwrap()
            .with_timing(timing())
            .on_progress(move |phase, pct| seen.lock().unwrap().push((phase, pct)));
        Host {
            fake,
            steer,
            progress,
        }
    }

    /// A source and a destination, each seeing the other's role as its peer's.
    fn pair(tmp: &TempDir) -> (Host, Host) {
        let (src, dst) = (
            Host::new(tmp, Side::Source),
            Host::new(tmp, Side::Destination),
        );
        FakeDrbd::link(&src.fake, &dst.fake);
        (src, dst)
    }
}

/// What drbdadm adds to every `net-options` from the resource file's `net` section (all of
/// it but the protocol, which the command line overrides), in drbdadm 9.22's order.
const NET_SECTION: &str = "--after-sb-2pri=disconnect --after-sb-1pri=discard-secondary \
                           --after-sb-0pri=discard-zero-changes";

fn net(peer: u8, name: &str, opts: &str) -> String {
    format!("net-options {RES} {peer} --_name={name} {NET_SECTION} {opts}")
}

fn src_net(opts: &str) -> String {
    net(1, DST_NAME, opts)
}

fn dst_net(opts: &str) -> String {
    net(0, SRC_NAME, opts)
}

/// The migration driver's order of calls, stopping at the first failure.
fn drive(src: &mut Host, dst: &mut Host) -> Result<(), (Side, DrbdError)> {
    let s = |r: Result<(), DrbdError>| r.map_err(|e| (Side::Source, e));
    let d = |r: Result<(), DrbdError>| r.map_err(|e| (Side::Destination, e));
    s(src.steer.bulk_sync())?;
    d(dst.steer.bulk_sync())?;
    s(src.steer.before_memory())?;
    d(dst.steer.before_memory())?;
    // ... memory pre-copy, the guest pauses at the source ...
    s(src.steer.switchover())?;
    d(dst.steer.switchover())?;
    // ... the guest commits and resumes at the destination ...
    d(dst.steer.after_commit())?;
    s(src.steer.after_commit())?;
    s(src.steer.finish())?;
    d(dst.steer.finish())?;
    Ok(())
}

#[test]
fn the_resource_file_passes_drbdadm_dump() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("dump");
    let mut v6 = disk_as(Side::Source);
    v6.nodes[0].address = "[::1]:7791".parse().unwrap();
    v6.nodes[1].address = "[2001:db8::20]:7791".parse().unwrap();
    v6.disk = "/dev/disk/by-path/pci-0000:00:1f.2-ata-1-part3".into();
    v6.meta_disk = "/dev/vg0/web1-md".into();
    for (disk, wants) in [
        (
            disk_as(Side::Source),
            vec![
                "resource web1 {".to_string(),
                format!("on {} {{ node-id 0;", local_hostname().unwrap()),
                "device /dev/drbd10 minor 10;".into(),
                // drbdadm drops the quotes where they are not needed.
                "disk /dev/vg0/web1;".into(),
                "meta-disk internal;".into(),
                "address ipv4 127.0.0.1:7790;".into(),
                format!("on {DST_NAME} {{ node-id 1;"),
                "address ipv4 192.0.2.20:7790;".into(),
                format!(
                    "connection-mesh {{ hosts {} {DST_NAME}; }}",
                    local_hostname().unwrap()
                ),
                "protocol A;".into(),
                "after-sb-1pri discard-secondary;".into(),
            ],
        ),
        (
            v6,
            vec![
                "address ipv6 [::1]:7791;".into(),
                "address ipv6 [2001:db8::20]:7791;".into(),
                "disk \"/dev/disk/by-path/pci-0000:00:1f.2-ata-1-part3\";".into(),
                "meta-disk /dev/vg0/web1-md;".into(),
            ],
        ),
    ] {
        let file = disk.write_resource_file(&tmp.0).unwrap();
        let out = Command::new(DRBDADM)
            .arg("-c")
            .arg(&file)
            .args(["dump", RES])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "drbdadm dump refused {}:\n{}\n{}",
            file.display(),
            std::fs::read_to_string(&file).unwrap(),
            String::from_utf8_lossy(&out.stderr)
        );
        // drbdadm re-indents with tabs and padding; compare with whitespace collapsed.
        let flat = stdout.split_whitespace().collect::<Vec<_>>().join(" ");
        for want in wants {
            assert!(
                flat.contains(&want),
                "{want:?} missing from drbdadm dump:\n{stdout}"
            );
        }
    }
}

#[test]
fn dry_run_prints_the_drbdsetup_commands_of_every_step() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("dry");
    let drbdsetup = Path::new(DRBDADM).with_file_name("drbdsetup");
    let drbdsetup = drbdsetup.display();
    for side in [Side::Source, Side::Destination] {
        let disk = disk_as(side);
        let file = disk.write_resource_file(&tmp.0).unwrap();
        let adm = Drbdadm::new().with_program(DRBDADM).with_config(&file);
        let peer: fn(&str) -> String = match side {
            Side::Source => src_net,
            Side::Destination => dst_net,
        };
        for step in [
            Step::BulkSync,
            Step::BeforeMemory,
            Step::Switchover,
            Step::AfterCommit,
            Step::Finish,
            Step::RollBack,
        ] {
            for cmd in planned(step, side) {
                let want = match cmd {
                    AdmCommand::ProtocolA => peer("--protocol=A"),
                    AdmCommand::ProtocolC => peer("--protocol=C"),
                    AdmCommand::AllowTwoPrimaries => peer("--protocol=C --allow-two-primaries=yes"),
                    AdmCommand::OnePrimary => peer("--protocol=A --allow-two-primaries=no"),
                    AdmCommand::Primary => format!("primary {RES}"),
                    AdmCommand::Secondary => format!("secondary {RES}"),
                };
                let out = adm.dry_run(step, &cmd.args(RES)).unwrap();
                // drbdadm runs the drbdsetup beside itself, and names it so.
                assert_eq!(
                    out,
                    format!("{drbdsetup} {want}\n"),
                    "{side} {step} {cmd:?}"
                );
            }
        }
    }
}

#[test]
fn the_whole_sequence_on_both_hosts() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("whole");
    let (mut src, mut dst) = Host::pair(&tmp);
    // The source sees the initial sync progress before it completes (the first answer
    // goes to the role check that opens the step).
    std::fs::create_dir(src.dir.join("queue")).unwrap();
    let progress = [(8_388_323, 20.0), (6_291_242, 40.0), (2_097_081, 80.0)];
    for (i, (oos, pct)) in progress.into_iter().enumerate() {
        src.set(
            &format!("queue/{i:02}"),
            &status_json(0, "UpToDate", "SyncSource", "Inconsistent", oos, pct),
        );
    }

    drive(&mut src, &mut dst).unwrap();

    assert_eq!(
        src.changes(),
        [
            src_net("--protocol=A"),
            src_net("--protocol=C"),
            format!("secondary {RES}"),
            src_net("--protocol=A --allow-two-primaries=no"),
        ]
    );
    let status = format!("status {RES} --json");
    let show = format!("show {RES} --show-defaults");
    // Every change is checked before the step reports success.
    assert_eq!(
        dst.calls(),
        [
            // bulk-sync
            status.clone(),
            dst_net("--protocol=A"),
            show.clone(),
            status.clone(),
            // before-memory
            dst_net("--protocol=C"),
            show.clone(),
            status.clone(),
            // switchover
            dst_net("--protocol=C --allow-two-primaries=yes"),
            show.clone(),
            format!("primary {RES}"),
            status.clone(),
            // after-commit
            status.clone(),
            // finish: Primary here, so it first checks the source let go
            status.clone(),
            status.clone(),
            dst_net("--protocol=A --allow-two-primaries=no"),
            show.clone(),
            status.clone(),
        ]
    );
    assert_eq!(src.drbd(), ("Secondary".into(), "A".into(), "no".into()));
    assert_eq!(dst.drbd(), ("Primary".into(), "A".into(), "no".into()));
    assert_eq!(src.steer.phase(), DiskPhase::Done);
    assert_eq!(dst.steer.phase(), DiskPhase::Done);

    let seen = src.progress.lock().unwrap().clone();
    let syncing: Vec<_> = seen
        .iter()
        .filter(|(p, _)| *p == DiskPhase::BulkSync)
        .map(|(_, pct)| *pct)
        .collect();
    assert_eq!(syncing, [None, Some(40.0), Some(80.0), Some(100.0)]);
    let phases: Vec<_> = seen
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| *p != DiskPhase::BulkSync)
        .collect();
    assert_eq!(
        phases,
        [
            DiskPhase::Synced,
            DiskPhase::ProtocolC,
            DiskPhase::ProtocolC,
            DiskPhase::Committed,
            DiskPhase::Done
        ]
    );
    let status = serde_json::to_value(dst.steer.status()).unwrap();
    assert_eq!(
        status,
        serde_json::json!({"resource": "web1", "side": "destination", "phase": "done",
                           "sync_percent": 100.0})
    );
    // A roll back after the end (the other host failed late) has nothing to undo.
    let calls = dst.calls().len();
    let report = dst.steer.roll_back().unwrap();
    assert_eq!(
        report.to_string(),
        "destination web1: ran nothing; this host had finished its part; nothing to undo"
    );
    assert_eq!(
        (dst.calls().len(), dst.steer.phase()),
        (calls, DiskPhase::Done)
    );
}

/// How a case makes its step fail.
enum Break {
    /// drbdsetup fails calls matching this pattern on that host.
    Fail(Side, &'static str),
    /// After `primary`, the destination's status reports the source's disk Outdated.
    PeerOutdated,
}

struct Case {
    name: &'static str,
    how: Break,
    side: Side,
    step: Step,
    /// The destination issued `primary`, so its roll back demotes it.
    promoted: bool,
    /// The guest had committed at the destination.
    committed: bool,
}

#[test]
fn a_failure_at_every_step_rolls_back() {
    if !have_drbdadm() {
        return;
    }
    use Side::{Destination as Dst, Source as Src};
    let case = |name, how, side, step, promoted, committed| Case {
        name,
        how,
        side,
        step,
        promoted,
        committed,
    };
    // A table reads better than rustfmt's one argument per line. A failure at after-commit
    // has a test of its own: it leaves two primaries, which no roll back may resolve.
    #[rustfmt::skip]
    let cases = [
        //   name                 how it breaks                                side step               promoted committed
        case("src protocol A",    Break::Fail(Src, "--protocol=A$"),           Src, Step::BulkSync,     false, false),
        case("dst protocol A",    Break::Fail(Dst, "--protocol=A$"),           Dst, Step::BulkSync,     false, false),
        case("src status",        Break::Fail(Src, "^status"),                 Src, Step::BulkSync,     false, false),
        case("src protocol C",    Break::Fail(Src, "--protocol=C$"),           Src, Step::BeforeMemory, false, false),
        case("dst protocol C",    Break::Fail(Dst, "--protocol=C$"),           Dst, Step::BeforeMemory, false, false),
        case("dst two primaries", Break::Fail(Dst, "two-primaries=yes"),       Dst, Step::Switchover,   false, false),
        case("dst primary",       Break::Fail(Dst, "^primary"),                Dst, Step::Switchover,   true,  false),
        case("dst peer outdated", Break::PeerOutdated,                         Dst, Step::Switchover,   true,  false),
        case("src finish",        Break::Fail(Src, "two-primaries=no"),        Src, Step::Finish,       true,  true),
        case("dst finish",        Break::Fail(Dst, "two-primaries=no"),        Dst, Step::Finish,       true,  true),
    ];
    for c in cases {
        let tmp = TempDir::new("fail");
        let (mut src, mut dst) = Host::pair(&tmp);
        match c.how {
            Break::Fail(Src, pattern) => src.set("fail-on", pattern),
            Break::Fail(Dst, pattern) => dst.set("fail-on", pattern),
            Break::PeerOutdated => {
                // Good until the switchover, then the source's disk is reported stale.
                std::fs::create_dir(dst.dir.join("queue")).unwrap();
                for i in 0..3 {
                    dst.set(&format!("queue/{i:02}"), &in_sync(1));
                }
                dst.set(
                    "status.json",
                    &status_json(1, "UpToDate", "Established", "Outdated", 0, 100.0),
                );
            }
        }
        let (side, err) = drive(&mut src, &mut dst).expect_err(c.name);
        let msg = err.to_string();
        assert_eq!(
            (side, err.step()),
            (c.side, Some(c.step)),
            "{}: {msg}",
            c.name
        );
        assert!(
            msg.starts_with(&format!("disk step {}", c.step)),
            "{}: {msg}",
            c.name
        );
        let failed = match c.side {
            Src => &src,
            Dst => &dst,
        };
        assert_eq!(failed.steer.phase(), DiskPhase::Failed, "{}", c.name);
        if let Break::PeerOutdated = c.how {
            assert!(
                msg.contains("peer disk is Outdated, expected in sync"),
                "{msg}"
            );
        }

        // The failure was transient; the driver rolls back, destination first.
        src.set("fail-on", "");
        dst.set("fail-on", "");
        dst.set("status.json", &in_sync(1));
        let (src_before, dst_before) = (src.changes().len(), dst.changes().len());
        // A source that finished before the destination failed has nothing to undo.
        let src_finished = src.steer.phase() == DiskPhase::Done;
        let dst_report = dst
            .steer
            .roll_back()
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let src_report = src
            .steer
            .roll_back()
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let reset = "--protocol=A --allow-two-primaries=no";
        let mut dst_wants = Vec::new();
        if c.promoted && !c.committed {
            dst_wants.push(format!("secondary {RES}"));
        }
        dst_wants.push(dst_net(reset));
        let src_wants = if src_finished {
            vec![]
        } else {
            vec![src_net(reset)]
        };
        assert_eq!(dst.changes()[dst_before..], dst_wants, "{}", c.name);
        assert_eq!(src.changes()[src_before..], src_wants, "{}", c.name);
        assert_eq!(
            dst_report.done.len(),
            dst_wants.len(),
            "{}: {dst_report}",
            c.name
        );
        assert_eq!(
            src_report.done.len(),
            src_wants.len(),
            "{}: {src_report}",
            c.name
        );

        let (src_role, dst_role) = if c.committed {
            ("Secondary", "Primary")
        } else {
            ("Primary", "Secondary")
        };
        assert_eq!(
            src.drbd(),
            (src_role.into(), "A".into(), "no".into()),
            "{}",
            c.name
        );
        assert_eq!(
            dst.drbd(),
            (dst_role.into(), "A".into(), "no".into()),
            "{}",
            c.name
        );
        let src_end = if src_finished {
            DiskPhase::Done
        } else {
            DiskPhase::RolledBack
        };
        assert_eq!(src.steer.phase(), src_end, "{}", c.name);
        assert_eq!(dst.steer.phase(), DiskPhase::RolledBack, "{}", c.name);
    }
}

#[test]
fn a_source_that_cannot_let_go_after_the_commit_is_left_for_the_operator() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("commit");
    let (mut src, mut dst) = Host::pair(&tmp);
    src.set("fail-on", "^secondary");
    let (side, err) = drive(&mut src, &mut dst).unwrap_err();
    assert_eq!((side, err.step()), (Side::Source, Some(Step::AfterCommit)));
    let msg = err.to_string();
    assert!(
        msg.starts_with("disk step after-commit: `")
            && msg.contains("secondary web1` failed with exit status 17")
            && msg.contains("fake drbdsetup fails 'secondary web1'"),
        "{msg}"
    );

    // The guest runs at the destination now: roll back must not demote it, and with both
    // Primary, DRBD will not let either side forbid two primaries.
    src.set("fail-on", "");
    let before = dst.changes().len();
    let e = dst.steer.roll_back().unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("the guest committed here, so this disk stays Primary"),
        "{msg}"
    );
    assert!(msg.contains("still Primary after 300ms"), "{msg}");
    assert!(
        msg.contains(
            "run `drbdadm net-options --protocol=A --allow-two-primaries=no web1` on both"
        ),
        "{msg}"
    );
    assert_eq!(dst.changes().len(), before, "{:?}", dst.changes());
    let e = src.steer.roll_back().unwrap_err();
    assert!(
        e.to_string().contains("this host's role is left as it is"),
        "{e}"
    );
    assert_eq!(src.steer.phase(), DiskPhase::Failed);
    assert_eq!(dst.state("role"), "Primary");

    // The operator demotes the source by hand; a second roll back then completes.
    Drbdadm::new()
        .with_program(DRBDADM)
        .with_config(src.dir.join("skyferry-web1.res"))
        .with_drbdsetup(src.dir.join("drbdsetup"))
        .run(Step::RollBack, &["secondary".into(), RES.into()])
        .unwrap();
    dst.steer.roll_back().unwrap();
    src.steer.roll_back().unwrap();
    assert_eq!(src.drbd(), ("Secondary".into(), "A".into(), "no".into()));
    assert_eq!(dst.drbd(), ("Primary".into(), "A".into(), "no".into()));
}

#[test]
fn the_source_rolls_back_only_once_the_destination_let_go() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("order");
    let (mut src, mut dst) = Host::pair(&tmp);
    src.steer.bulk_sync().unwrap();
    dst.steer.bulk_sync().unwrap();
    src.steer.before_memory().unwrap();
    dst.steer.before_memory().unwrap();
    dst.steer.switchover().unwrap();
    assert_eq!(dst.steer.phase(), DiskPhase::DualPrimary);

    // Rolled back in the wrong order, the source cannot forbid two primaries yet, and
    // does not try. It waits its full time even though the migration was aborted: the
    // abort is what asked for the roll back.
    src.steer.abort_handle().store(true, Ordering::Relaxed);
    let before = src.changes().len();
    let err = src.steer.roll_back().unwrap_err();
    assert!(
        err.to_string()
            .contains("skyferry-dst is still Primary after 300ms"),
        "{err}"
    );
    assert_eq!(src.steer.phase(), DiskPhase::Failed);
    assert_eq!(src.changes().len(), before);

    let report = dst.steer.roll_back().unwrap();
    assert!(
        report.to_string().starts_with("destination web1: ran `"),
        "{report}"
    );
    let report = src.steer.roll_back().unwrap();
    assert_eq!(report.done.len(), 1, "{report}");
    assert_eq!(src.drbd(), ("Primary".into(), "A".into(), "no".into()));
    assert_eq!(dst.drbd(), ("Secondary".into(), "A".into(), "no".into()));
}

#[test]
fn a_sync_that_never_completes_meets_its_deadline() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("deadline");
    let mut src = Host::new(&tmp, Side::Source);
    src.set(
        "status.json",
        &status_json(0, "UpToDate", "SyncSource", "Inconsistent", 6_291_242, 40.0),
    );
    src.steer = src.steer.with_timing(SteerTiming {
        sync_deadline: Duration::from_millis(300),
        ..timing()
    });
    let start = Instant::now();
    let err = src.steer.bulk_sync().unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let msg = err.to_string();
    assert!(matches!(err, DrbdError::SyncDeadline { .. }), "{msg}");
    assert!(
        msg.starts_with("disk step bulk-sync: resource web1 was not in sync after 300ms"),
        "{msg}"
    );
    assert!(msg.contains("volume 0 replication is SyncSource"), "{msg}");
    assert!(msg.contains("(40.00% in sync)"), "{msg}");
    assert_eq!(src.steer.phase(), DiskPhase::Failed);
    assert_eq!(src.steer.status().sync_percent, Some(40.0));
    src.set("status.json", &in_sync(0));
    src.steer.roll_back().unwrap();
    assert_eq!(src.steer.phase(), DiskPhase::RolledBack);
}

#[test]
fn an_abort_ends_the_bulk_sync() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("abort");
    let mut src = Host::new(&tmp, Side::Source);
    src.set(
        "status.json",
        &status_json(0, "UpToDate", "SyncSource", "Inconsistent", 100, 99.99),
    );
    let abort = src.steer.abort_handle();
    src.steer = src.steer.on_progress(move |_, pct| {
        if pct.is_some() {
            abort.store(true, Ordering::Relaxed);
        }
    });
    let err = src.steer.bulk_sync().unwrap_err();
    assert_eq!(
        err.to_string(),
        "disk step bulk-sync: resource web1: aborted"
    );
}

#[test]
fn states_that_do_not_fit_the_step_are_caught() {
    if !have_drbdadm() {
        return;
    }
    // A destination that is already Primary before anything started.
    let tmp = TempDir::new("state");
    let mut dst = Host::new(&tmp, Side::Destination);
    dst.set("role", "Primary");
    let err = dst.steer.bulk_sync().unwrap_err();
    assert!(
        err.to_string().starts_with(
            "disk step bulk-sync: resource web1, before the bulk copy: this host is Primary, \
             expected Secondary; DRBD reports: web1 Primary"
        ),
        "{err}"
    );
    assert!(dst.changes().is_empty(), "{:?}", dst.changes());

    // A protocol change that does not take.
    let tmp = TempDir::new("frozen");
    let mut src = Host::new(&tmp, Side::Source);
    src.steer.bulk_sync().unwrap();
    src.set("frozen", "");
    let err = src.steer.before_memory().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("disk step before-memory: resource web1, after `"),
        "{msg}"
    );
    assert!(
        msg.contains("net-options --protocol=C web1`: protocol is A, expected C"),
        "{msg}"
    );

    // DRBD running the resource as another node than the configuration says.
    let tmp = TempDir::new("node");
    let mut src = Host::new(&tmp, Side::Source);
    src.set("status.json", &in_sync(1));
    let err = src.steer.bulk_sync().unwrap_err();
    assert!(err.to_string().contains("DRBD runs it as node 1"), "{err}");

    // A connection DRBD will not re-establish by itself.
    let tmp = TempDir::new("standalone");
    let mut src = Host::new(&tmp, Side::Source);
    src.set(
        "status.json",
        &status_json(0, "UpToDate", "Off", "DUnknown", 0, 100.0)
            .replace("\"Connected\"", "\"StandAlone\""),
    );
    let err = src.steer.bulk_sync().unwrap_err();
    assert!(
        err.to_string().contains("the connection is StandAlone"),
        "{err}"
    );

    // Output that is not drbdsetup's.
    let tmp = TempDir::new("garbage");
    let mut src = Host::new(&tmp, Side::Source);
    src.set("status.json", "# No currently configured DRBD found.\n");
    let err = src.steer.bulk_sync().unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("disk step bulk-sync: cannot read the output of `"),
        "{msg}"
    );
    assert!(
        msg.contains("drbdsetup status web1 --json`: not drbdsetup 9 status JSON"),
        "{msg}"
    );
}

#[test]
fn steps_out_of_order_are_refused() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("order");
    let mut dst = Host::new(&tmp, Side::Destination);
    let err = dst.steer.switchover().unwrap_err();
    assert_eq!(
        err.to_string(),
        "disk step switchover called with resource web1 in phase idle; it needs protocol-c"
    );
    assert_eq!(dst.steer.phase(), DiskPhase::Idle);
    assert!(dst.calls().is_empty());
}

#[test]
fn a_hung_drbdsetup_is_killed_and_reported() {
    if !have_drbdadm() {
        return;
    }
    let tmp = TempDir::new("hang");
    let mut dst = Host::with_timeout(&tmp, Side::Destination, Duration::from_secs(1));
    dst.steer.bulk_sync().unwrap();
    dst.steer.before_memory().unwrap();
    dst.set("hang-on", "^primary");
    let start = Instant::now();
    let err = dst.steer.switchover().unwrap_err();
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    let msg = err.to_string();
    assert!(matches!(err, DrbdError::Timeout { .. }), "{msg}");
    assert!(
        msg.starts_with("disk step switchover: `/usr/sbin/drbdadm -c "),
        "{msg}"
    );
    assert!(
        msg.contains("primary web1` did not finish within 1s and was killed"),
        "{msg}"
    );
    dst.set("hang-on", "");
    // It may or may not have been promoted: roll back demotes to be sure.
    let report = dst.steer.roll_back().unwrap();
    assert_eq!(report.done.len(), 2, "{report}");
    assert_eq!(dst.drbd(), ("Secondary".into(), "A".into(), "no".into()));
}

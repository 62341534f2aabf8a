//! KVM micro-VMs end to end: the project's self-checking test guest, live-migrated between
//! two real skyferryd processes. After each migration the guest sweeps every page at the
//! destination: zero bad pages, its progress counter going on from the value it paused at.
//! A destination told to corrupt one page before the sweep (`SKYFERRY_KVM_CORRUPT=1`) must
//! hear of exactly one.
//!
//! Faults: a link cut in pre-copy resumes and the guest still arrives intact; a migration
//! that fails after the pause, or is aborted, leaves the guest running on at the source and
//! never at the destination.
//!
//! Needs /dev/kvm; without it the tests print why and skip, unless `SKYFERRY_REQUIRE_KVM` is
//! set (`tests/run` sets it), when they fail. Guests are small: on this nested host the
//! guest runs under instruction emulation and sweeps about 1.5 MiB/s. The 4 GiB guest is
//! checked by the host, by the guest's rules (`[kvm] arrival_check = "host"`), and runs only
//! in release builds (`tests/run` runs it so).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use skyferry_tests::relay::Relay;
use skyferry_tests::{Daemon, is_final};

fn have_kvm() -> bool {
    match dataplane::guest::kvm::available() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var_os("SKYFERRY_REQUIRE_KVM").is_none(),
                "SKYFERRY_REQUIRE_KVM is set but {why}"
            );
            eprintln!("skipped: {why}");
            false
        }
    }
}

/// The source's final status, with its guest's check.
fn source_done(src: &Daemon, id: &str) -> Value {
    src.wait_for(id, 120, |s| is_final(s) && !s["guest_check"].is_null())
}

/// The destination's status once the guest has swept and counted on past its arrival.
fn dest_checked(dst: &Daemon, id: &str) -> Value {
    dst.wait_for(id, 120, |s| {
        let c = &s["guest_check"];
        !c["failure"].is_null()
            || (!c["bad_pages"].is_null()
                && c["progress"].as_u64() > c["progress_at_switch"].as_u64())
    })
}

/// Migrates one guest and checks what it says of itself; returns (driver's pause ms,
/// guest-seen downtime ms).
fn migrate_and_check(src: &Daemon, dst: &Daemon, case: &[&str]) -> (u64, f64) {
    let id = start(src, dst.listen.expect("destination listens"), case);
    check_arrival(src, dst, &id, case)
}

fn start(src: &Daemon, to: std::net::SocketAddr, case: &[&str]) -> String {
    let mut args = vec!["--guest", "kvm"];
    args.extend_from_slice(case);
    src.start_migration(to, &args)
}

/// Checks migration `id` completed and the guest arrived intact and runs on.
fn check_arrival(src: &Daemon, dst: &Daemon, id: &str, case: &[&str]) -> (u64, f64) {
    let s = source_done(src, id);
    assert_eq!(
        s["phase"],
        "completed",
        "{case:?}: {s}\nDEST LOG:\n{}",
        dst.log()
    );
    assert_eq!(s["verified"], true, "{case:?}");
    let d = dest_checked(dst, id);
    assert_eq!(d["phase"], "completed", "{case:?}: {d}");
    let (sc, dc) = (&s["guest_check"], &d["guest_check"]);
    assert!(dc["failure"].is_null(), "{case:?}: guest failed: {dc}");
    assert_eq!(dc["resumed"], true, "{case:?}: {dc}");
    assert_eq!(
        dc["bad_pages"],
        0,
        "{case:?}: {dc}\nDEST LOG:\n{}",
        dst.log()
    );
    assert_eq!(
        dc["progress_at_switch"], sc["progress_at_switch"],
        "{case:?}: the counter arrives as it paused"
    );
    assert!(
        dc["progress"].as_u64() > dc["progress_at_switch"].as_u64(),
        "{case:?}: the counter goes on: {dc}"
    );
    let guest_ms = dc["downtime_ms"]
        .as_f64()
        .expect("the guest measured its pause");
    let driver_ms = s["pause_ms"].as_u64().expect("pause known");
    eprintln!(
        "{case:?}: iterations {}, driver pause {driver_ms} ms, guest-seen downtime {guest_ms:.1} ms, \
         counter {} -> {}",
        s["iteration"], dc["progress_at_switch"], dc["progress"]
    );
    (driver_ms, guest_ms)
}

#[test]
fn guests_of_several_sizes_rates_and_policies_arrive_intact() {
    if !have_kvm() {
        return;
    }
    let dst = Daemon::start("kvm-dst", 1, true, "[kvm]\n");
    let src = Daemon::start("kvm-src", 1, false, "");
    let cases: [&[&str]; 5] = [
        &[
            "--mem",
            "2MiB",
            "--workload",
            "tpcw",
            "--policy",
            "smart",
            "--optimizations",
            "all",
        ],
        &[
            "--mem",
            "4MiB",
            "--workload",
            "kernel",
            "--speed",
            "2",
            "--policy",
            "xen-default",
            "--optimizations",
            "none",
        ],
        &[
            "--mem",
            "8MiB",
            "--workload",
            "specjbb",
            "--policy",
            "smart",
            "--optimizations",
            "none",
        ],
        &[
            "--mem",
            "2MiB",
            "--workload",
            "idle",
            "--policy",
            "xen-default",
            "--optimizations",
            "all",
        ],
        // A slow link: several iterations while the guest writes.
        &[
            "--mem",
            "4MiB",
            "--workload",
            "tpcw",
            "--speed",
            "3",
            "--policy",
            "smart",
            "--optimizations",
            "all",
            "--max-bandwidth",
            "20MB/s",
        ],
    ];
    for case in cases {
        migrate_and_check(&src, &dst, case);
    }
}

#[test]
fn a_page_corrupted_at_the_destination_is_the_one_bad_page() {
    if !have_kvm() {
        return;
    }
    let flag = std::path::Path::new("1");
    let dst = Daemon::start_with_env(
        "kvm-corrupt-dst",
        2,
        true,
        "[kvm]\n",
        &[(dataplane::guest::kvm::CORRUPT_VAR, flag)],
    );
    let src = Daemon::start("kvm-corrupt-src", 2, false, "");
    let id = src.start_migration(
        dst.listen.expect("listens"),
        &["--guest", "kvm", "--mem", "2MiB", "--workload", "tpcw"],
    );
    let s = source_done(&src, &id);
    assert_eq!(s["phase"], "completed", "{s}");
    let d = dest_checked(&dst, &id);
    assert_eq!(
        d["guest_check"]["bad_pages"], 1,
        "the guest must find exactly the corrupted page: {d}"
    );
    assert!(dst.log().contains("corrupted one page"), "{}", dst.log());
}

#[test]
fn a_destination_without_a_kvm_section_refuses() {
    if !have_kvm() {
        return;
    }
    let dst = Daemon::start("kvm-refuse-dst", 3, true, "");
    let src = Daemon::start("kvm-refuse-src", 3, false, "");
    let id = src.start_migration(
        dst.listen.expect("listens"),
        &["--guest", "kvm", "--mem", "1MiB", "--workload", "idle"],
    );
    let s = src.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap_or("").contains("[kvm]"),
        "the reason names the missing section: {s}"
    );
}

/// The guest at the source runs on: its counter passes `past` (the value it paused at).
fn runs_on_at_source(src: &Daemon, id: &str, past: u64) -> Value {
    src.wait_for(id, 30, |s| {
        s["guest_check"]["progress"].as_u64() > Some(past)
    })
}

/// A link cut in pre-copy: the source reconnects, sends what the destination had not
/// acknowledged, and the guest arrives intact.
#[test]
fn a_link_cut_in_pre_copy_resumes_and_the_guest_arrives_intact() {
    if !have_kvm() {
        return;
    }
    let dst = Daemon::start("kvm-cut-dst", 4, true, "[kvm]\n");
    let src = Daemon::start("kvm-cut-src", 4, false, "");
    let relay = Relay::new(dst.listen.expect("listens"));
    // 8 MiB at 2 MB/s: the first iteration takes seconds, time to cut it.
    let case = [
        "--mem",
        "8MiB",
        "--workload",
        "tpcw",
        "--speed",
        "3",
        "--policy",
        "xen-default",
        "--max-bandwidth",
        "2MB/s",
    ];
    let id = start(&src, relay.addr, &case);
    let s = src.wait_for(&id, 60, |s| {
        is_final(s) || (s["phase"] == "iterating" && s["wire_bytes"].as_u64() > Some(1 << 20))
    });
    assert!(!is_final(&s), "ended before the cut: {s}");
    relay.cut();
    check_arrival(&src, &dst, &id, &case);
    let s = src.wait_for(&id, 5, is_final);
    assert!(s["resumes"].as_u64() >= Some(1), "it resumed: {s}");
}

/// A link cut after the guest paused: the migration fails, and the guest runs on at the
/// source from where it paused; the destination never starts it. Then an abort in
/// pre-copy: the guest never stops at the source.
#[test]
fn a_failed_or_aborted_migration_leaves_the_guest_running_at_the_source_only() {
    if !have_kvm() {
        return;
    }
    let dst = Daemon::start("kvm-fail-dst", 5, true, "[kvm]\n");
    let hold = Path::new("source-paused:3000");
    let src = Daemon::start_with_env("kvm-fail-src", 5, false, "", &[("SKYFERRY_HOLD", hold)]);
    let relay = Relay::new(dst.listen.expect("listens"));
    let case = ["--mem", "2MiB", "--workload", "kernel", "--speed", "3"];
    let id = start(&src, relay.addr, &case);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !src.log().contains("holding at source-paused") {
        assert!(Instant::now() < deadline, "never paused:\n{}", src.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    relay.cut();
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    let paused = s["guest_check"]["progress_at_switch"]
        .as_u64()
        .expect("the guest paused");
    let s = runs_on_at_source(&src, &id, paused);
    eprintln!(
        "failed after the pause ({}): the guest paused at {paused}, runs on at the source: {}",
        s["error"], s["guest_check"]["progress"]
    );
    let d = dst.wait_for(&id, 30, |d| is_final(d) || d["phase"] == "in-doubt");
    assert_eq!(d["phase"], "failed", "the destination discards: {d}");
    assert_ne!(
        d["guest_check"]["resumed"], true,
        "the guest must not run at the destination too: {d}"
    );

    // An abort in pre-copy, straight to the destination.
    let slow = [
        "--mem",
        "8MiB",
        "--workload",
        "tpcw",
        "--max-bandwidth",
        "1MB/s",
    ];
    let id = start(&src, dst.listen.expect("listens"), &slow);
    src.wait_for(&id, 60, |s| {
        s["phase"] == "iterating" && s["wire_bytes"].as_u64() > Some(256 << 10)
    });
    let out = src.cli(&["abort", &id]);
    assert!(out.status.success(), "{out:?}");
    let s = src.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "aborted", "{s}");
    assert!(
        s["guest_check"]["progress_at_switch"].is_null(),
        "the guest never paused: {s}"
    );
    let now = s["guest_check"]["progress"].as_u64().expect("counter");
    runs_on_at_source(&src, &id, now);
}

/// The largest guest the program runs in: 4 GiB, 1,048,576 pages, migrated and checked by
/// the host by the guest's rules (the guest's own sweep of it would take most of an hour
/// under this host's instruction emulation). Release builds only.
#[test]
fn a_four_gib_guest_arrives_intact() {
    if cfg!(debug_assertions) {
        eprintln!("skipped in debug builds (4 GiB): tests/run runs it with --release");
        return;
    }
    if !have_kvm() {
        return;
    }
    let dst = Daemon::start("kvm-4g-dst", 7, true, "[kvm]\narrival_check = \"host\"\n");
    let src = Daemon::start("kvm-4g-src", 7, false, "");
    let case = [
        "--mem",
        "4GiB",
        "--workload",
        "kernel",
        "--speed",
        "3",
        "--policy",
        "smart",
    ];
    let id = start(&src, dst.listen.expect("listens"), &case);
    let (driver_ms, guest_ms) = check_arrival(&src, &dst, &id, &case);
    let d = dst.status(&id);
    assert_eq!(d["guest_check"]["checked_by"], "host", "{d}");
    eprintln!("4 GiB: driver pause {driver_ms} ms, guest-seen {guest_ms:.1} ms");
}

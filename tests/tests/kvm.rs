//! KVM micro-VMs end to end: the project's self-checking test guest, live-migrated between
//! two real skyferryd processes. After each migration the guest sweeps every page at the
//! destination: zero bad pages, its progress counter going on from the value it paused at.
//! A destination told to corrupt one page before the sweep (`SKYFERRY_KVM_CORRUPT=1`) must
//! hear of exactly one.
//!
//! Needs /dev/kvm; without it the tests print why and skip, unless `SKYFERRY_REQUIRE_KVM` is
//! set (`tests/run` sets it), when they fail. Guests are small: on this nested host the
//! guest runs under instruction emulation and sweeps about 1.5 MiB/s.

use serde_json::Value;
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
    let mut args = vec!["--guest", "kvm"];
    args.extend_from_slice(case);
    let id = src.start_migration(dst.listen.expect("destination listens"), &args);
    let s = source_done(src, &id);
    assert_eq!(
        s["phase"],
        "completed",
        "{case:?}: {s}\nDEST LOG:\n{}",
        dst.log()
    );
    assert_eq!(s["verified"], true, "{case:?}");
    let d = dest_checked(dst, &id);
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

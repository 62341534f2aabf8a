//! Resume instead of restart: pre-copy whose link breaks reconnects and goes on from the
//! last iteration the destination acknowledged, between two real skyferryd with a relay
//! between them that cuts every connection. Every wait is on an event (a log line, a
//! status, a file that releases a held daemon); the bounds only catch what never happens.

use std::path::Path;

use skyferry_tests::relay::Relay;
use skyferry_tests::{Daemon, Release, is_final};

/// Generous bound on any one wait: reached only by a migration that never gets there.
const BOUND: u64 = 300;

/// A guest whose second iteration, at this rate, is long enough to strike in.
const GUEST: &[&str] = &[
    "--workload",
    "tpcw",
    "--mem",
    "64MiB",
    "--speed",
    "2",
    "--policy",
    "xen-default",
    "--max-bandwidth",
    "10MB/s",
];

fn wire(s: &serde_json::Value) -> u64 {
    s["wire_bytes"].as_u64().expect("wire_bytes")
}

#[test]
fn a_cut_in_a_later_iteration_resumes_and_sends_less_than_a_restart() {
    let dst = Daemon::start("resume-d", 1, true, "");
    // The source holds in iteration 2 once its pages are handed to the pipeline (which
    // goes on sending them) until the test has cut the link: the cut lands inside a later
    // iteration, never as pre-copy ends (a cut in the stop-and-copy is not resumed).
    let release = Release::new("resume");
    let hold = release.hold("source-iteration-2");
    let src = Daemon::start_with_env(
        "resume-s",
        1,
        false,
        "",
        &[("SKYFERRY_HOLD", Path::new(&hold))],
    );
    let relay = Relay::new(dst.listen.unwrap());

    let id = src.start_migration(relay.addr, GUEST);
    src.wait_log("holding at source-iteration-2 ", BOUND);
    // Once the destination acknowledged iteration 1 (a cut while its tail is still in
    // flight resends the whole iteration).
    dst.wait_for(&id, BOUND, |d| d["iteration"].as_u64() >= Some(1));
    let before = src.status(&id);
    relay.cut();
    // What the source counted before the cut (frames the held driver has not counted yet
    // fall after it: the comparison below only gets harder).
    let at_cut = wire(&src.status(&id));
    release.go();
    let s = src.wait_for(&id, BOUND, is_final);
    let d = dst.wait_for(&id, BOUND, is_final);
    assert_eq!(s["phase"], "completed", "source: {s}");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(d["phase"], "completed", "destination: {d}");
    assert_eq!(d["verified"], true, "{d}");
    assert!(s["resumes"].as_u64() >= Some(1), "{s}");
    assert!(d["resumes"].as_u64() >= Some(1), "{d}");
    assert!(
        s["link_error"].as_str().is_some_and(|e| !e.is_empty()),
        "the status says why the link broke: {s}"
    );
    let resumed_total = wire(&s);
    let after_cut = resumed_total - at_cut;

    // The alternative: start over. The same guest, migrated whole, with nothing cut.
    let fresh = src.start_migration(dst.listen.unwrap(), GUEST);
    let f = src.wait_for(&fresh, BOUND, is_final);
    assert_eq!(f["phase"], "completed", "{f}");
    let restart_total = at_cut + wire(&f);
    eprintln!(
        "cut in iteration {}: {at_cut} bytes before the cut; resumed: {after_cut} bytes after \
         it, {resumed_total} in all; restarted: {} bytes for a new migration, {restart_total} \
         in all; resume saved {} bytes ({:.0}%)",
        before["iteration"],
        wire(&f),
        restart_total - resumed_total,
        100.0 * (restart_total - resumed_total) as f64 / restart_total as f64
    );
    assert!(
        after_cut < wire(&f),
        "going on cost {after_cut} bytes, starting over {}",
        wire(&f)
    );
}

#[test]
fn a_destination_that_lost_the_migration_refuses_the_reconnection() {
    // The destination daemon restarts mid-pre-copy: the new one does not hold the
    // migration, says so, and the source stops trying at once (its guest runs on).
    let mut dst = Daemon::start("resume-gone-d", 1, true, "");
    let src = Daemon::start("resume-gone-s", 1, false, "");
    let relay = Relay::new(dst.listen.unwrap());
    let id = src.start_migration(relay.addr, GUEST);
    let s = src.wait_for(&id, BOUND, |s| {
        s["iteration"].as_u64() >= Some(2) || is_final(s)
    });
    assert!(!is_final(&s), "ended before the restart: {s}");
    dst.kill();
    let again = Daemon::start_at("resume-gone-d2", 1, dst.listen.unwrap(), "");
    let s = src.wait_for(&id, BOUND, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    let why = s["error"].as_str().unwrap_or_default();
    assert!(why.contains("not held here for resuming"), "{why}");
    // (That error is the refusal's: it ended the retries, with attempts to spare.)
    drop(again);
}

#[test]
fn a_spent_time_budget_still_leaves_the_first_attempts() {
    // The budget for reconnecting is spent before the first attempt (as one slow attempt
    // on a loaded host spent it): the first attempts are made all the same, and resume.
    let dst = Daemon::start("resume-budget-d", 1, true, "");
    let release = Release::new("resume-budget");
    let hold = release.hold("source-iteration-2");
    let src = Daemon::start_with_env(
        "resume-budget-s",
        1,
        false,
        "resume_within = \"0s\"",
        &[("SKYFERRY_HOLD", Path::new(&hold))],
    );
    let relay = Relay::new(dst.listen.unwrap());
    let id = src.start_migration(relay.addr, GUEST);
    src.wait_log("holding at source-iteration-2 ", BOUND);
    relay.cut();
    release.go();
    let s = src.wait_for(&id, BOUND, is_final);
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert!(s["resumes"].as_u64() >= Some(1), "{s}");
}

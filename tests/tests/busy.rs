//! A destination already receiving its `max_migrations` refuses a new migration as busy; the
//! refused source waits (phase `waiting`, "destination busy, retry n in Xs") and asks again
//! with backoff, and gets in once the first migration has ended. Two real skyferryd
//! sources, one destination with `max_migrations = 1` and no queue (with a queue, the
//! destination holds the second one in line instead; `metrics.rs` tests that).

use skyferry_tests::{Daemon, is_final};

/// The first migration: slow enough (a rate limit is a floor on its duration, a slow host
/// only makes it longer) that the second is refused while it runs.
const LONG: &[&str] = &[
    "--workload",
    "tpcw",
    "--mem",
    "64MiB",
    "--policy",
    "xen-default",
    "--max-bandwidth",
    "2MB/s",
];

#[test]
fn a_source_refused_as_busy_waits_and_gets_in_once_the_first_migration_ends() {
    let dst = Daemon::start_listening_with("busy-d", 1, "max_migrations = 1\nqueue = 0", "");
    let first_src = Daemon::start("busy-s1", 1, false, "");
    let second_src = Daemon::start("busy-s2", 1, false, "");
    let to = dst.listen.unwrap();

    let first = first_src.start_migration(to, LONG);
    dst.wait_for(&first, 300, |s| s["phase"] == "iterating" || is_final(s));
    let s = first_src.status(&first);
    assert!(!is_final(&s), "the first migration must hold the slot: {s}");

    let second = second_src.start_migration(to, &["--workload", "idle", "--mem", "8MiB"]);
    let waiting = second_src.wait_for(&second, 300, |s| s["phase"] == "waiting" || is_final(s));
    assert_eq!(waiting["phase"], "waiting", "{waiting}");
    let note = waiting["waiting"].as_str().unwrap_or_default();
    assert!(
        note.starts_with("destination busy, retry ") && note.ends_with('s'),
        "{waiting}"
    );
    assert!(
        waiting["link_error"]
            .as_str()
            .is_some_and(|e| e.contains("max_migrations = 1")),
        "the refusal's reason is shown: {waiting}"
    );
    eprintln!(
        "second source while the first holds the slot: {} ({})",
        note, waiting["link_error"]
    );
    // The table says so too.
    let table = second_src.cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("waiting") && table.contains("destination busy, retry "),
        "{table}"
    );
    // The busy refusals leave no row at the destination.
    let out = dst.cli(&["status", &second]);
    assert!(!out.status.success(), "a row for a refused migration");

    // Free the slot: the operator aborts the first migration (its guest stays at the source).
    let out = first_src.cli(&["abort", &first]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = first_src.wait_for(&first, 300, is_final);
    assert_eq!(f["phase"], "aborted", "{f}");

    let s = second_src.wait_for(&second, 300, is_final);
    assert_eq!(s["phase"], "completed", "{s}");
    assert_eq!(s["verified"], true, "{s}");
    assert!(s["waiting"].is_null(), "no longer waiting: {s}");
    let d = dst.wait_for(&second, 300, is_final);
    assert_eq!(d["phase"], "completed", "{d}");
}

#[test]
fn a_source_gives_up_on_a_busy_destination_after_its_bound() {
    let dst = Daemon::start_listening_with("busy-bound-d", 1, "max_migrations = 1\nqueue = 0", "");
    let first_src = Daemon::start("busy-bound-s1", 1, false, "");
    let second_src = Daemon::start("busy-bound-s2", 1, false, "busy_retry_within = \"0s\"");
    let to = dst.listen.unwrap();
    let first = first_src.start_migration(to, LONG);
    dst.wait_for(&first, 300, |s| s["phase"] == "iterating" || is_final(s));
    assert!(!is_final(&first_src.status(&first)));

    let second = second_src.start_migration(to, &["--workload", "idle", "--mem", "8MiB"]);
    let s = second_src.wait_for(&second, 300, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    let why = s["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("destination busy") && why.contains("gave up after 0 retries"),
        "{why}"
    );
    let out = first_src.cli(&["abort", &first]);
    assert!(out.status.success());
}

//! Live migrations between two real skyferryd processes over loopback TCP, driven by the
//! real `skyferry` CLI.

use skyferry_tests::{Daemon, is_final};

fn start(src: &Daemon, dst: &Daemon, args: &[&str]) -> String {
    src.start_migration(dst.listen.expect("destination listens"), args)
}

#[test]
fn every_workload_policy_and_codec_setting_verifies() {
    let dst = Daemon::start("matrix-dst", 1, true, "");
    let src = Daemon::start("matrix-src", 1, false, "");
    for workload in ["kernel", "tpcw", "specjbb", "idle"] {
        for policy in ["smart", "xen-default"] {
            for opts in ["all", "none"] {
                let id = start(
                    &src,
                    &dst,
                    &[
                        "--workload",
                        workload,
                        "--mem",
                        "16MiB",
                        "--speed",
                        "4",
                        "--policy",
                        policy,
                        "--optimizations",
                        opts,
                        "--max-bandwidth",
                        "400MB/s",
                    ],
                );
                let s = src.wait_for(&id, 60, is_final);
                assert_eq!(
                    s["phase"],
                    "completed",
                    "{workload}/{policy}/{opts}: {s}\nDEST LOG:\n{}",
                    dst.log()
                );
                assert_eq!(s["verified"], true);
                let d = dst.wait_for(&id, 10, is_final);
                assert_eq!(d["phase"], "completed", "destination: {d}");
                let saved = &s["saved"];
                let total = saved["zero"].as_u64().unwrap()
                    + saved["cbr"].as_u64().unwrap()
                    + saved["delta"].as_u64().unwrap();
                if opts == "none" {
                    assert_eq!(
                        total, 0,
                        "{workload}/{policy}: nothing saved without optimizations"
                    );
                } else if workload != "tpcw" {
                    assert!(
                        total > 0,
                        "{workload}/{policy}: optimizations saved nothing: {s}"
                    );
                }
            }
        }
    }
}

#[test]
fn wrong_key_is_refused_and_the_guest_stays() {
    let dst = Daemon::start("key-dst", 2, true, "");
    let src = Daemon::start("key-src", 1, false, "");
    let id = start(&src, &dst, &["--workload", "idle", "--mem", "8MiB"]);
    let s = src.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        s["error"].as_str().unwrap().contains("pre-shared key"),
        "{s}"
    );
    // The daemon is fine and says where the guest is.
    let out = src.cli(&["status"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed"));
}

fn abort_when(phase_pred: impl Fn(&serde_json::Value) -> bool, args: &[&str], name: &str) {
    let dst = Daemon::start(&format!("{name}-dst"), 1, true, "");
    let src = Daemon::start(&format!("{name}-src"), 1, false, "");
    let id = start(&src, &dst, args);
    src.wait_for(&id, 60, |s| phase_pred(s) || is_final(s));
    let out = src.cli(&["abort", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "abort: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("aborted"),
        "{text}\nsource log:\n{}\ndestination log:\n{}",
        src.log(),
        dst.log()
    );
    let s = src.wait_for(&id, 30, is_final);
    assert_eq!(s["phase"], "aborted", "{s}");
    let d = dst.wait_for(&id, 30, is_final);
    assert_eq!(
        d["phase"], "aborted",
        "the destination discards and says why: {d}"
    );
    // The daemons survive and the next migration works.
    let next = start(&src, &dst, &["--workload", "idle", "--mem", "8MiB"]);
    assert_eq!(src.wait_for(&next, 60, is_final)["phase"], "completed");
}

#[test]
fn abort_in_iteration_1() {
    abort_when(
        |s| s["phase"] == "iterating" && s["iteration"] == 1,
        &[
            "--workload",
            "tpcw",
            "--mem",
            "128MiB",
            "--max-bandwidth",
            "20MB/s",
        ],
        "abort1",
    );
}

#[test]
fn abort_in_a_later_iteration() {
    abort_when(
        |s| s["phase"] == "iterating" && s["iteration"].as_u64().unwrap() >= 3,
        &[
            "--workload",
            "specjbb",
            "--mem",
            "32MiB",
            // The hot set never drops under Xen's 50-page stop, so pre-copy runs to its 30
            // iterations. At 2 MB/s (`skyferry demo` with these flags, at 10 MB/s: iterations
            // 3 to 30 took 1.3 s) they take several seconds, time enough to see iteration 3
            // on a busy machine.
            "--speed",
            "30",
            "--policy",
            "xen-default",
            "--max-bandwidth",
            "2MB/s",
        ],
        "abort3",
    );
}

#[test]
fn abort_during_stop_and_copy() {
    // SPECjbb's hot set is rewritten faster than 4 MB/s can carry it, so the final copy is
    // large and slow enough to be caught.
    abort_when(
        |s| s["phase"] == "stop-and-copy",
        &[
            "--workload",
            "specjbb",
            "--mem",
            "64MiB",
            "--speed",
            "20",
            "--policy",
            "smart",
            "--optimizations",
            "none",
            "--max-bandwidth",
            "4MB/s",
        ],
        "abortsc",
    );
}

#[test]
fn killing_the_destination_mid_iteration_leaves_the_guest_at_the_source() {
    let mut dst = Daemon::start("kill-dst", 1, true, "");
    let src = Daemon::start("kill-src", 1, false, "");
    let id = start(
        &src,
        &dst,
        &[
            "--workload",
            "tpcw",
            "--mem",
            "128MiB",
            "--max-bandwidth",
            "20MB/s",
        ],
    );
    src.wait_for(&id, 30, |s| {
        s["phase"] == "iterating" && s["wire_bytes"].as_u64().unwrap() > 0
    });
    dst.kill();
    let s = src.wait_for(&id, 60, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(s["error"].as_str().is_some());
    // The source daemon lives on and migrates to a fresh destination.
    let dst2 = Daemon::start("kill-dst2", 1, true, "");
    let next = start(&src, &dst2, &["--workload", "idle", "--mem", "8MiB"]);
    assert_eq!(src.wait_for(&next, 60, is_final)["phase"], "completed");
}

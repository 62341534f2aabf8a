//! Guests that do not converge, between two real skyferryd processes over loopback TCP,
//! driven by the real `skyferry` CLI: the completion timeout with `abort` and with `force`,
//! auto-converge, and the pause ceiling (`--max-downtime`).
//!
//! Waits are on status phases and log lines. Pause lengths are printed, never asserted: they
//! are benchmark figures on a shared host.

use skyferry_tests::{Daemon, is_final};

fn pair(name: &str) -> (Daemon, Daemon) {
    let dst = Daemon::start(&format!("{name}-dst"), 1, true, "");
    let src = Daemon::start(&format!("{name}-src"), 1, false, "");
    (src, dst)
}

fn start(src: &Daemon, dst: &Daemon, args: &[&str]) -> String {
    src.start_migration(dst.listen.expect("destination listens"), args)
}

/// Byte offset of the first line of `log` that contains every one of `words`.
fn line_at(log: &str, words: &[&str]) -> Option<usize> {
    let mut at = 0;
    for line in log.split_inclusive('\n') {
        if words.iter().all(|w| line.contains(w)) {
            return Some(at);
        }
        at += line.len();
    }
    None
}

/// A guest that cannot converge in time: a `--max-downtime` no pause can meet and a
/// completion timeout that falls due during pre-copy.
fn unconverging(action: &str) -> Vec<&str> {
    vec![
        "--workload",
        "tpcw",
        "--mem",
        "32MiB",
        "--max-bandwidth",
        "40Mbit",
        "--max-downtime",
        "1ms",
        // 32 s per GiB: 1 s for this guest.
        "--completion-timeout-per-gib",
        "32s",
        "--completion-action",
        action,
    ]
}

/// Waits until `status` announces the completion action or the migration ended; if it was
/// seen still announced, the CLI's own status line must say what will happen.
fn announced_in_status(src: &Daemon, id: &str, will: &str) {
    let s = src.wait_for(id, 60, |s| !s["completion"].is_null() || is_final(s));
    if s["completion"]["applied"] == false {
        let out = src.cli(&["status", id]);
        let text = String::from_utf8_lossy(&out.stdout);
        // Unless it applied between the two looks.
        if !text.contains("not converged") {
            assert!(text.contains(will), "status announces the action: {text}");
        }
    }
}

#[test]
fn completion_timeout_abort_keeps_the_guest_at_the_source_and_says_why() {
    let (src, dst) = pair("ct-abort");
    let id = start(&src, &dst, &unconverging("abort"));
    announced_in_status(&src, &id, "will abort");
    let s = src.wait_for(&id, 120, is_final);
    assert_eq!(s["phase"], "failed", "{s}");
    let err = s["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("completion timeout reached") && err.contains("keeps running at the source"),
        "{s}"
    );
    assert_ne!(s["verified"], true, "{s}");
    assert!(s["pause_ms"].is_null(), "the guest never paused: {s}");
    let c = &s["completion"];
    assert_eq!(c["action"], "abort", "{s}");
    assert_eq!(c["cause"], "timeout", "{s}");
    assert_eq!(c["applied"], true, "{s}");
    // Announced (the countdown, logged as pre-copy began) before it applied.
    let log = src.log();
    let announced = line_at(&log, &["completion timeout in", "will abort"]);
    let applied = line_at(&log, &["completion timeout reached: aborted"]);
    assert!(
        announced.is_some() && applied.is_some() && announced < applied,
        "announced before applied:\n{log}"
    );
    // The destination discarded its copy.
    let d = dst.wait_for(&id, 30, is_final);
    assert!(d["phase"] == "aborted" || d["phase"] == "failed", "{d}");
    assert_ne!(d["phase"], "completed", "{d}");
}

#[test]
fn completion_timeout_force_pauses_over_the_ceiling_and_completes_verified() {
    let (src, dst) = pair("ct-force");
    let id = start(&src, &dst, &unconverging("force"));
    announced_in_status(&src, &id, "will force the pause");
    let s = src.wait_for(&id, 180, is_final);
    assert_eq!(s["phase"], "completed", "{s}\nsource log:\n{}", src.log());
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["stop_reason"], "forced", "{s}");
    assert_eq!(s["completion"]["applied"], true, "{s}");
    assert_eq!(s["completion"]["action"], "force", "{s}");
    let d = dst.wait_for(&id, 30, is_final);
    assert_eq!(d["phase"], "completed", "{d}");
    let log = src.log();
    assert!(
        line_at(&log, &["completion timeout in", "will force the pause"])
            < line_at(&log, &["completion action force: pausing"]),
        "announced before applied:\n{log}"
    );
    eprintln!(
        "forced pause over a 1 ms ceiling: {} ms, {} bytes while paused",
        s["pause_ms"], s["paused_bytes"]
    );
}

/// `specjbb` rewrites its eden (1.5% of memory, 492 pages here) every 0.1 s, 20 MB/s of
/// mostly new pages: at 40 Mbit/s the eden is dirty again in every iteration, and the pause
/// it would take (its 2 MB, plus the frames queued before the link) exceeds 400 ms.
const HOT: &[&str] = &[
    "--workload",
    "specjbb",
    "--mem",
    "128MiB",
    "--streams",
    "1",
    "--max-bandwidth",
    "40Mbit",
    "--max-downtime",
    "400ms",
];

#[test]
fn auto_converge_throttles_a_guest_that_cannot_converge_then_releases_it() {
    let (src, dst) = pair("autoconv");
    let mut args = HOT.to_vec();
    args.extend(["--auto-converge", "on", "--completion-action", "abort"]);
    let id = start(&src, &dst, &args);
    let s = src.wait_for(&id, 300, |s| {
        s["throttle_percent"].as_u64() > Some(0) || is_final(s)
    });
    if !is_final(&s) {
        let out = src.cli(&["status", &id]);
        let text = String::from_utf8_lossy(&out.stdout);
        if !text.contains("completed") {
            assert!(text.contains("vCPUs throttled"), "{text}");
        }
    }
    let s = src.wait_for(&id, 300, is_final);
    let log = src.log();
    assert_eq!(s["phase"], "completed", "{s}\nsource log:\n{log}");
    assert_eq!(s["verified"], true, "{s}");
    let peak = s["throttle_peak_percent"].as_u64().unwrap();
    assert!(peak >= 20, "auto-converge engaged: {s}");
    assert_eq!(s["throttle_percent"], 0, "released: {s}");
    assert_ne!(s["stop_reason"], "forced", "{s}");
    let predicted = s["expected_downtime_ms"].as_u64().unwrap();
    assert!(
        predicted <= 400,
        "stopped with a pause under the ceiling: {s}"
    );
    let throttled = line_at(&log, &["auto-converge: guest throttled"]);
    let paused = line_at(&log, &["guest paused"]);
    let released = line_at(&log, &["auto-converge: throttle released"]);
    assert!(
        throttled.is_some() && throttled < paused && paused < released,
        "throttled during pre-copy, released at the pause:\n{log}"
    );
    assert_eq!(dst.wait_for(&id, 30, is_final)["phase"], "completed");
    eprintln!(
        "auto-converge: peak throttle {peak} %, {} iterations, stop {}, predicted pause {predicted} ms, \
         measured pause {} ms (ceiling 400 ms)",
        s["iteration"], s["stop_reason"], s["pause_ms"]
    );
}

#[test]
fn without_auto_converge_the_ceiling_holds_and_the_bound_applies_the_action() {
    let (src, dst) = pair("overceil");
    let mut args = HOT.to_vec();
    args.extend(["--auto-converge", "off", "--completion-action", "abort"]);
    let id = start(&src, &dst, &args);
    let s = src.wait_for(&id, 600, is_final);
    assert_eq!(s["phase"], "failed", "{s}\nsource log:\n{}", src.log());
    assert!(
        s["pause_ms"].is_null(),
        "never paused over the ceiling: {s}"
    );
    assert_eq!(s["completion"]["cause"], "over-ceiling", "{s}");
    assert!(
        s["error"]
            .as_str()
            .is_some_and(|e| e.contains("never fit under max_downtime")),
        "{s}"
    );
    assert_eq!(s["throttle_peak_percent"], 0, "{s}");
    let d = dst.wait_for(&id, 30, is_final);
    assert_ne!(d["phase"], "completed", "{d}");
}

#[test]
fn a_converging_guest_stops_once_its_predicted_pause_fits_the_ceiling() {
    let (src, dst) = pair("ceiling");
    let id = start(
        &src,
        &dst,
        &[
            "--workload",
            "kernel",
            "--mem",
            "32MiB",
            "--max-bandwidth",
            "100Mbit",
            "--max-downtime",
            "300ms",
        ],
    );
    let s = src.wait_for(&id, 120, is_final);
    assert_eq!(s["phase"], "completed", "{s}\nsource log:\n{}", src.log());
    assert_eq!(s["verified"], true, "{s}");
    assert_ne!(s["stop_reason"], "forced", "{s}");
    let predicted = s["expected_downtime_ms"].as_u64().unwrap();
    assert!(
        predicted <= 300,
        "the policy stopped under the ceiling: {s}"
    );
    assert!(s["completion"].is_null(), "nothing to announce: {s}");
    eprintln!(
        "ceiling 300 ms: stop {}, predicted pause {predicted} ms, measured pause {} ms",
        s["stop_reason"], s["pause_ms"]
    );
}

/// The KVM micro-VM: its vCPU is a thread of skyferryd, throttled alone through a cgroup v1
/// `cpu` group. A 1 ms ceiling keeps pre-copy going while the guest dirties (at 2 Mbit/s
/// the frames queued before the link take seconds), so the throttle steps up on iteration
/// counts, not on time, until the guest is quiet and the link drained (the predicted pause
/// then fits) or the ceiling's iteration bound forces the pause. Needs
/// /dev/kvm and a cgroup v1 `cpu` controller skyferryd may write; without them it says why
/// and checks nothing.
#[test]
fn auto_converge_throttles_a_kvm_vcpu_thread_and_the_guest_arrives_intact() {
    if let Err(why) = dataplane::guest::kvm::available() {
        eprintln!("skipped: {why}");
        return;
    }
    if !std::path::Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists() {
        eprintln!("skipped: no cgroup v1 cpu controller");
        return;
    }
    let dst = Daemon::start("autoconv-kvm-dst", 1, true, "[kvm]\n");
    let src = Daemon::start("autoconv-kvm-src", 1, false, "");
    let id = start(
        &src,
        &dst,
        &[
            "--guest",
            "kvm",
            "--mem",
            "4MiB",
            "--workload",
            "specjbb",
            "--speed",
            "20",
            "--max-bandwidth",
            "2Mbit",
            "--max-downtime",
            "1ms",
            "--completion-action",
            "force",
            "--auto-converge",
            "on",
        ],
    );
    let s = src.wait_for(&id, 300, |s| is_final(s) && !s["guest_check"].is_null());
    let log = src.log();
    if log.contains("auto-converge off") {
        eprintln!("skipped: skyferryd could not throttle here:\n{log}");
        return;
    }
    assert_eq!(s["phase"], "completed", "{s}\nsource log:\n{log}");
    assert_eq!(s["verified"], true, "{s}");
    assert!(
        s["throttle_peak_percent"].as_u64() >= Some(20),
        "{s}\n{log}"
    );
    assert_eq!(s["throttle_percent"], 0, "released: {s}");
    let d = dst.wait_for(&id, 120, |s| {
        let c = &s["guest_check"];
        !c["failure"].is_null()
            || (!c["bad_pages"].is_null()
                && c["progress"].as_u64() > c["progress_at_switch"].as_u64())
    });
    assert_eq!(d["guest_check"]["bad_pages"], 0, "{d}");
    assert!(d["guest_check"]["failure"].is_null(), "{d}");
    eprintln!(
        "kvm auto-converge: peak throttle {} %, {} iterations, stop {}, pause {} ms",
        s["throttle_peak_percent"], s["iteration"], s["stop_reason"], s["pause_ms"]
    );
}

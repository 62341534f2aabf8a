//! Faults at every phase of a migration between two real skyferryd, with a relay between
//! them that can cut the connections or freeze them (stop forwarding, so the peer stops
//! answering), and SIGKILL of a daemon. Each case must end in a defined state:
//!
//! - before the commit, the guest runs at the source; the destination discards, or, when it
//!   had already said it was ready, holds the guest paused *in doubt* until the operator
//!   resolves it (it cannot know whether the source committed);
//! - after the commit, the source never resumes the guest;
//! - a link cut during pre-copy is not a failure: the source reconnects and goes on.
//!
//! After each case the daemons still work: a next migration completes.
//!
//! Exact moments are reached with the daemons' `SKYFERRY_HOLD` test hook: the source waits
//! at a named point until the test, having struck, creates a file that lets it go on. Every
//! wait is on an event (a log line, a status phase, a file); the bounds on them only catch a
//! migration that never gets there, and are far above what a loaded host needs.

use std::net::SocketAddr;
use std::path::Path;

use skyferry_tests::relay::Relay;
use skyferry_tests::{Daemon, Release, is_final};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Cut,
    Freeze,
    KillDest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Handshake,
    FirstIteration,
    LaterIteration,
    StopAndCopy,
    AfterReady,
    AfterCommit,
}

impl At {
    /// The source's hold point for the phase, if it needs one. In pre-copy the driver holds
    /// once the iteration's pages are handed to the pipeline (which goes on sending them),
    /// so the strike lands inside that iteration, never as pre-copy ends.
    fn hold(self) -> Option<&'static str> {
        match self {
            At::Handshake => None,
            At::FirstIteration => Some("source-iteration-1"),
            At::LaterIteration => Some("source-iteration-2"),
            At::StopAndCopy => Some("source-paused"),
            At::AfterReady => Some("source-ready"),
            At::AfterCommit => Some("source-committed"),
        }
    }
}

/// Generous bound on any one wait: reached only by a migration that never gets there.
const BOUND: u64 = 300;

/// Source arguments: iterations long enough to strike in, and many of them.
const GUEST: &[&str] = skyferry_tests::SLOW_GUEST;

fn start(src: &Daemon, to: SocketAddr, args: &[&str]) -> String {
    src.start_migration(to, args)
}

/// The destination's record of migration `id`, once it has one in a settled phase.
fn dest_settled(dst: &Daemon, id: &str, secs: u64) -> serde_json::Value {
    dst.wait_for(id, secs, |s| is_final(s) || s["phase"] == "in-doubt")
}

/// One case: returns (source status, destination status if it survived).
fn case(at: At, fault: Fault) -> (serde_json::Value, Option<serde_json::Value>) {
    let name = format!("{at:?}-{fault:?}").to_lowercase();
    let mut dst = Daemon::start(&format!("f-{name}-d"), 1, true, "");
    let release = Release::new(&name);
    let hold = at.hold().map(|p| release.hold(p));
    let env: Vec<(&str, &Path)> = hold
        .iter()
        .map(|h| ("SKYFERRY_HOLD", Path::new(h.as_str())))
        .collect();
    let src = Daemon::start_with_env(&format!("f-{name}-s"), 1, false, "", &env);
    let relay = Relay::new(dst.listen.unwrap());
    let strike = |dst: &mut Daemon| match fault {
        Fault::Cut => relay.cut(),
        Fault::Freeze => relay.freeze(),
        Fault::KillDest => dst.kill(),
    };
    if at == At::Handshake {
        // The Hello reaches the destination and the connection is then cut; or nothing
        // passes; or nobody is there.
        match fault {
            Fault::Cut => relay.cut_after_first_bytes(),
            _ => strike(&mut dst),
        }
    }
    let id = start(&src, relay.addr, GUEST);
    if let Some(point) = at.hold() {
        src.wait_log(&format!("holding at {point} "), BOUND);
        if at == At::LaterIteration {
            // Once the destination acknowledged an earlier iteration, as a resumed
            // migration would find it.
            dst.wait_for(&id, BOUND, |d| d["iteration"].as_u64() >= Some(1));
        }
        strike(&mut dst);
        release.go();
    }
    let s = src.wait_for(&id, BOUND, is_final);
    // A Hello that never got through leaves no record at the destination (its connection
    // is dropped once it has said nothing for 5 s).
    let never_arrived = at == At::Handshake && fault == Fault::Freeze;
    let d = (fault != Fault::KillDest && !never_arrived).then(|| dest_settled(&dst, &id, BOUND));
    if never_arrived {
        let out = dst.cli(&["status", &id]);
        assert!(
            !out.status.success(),
            "{name}: the destination has a record"
        );
    }

    // The daemons survive: the source starts the next migration, to a destination that
    // is alive (the same one unless it was killed), straight, not through the relay.
    let fresh;
    let next_dst = if fault == Fault::KillDest {
        fresh = Daemon::start(&format!("f-{name}-d2"), 1, true, "");
        &fresh
    } else {
        &dst
    };
    let next = start(
        &src,
        next_dst.listen.unwrap(),
        &["--workload", "idle", "--mem", "8MiB"],
    );
    let n = src.wait_for(&next, BOUND, is_final);
    assert_eq!(n["phase"], "completed", "{name}: next migration: {n}");
    eprintln!(
        "{name}: source {} ({}); destination {}",
        s["phase"],
        s["error"].as_str().unwrap_or("-"),
        d.as_ref().map_or(
            if never_arrived { "no record" } else { "killed" }.to_string(),
            |d| format!("{} ({})", d["phase"], d["error"].as_str().unwrap_or("-"))
        )
    );
    (s, d)
}

/// Before the destination said it was ready: the guest runs at the source, the
/// destination discards. (A fault meant for the pre-copy may land just after the
/// destination's Ready, if the migration was about to end: the destination then holds the
/// guest in doubt, paused, which is as safe.) In pre-copy a cut link resumes instead
/// (`tests/resume.rs` measures it): the migration completes, verified.
fn before_ready(at: At) {
    let precopy = matches!(at, At::FirstIteration | At::LaterIteration);
    for fault in [Fault::Cut, Fault::Freeze, Fault::KillDest] {
        let (s, d) = case(at, fault);
        if precopy && fault == Fault::Cut {
            assert_eq!(s["phase"], "completed", "{at:?}/{fault:?}: resumed: {s}");
            assert_eq!(s["verified"], true, "{at:?}/{fault:?}: {s}");
            assert!(s["resumes"].as_u64() >= Some(1), "{at:?}/{fault:?}: {s}");
            let d = d.expect("the destination lives");
            assert_eq!(d["phase"], "completed", "{at:?}/{fault:?}: {d}");
            continue;
        }
        assert!(
            s["phase"] == "failed" || s["phase"] == "aborted",
            "{at:?}/{fault:?}: the guest must run at the source: {s}"
        );
        assert_ne!(s["verified"], true, "{at:?}/{fault:?}: {s}");
        if let Some(d) = d {
            assert!(
                d["phase"] == "failed" || d["phase"] == "in-doubt",
                "{at:?}/{fault:?}: the destination discards: {d}"
            );
        }
    }
}

#[test]
fn faults_in_the_handshake() {
    before_ready(At::Handshake);
}

#[test]
fn faults_in_the_first_iteration() {
    before_ready(At::FirstIteration);
}

#[test]
fn faults_in_a_later_iteration() {
    before_ready(At::LaterIteration);
}

#[test]
fn faults_in_the_stop_and_copy() {
    before_ready(At::StopAndCopy);
}

#[test]
fn faults_after_the_destination_is_ready() {
    // A cut or a killed destination is seen before the commit: the guest stays at the
    // source. The destination that lost the source after Ready cannot know that, so it
    // holds the guest in doubt; the operator discards it there.
    for fault in [Fault::Cut, Fault::KillDest] {
        let (s, d) = case(At::AfterReady, fault);
        assert_eq!(s["phase"], "failed", "{fault:?}: {s}");
        if let Some(d) = d {
            assert_eq!(d["phase"], "in-doubt", "{fault:?}: {d}");
        }
    }
    // A frozen link hides the destination's state: the source commits, Commit never
    // arrives. The source never resumes the guest, the destination holds it in doubt,
    // and the operator starts it there: it then runs on exactly one host.
    let name = "afterready-freeze-resolve";
    let dst = Daemon::start(&format!("{name}-d"), 1, true, "");
    let release = Release::new(name);
    let hold = release.hold("source-ready");
    let src = Daemon::start_with_env(
        &format!("{name}-s"),
        1,
        false,
        "",
        &[("SKYFERRY_HOLD", Path::new(&hold))],
    );
    let relay = Relay::new(dst.listen.unwrap());
    let id = start(&src, relay.addr, GUEST);
    src.wait_log("holding at source-ready ", BOUND);
    relay.freeze();
    release.go();
    let s = src.wait_for(&id, BOUND, is_final);
    assert_eq!(s["phase"], "committed-unconfirmed", "{s}");
    let d = dest_settled(&dst, &id, BOUND);
    assert_eq!(d["phase"], "in-doubt", "{d}");
    let out = dst.cli(&["resolve", &id, "--start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = dst.status(&id);
    assert_eq!(d["phase"], "completed", "{d}");
    // Resolving twice is refused.
    let out = dst.cli(&["resolve", &id, "--discard"]);
    assert!(!out.status.success());
}

#[test]
fn faults_after_the_commit() {
    // The source never resumes the guest once it committed.
    for fault in [Fault::Cut, Fault::Freeze, Fault::KillDest] {
        let (s, d) = case(At::AfterCommit, fault);
        assert!(
            s["phase"] == "completed" || s["phase"] == "committed-unconfirmed",
            "{fault:?}: {s}"
        );
        // The Commit left the source but the relay may not have passed it on before the
        // cut: then the destination holds the guest in doubt, and the source's
        // committed-unconfirmed tells the operator to start it there (as tested above).
        if let Some(d) = d {
            assert!(
                d["phase"] == "completed"
                    || (d["phase"] == "in-doubt" && s["phase"] == "committed-unconfirmed"),
                "{fault:?}: {d}"
            );
            assert_eq!(d["verified"], true);
        }
    }
}

#[test]
fn a_killed_source_leaves_nothing_at_the_destination() {
    let dst = Daemon::start("f-killsrc-d", 1, true, "");
    let mut src = Daemon::start("f-killsrc-s", 1, false, "");
    let id = start(&src, dst.listen.unwrap(), GUEST);
    src.wait_for(&id, BOUND, |s| {
        s["phase"] == "iterating" && s["wire_bytes"].as_u64() > Some(1 << 20)
    });
    src.kill();
    let d = dest_settled(&dst, &id, BOUND);
    assert_eq!(d["phase"], "failed", "{d}");
    let src = Daemon::start("f-killsrc-s2", 1, false, "");
    let next = start(
        &src,
        dst.listen.unwrap(),
        &["--workload", "idle", "--mem", "8MiB"],
    );
    assert_eq!(src.wait_for(&next, BOUND, is_final)["phase"], "completed");
}

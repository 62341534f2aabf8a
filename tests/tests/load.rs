//! Eight migrations at once through one pair of real skyferryd: the destination receives
//! them all at the same time (one migration port, data streams routed by migration id).

use skyferry_tests::{Daemon, is_final};

const MIGRATIONS: usize = 8;
const GUEST_MIB: u64 = 32;
const CACHE_MIB: u64 = 4;
const STREAMS: u64 = 2;

#[test]
fn eight_concurrent_migrations_all_verify_with_bounded_memory() {
    let extra = format!("cache = \"{CACHE_MIB}MiB\"\n");
    let dst = Daemon::start("load-dst", 1, true, &extra);
    let src = Daemon::start("load-src", 1, false, &extra);
    let to = dst.listen.unwrap().to_string();
    let workloads = ["kernel", "tpcw", "specjbb", "idle"];
    let ids: Vec<String> = (0..MIGRATIONS)
        .map(|i| {
            let (mem, seed, name) = (
                format!("{GUEST_MIB}MiB"),
                i.to_string(),
                format!("load-{i}"),
            );
            src.start_migration(
                &to,
                &[
                    "--workload",
                    workloads[i % workloads.len()],
                    "--mem",
                    &mem,
                    "--seed",
                    &seed,
                    "--name",
                    &name,
                    // Slow enough that all eight are under way together.
                    "--max-bandwidth",
                    "24MB/s",
                ],
            )
        })
        .collect();

    // Watch the destination: how many it receives at once.
    let mut most_at_once = 0;
    loop {
        let out = dst.cli(&["status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let active = v["migrations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["id"] != "0" && !is_final(m))
            .count();
        most_at_once = most_at_once.max(active);
        let done = ids.iter().filter(|id| is_final(&src.status(id))).count();
        if done == MIGRATIONS {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    for id in &ids {
        let s = src.wait_for(id, 300, is_final);
        assert_eq!(s["phase"], "completed", "{s}\n{}", dst.log());
        assert_eq!(s["verified"], true, "{s}");
        let d = dst.wait_for(id, 30, is_final);
        assert_eq!(d["phase"], "completed", "{d}");
    }
    assert!(
        most_at_once >= 2,
        "the destination received at most {most_at_once} at once"
    );

    // Memory: guest memory (the destination holds every guest it received; the source its
    // guests until each commits), the block caches (one per stream, each end), and a fixed
    // overhead for everything else. Measured here: see the note printed below.
    let mib = 1 << 20;
    let guests = MIGRATIONS as u64 * GUEST_MIB * mib;
    let caches = MIGRATIONS as u64 * STREAMS * CACHE_MIB * mib;
    let overhead = 128 * mib;
    for (who, d) in [("source", &src), ("destination", &dst)] {
        let peak = d.peak_rss();
        eprintln!(
            "{who}: peak RSS {} MiB (guests {} MiB, caches {} MiB)",
            peak / mib,
            guests / mib,
            caches / mib
        );
        assert!(
            peak <= guests + caches + overhead,
            "{who}: peak RSS {} MiB exceeds guests + caches + {} MiB",
            peak / mib,
            overhead / mib
        );
    }
    eprintln!("destination received up to {most_at_once} migrations at once");
}

//! The Prometheus endpoint of two real skyferryd, scraped over HTTP while a migration runs
//! between them and after it ends: names, types and values against `status --json`, and the
//! page against `promtool check metrics` (Debian's `prometheus` package), and its timeline
//! drawn by `skyferry report`. Also admission: a source whose limit is one migration queues
//! the second, with its place in `status`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skyferry_tests::{Daemon, free_port, is_final};

/// A guest slow enough to be caught mid-migration.
const GUEST: &[&str] = skyferry_tests::SLOW_GUEST;

/// A daemon serving metrics on a port of its own, once it says it does.
fn with_metrics(name: &str, listen: bool, source_keys: &str) -> (Daemon, u16) {
    let port = free_port();
    let d = Daemon::start(
        name,
        1,
        listen,
        &format!("{source_keys}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    d.wait_log("metrics on http://", 120);
    (d, port)
}

/// `GET /metrics`: the body, after checking the status line and the content type.
fn scrape(port: u16) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    c.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.to_string()
}

/// Scrapes until `key` reads `want`: the totals count a migration just after its status
/// turned final.
fn scrape_until(port: u16, key: &str, want: f64) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = parse(&scrape(port));
        if m.samples.get(key) == Some(&want) {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{key} never read {want}: {:?}",
            m.samples.get(key)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The samples of a scrape by `name{labels}`, and the type of each family.
struct Scrape {
    samples: HashMap<String, f64>,
    types: HashMap<String, String>,
}

fn parse(text: &str) -> Scrape {
    let mut samples = HashMap::new();
    let mut types = HashMap::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (key, value) = line.rsplit_once(' ').unwrap();
            samples.insert(key.to_string(), value.parse().unwrap());
        }
    }
    Scrape { samples, types }
}

impl Scrape {
    fn get(&self, key: &str) -> f64 {
        *self
            .samples
            .get(key)
            .unwrap_or_else(|| panic!("no sample {key} in the scrape"))
    }
}

/// `promtool check metrics` on a scrape: exit 0, nothing to say.
fn promtool(text: &str) {
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; tests/run installs it)");
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn u(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("a number, got {v}"))
}

#[test]
fn a_live_migrations_metrics_match_its_status() {
    let (dst, dst_port) = with_metrics("m-live-d", true, "");
    let (src, src_port) = with_metrics("m-live-s", false, "");
    let id = src.start_migration(dst.listen.unwrap(), GUEST);
    // Mid pre-copy, after an iteration measured its dirty rate.
    let before = src.wait_for(&id, 60, |s| {
        is_final(s) || (s["phase"] == "iterating" && s["iteration"].as_u64() >= Some(2))
    });
    assert_eq!(
        before["phase"], "iterating",
        "caught mid-migration: {before}"
    );
    let text = scrape(src_port);
    let after = src.status(&id);
    promtool(&text);
    let m = parse(&text);

    // One id form: the JSON's string is the label.
    assert_eq!(before["id"].as_str(), Some(id.as_str()));
    assert_eq!(before["schema_version"], 2);
    let l = format!("{{id=\"{id}\",role=\"source\"}}");
    for (name, kind) in [
        ("skyferry_migration_data_processed_bytes", "gauge"),
        ("skyferry_migration_data_remaining_bytes", "gauge"),
        ("skyferry_migration_wire_bytes", "gauge"),
        ("skyferry_migration_dirty_memory_rate_bytes", "gauge"),
        ("skyferry_migration_memory_transfer_rate_bytes", "gauge"),
        ("skyferry_migration_phase", "gauge"),
        ("skyferry_migration_saved_bytes", "gauge"),
        ("skyferry_migrations_succeeded_total", "counter"),
        ("skyferry_migrations_failed_total", "counter"),
        ("skyferry_keyless_connections_refused_total", "counter"),
        ("skyferry_wire_bytes_total", "counter"),
    ] {
        assert_eq!(m.types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // Constant figures are equal; growing ones lie between the two status reads around
    // the scrape.
    assert_eq!(
        m.get(&format!("skyferry_migration_data_total_bytes{l}")),
        u(&before["data_total_bytes"])
    );
    for (metric, field) in [
        ("skyferry_migration_wire_bytes", "wire_bytes"),
        (
            "skyferry_migration_data_processed_bytes",
            "data_processed_bytes",
        ),
        ("skyferry_migration_iterations", "iteration"),
    ] {
        let v = m.get(&format!("{metric}{l}"));
        assert!(
            u(&before[field]) <= v && v <= u(&after[field]),
            "{metric} {v} outside {field} {} ..= {}",
            before[field],
            after[field]
        );
    }
    assert!(u(&before["wire_bytes"]) > 0.0);
    assert!(m.get(&format!("skyferry_migration_dirty_memory_rate_bytes{l}")) > 0.0);
    if after["phase"] == "iterating" {
        let phase = |p: &str| {
            m.get(&format!(
                "skyferry_migration_phase{{id=\"{id}\",phase=\"{p}\",role=\"source\"}}"
            ))
        };
        assert_eq!(phase("iterating"), 1.0);
        assert_eq!(phase("completed"), 0.0);
        assert_eq!(m.get("skyferry_migrations{phase=\"iterating\"}"), 1.0);
    }
    assert_eq!(m.get("skyferry_migrations_succeeded_total"), 0.0);

    // Once it ended, the totals count it, at both ends.
    let end = src.wait_for(&id, 120, is_final);
    assert_eq!(end["phase"], "completed", "{end}");
    let m = scrape_until(src_port, "skyferry_migrations_succeeded_total", 1.0);
    assert_eq!(
        m.get("skyferry_wire_bytes_total{direction=\"sent\"}"),
        u(&end["wire_bytes"])
    );
    assert_eq!(
        m.get(&format!("skyferry_migration_downtime_seconds{l}")),
        u(&end["pause_ms"]) / 1000.0
    );
    let arrived = dst.wait_for(&id, 30, is_final);
    assert_eq!(arrived["phase"], "completed", "{arrived}");
    // The destination shows what it received, and nothing left.
    assert_eq!(arrived["remaining"], 0, "{arrived}");
    assert!(
        u(&arrived["pages_sent"]) >= u(&arrived["guest_pages"]),
        "{arrived}"
    );
    scrape_until(dst_port, "skyferry_migrations_succeeded_total", 1.0);
    let text = scrape(dst_port);
    promtool(&text);
    let m = parse(&text);
    assert_eq!(m.get("skyferry_migrations_succeeded_total"), 1.0);
    assert_eq!(
        m.get("skyferry_wire_bytes_total{direction=\"received\"}"),
        u(&arrived["wire_bytes"])
    );
    assert_eq!(
        m.get(&format!(
            "skyferry_migration_phase{{id=\"{id}\",phase=\"completed\",role=\"destination\"}}"
        )),
        1.0
    );
    // Its timeline, as a picture.
    let svg = src.dir.join("timeline.svg");
    let out = src.cli(&["report", &id, "--svg", svg.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let picture = std::fs::read_to_string(&svg).expect("the SVG");
    assert!(picture.starts_with("<svg"), "an SVG");
    assert!(
        picture.contains(&format!("migration {id}")),
        "titled with the id"
    );
    assert!(picture.contains("guest paused"), "shows the pause");
    // The destination's log lines name the migration.
    let log = dst.log();
    assert!(
        log.lines()
            .any(|l| l.contains("final frames decoded") && l.contains(&id)),
        "{log}"
    );
}

#[test]
fn beyond_its_limit_a_source_queues_migrations_and_runs_them_in_turn() {
    let dst = Daemon::start("m-queue-d", 1, true, "");
    let (src, port) = with_metrics("m-queue-s", false, "max_migrations = 1\nqueue = 4");
    let first = src.start_migration(dst.listen.unwrap(), GUEST);
    let second = src.start_migration(dst.listen.unwrap(), GUEST);
    let waiting = src.wait_for(&second, 30, |s| s["phase"] == "queued" || is_final(s));
    assert_eq!(waiting["phase"], "queued", "{waiting}");
    assert_eq!(waiting["queue_position"], 1, "{waiting}");
    let m = parse(&scrape(port));
    assert_eq!(
        m.get("skyferry_admission_queued{direction=\"outbound\"}"),
        1.0
    );
    assert_eq!(
        m.get("skyferry_admission_running{direction=\"outbound\"}"),
        1.0
    );
    // The second runs once the first ended, and completes too.
    let one = src.wait_for(&first, 120, is_final);
    assert_eq!(one["phase"], "completed", "{one}");
    let two = src.wait_for(&second, 120, is_final);
    assert_eq!(two["phase"], "completed", "{two}");
    assert!(two["queue_position"].is_null(), "{two}");
    assert!(
        u(&two["started_at_ms"]) >= u(&one["ended_at_ms"]),
        "the second started after the first ended: {one} {two}"
    );
}

#[test]
fn pages_sent_moves_during_the_first_iteration_and_an_abort_is_counted() {
    let dst = Daemon::start("m-first-d", 1, true, "");
    let (src, port) = with_metrics("m-first-s", false, "");
    // 48 MiB at 8 MB/s: iteration 1 lasts seconds, longer on a busier host.
    let mut args = GUEST.to_vec();
    *args.last_mut().unwrap() = "8MB/s";
    let id = src.start_migration(dst.listen.unwrap(), &args);
    let s = src.wait_for(&id, 60, |s| {
        is_final(s) || s["iteration"].as_u64() > Some(1) || s["pages_sent"].as_u64() > Some(0)
    });
    assert_eq!(s["iteration"], 1, "still in iteration 1: {s}");
    assert!(
        s["pages_sent"].as_u64() < s["guest_pages"].as_u64(),
        "part of the guest: {s}"
    );
    assert!(u(&s["data_processed_bytes"]) > 0.0, "{s}");
    let out = src.cli(&["abort", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let end = src.wait_for(&id, 60, is_final);
    assert_eq!(end["phase"], "aborted", "{end}");
    assert!(end["ended_at_ms"].is_u64(), "{end}");
    let m = scrape_until(port, "skyferry_migrations_aborted_total", 1.0);
    assert_eq!(m.get("skyferry_migrations_succeeded_total"), 0.0);
}

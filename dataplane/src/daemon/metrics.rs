//! The Prometheus endpoint (`[metrics] listen`): per-migration gauges in KubeVirt's
//! vocabulary under a `skyferry_` prefix, and this daemon's totals. Names are in base units
//! (bytes, seconds), counters end in `_total`, and the only labels are the migration's id and
//! role, its phase, and fixed sets (optimization, direction): nothing a guest or a peer
//! chooses. Each scrape renders the registry's statuses afresh, so a migration the registry
//! forgets leaves the scrape with it; the totals live here, in atomics, and only grow.
//! Served in Prometheus' text format 0.0.4, which every scraper and `promtool` read.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus::core::Collector;
use prometheus::{Encoder, GaugeVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, TextEncoder};

use super::admission::Admission;
use crate::migrate::converge::{CompletionAction, CompletionCause};
use crate::migrate::{MigrationId, MigrationStatus, Phase, Role};

/// This daemon's totals since it started.
#[derive(Debug, Default)]
pub struct Totals {
    succeeded: AtomicU64,
    failed: AtomicU64,
    aborted: AtomicU64,
    resumed: AtomicU64,
    sent_bytes: AtomicU64,
    received_bytes: AtomicU64,
    keyless_refused: AtomicU64,
}

/// The daemon's totals (one daemon per process).
pub static TOTALS: Totals = Totals {
    succeeded: AtomicU64::new(0),
    failed: AtomicU64::new(0),
    aborted: AtomicU64::new(0),
    resumed: AtomicU64::new(0),
    sent_bytes: AtomicU64::new(0),
    received_bytes: AtomicU64::new(0),
    keyless_refused: AtomicU64::new(0),
};

/// Counts a connection refused because its peer did not prove the pre-shared key (called by
/// the migration port's handshake).
pub fn count_keyless_refused() {
    TOTALS.keyless_refused.fetch_add(1, Ordering::Relaxed);
}

/// Counts a migration that ended here (call once, with its final status).
pub fn count_ended(s: &MigrationStatus) {
    let t = &TOTALS;
    match s.phase {
        Phase::Completed | Phase::CommittedUnconfirmed => &t.succeeded,
        Phase::Aborted => &t.aborted,
        _ => &t.failed,
    }
    .fetch_add(1, Ordering::Relaxed);
    t.resumed.fetch_add(u64::from(s.resumes), Ordering::Relaxed);
    match s.role {
        Role::Source => &t.sent_bytes,
        Role::Destination => &t.received_bytes,
    }
    .fetch_add(s.wire_bytes, Ordering::Relaxed);
}

/// Every phase, in the order `status` documents them (for the phase state sets).
const PHASES: [Phase; 12] = [
    Phase::Queued,
    Phase::Connecting,
    Phase::Preparing,
    Phase::Iterating,
    Phase::Reconnecting,
    Phase::StopAndCopy,
    Phase::Verifying,
    Phase::Completed,
    Phase::Aborted,
    Phase::Failed,
    Phase::CommittedUnconfirmed,
    Phase::InDoubt,
];

/// A phase's name as `status --json` writes it.
fn phase_name(p: Phase) -> String {
    serde_json::to_value(p)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

fn ms_to_s(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// The scrape: metrics of `statuses` and of this daemon, in the text format.
pub fn render(statuses: &[MigrationStatus], admission: Option<&Admission>) -> String {
    let mut families = Vec::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        GaugeVec::new(Opts::new(name, help), labels).expect("valid metric")
    };
    let ids = ["id", "role"];
    let per = [
        (
            "skyferry_migration_data_total_bytes",
            "Guest memory of the migration.",
        ),
        (
            "skyferry_migration_data_processed_bytes",
            "Guest memory sent so far, all iterations, before the codec.",
        ),
        (
            "skyferry_migration_data_remaining_bytes",
            "Guest memory left to send in this iteration or the next.",
        ),
        (
            "skyferry_migration_wire_bytes",
            "Bytes on the wire so far (after the codec, compression and sealing).",
        ),
        (
            "skyferry_migration_dirty_memory_rate_bytes",
            "Guest memory dirtied per second during the last finished iteration.",
        ),
        (
            "skyferry_migration_memory_transfer_rate_bytes",
            "Bytes on the wire per second during the current (or last) iteration.",
        ),
        (
            "skyferry_migration_link_rate_bytes",
            "Bytes on the wire per second over pre-copy so far: the stop policy's rate.",
        ),
        (
            "skyferry_migration_iterations",
            "The current (or last) iteration.",
        ),
        (
            "skyferry_migration_expected_downtime_seconds",
            "Expected pause if the guest stopped now.",
        ),
        (
            "skyferry_migration_downtime_seconds",
            "How long the guest was paused (once known).",
        ),
        (
            "skyferry_migration_time_remaining_seconds",
            "Estimated time to completion.",
        ),
        (
            "skyferry_migration_elapsed_seconds",
            "Time since the migration started.",
        ),
        (
            "skyferry_migration_start_time_seconds",
            "When the migration started, seconds since the Unix epoch.",
        ),
        (
            "skyferry_migration_end_time_seconds",
            "When the migration ended, seconds since the Unix epoch.",
        ),
        (
            "skyferry_migration_queue_position",
            "Place in this host's admission queue while the migration waits (1 = next).",
        ),
        (
            "skyferry_migration_vcpu_throttle_ratio",
            "How much auto-converge throttles the guest's vCPUs now (0 to 0.99).",
        ),
        (
            "skyferry_migration_completion_timeout_remaining_seconds",
            "Time left before the completion timeout's action applies (while it counts down).",
        ),
    ];
    let vecs: Vec<GaugeVec> = per.iter().map(|(n, h)| gauge(n, h, &ids)).collect();
    let saved = gauge(
        "skyferry_migration_saved_bytes",
        "Bytes each optimization kept off the wire.",
        &["id", "role", "optimization"],
    );
    let action = gauge(
        "skyferry_migration_completion_action",
        "The completion action announced for the migration (0) or taken (1), by action.",
        &["id", "role", "action"],
    );
    let phase = gauge(
        "skyferry_migration_phase",
        "1 for the migration's current phase, 0 for the others.",
        &["id", "role", "phase"],
    );
    let per_phase = IntGaugeVec::new(
        Opts::new(
            "skyferry_migrations",
            "Migrations this daemon knows of, per phase.",
        ),
        &["phase"],
    )
    .expect("valid metric");
    for p in PHASES {
        per_phase
            .with_label_values(&[phase_name(p).as_str()])
            .set(0);
    }
    for s in statuses {
        let id = MigrationId(s.id).to_string();
        let labels = [id.as_str(), role_name(s.role)];
        let j = &s.job;
        let countdown = s
            .completion
            .filter(|n| !n.applied && n.cause == CompletionCause::Timeout)
            .and_then(|n| n.in_ms);
        let values: [Option<f64>; 17] = [
            Some(j.data_total_bytes as f64),
            Some(j.data_processed_bytes as f64),
            Some(j.data_remaining_bytes as f64),
            Some(s.wire_bytes as f64),
            Some(j.dirty_rate_bps),
            Some(j.transfer_rate_bps),
            Some(j.link_rate_bps),
            Some(f64::from(s.iteration)),
            s.expected_downtime_ms.map(ms_to_s),
            s.pause_ms.map(ms_to_s),
            s.eta_ms.map(ms_to_s),
            Some(ms_to_s(s.elapsed_ms)),
            Some(ms_to_s(j.started_at_ms)),
            j.ended_at_ms.map(ms_to_s),
            j.queue_position.map(f64::from),
            Some(f64::from(s.throttle_percent) / 100.0),
            countdown.map(ms_to_s),
        ];
        for (v, value) in vecs.iter().zip(values) {
            if let Some(value) = value {
                v.with_label_values(&labels).set(value);
            }
        }
        for (name, bytes) in [
            ("zero", s.saved.zero),
            ("cbr", s.saved.cbr),
            ("delta", s.saved.delta),
            ("compress", s.saved.compress),
        ] {
            saved
                .with_label_values(&[labels[0], labels[1], name])
                .set(bytes as f64);
        }
        if let Some(n) = s.completion {
            let name = match n.action {
                CompletionAction::Abort => "abort",
                CompletionAction::Force => "force",
            };
            action
                .with_label_values(&[labels[0], labels[1], name])
                .set(if n.applied { 1.0 } else { 0.0 });
        }
        for p in PHASES {
            let name = phase_name(p);
            phase
                .with_label_values(&[labels[0], labels[1], name.as_str()])
                .set(if p == s.phase { 1.0 } else { 0.0 });
        }
        per_phase
            .with_label_values(&[phase_name(s.phase).as_str()])
            .inc();
    }
    for v in vecs.iter().chain([&saved, &action, &phase]) {
        families.extend(v.collect());
    }
    families.extend(per_phase.collect());

    let t = &TOTALS;
    let counter = |name: &str, help: &str, v: &AtomicU64| {
        let c = IntCounter::new(name, help).expect("valid metric");
        c.inc_by(v.load(Ordering::Relaxed));
        c.collect()
    };
    families.extend(counter(
        "skyferry_migrations_succeeded_total",
        "Migrations that ended with the guest running at the destination.",
        &t.succeeded,
    ));
    families.extend(counter(
        "skyferry_migrations_failed_total",
        "Migrations that failed (the guest stayed at, or went back to, the source).",
        &t.failed,
    ));
    families.extend(counter(
        "skyferry_migrations_aborted_total",
        "Migrations the operator aborted.",
        &t.aborted,
    ));
    families.extend(counter(
        "skyferry_migrations_resumed_total",
        "Times an ended migration's pre-copy resumed after its link broke.",
        &t.resumed,
    ));
    families.extend(counter(
        "skyferry_keyless_connections_refused_total",
        "Connections to the migration port refused because the peer did not prove the key.",
        &t.keyless_refused,
    ));
    let wire = IntCounterVec::new(
        Opts::new(
            "skyferry_wire_bytes_total",
            "Bytes on the wire of ended migrations, by direction.",
        ),
        &["direction"],
    )
    .expect("valid metric");
    wire.with_label_values(&["sent"])
        .inc_by(t.sent_bytes.load(Ordering::Relaxed));
    wire.with_label_values(&["received"])
        .inc_by(t.received_bytes.load(Ordering::Relaxed));
    families.extend(wire.collect());
    if let Some(a) = admission {
        let g = IntGaugeVec::new(
            Opts::new(
                "skyferry_admission_running",
                "Migrations holding one of this host's slots, by direction.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        let q = IntGaugeVec::new(
            Opts::new(
                "skyferry_admission_queued",
                "Migrations waiting for a slot, by direction.",
            ),
            &["direction"],
        )
        .expect("valid metric");
        for (dir, gate) in [("outbound", &a.outbound), ("inbound", &a.inbound)] {
            g.with_label_values(&[dir])
                .set(i64::try_from(gate.running()).unwrap_or(i64::MAX));
            q.with_label_values(&[dir])
                .set(i64::try_from(gate.queued()).unwrap_or(i64::MAX));
        }
        families.extend(g.collect());
        families.extend(q.collect());
    }
    // A family none of whose samples is known yet (no pause measured) is left out whole.
    families.retain(|f| !f.get_metric().is_empty());
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut out)
        .expect("encoding to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

/// Serves `GET /metrics` on `addr` from a thread of its own; `scrape` renders the page.
pub fn serve(
    addr: SocketAddr,
    scrape: Arc<dyn Fn() -> String + Send + Sync>,
) -> Result<SocketAddr, String> {
    let server = tiny_http::Server::http(addr).map_err(|e| format!("metrics on {addr}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| format!("metrics on {addr}: not an IP address"))?;
    std::thread::Builder::new()
        .name("sf-metrics".into())
        .spawn(move || {
            for req in server.incoming_requests() {
                let path = req.url().split('?').next().unwrap_or("");
                let response = if *req.method() != tiny_http::Method::Get {
                    tiny_http::Response::from_string("only GET\n").with_status_code(405)
                } else if path == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        &b"Content-Type"[..],
                        prometheus::TEXT_FORMAT.as_bytes(),
                    )
                    .expect("a valid header");
                    tiny_http::Response::from_string(scrape()).with_header(header)
                } else {
                    tiny_http::Response::from_string("see /metrics\n").with_status_code(404)
                };
                if let Err(e) = req.respond(response) {
                    tracing::debug!("answering a metrics scrape: {e}");
                }
            }
        })
        .map_err(|e| e.to_string())?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_names_each_migration_by_id_and_role_and_sets_its_phase() {
        let mut s = MigrationStatus::new(0xbeef, Role::Source, "guest \"free text\"", 256);
        s.phase = Phase::Iterating;
        s.pages_sent = 100;
        s.remaining = 156;
        s.wire_bytes = 123_456;
        s.saved.cbr = 777;
        s.derive_job();
        let text = render(&[s], None);
        assert!(text.contains(
            "skyferry_migration_data_processed_bytes{id=\"beef\",role=\"source\"} 409600"
        ));
        assert!(text.contains("skyferry_migration_wire_bytes{id=\"beef\",role=\"source\"} 123456"));
        assert!(text.contains(
            "skyferry_migration_saved_bytes{id=\"beef\",optimization=\"cbr\",role=\"source\"} 777"
        ));
        assert!(text.contains(
            "skyferry_migration_phase{id=\"beef\",phase=\"iterating\",role=\"source\"} 1"
        ));
        assert!(text.contains(
            "skyferry_migration_phase{id=\"beef\",phase=\"completed\",role=\"source\"} 0"
        ));
        assert!(text.contains("skyferry_migrations{phase=\"iterating\"} 1"));
        assert!(text.contains("# TYPE skyferry_migrations_succeeded_total counter"));
        // The guest's label is the operator's free text: never a label value.
        assert!(!text.contains("free text"));
        // Not known yet: no sample rather than a made-up 0.
        assert!(!text.contains("skyferry_migration_downtime_seconds{"));
        assert!(!text.contains("skyferry_migration_completion_timeout_remaining_seconds{"));
    }

    #[test]
    fn the_completion_countdown_its_action_and_the_throttle_are_scraped() {
        use crate::migrate::converge::CompletionNotice;
        let mut s = MigrationStatus::new(0xcafe, Role::Source, "g", 256);
        s.phase = Phase::Iterating;
        s.throttle_percent = 40;
        s.completion = Some(CompletionNotice {
            action: CompletionAction::Abort,
            cause: CompletionCause::Timeout,
            in_ms: Some(12_000),
            iterations_left: None,
            applied: false,
        });
        let text = render(&[s], None);
        let has = |line: &str| assert!(text.contains(line), "{line}\n{text}");
        has("skyferry_migration_vcpu_throttle_ratio{id=\"cafe\",role=\"source\"} 0.4");
        has(
            "skyferry_migration_completion_timeout_remaining_seconds{id=\"cafe\",role=\"source\"} 12",
        );
        has("skyferry_migration_completion_action{action=\"abort\",id=\"cafe\",role=\"source\"} 0");
    }
}

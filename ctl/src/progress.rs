//! Live progress of one migration and its final summary, for `skyferry demo` and `watch`.
//!
//! [`Progress`] takes [`MigrationStatus`] snapshots as often as the caller polls and shows
//! them one of three ways ([`Style`]): on a terminal, a block of four lines redrawn in place
//! (phase, pages, bytes, estimates) under a log of finished iterations, drawn by `indicatif`
//! (which owns the cursor: redraws, log lines above the block, clearing at the end);
//! elsewhere (a pipe, a file, CI, `NO_COLOR`), plain lines, one per finished iteration and
//! one per phase change; or nothing. What the lines say, and the summary table, are
//! skyferry's own: no crate knows a migration's phases.
//!
//! The driver updates the status at iteration boundaries, so a snapshot shows the last
//! finished iteration; an iteration that starts and ends between two polls gets a short line
//! (the summary's iteration table has its figures). The elapsed time runs on between
//! updates, counted here.
//!
//! [`summary_table`] renders the end result: one row per iteration, then totals in human
//! units.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::time::{Duration, Instant};

use dataplane::codec::CodecStats;
use dataplane::migrate::source::IterationRecord;
use dataplane::migrate::{MigrationStatus, Phase, Role, StopReason};
use dataplane::page::PAGE_SIZE;
use dataplane::protocol::text::escape;
use dataplane::units::{format_duration, format_rate, format_size};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// A terminal: a status block redrawn in place under a log of iterations.
    Live,
    /// Not a terminal: a plain line per finished iteration and per phase change.
    Lines,
    /// Nothing.
    Quiet,
}

/// A live progress display for one migration.
pub struct Progress {
    /// Where plain lines go (style `Lines`).
    out: Box<dyn Write + Send>,
    /// The live block (style `Live`).
    bar: Option<ProgressBar>,
    style: Style,
    /// Terminal columns; status lines are cut to fit so the redraw never wraps.
    width: usize,
    seen: Seen,
    /// The last `elapsed_ms` seen and when: the clock runs on between status updates.
    clock: Option<(u64, Instant)>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("style", &self.style)
            .field("width", &self.width)
            .field("live", &self.bar.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

impl Progress {
    /// Progress on standard output: live on a terminal, plain lines otherwise (and with
    /// `NO_COLOR` or `TERM=dumb`, which ask for output without terminal escapes).
    pub fn new() -> Self {
        let out = std::io::stdout();
        if live_allowed(out.is_terminal()) {
            Self::live(ProgressDrawTarget::stdout(), terminal_width())
        } else {
            Self::with_writer(Box::new(out), Style::Lines, terminal_width())
        }
    }

    /// Progress on standard error, live on a terminal and silent otherwise (for commands
    /// whose standard output carries JSON); plain lines on a terminal that asks for no
    /// escapes.
    pub fn stderr() -> Self {
        let out = std::io::stderr();
        let style = match (out.is_terminal(), live_allowed(out.is_terminal())) {
            (_, true) => return Self::live(ProgressDrawTarget::stderr(), terminal_width()),
            (true, false) => Style::Lines,
            (false, _) => Style::Quiet,
        };
        Self::with_writer(Box::new(out), style, terminal_width())
    }

    /// The live block on `target` (a terminal), lines cut to `width` columns.
    pub fn live(target: ProgressDrawTarget, width: usize) -> Self {
        let bar = ProgressBar::with_draw_target(None, target);
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg}")
                .expect("a valid template")
                .tick_chars("|/-\\ "),
        );
        Progress {
            bar: Some(bar),
            style: Style::Live,
            ..Self::with_writer(Box::new(std::io::sink()), Style::Quiet, width)
        }
    }

    /// No progress at all.
    pub fn quiet() -> Self {
        Self::with_writer(Box::new(std::io::sink()), Style::Quiet, 80)
    }

    /// Plain lines (or nothing) on any writer; `Live` needs a terminal ([`Progress::live`])
    /// and means `Lines` here.
    pub fn with_writer(out: Box<dyn Write + Send>, style: Style, width: usize) -> Self {
        Progress {
            out,
            bar: None,
            style: if style == Style::Live {
                Style::Lines
            } else {
                style
            },
            width: width.max(20),
            seen: Seen::default(),
            clock: None,
        }
    }

    /// Shows a new snapshot. Output errors (a closed pipe) are ignored: progress is a view.
    pub fn update(&mut self, st: &MigrationStatus) {
        let _ = self.show(st, false);
    }

    /// Shows the last snapshot and leaves the screen clean for what follows (the status
    /// block is removed; the log lines stay).
    pub fn finish(&mut self, st: &MigrationStatus) {
        let _ = self.show(st, true);
    }

    fn show(&mut self, st: &MigrationStatus, last: bool) -> std::io::Result<()> {
        if self.style == Style::Quiet {
            return Ok(());
        }
        let events = self.seen.advance(st);
        let elapsed = self.elapsed(st);
        if let Some(bar) = &self.bar {
            for e in &events {
                bar.println(e.text(elapsed));
            }
            if last {
                bar.finish_and_clear();
            } else {
                // The spinner and its space take two columns of the first line.
                let block = live_block(st, elapsed);
                let cut: Vec<String> = block.iter().map(|l| cut(l, self.width - 3)).collect();
                bar.set_message(cut.join("\n"));
                bar.tick();
            }
            return Ok(());
        }
        let mut text = String::new();
        for e in &events {
            let _ = writeln!(text, "{}", e.text(elapsed));
        }
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    /// Elapsed time, running on between status updates until the migration ends.
    fn elapsed(&mut self, st: &MigrationStatus) -> Duration {
        let base = Duration::from_millis(st.elapsed_ms);
        if st.phase.is_final() {
            return base;
        }
        match self.clock {
            Some((ms, at)) if ms == st.elapsed_ms => base + at.elapsed(),
            _ => {
                self.clock = Some((st.elapsed_ms, Instant::now()));
                base
            }
        }
    }
}

/// Whether a terminal may be redrawn in place: not when `NO_COLOR` is set
/// (<https://no-color.org>: its users want output free of escapes) or `TERM` is `dumb`.
fn live_allowed(terminal: bool) -> bool {
    terminal
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
        && std::env::var_os("TERM").is_none_or(|t| t != "dumb")
}

/// Terminal columns of standard output or error, 80 when unknown.
fn terminal_width() -> usize {
    terminal_size::terminal_size()
        .or_else(|| terminal_size::terminal_size_of(std::io::stderr()))
        .map_or(80, |(w, _)| usize::from(w.0))
}

/// `s` cut to `width` characters, with `...` where it was cut.
fn cut(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut t: String = s.chars().take(width.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

/// What the display has already reported.
#[derive(Debug, Default)]
struct Seen {
    started: bool,
    /// Rank of the last phase reported (see [`rank`]).
    rank: u8,
    /// Last pre-copy iteration given a log line.
    logged: u32,
    /// Iteration of the last snapshot.
    iteration: u32,
    /// The disk's phase last reported.
    disk: Option<dataplane::disk::drbd::DiskPhase>,
    /// The network line last reported.
    network: Option<String>,
    /// A disk error was reported.
    disk_error: bool,
}

/// Phases in the order a migration passes them.
fn rank(p: Phase) -> u8 {
    match p {
        Phase::Queued | Phase::Connecting | Phase::Waiting | Phase::Preparing => 0,
        Phase::Iterating | Phase::Reconnecting => 1,
        Phase::StopAndCopy => 2,
        Phase::Verifying => 3,
        Phase::Completed
        | Phase::Aborted
        | Phase::Failed
        | Phase::CommittedUnconfirmed
        | Phase::InDoubt => 4,
    }
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq)]
enum Event {
    Start(String),
    Iteration(String),
    Phase(String),
}

impl Event {
    fn text(&self, elapsed: Duration) -> String {
        match self {
            Event::Start(s) => s.clone(),
            Event::Iteration(s) | Event::Phase(s) => {
                format!("[{:>9}] {s}", format_duration(elapsed))
            }
        }
    }
}

impl Seen {
    /// The log lines a new snapshot calls for.
    fn advance(&mut self, st: &MigrationStatus) -> Vec<Event> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            let role = match st.role {
                Role::Source => "to the destination",
                Role::Destination => "from the source",
            };
            out.push(Event::Start(format!(
                "migration {:016x}: guest {} ({}, {} pages) {role}",
                st.id,
                if st.guest.is_empty() {
                    "-".into()
                } else {
                    escape(&st.guest)
                },
                format_size(st.guest_pages.saturating_mul(PAGE_SIZE as u64)),
                group(st.guest_pages),
            )));
        }
        if let Some(d) = &st.disk
            && self.disk != Some(d.phase)
        {
            self.disk = Some(d.phase);
            out.push(Event::Phase(disk_text(d)));
        }
        if let Some(e) = &st.disk_error
            && !self.disk_error
        {
            self.disk_error = true;
            out.push(Event::Phase(format!("disk NEEDS THE OPERATOR: {e}")));
        }
        if st.network.is_some() && st.network != self.network {
            self.network.clone_from(&st.network);
            out.push(Event::Phase(format!(
                "network: {}",
                st.network.as_deref().unwrap_or_default()
            )));
        }
        let r = rank(st.phase);
        // A finished pre-copy iteration: once iteration k + 1 has begun, the status holds
        // k's counts; at stop-and-copy it holds the last iteration's.
        let finished = match st.phase {
            Phase::Iterating => st.iteration.saturating_sub(1),
            Phase::StopAndCopy => st.iteration,
            _ => 0,
        };
        if finished > self.logged && st.role == Role::Source {
            // Iterations that began and ended between two snapshots still get their line,
            // with their figures from the status's history where it kept them.
            for k in self.logged + 1..finished {
                let line = match st.history.iter().find(|p| p.iteration == k) {
                    Some(p) => format!(
                        "iteration {k}: {} sent, {} dirtied | {} on the wire in {}",
                        group(p.sent),
                        group(p.dirtied),
                        format_size(p.wire_bytes),
                        ms_text(p.ms)
                    ),
                    None => format!("iteration {k}: finished between two refreshes"),
                };
                out.push(Event::Iteration(line));
            }
            self.logged = finished;
            out.push(Event::Iteration(iteration_line(finished, st)));
        } else if st.role == Role::Destination && st.iteration > self.iteration && r == 1 {
            out.push(Event::Iteration(format!(
                "iteration {} received: {} on the wire so far",
                st.iteration,
                format_size(st.wire_bytes)
            )));
        }
        if r == 1 && self.rank < 1 && st.role == Role::Source {
            out.push(Event::Phase(format!(
                "iteration 1: sending all {} pages while the guest runs",
                group(st.guest_pages)
            )));
        }
        // A migration that failed or was aborted in pre-copy never paused its guest: no
        // stop-and-copy line for it (a stop reason means the policy did stop it).
        let paused = !matches!(st.phase, Phase::Failed | Phase::Aborted)
            || st.stop_reason.is_some()
            || st.pause_ms.is_some();
        if r >= 2 && self.rank < 2 && paused {
            let reason = st.stop_reason.map_or("-".into(), stop_reason_name);
            out.push(Event::Phase(if r == 2 {
                format!(
                    "stop and copy ({reason}): guest paused, {} pages left to send",
                    group(st.remaining)
                )
            } else {
                format!("stop and copy ({reason}): guest paused")
            }));
        }
        if r >= 3 && self.rank < 3 && st.phase != Phase::Failed && st.phase != Phase::Aborted {
            out.push(Event::Phase(format!(
                "final copy: {} pages sent with the guest paused; the destination verifies",
                group(st.last_sent)
            )));
        }
        if r == 4 && self.rank < 4 {
            out.push(Event::Phase(end_line(st)));
        }
        self.rank = self.rank.max(r);
        self.iteration = st.iteration;
        out
    }
}

fn iteration_line(k: u32, st: &MigrationStatus) -> String {
    let rate = format_rate(st.job.transfer_rate_bps);
    let mut s = format!(
        "iteration {k}: {} sent, {} dirtied | wire {} | {}",
        group(st.last_sent),
        group(st.last_dirtied),
        format_size(st.wire_bytes),
        rate.split(" (").next().unwrap_or(&rate),
    );
    if let Some(ms) = st.expected_downtime_ms {
        // The policy's own estimate (what it weighs when deciding to stop), not a promise.
        let _ = write!(s, " | expected pause if stopped now {}", ms_text(ms));
    }
    if st.throttle_percent > 0 {
        let _ = write!(s, " | throttled {} %", st.throttle_percent);
    }
    if let Some(n) = st.completion.filter(|n| !n.applied) {
        let _ = write!(s, " | {n}");
    }
    s
}

/// The closing line for a finished migration.
pub fn end_line(st: &MigrationStatus) -> String {
    let err = escape(st.error.as_deref().unwrap_or("no reason given"));
    match st.phase {
        Phase::Completed => format!(
            "completed in {}: guest paused {}, memory {}{}",
            ms_text(st.elapsed_ms),
            st.pause_ms.map_or("-".into(), ms_text),
            match st.verified {
                Some(true) => "verified at both ends",
                Some(false) => "NOT verified",
                None => "not verified",
            },
            match st.resumes {
                0 => String::new(),
                n => format!(
                    "; pre-copy resumed {n} time(s) after its link broke (last: {})",
                    st.link_error.as_deref().unwrap_or("-")
                ),
            }
        ),
        Phase::Aborted => format!("aborted: {err}; the guest keeps running at the source"),
        Phase::Failed => format!("failed: {err}; the guest keeps running at the source"),
        Phase::CommittedUnconfirmed => format!(
            "committed, but the destination did not confirm that the guest started ({err}): \
             start it there"
        ),
        Phase::InDoubt => err.to_string(),
        _ => phase_name(st.phase).to_string(),
    }
}

/// The status block for a terminal.
fn live_block(st: &MigrationStatus, elapsed: Duration) -> Vec<String> {
    let phase = match st.phase {
        Phase::Connecting => "connecting".to_string(),
        Phase::Waiting => format!(
            "waiting: {} ({}; guest running at the source)",
            st.waiting.as_deref().unwrap_or("destination busy"),
            st.link_error.as_deref().unwrap_or("-")
        ),
        Phase::Preparing => "preparing (the disks get in sync; the guest runs)".to_string(),
        Phase::Iterating => format!("iteration {} (pre-copy, guest running)", st.iteration),
        Phase::Reconnecting => format!(
            "reconnecting after iteration {} (link lost: {}; guest running at the source)",
            st.iteration,
            st.link_error.as_deref().unwrap_or("-")
        ),
        Phase::StopAndCopy => "stop and copy (guest paused)".to_string(),
        Phase::Verifying => "verifying at the destination".to_string(),
        p => phase_name(p).to_string(),
    };
    let rate = if st.job.transfer_rate_bps > 0.0 {
        format_rate(st.job.transfer_rate_bps)
    } else {
        "measuring".to_string()
    };
    let s = st.saved;
    let saved = s.zero + s.cbr + s.delta + s.compress;
    let mut lines = vec![
        format!("{phase} | {} | {rate}", format_duration(elapsed)),
        format!(
            "  pages  left {} | sent {} in finished iterations | last dirtied {}",
            group(st.remaining),
            group(st.pages_sent),
            group(st.last_dirtied)
        ),
        format!(
            "  bytes  on the wire {} | saved {} (zero {}, CBR {}, delta {}{})",
            format_size(st.wire_bytes),
            format_size(saved),
            format_size(s.zero),
            format_size(s.cbr),
            format_size(s.delta),
            compress_text(s.compress, ", compression ")
        ),
        format!(
            "  next   ETA {} | expected pause if stopped now {}",
            st.eta_ms.map_or("-".into(), ms_text),
            st.expected_downtime_ms.map_or("-".into(), ms_text)
        ),
    ];
    if let Some(n) = &st.completion {
        lines.push(format!("  until  {n}"));
    }
    if st.throttle_peak_percent > 0 {
        lines.push(format!(
            "  vcpus  auto-converge throttle {} % now, {} % at most",
            st.throttle_percent, st.throttle_peak_percent
        ));
    }
    if let Some(d) = &st.disk {
        lines.push(format!("  disk   {}", disk_text(d)));
    }
    if let Some(n) = &st.network {
        lines.push(format!("  net    {n}"));
    }
    lines
}

/// One line for the guest's disk: `disk web1 (source): bulk-sync, 42.0% in sync`.
pub fn disk_text(d: &dataplane::disk::drbd::DiskStatus) -> String {
    let pct = match (d.phase, d.sync_percent) {
        (dataplane::disk::drbd::DiskPhase::BulkSync, Some(p)) => format!(", {p:.1}% in sync"),
        _ => String::new(),
    };
    format!("disk {} ({}): {}{pct}", d.resource, d.side, d.phase)
}

/// One line for a guest that checks itself (the KVM test guest), e.g. `guest: counter 22 ->
/// 31, saw a 750.2 ms pause, 0 bad pages (host check)`.
pub fn guest_check_text(c: &dataplane::guest::GuestCheck) -> String {
    let mut t = match c.progress_at_switch {
        Some(p) => format!("guest: counter {p} -> {}", c.progress),
        None => format!("guest: counter {}", c.progress),
    };
    if let Some(ms) = c.downtime_ms {
        let _ = write!(t, ", saw a {ms:.1} ms pause");
    }
    if let Some(bad) = c.bad_pages {
        let by = c.checked_by.as_deref().unwrap_or("guest");
        let _ = write!(t, ", {bad} bad pages ({by} check)");
    }
    if let Some(f) = &c.failure {
        let _ = write!(t, ", STOPPED: {f}");
    }
    t
}

pub fn ms_text(ms: u64) -> String {
    format_duration(Duration::from_millis(ms))
}

/// The operator's name of a phase (as in `status --json`).
pub fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Queued => "queued",
        Phase::Connecting => "connecting",
        Phase::Waiting => "waiting",
        Phase::Preparing => "preparing",
        Phase::Iterating => "iterating",
        Phase::Reconnecting => "reconnecting",
        Phase::StopAndCopy => "stop-and-copy",
        Phase::Verifying => "verifying",
        Phase::Completed => "completed",
        Phase::Aborted => "aborted",
        Phase::Failed => "failed",
        Phase::CommittedUnconfirmed => "committed-unconfirmed",
        Phase::InDoubt => "in-doubt",
    }
}

/// The name of a stop reason (as in JSON).
pub fn stop_reason_name(r: StopReason) -> String {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{r:?}"))
}

/// What a stop reason means.
pub fn stop_reason_text(r: StopReason) -> &'static str {
    match r {
        StopReason::FewPagesLeft => "fewer than 50 pages were left",
        StopReason::MaxIterations => "30 iterations were done",
        StopReason::MaxData => "3x guest memory was sent",
        StopReason::LocalMinimum => "Smart Stop found a local minimum of remaining pages",
        StopReason::WindowExhausted => "Smart Stop searched a whole window without a new minimum",
        StopReason::DowntimeFits => "the predicted pause fit under max_downtime",
        StopReason::Requested => "the coordinator or the operator asked",
        StopReason::Forced => "the completion action force paused it, whatever the ceiling",
    }
}

/// `1234567` as `1,234,567`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The final summary: an iteration table (when `iterations` is given) and the totals, in
/// human units. `codec` adds the record and cache counters.
pub fn summary_table(
    st: &MigrationStatus,
    codec: Option<&CodecStats>,
    iterations: &[IterationRecord],
) -> String {
    let mut t = String::new();
    let page = PAGE_SIZE as u64;
    let guest_bytes = st.guest_pages.saturating_mul(page);
    let _ = writeln!(
        t,
        "migration {:016x} ({}): guest {}, {} ({} pages): {}",
        st.id,
        match st.role {
            Role::Source => "source",
            Role::Destination => "destination",
        },
        if st.guest.is_empty() {
            "-".into()
        } else {
            escape(&st.guest)
        },
        format_size(guest_bytes),
        group(st.guest_pages),
        phase_name(st.phase)
    );
    if !iterations.is_empty() {
        let rows: Vec<[String; 5]> = iterations
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let is_final = i + 1 == iterations.len() && st.stop_reason.is_some();
                [
                    if is_final {
                        format!("{} (final, paused)", r.iteration)
                    } else {
                        r.iteration.to_string()
                    },
                    group(r.sent),
                    if is_final {
                        "-".to_string()
                    } else {
                        group(r.dirtied)
                    },
                    format_size(r.wire_bytes),
                    ms_text(r.ms),
                ]
            })
            .collect();
        let head = [
            "iteration",
            "pages sent",
            "dirtied meanwhile",
            "on the wire",
            "time",
        ];
        let mut w = head.map(str::len);
        for r in &rows {
            for (w, c) in w.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        let _ = writeln!(t);
        let _ = writeln!(
            t,
            "  {:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {:>w4$}",
            head[0],
            head[1],
            head[2],
            head[3],
            head[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3],
            w4 = w[4]
        );
        for r in &rows {
            let _ = writeln!(
                t,
                "  {:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {:>w4$}",
                r[0],
                r[1],
                r[2],
                r[3],
                r[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4]
            );
        }
    }
    let mut kv: Vec<(&str, String)> = Vec::new();
    let sent_bytes = st.pages_sent.saturating_mul(page);
    let factor = if guest_bytes > 0 {
        sent_bytes as f64 / guest_bytes as f64
    } else {
        0.0
    };
    kv.push((
        "pages sent",
        format!(
            "{} ({}, {factor:.2}x guest memory)",
            group(st.pages_sent),
            format_size(sent_bytes)
        ),
    ));
    let ratio = if sent_bytes > 0 {
        format!(
            ", {:.1}% of the pages' bytes",
            st.wire_bytes as f64 * 100.0 / sent_bytes as f64
        )
    } else {
        String::new()
    };
    kv.push((
        "bytes on the wire",
        format!("{}{ratio}", format_size(st.wire_bytes)),
    ));
    let s = st.saved;
    kv.push((
        "saved",
        format!(
            "zero {} | CBR {} | delta {}{} | total {}",
            format_size(s.zero),
            format_size(s.cbr),
            format_size(s.delta),
            compress_text(s.compress, " | compression "),
            format_size(s.zero + s.cbr + s.delta + s.compress)
        ),
    ));
    if let Some(c) = codec {
        kv.push((
            "records",
            format!(
                "zero {} | full {} | blocks {} | delta {}",
                group(c.pages[0]),
                group(c.pages[1]),
                group(c.pages[2]),
                group(c.pages[3])
            ),
        ));
        kv.push((
            "block cache",
            format!(
                "hits {} | misses {} | evictions {} | fingerprint collisions {} | delta overflows {}",
                group(c.cache_hits),
                group(c.cache_misses),
                group(c.cache_evictions),
                group(c.fingerprint_collisions),
                group(c.delta_overflows)
            ),
        ));
    }
    kv.push(("total time", ms_text(st.elapsed_ms)));
    kv.push(("guest paused", st.pause_ms.map_or("-".into(), ms_text)));
    kv.push((
        "stop reason",
        st.stop_reason.map_or("-".into(), |r| {
            format!("{}: {}", stop_reason_name(r), stop_reason_text(r))
        }),
    ));
    kv.push(("average rate", format_rate(st.job.link_rate_bps)));
    kv.push((
        "memory verified",
        match st.verified {
            Some(true) => "yes: the memory digests match at both ends".into(),
            Some(false) => "NO: the memory digests differ".into(),
            None => "no (the migration did not reach verification)".into(),
        },
    ));
    if let Some(e) = &st.error {
        kv.push(("error", escape(e).into_owned()));
    }
    let key_w = kv.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let _ = writeln!(t);
    for (k, v) in kv {
        let _ = writeln!(t, "  {k:<key_w$}  {v}");
    }
    t
}

/// What compression saved, behind `label`; nothing when it saved nothing (it is off).
fn compress_text(saved: u64, label: &str) -> String {
    if saved == 0 {
        String::new()
    } else {
        format!("{label}{}", format_size(saved))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use dataplane::migrate::Saved;

    use super::*;

    /// A writer the test can read back.
    #[derive(Clone, Default, Debug)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    /// A terminal for indicatif that records what it is sent, as ANSI escapes.
    #[derive(Debug)]
    struct Screen(Shared, u16);

    impl Screen {
        fn put(&self, s: &str) -> std::io::Result<()> {
            self.0.clone().write_all(s.as_bytes())
        }
    }

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            self.1
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}A"))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}B"))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}C"))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.put(&format!("\x1b[{n}D"))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.put(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.put(s)
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.put("\r\x1b[2K")
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    fn status() -> MigrationStatus {
        MigrationStatus::new(0xabc, Role::Source, "web-1", 262_144)
    }

    /// A migration as the driver reports it: 3 pre-copy iterations, then the final copy.
    fn timeline() -> Vec<MigrationStatus> {
        let mut v = Vec::new();
        let mut s = status();
        v.push(s.clone());
        s.phase = Phase::Iterating;
        s.iteration = 1;
        v.push(s.clone());
        for (it, sent, dirtied) in [(1, 262_144, 30_000), (2, 30_000, 9_000), (3, 9_000, 8_000)] {
            s.pages_sent += sent;
            s.last_sent = sent;
            s.last_dirtied = dirtied;
            s.remaining = dirtied;
            s.wire_bytes += sent * 4096;
            s.job.transfer_rate_bps = 117_500_000.0;
            s.job.link_rate_bps = 117_500_000.0;
            s.expected_downtime_ms = Some(dirtied / 30);
            s.eta_ms = s.expected_downtime_ms;
            s.elapsed_ms += 1000;
            s.saved = Saved {
                zero: 1 << 20,
                cbr: 2 << 20,
                delta: 3 << 20,
                compress: 0,
            };
            if it < 3 {
                s.iteration = it + 1;
                v.push(s.clone());
            }
        }
        s.phase = Phase::StopAndCopy;
        s.stop_reason = Some(StopReason::LocalMinimum);
        v.push(s.clone());
        s.phase = Phase::Verifying;
        s.iteration = 4;
        s.pages_sent += 8_100;
        s.last_sent = 8_100;
        s.remaining = 0;
        v.push(s.clone());
        s.phase = Phase::Completed;
        s.verified = Some(true);
        s.pause_ms = Some(95);
        s.elapsed_ms = 3200;
        v.push(s);
        v
    }

    #[test]
    fn lines_log_each_iteration_and_phase_once() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Lines, 80);
        let tl = timeline();
        for s in &tl {
            p.update(s);
            p.update(s); // polled twice: no repeats
        }
        p.finish(tl.last().unwrap());
        let text = out.text();
        assert!(!text.contains('\x1b'), "no escapes off a terminal:\n{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 8, "{text}");
        assert!(lines[0].starts_with("migration 0000000000000abc: guest web-1 (1.00 GiB"));
        assert!(lines[1].contains("iteration 1: sending all 262,144 pages"));
        assert!(
            lines[2].ends_with(
                "iteration 1: 262,144 sent, 30,000 dirtied | wire 1.00 GiB | 940 Mbit/s | \
                 expected pause if stopped now 1.00 s"
            ),
            "{text}"
        );
        assert!(lines[3].contains("iteration 2: 30,000 sent, 9,000 dirtied"));
        assert!(lines[4].contains("iteration 3: 9,000 sent, 8,000 dirtied"));
        assert!(lines[5].contains("stop and copy (local-minimum): guest paused, 8,000 pages"));
        assert!(lines[6].contains("final copy: 8,100 pages"));
        assert!(
            lines[7].contains("completed in 3.20 s: guest paused 95 ms, memory verified"),
            "{text}"
        );
    }

    #[test]
    fn iterations_between_two_snapshots_still_get_a_line() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Lines, 80);
        let tl = timeline();
        p.update(&tl[0]);
        // Straight to the stop-and-copy after iteration 3: 1 and 2 ended between snapshots.
        p.update(&tl[4]);
        let text = out.text();
        for k in 1..=2 {
            assert!(
                text.contains(&format!("iteration {k}: finished between two refreshes")),
                "{text}"
            );
        }
        assert!(text.contains("iteration 3: 9,000 sent"), "{text}");
    }

    #[test]
    fn iterations_between_two_snapshots_show_their_figures_from_the_history() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Lines, 80);
        let tl = timeline();
        p.update(&tl[0]);
        let mut last = tl[4].clone();
        last.history = vec![dataplane::migrate::IterationPoint {
            iteration: 1,
            sent: 262_144,
            dirtied: 30_000,
            remaining: 30_000,
            wire_bytes: 1 << 30,
            ms: 1000,
            saved: Saved::default(),
            paused: false,
        }];
        p.update(&last);
        let text = out.text();
        assert!(
            text.contains("iteration 1: 262,144 sent, 30,000 dirtied | 1.00 GiB on the wire in"),
            "{text}"
        );
        // Iteration 2 is not in the history: it still gets its line.
        assert!(
            text.contains("iteration 2: finished between two refreshes"),
            "{text}"
        );
    }

    #[test]
    fn skipped_phases_still_get_their_lines() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Lines, 80);
        let tl = timeline();
        p.update(&tl[1]);
        p.finish(tl.last().unwrap());
        let text = out.text();
        assert!(
            text.contains("stop and copy (local-minimum): guest paused\n"),
            "{text}"
        );
        assert!(text.contains("final copy: 8,100 pages"));
        assert!(text.contains("completed in"));
    }

    #[test]
    fn failures_say_where_the_guest_runs() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Lines, 80);
        let mut s = status();
        s.phase = Phase::Failed;
        s.error = Some("peer failed: disk full".into());
        p.finish(&s);
        let text = out.text();
        assert!(
            text.contains("failed: peer failed: disk full; the guest keeps running at the source"),
            "{text}"
        );
        assert!(!text.contains("final copy"));
        assert!(
            !text.contains("guest paused"),
            "the guest was never paused:\n{text}"
        );
    }

    #[test]
    fn a_failure_after_the_pause_says_the_guest_paused() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Lines, 80);
        let mut s = status();
        s.phase = Phase::Failed;
        s.stop_reason = Some(StopReason::LocalMinimum);
        s.error = Some("digest mismatch".into());
        p.finish(&s);
        let text = out.text();
        assert!(text.contains("guest paused"), "{text}");
        assert!(text.contains("failed: digest mismatch"), "{text}");
    }

    #[test]
    fn live_redraws_in_place_and_fits_the_width() {
        let out = Shared::default();
        let screen = Screen(out.clone(), 60);
        let mut p = Progress::live(ProgressDrawTarget::term_like(Box::new(screen)), 60);
        let tl = timeline();
        p.update(&tl[1]);
        p.update(&tl[2]);
        let text = out.text();
        // A redraw goes back up over the block and clears its lines.
        assert!(text.contains("\x1b[2K"), "{text:?}");
        assert!(text.contains("A\r\x1b[2K"), "{text:?}");
        assert!(text.contains("iteration 1: 262,144 sent"), "{text:?}");
        // The four-line block goes up three lines to be redrawn; its lines are cut to fit
        // (indicatif pads each to the width, so the terminal never wraps them).
        assert!(text.contains("\x1b[3A"), "{text:?}");
        assert!(
            text.contains("| sent 262,144 in finished iterat..."),
            "{text:?}"
        );
        p.finish(tl.last().unwrap());
        let text = out.text();
        assert!(text.contains("memory verified at both ends"), "{text:?}");
    }

    #[test]
    fn quiet_writes_nothing() {
        let out = Shared::default();
        let mut p = Progress::with_writer(Box::new(out.clone()), Style::Quiet, 80);
        for s in timeline() {
            p.update(&s);
        }
        assert!(out.text().is_empty());
    }

    #[test]
    fn summary_is_aligned_and_human() {
        let st = timeline().pop().unwrap();
        let its = [
            IterationRecord {
                iteration: 1,
                sent: 262_144,
                dirtied: 30_000,
                wire_bytes: 900 << 20,
                ms: 7600,
            },
            IterationRecord {
                iteration: 2,
                sent: 30_000,
                dirtied: 9_000,
                wire_bytes: 100 << 20,
                ms: 800,
            },
            IterationRecord {
                iteration: 3,
                sent: 9_000,
                dirtied: 0,
                wire_bytes: 30 << 20,
                ms: 95,
            },
        ];
        let codec = CodecStats {
            pages: [10, 20, 30, 40],
            ..CodecStats::default()
        };
        let t = summary_table(&st, Some(&codec), &its);
        assert!(t.contains("1.00 GiB (262,144 pages): completed"), "{t}");
        assert!(t.contains("3 (final, paused)"), "{t}");
        let rows: Vec<&str> = t
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("iteration"))
            .take(4)
            .collect();
        // Right-aligned columns: every row ends at the same column.
        let ends: Vec<usize> = rows.iter().map(|l| l.len()).collect();
        assert!(ends.iter().all(|&e| e == ends[0]), "{t}");
        assert!(
            t.contains("stop reason        local-minimum: Smart Stop"),
            "{t}"
        );
        assert!(t.contains("records            zero 10 | full 20 | blocks 30 | delta 40"));
        assert!(t.contains("average rate       940 Mbit/s (117.5 MB/s)"));
        assert!(t.contains("memory verified    yes"));
        assert!(t.contains("guest paused       95 ms"));
    }

    #[test]
    fn grouping() {
        assert_eq!(group(0), "0");
        assert_eq!(group(999), "999");
        assert_eq!(group(1000), "1,000");
        assert_eq!(group(262_144), "262,144");
        assert_eq!(group(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn cutting() {
        assert_eq!(cut("abcdef", 10), "abcdef");
        assert_eq!(cut("abcdefghijkl", 8), "abcde...");
    }

    #[test]
    fn a_guest_check_reads_as_one_line() {
        let mut c = dataplane::guest::GuestCheck {
            progress_at_switch: Some(22),
            progress: 31,
            resumed: true,
            bad_pages: Some(0),
            checked_by: Some("host".into()),
            downtime_ms: Some(750.17),
            failure: None,
        };
        assert_eq!(
            guest_check_text(&c),
            "guest: counter 22 -> 31, saw a 750.2 ms pause, 0 bad pages (host check)"
        );
        c = dataplane::guest::GuestCheck {
            progress: 5,
            failure: Some("KVM_EXIT_SHUTDOWN".into()),
            ..Default::default()
        };
        assert_eq!(
            guest_check_text(&c),
            "guest: counter 5, STOPPED: KVM_EXIT_SHUTDOWN"
        );
    }
}

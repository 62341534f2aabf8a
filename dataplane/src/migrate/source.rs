//! The source's pre-copy driver: handshake, iterations until the stop policy says stop,
//! stop-and-copy, and the two-phase switchover.
//!
//! Invariant: the guest runs here until the destination has confirmed it holds every page
//! and the memory digests match (`Ready`). Only then does the source hand the guest over
//! (the commit point) and send `Commit`; after that it never resumes it. Any failure before
//! the commit resumes the guest here and tells the destination to discard.

use std::cell::Cell;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::announcer::Announcer;
use super::converge::{CompletionAction, CompletionCause, ConvergeOptions};
use super::disk::{DrbdHost, SyncTask};
use super::{
    Decision, IterationReport, MigrateError, MigrationStatus, Phase, Policy, Role, StopDecider,
};
use crate::codec::{CodecConfig, CodecStats};
use crate::coordinator::{Member, Progress, Verdict};
use crate::crypto::{Direction, HandshakeNonce, PreSharedKey};
use crate::disk::drbd::{DrbdDisk, Side, Steer};
use crate::guest::{DirtyBitmap, SourceGuest};
use crate::network::{AnnounceConfig, GuestIdentity};
use crate::page::PAGE_SIZE;
use crate::pipeline::source::{SourcePipeline, SourceSettings};
use crate::protocol::{
    ControlTx, Hello, STATE_PART, StreamHello, ToDest, ToSource, control_channel, open_stream,
    send_hello, text,
};
use crate::transport::SocketOptions;

/// Everything a source needs to know.
#[derive(Debug, Clone)]
pub struct SourceOptions {
    /// The destination's migration address.
    pub peer: SocketAddr,
    /// The pre-shared key.
    pub psk: PreSharedKey,
    /// Data streams (TCP connections).
    pub streams: u32,
    /// Codec settings (the destination adopts them).
    pub codec: CodecConfig,
    /// Stop policy.
    pub policy: Policy,
    /// The pause ceiling: stop as soon as the predicted pause fits under it, and never pause
    /// over it (but see `converge`).
    pub max_downtime: Option<Duration>,
    /// Completion timeout, its action, auto-converge.
    pub converge: ConvergeOptions,
    /// Send-side rate limit, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Socket tuning.
    pub socket: SocketOptions,
    /// Data frame size.
    pub frame_size: usize,
    /// Pin pipeline threads to cores.
    pub pin_threads: bool,
    /// How long the peer may stay silent before the migration fails.
    pub timeout: Duration,
    /// The guest's name, for status displays.
    pub guest_label: String,
    /// Synchronized Arrival: the group this migration arrives with.
    pub group: Option<crate::coordinator::GroupOptions>,
    /// The guest's DRBD disk, steered along with the memory.
    pub disk: Option<SourceDisk>,
    /// The guest's network identity, announced at the destination at the pause.
    pub network: Option<SourceNetwork>,
    /// Reconnecting when pre-copy loses its link.
    pub resume: ResumePolicy,
}

/// How the source reconnects when pre-copy loses its link (DESIGN.md: resume, not restart),
/// and how long it waits for a destination that refused it as busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePolicy {
    /// Most reconnections tried per break; 0: a broken link fails the migration.
    pub attempts: u32,
    /// Time in which further reconnections may start, backoff included, from the break
    /// on. The first [`MIN_ATTEMPTS`] (at most `attempts`) are made however long each
    /// takes: on a loaded host one attempt can take as long as the whole budget, and must
    /// not be the last.
    pub within: Duration,
    /// How long a migration the destination refused as busy (`[listen] max_migrations`
    /// reached) keeps retrying, with backoff; zero: fail at once.
    pub busy_within: Duration,
}

impl Default for ResumePolicy {
    fn default() -> Self {
        ResumePolicy {
            attempts: 8,
            within: Duration::from_secs(60),
            busy_within: Duration::from_secs(300),
        }
    }
}

/// Reconnections made after a break whatever time they take (fewer if `attempts` is
/// lower).
pub const MIN_ATTEMPTS: u32 = 3;

/// The first wait before reconnecting; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
/// The longest wait between two reconnections.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The first wait before asking a busy destination again; it doubles up to
/// [`MAX_BUSY_BACKOFF`].
const FIRST_BUSY_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between two questions to a busy destination.
const MAX_BUSY_BACKOFF: Duration = Duration::from_secs(15);

/// A guest disk replicated by DRBD, and how this host runs DRBD's tools.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// The resource (the destination writes the same file).
    pub disk: DrbdDisk,
    /// This host's `[drbd]`.
    pub host: DrbdHost,
}

/// The guest's network identity.
#[derive(Debug, Clone)]
pub struct SourceNetwork {
    /// Its MAC (and IPv4 address, if known).
    pub guest: GuestIdentity,
    /// This host's `[announce]`, to announce the guest back here if the migration fails
    /// after the destination started announcing it; without one that is only logged.
    pub announce_here: Option<AnnounceConfig>,
}

/// Shortest iteration of a member held for its group (see `group_decision`).
const HELD_ITERATION_FLOOR: Duration = Duration::from_millis(20);

/// The end result, as measured at the source.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceSummary {
    /// Final status (phase Completed).
    pub status: MigrationStatus,
    /// Codec counters over all streams.
    pub codec: CodecStats,
    /// One record per iteration, the final copy last.
    pub iterations: Vec<IterationRecord>,
}

/// What one iteration did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IterationRecord {
    /// Iteration number.
    pub iteration: u32,
    /// Pages sent.
    pub sent: u64,
    /// Pages dirtied while it ran (0 for the final copy: the guest was paused).
    pub dirtied: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Duration, ms.
    pub ms: u64,
}

/// Live-migrates `guest` to `opts.peer`. `status` is kept current for observers; setting
/// `abort` stops the migration at the next step before the commit.
pub fn migrate(
    guest: Arc<dyn SourceGuest>,
    opts: &SourceOptions,
    id: u64,
    status: &Arc<Mutex<MigrationStatus>>,
    abort: &AtomicBool,
) -> Result<SourceSummary, MigrateError> {
    *status.lock().expect("status lock") =
        MigrationStatus::new(id, Role::Source, &opts.guest_label, guest.page_count());
    let mut run = Run {
        guest,
        opts,
        id,
        status,
        abort,
        started: Instant::now(),
        paused: None,
        committed: false,
        member: None,
        disk: None,
        told_paused: false,
        acked: Cell::new(0),
        throttle: Cell::new(0),
        deadline: None,
    };
    let result = run.join_group().and_then(|()| run.go());
    run.leave_group(&result);
    run.guest.release();
    let mut st = status.lock().expect("status lock");
    st.elapsed_ms = millis(run.started.elapsed());
    st.job
        .ended_at_ms
        .get_or_insert_with(super::job_stats::unix_ms);
    match &result {
        Ok(_) => {}
        Err(e) => {
            st.error = Some(e.to_string());
            if !run.committed {
                st.phase = if matches!(e, MigrateError::Aborted) {
                    Phase::Aborted
                } else {
                    Phase::Failed
                };
            }
        }
    }
    drop(st);
    result
}

/// The pause's costs as far as the counters tell: the frames sealed but not yet on the wire
/// (their headers and tags left out: a little short), and a remaining page at its worst for
/// the codec, a whole page, shrunk by the compression measured so far. The pause ceiling
/// rests on this, so it errs long: the pages left are the guest's hottest, often rewritten
/// whole, however cheap the earlier ones were.
fn pause_costs(codec: &CodecStats, wire: u64) -> super::policy::PauseCosts {
    let encoded = codec.bytes_out.saturating_sub(codec.saved_compress);
    let kept = if codec.bytes_out > 0 {
        encoded as f64 / codec.bytes_out as f64
    } else {
        1.0
    };
    super::policy::PauseCosts {
        page_bytes: Some(crate::page::PAGE_SIZE as f64 * kept),
        queued_bytes: encoded.saturating_sub(wire),
        time: Duration::ZERO,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Run<'a> {
    guest: Arc<dyn SourceGuest>,
    opts: &'a SourceOptions,
    id: u64,
    status: &'a Arc<Mutex<MigrationStatus>>,
    abort: &'a AtomicBool,
    started: Instant,
    paused: Option<Instant>,
    committed: bool,
    /// Synchronized Arrival: this migration's membership, while it lasts.
    member: Option<Member>,
    /// The guest's disk steering, once `prepare` built it.
    disk: Option<Steer>,
    /// The destination was told the guest paused (and may have announced it).
    told_paused: bool,
    /// The last iteration the destination acknowledged.
    acked: Cell<u32>,
    /// Auto-converge's throttle as applied to the guest, percent.
    throttle: Cell<u8>,
    /// When the completion timeout falls due.
    deadline: Option<Instant>,
}

/// Everything to undo if the migration fails before the commit.
struct Session {
    control: TcpStream,
    data: Vec<TcpStream>,
    tx: ControlTx,
    from_dest: Receiver<Result<ToSource, String>>,
}

impl Session {
    fn teardown(&self) {
        for s in self.data.iter().chain([&self.control]) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Run<'_> {
    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        let mut st = self.status.lock().expect("status lock");
        f(&mut st);
        st.elapsed_ms = millis(self.started.elapsed());
        if st.phase.is_final() {
            st.job
                .ended_at_ms
                .get_or_insert_with(super::job_stats::unix_ms);
        }
    }

    fn go(&mut self) -> Result<SourceSummary, MigrateError> {
        let (mut session, mut pipeline) = self.connect_when_free()?;
        self.guest.start_dirty_log()?;
        let result = self
            .prepare(&mut session)
            .and_then(|()| self.precopy_and_switch(&mut session, &mut pipeline));
        match result {
            Ok(iterations) => {
                let codec = pipeline.codec_totals();
                // Committed: the pipeline has delivered everything; a late error is reported
                // but does not change where the guest runs.
                let tail = pipeline.finish();
                session.teardown();
                if let Err(e) = tail {
                    tracing::warn!(migration = %crate::migrate::MigrationId(self.id), "pipeline after commit: {e}");
                }
                let status = self.status.lock().expect("status lock").clone();
                Ok(SourceSummary {
                    status,
                    codec,
                    iterations,
                })
            }
            Err(e) => {
                // Before the commit (the commit is the last fallible step's success): tell the
                // destination to discard, stop the pipeline, give the guest back its CPU.
                let _ = session.tx.send(&ToDest::Abort {
                    reason: e.to_string(),
                    operator: matches!(e, MigrateError::Aborted),
                });
                for s in session.data.iter().chain([&session.control]) {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                let tail = pipeline.finish();
                self.release_throttle();
                if self.paused.is_some() && !self.committed {
                    self.guest.resume()?;
                    if self.told_paused {
                        self.announce_back();
                    }
                }
                // The destination rolled its disk back on the Abort (or its own failure);
                // this end waits for it to let go, then restores its own.
                if let Some(steer) = self.disk.as_mut() {
                    super::disk::roll_back(steer, self.status, self.id);
                }
                // A pipeline failure is usually the cause of the driver's error; prefer it.
                match (e, tail) {
                    (MigrateError::Peer(_) | MigrateError::Timeout(..), Err(p)) => Err(p.into()),
                    (e, _) => Err(e),
                }
            }
        }
    }

    /// Opens the first session; while the destination refuses it as busy, asks again with
    /// backoff (phase `waiting`, the status saying when) for up to the policy's
    /// `busy_within`.
    fn connect_when_free(&self) -> Result<(Session, SourcePipeline), MigrateError> {
        let bound = self.opts.resume.busy_within;
        let first = Instant::now();
        let mut backoff = FIRST_BUSY_BACKOFF;
        let mut retry = 0u32;
        loop {
            let refusal = match self.connect(0) {
                Err(e) if e.is_busy() => e,
                other => {
                    if retry > 0 {
                        self.update(|s| {
                            s.phase = Phase::Connecting;
                            s.waiting = None;
                            s.link_error = None;
                        });
                    }
                    return other;
                }
            };
            let left = bound.saturating_sub(first.elapsed());
            if left.is_zero() {
                return Err(MigrateError::Peer(format!(
                    "{}; gave up after {retry} retries in {} s ([source] busy_retry_within)",
                    refusal.detail(),
                    first.elapsed().as_secs()
                )));
            }
            retry += 1;
            let wait = backoff.min(left);
            backoff = (backoff * 2).min(MAX_BUSY_BACKOFF);
            tracing::info!(
                migration = %crate::migrate::MigrationId(self.id),
                retry,
                "{refusal}; asking again in {} ms",
                wait.as_millis()
            );
            let until = Instant::now() + wait;
            loop {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                let secs = until.duration_since(now).as_secs_f64().ceil();
                self.update(|s| {
                    s.phase = Phase::Waiting;
                    s.waiting = Some(format!("destination busy, retry {retry} in {secs:.0}s"));
                    s.link_error = Some(refusal.detail());
                });
                self.sleep(until.duration_since(now).min(Duration::from_millis(500)))?;
            }
        }
    }

    /// Opens a session: the handshake (`resume`: 0 for a new migration, else the number of
    /// this reconnection), the data streams, the control channel and a pipeline.
    fn connect(&self, resume: u32) -> Result<(Session, SourcePipeline), MigrateError> {
        let o = self.opts;
        let dial = |what: &str| {
            let s = TcpStream::connect_timeout(&o.peer, o.timeout).map_err(|e| {
                MigrateError::Connect(format!("connecting {what} to {}", o.peer), e)
            })?;
            o.socket
                .apply(&s)
                .map_err(|e| MigrateError::Connect(format!("tuning {what} socket"), e))?;
            Ok::<_, MigrateError>(s)
        };
        let mut control = dial("control connection")?;
        control
            .set_read_timeout(Some(o.timeout))
            .map_err(|e| MigrateError::Connect("control timeout".into(), e))?;
        let nonce = HandshakeNonce::random().map_err(|e| {
            MigrateError::Connect("nonce".into(), std::io::Error::other(e.to_string()))
        })?;
        let hello = Hello {
            migration_id: self.id,
            source_nonce: nonce.0,
            guest_pages: self.guest.page_count(),
            streams: o.streams,
            codec: o.codec.clone(),
            frame_size: u32::try_from(o.frame_size).unwrap_or(u32::MAX),
            backend: self.guest.backend().to_string(),
            guest: o.guest_label.clone(),
            destination: self.guest.destination(),
            resume,
        };
        let keys = send_hello(&mut control, &o.psk, &hello)?;
        control
            .set_read_timeout(None)
            .map_err(|e| MigrateError::Connect("control timeout".into(), e))?;
        let mut data = Vec::new();
        let mut stream_keys = Vec::new();
        for s in 1..=o.streams {
            let mut d = dial("data stream")?;
            d.set_read_timeout(Some(o.timeout))
                .map_err(|e| MigrateError::Connect("data timeout".into(), e))?;
            open_stream(
                &mut d,
                &o.psk,
                StreamHello {
                    migration_id: self.id,
                    stream: s,
                },
            )?;
            d.set_read_timeout(None)
                .map_err(|e| MigrateError::Connect("data timeout".into(), e))?;
            data.push(d);
            stream_keys.push(keys.stream_key(s, Direction::SourceToDest));
        }
        let (tx, mut rx) = control_channel(&control, &keys, Direction::SourceToDest)?;
        // Destination messages arrive on their own thread, so waits can time out and see
        // the destination's failure reports at any point.
        let (msg_tx, from_dest) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name(format!("sf-ctl-{:x}", self.id))
            .spawn(move || {
                loop {
                    let m = rx.recv::<ToSource>().map_err(|e| e.to_string());
                    let end = m.is_err();
                    if msg_tx.send(m).is_err() || end {
                        return;
                    }
                }
            })
            .map_err(|e| MigrateError::Connect("control thread".into(), e))?;

        let settings = SourceSettings {
            codec: o.codec.clone(),
            frame_size: o.frame_size,
            max_bandwidth: o.max_bandwidth,
            pin_threads: o.pin_threads,
        };
        let sockets = data
            .iter()
            .map(TcpStream::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MigrateError::Connect("cloning data sockets".into(), e))?;
        let pipeline = SourcePipeline::start(self.guest.clone(), sockets, &stream_keys, &settings)?;
        Ok((
            Session {
                control,
                data,
                tx,
                from_dest,
            },
            pipeline,
        ))
    }

    /// Tells the destination what moves with the guest and waits for its go-ahead. With a
    /// DRBD disk, both hosts first bring the disks in sync (protocol A, the bulk copy) and
    /// then make replication synchronous (protocol C), so that from iteration 1 on every
    /// write the guest makes is on both disks.
    fn prepare(&mut self, session: &mut Session) -> Result<(), MigrateError> {
        let o = self.opts;
        let disk = match &o.disk {
            Some(d) => Some(serde_json::to_string(&d.disk).map_err(|e| {
                MigrateError::Unsupported(format!("the disk's configuration: {e}"))
            })?),
            None => None,
        };
        if let Some(d) = &o.disk {
            self.update(|s| s.phase = Phase::Preparing);
            self.disk = Some(d.host.steer(d.disk.clone(), Side::Source, self.status)?);
        }
        session.tx.send(&ToDest::Prepare {
            disk,
            network: o.network.as_ref().map(|n| n.guest.into()),
        })?;
        let Some(steer) = self.disk.take() else {
            return match self.expect(session, "preparing")? {
                ToSource::Prepared => Ok(()),
                m => Err(MigrateError::Peer(format!("expected Prepared, got {m:?}"))),
            };
        };
        // Our bulk sync runs on its own thread while this one watches the destination
        // (which syncs too, then switches to protocol C) and the operator.
        let mut task = Some(SyncTask::spawn(steer, false)?);
        let mut prepared = false;
        let mut synced_at = None;
        // Tells the destination, which hears nothing else meanwhile, that we are alive.
        let beat = (o.timeout / 4).min(Duration::from_secs(1));
        let mut last_beat = Instant::now();
        let outcome = loop {
            if self.abort.load(Ordering::Relaxed) {
                break Err(MigrateError::Aborted);
            }
            if last_beat.elapsed() >= beat {
                last_beat = Instant::now();
                let sync_percent = super::disk::current(self.status).and_then(|d| d.sync_percent);
                if let Err(e) = session.tx.send(&ToDest::DiskSyncing { sync_percent }) {
                    break Err(e.into());
                }
            }
            match session.from_dest.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(ToSource::Prepared)) => prepared = true,
                Ok(Ok(ToSource::IterationAck { .. })) | Err(RecvTimeoutError::Timeout) => {}
                Ok(Ok(ToSource::Failed { reason })) => {
                    break Err(MigrateError::Peer(text::from_peer(&reason)));
                }
                Ok(Ok(m)) => {
                    break Err(MigrateError::Peer(format!("expected Prepared, got {m:?}")));
                }
                Ok(Err(e)) => {
                    break Err(MigrateError::LinkLost(format!("control connection: {e}")));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    break Err(MigrateError::LinkLost("control connection closed".into()));
                }
            }
            if task.as_ref().is_some_and(SyncTask::is_finished) {
                let (steer, r) = task.take().expect("checked").join();
                self.disk = Some(steer);
                if let Err(e) = r {
                    break Err(e.into());
                }
                synced_at = Some(Instant::now());
            }
            match synced_at {
                Some(_) if prepared => break Ok(()),
                // Both ends watch the same replication: once ours is in sync, the
                // destination's follows within a poll or two.
                Some(t) if t.elapsed() > o.timeout => {
                    break Err(MigrateError::Timeout(
                        o.timeout.as_secs(),
                        "bringing its disk in sync",
                    ));
                }
                _ => {}
            }
        };
        if let Some(t) = task {
            self.disk = Some(t.cancel());
        }
        outcome?;
        self.disk
            .as_mut()
            .expect("the sync handed the steering back")
            .before_memory()?;
        Ok(())
    }

    /// After a failure past the pause: the destination may have announced the guest, which
    /// now runs here again, so announce it here too (on a thread of its own).
    fn announce_back(&self) {
        let Some(n) = &self.opts.network else {
            return;
        };
        let Some(cfg) = &n.announce_here else {
            tracing::warn!(
                migration = %crate::migrate::MigrationId(self.id),
                "the destination may have announced the guest before the migration failed; \
                 this host has no [announce] to announce it back"
            );
            return;
        };
        match Announcer::start(cfg.clone(), n.guest, self.status, self.id, "source") {
            Ok(a) => a.detach(),
            Err(e) => {
                tracing::error!(migration = %crate::migrate::MigrationId(self.id), "announcing the guest back: {e}")
            }
        }
    }

    /// Joins the group of `opts.group`, if any.
    fn join_group(&mut self) -> Result<(), MigrateError> {
        let Some(g) = &self.opts.group else {
            return Ok(());
        };
        let m = Member::join(
            g,
            &self.opts.psk,
            &self.opts.guest_label,
            self.guest.page_count(),
        )
        .map_err(|e| {
            MigrateError::Group(
                g.group.clone(),
                format!("coordinator {}: {e}", g.coordinator),
            )
        })?;
        self.member = Some(m);
        self.update(|s| {
            s.group = Some(g.group.clone());
            s.group_state = Some("iterating".into());
        });
        Ok(())
    }

    /// Tells the group how this migration ended.
    fn leave_group<T>(&mut self, result: &Result<T, MigrateError>) {
        let Some(mut m) = self.member.take() else {
            return;
        };
        let told = match result {
            Ok(_) => m.done(),
            Err(e) => m.fail(&e.to_string()),
        };
        if let Err(e) = told {
            tracing::warn!(migration = %crate::migrate::MigrationId(self.id), "telling the coordinator: {e}");
        }
    }

    /// The group's say on `own`, this migration's own decision: held members keep
    /// iterating (or, paced, wait for the others); everyone stops together.
    fn group_decision(
        &mut self,
        own: Decision,
        progress: Progress,
        iteration_took: Duration,
    ) -> Result<Decision, MigrateError> {
        let opts = self.opts;
        // The completion action is this migration's own; the group hears of it as a failure.
        if let Decision::GiveUp(_) = own {
            return Ok(own);
        }
        let (Some(mut m), Some(g)) = (self.member.take(), &opts.group) else {
            return Ok(own);
        };
        let group = g.group.clone();
        let lost =
            |e: std::io::Error| MigrateError::Group(group.clone(), format!("coordinator: {e}"));
        let go = |own: Decision| match own {
            Decision::Stop(r) => Decision::Stop(r),
            Decision::GiveUp(c) => Decision::GiveUp(c),
            Decision::Continue => Decision::Stop(super::StopReason::Requested),
        };
        let mut verdict = m.report(progress).map_err(&lost)?;
        if verdict == Verdict::Hold && progress.ready && g.pace {
            // Waiting costs nothing on the wire; one iteration per wait keeps what the
            // final copy will carry no larger than one wait's worth of writes.
            let wait =
                (iteration_took * 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
            self.update(|s| s.group_state = Some("paced".into()));
            if !self.abort.load(Ordering::Relaxed) {
                verdict = m.wait(wait).map_err(&lost)?;
            }
        }
        if verdict == Verdict::Hold && progress.ready && !g.pace {
            // Held and iterating: a guest that dirties little makes iterations of well
            // under a millisecond; a floor keeps that from spinning a core and the
            // coordinator.
            std::thread::sleep(HELD_ITERATION_FLOOR.saturating_sub(iteration_took));
        }
        let (state, decision) = match verdict {
            Verdict::Go => ("go", go(own)),
            Verdict::Hold if progress.ready => ("held", Decision::Continue),
            Verdict::Hold => ("iterating", Decision::Continue),
            Verdict::Alone => ("alone", own),
            Verdict::Abort => {
                self.member = Some(m); // so the coordinator hears how this one ended
                return Err(MigrateError::Group(
                    group,
                    "another member failed; the group aborts (--group-failure abort)".into(),
                ));
            }
        };
        if verdict != Verdict::Alone {
            self.member = Some(m);
        }
        self.update(|s| s.group_state = Some(state.into()));
        Ok(decision)
    }

    /// Records the destination's acknowledgement of `iteration`.
    fn ack(&self, iteration: u32) {
        self.acked.set(self.acked.get().max(iteration));
    }

    /// Checks for abort and for messages from the destination without waiting.
    fn poll(&self, session: &Session) -> Result<(), MigrateError> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(MigrateError::Aborted);
        }
        while let Ok(m) = session.from_dest.try_recv() {
            match m {
                Ok(ToSource::IterationAck { iteration }) => self.ack(iteration),
                Ok(ToSource::Failed { reason }) => {
                    return Err(MigrateError::Peer(text::from_peer(&reason)));
                }
                Ok(other) => return Err(MigrateError::Peer(format!("unexpected {other:?}"))),
                Err(e) => return Err(MigrateError::LinkLost(format!("control connection: {e}"))),
            }
        }
        Ok(())
    }

    /// Waits for one message other than an iteration ack.
    fn expect(&self, session: &Session, what: &'static str) -> Result<ToSource, MigrateError> {
        let deadline = Instant::now() + self.opts.timeout;
        loop {
            if self.abort.load(Ordering::Relaxed) && !self.committed {
                return Err(MigrateError::Aborted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match session
                .from_dest
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                Ok(Ok(ToSource::IterationAck { iteration })) => self.ack(iteration),
                Ok(Ok(ToSource::Failed { reason })) => {
                    return Err(MigrateError::Peer(text::from_peer(&reason)));
                }
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => {
                    return Err(MigrateError::LinkLost(format!("control connection: {e}")));
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline => {
                    return Err(MigrateError::Timeout(self.opts.timeout.as_secs(), what));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MigrateError::LinkLost("control connection closed".into()));
                }
            }
        }
    }

    /// Ends the data plane once its last frames are sent. A link that stops carrying them
    /// would block the sends for ever, with the guest paused: if no byte moves for the
    /// timeout, the data connections are closed, which ends the blocked sends, and the
    /// migration fails (the guest resumes here).
    fn drain(&self, session: &Session, pipeline: &mut SourcePipeline) -> Result<(), MigrateError> {
        let wire = pipeline.wire_bytes.clone();
        // Dropped when the pipeline has finished: the watchdog wakes at once (it runs in the
        // guest's pause, and the scope waits for it).
        let (done, finished_rx) = crossbeam_channel::bounded::<()>(0);
        let stalled = AtomicBool::new(false);
        let timeout = self.opts.timeout;
        let finished = std::thread::scope(|sc| {
            sc.spawn(|| {
                let (mut last, mut moved) = (wire.load(Ordering::Relaxed), Instant::now());
                while let Err(RecvTimeoutError::Timeout) =
                    finished_rx.recv_timeout(Duration::from_millis(50))
                {
                    let now = wire.load(Ordering::Relaxed);
                    if now != last {
                        (last, moved) = (now, Instant::now());
                    } else if moved.elapsed() > timeout {
                        stalled.store(true, Ordering::Release);
                        for s in &session.data {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                        return;
                    }
                }
            });
            let r = pipeline.finish();
            drop(done);
            r
        });
        if stalled.load(Ordering::Acquire) {
            return Err(MigrateError::Timeout(
                timeout.as_secs(),
                "taking the final frames: nothing was sent",
            ));
        }
        finished.map_err(MigrateError::from)
    }

    /// Sends `pages` as iteration `it` and waits until every stream has sealed it.
    fn send_iteration(
        &self,
        session: &Session,
        pipeline: &mut SourcePipeline,
        it: u32,
        pages: DirtyBitmap,
    ) -> Result<Vec<u64>, MigrateError> {
        let pages_in_iteration = pages.count();
        let scanned_before = pipeline.pages_scanned.load(Ordering::Relaxed);
        let (sent_before, began, wire_began) = (
            self.status.lock().expect("status lock").pages_sent,
            Instant::now(),
            pipeline.wire_bytes.load(Ordering::Relaxed),
        );
        pipeline
            .send_pages(it, pages)
            .map_err(|_| MigrateError::LinkLost("the data plane stopped".into()))?;
        super::hold::at(&format!("source-iteration-{it}"), self.id);
        // A destination that stops taking data (or a link that stops carrying it) blocks
        // the sends: no byte moving for the timeout fails the iteration.
        let (mut last_wire, mut moved) =
            (pipeline.wire_bytes.load(Ordering::Relaxed), Instant::now());
        loop {
            self.poll(session)?;
            // Live progress within the iteration, for `watch` and `status`.
            let done = pipeline.pages_scanned.load(Ordering::Relaxed) - scanned_before;
            let wire = pipeline.wire_bytes.load(Ordering::Relaxed);
            if wire != last_wire {
                (last_wire, moved) = (wire, Instant::now());
            } else if moved.elapsed() > self.opts.timeout {
                return Err(MigrateError::Timeout(
                    self.opts.timeout.as_secs(),
                    "taking data: nothing was sent",
                ));
            }
            self.abort_when_due()?;
            let secs = began.elapsed().as_secs_f64();
            let left = self
                .deadline
                .map(|d| millis(d.saturating_duration_since(Instant::now())));
            // The encoders publish their counters per batch: "saved" moves within an
            // iteration too, not only at its end.
            let codec = pipeline.codec_totals();
            self.update(|s| {
                if let Some(n) = s.completion.as_mut()
                    && n.cause == CompletionCause::Timeout
                    && !n.applied
                {
                    n.in_ms = left;
                }
                s.remaining = pages_in_iteration.saturating_sub(done);
                // Counted as they go, so a long first iteration shows its progress.
                s.pages_sent = sent_before + done.min(pages_in_iteration);
                s.wire_bytes = wire;
                s.set_codec(&codec);
                if secs > 0.0 {
                    // Until this iteration's first bytes move, the last rate still stands
                    // (a fresh iteration is not a link at 0 bit/s).
                    if wire > wire_began {
                        s.job.transfer_rate_bps = (wire - wire_began) as f64 / secs;
                    }
                    if done > 0 && s.phase == Phase::Iterating {
                        s.eta_ms = super::job_stats::estimate_completion_ms(
                            s.remaining,
                            done as f64 / secs,
                            s.job.dirty_rate_bps / PAGE_SIZE as f64,
                            s.guest_pages,
                        );
                    }
                }
            });
            match pipeline.wait_flushed_timeout(it, Duration::from_millis(100)) {
                Ok(Some(frames)) => {
                    self.update(|s| s.pages_sent = sent_before + pages_in_iteration);
                    return Ok(frames);
                }
                Ok(None) => {}
                Err(_) => return Err(MigrateError::LinkLost("the data plane stopped".into())),
            }
        }
    }

    /// One pre-copy iteration: sends `next`, then replaces it with the pages dirtied
    /// meanwhile. Returns the reason to stop, if the policy (or the group) says stop.
    #[allow(clippy::too_many_arguments)]
    fn iteration(
        &mut self,
        session: &mut Session,
        pipeline: &mut SourcePipeline,
        it: u32,
        next: &mut DirtyBitmap,
        unacked: &mut Vec<(u32, DirtyBitmap)>,
        decider: &mut StopDecider,
        reports: &mut Vec<IterationRecord>,
    ) -> Result<Option<super::StopReason>, MigrateError> {
        let pages = self.guest.page_count();
        let sent = next.count();
        let wire_before = pipeline.wire_bytes.load(Ordering::Relaxed);
        let t = Instant::now();
        let started = self.started;
        let (sent_before, saved_before) = {
            let s = self.status.lock().expect("status lock");
            (s.pages_sent, s.saved)
        };
        self.update(|s| {
            s.iteration = it;
            s.remaining = sent;
            s.job
                .setup_ms
                .get_or_insert_with(|| millis(started.elapsed()));
        });
        let acked = self.acked.get();
        unacked.retain(|(i, _)| *i > acked);
        unacked.push((it, next.clone()));
        // A broken link from here on resends `unacked` (which holds this iteration's pages)
        // and `next` (the pages dirtied since).
        let pages_now = std::mem::replace(next, DirtyBitmap::new(pages));
        let frames = self.send_iteration(session, pipeline, it, pages_now)?;
        session.tx.send(&ToDest::IterationEnd {
            iteration: it,
            frames,
        })?;
        self.guest.collect_dirty(next)?;
        pipeline.digests.invalidate_dirty(next);
        let dirtied = next.count();
        let codec = pipeline.codec_totals();
        let report = IterationReport {
            iteration: it,
            sent,
            dirtied,
            wire_bytes: pipeline.wire_bytes.load(Ordering::Relaxed) - wire_before,
            duration: t.elapsed(),
            elapsed: self.started.elapsed(),
        };
        decider.set_pause_costs(pause_costs(
            &codec,
            pipeline.wire_bytes.load(Ordering::Relaxed),
        ));
        let own = decider.after_iteration(&report);
        self.follow_throttle(decider);
        let decision = self.group_decision(
            own,
            Progress {
                iteration: it,
                sent,
                dirtied,
                remaining: dirtied,
                final_copy_ms: decider.estimate(dirtied).map(millis),
                iteration_ms: millis(report.duration),
                wire_bytes: pipeline.wire_bytes.load(Ordering::Relaxed),
                ready: matches!(own, Decision::Stop(_)),
            },
            report.duration,
        )?;
        reports.push(IterationRecord {
            iteration: it,
            sent,
            dirtied,
            wire_bytes: report.wire_bytes,
            ms: millis(report.duration),
        });
        let codec = pipeline.codec_totals();
        let secs = report.duration.as_secs_f64();
        self.update(|s| {
            s.pages_sent = sent_before + sent;
            s.last_sent = sent;
            s.last_dirtied = dirtied;
            s.remaining = dirtied;
            s.wire_bytes = pipeline.wire_bytes.load(Ordering::Relaxed);
            s.job.link_rate_bps = decider.rate();
            s.job.dirty_sync_count += 1;
            if secs > 0.0 {
                s.job.transfer_rate_bps = report.wire_bytes as f64 / secs;
                s.job.dirty_rate_bps = dirtied as f64 * PAGE_SIZE as f64 / secs;
            }
            s.expected_downtime_ms = decider.predicted_pause(dirtied).map(millis);
            s.completion = decider.notice(self.started.elapsed());
            s.eta_ms = if secs > 0.0 && sent > 0 {
                super::job_stats::estimate_completion_ms(
                    dirtied,
                    sent as f64 / secs,
                    dirtied as f64 / secs,
                    pages,
                )
            } else {
                s.expected_downtime_ms
            };
            s.set_codec(&codec);
            let saved = s.saved_since(&saved_before);
            s.push_history(super::IterationPoint {
                iteration: it,
                sent,
                dirtied,
                remaining: dirtied,
                wire_bytes: report.wire_bytes,
                ms: millis(report.duration),
                saved,
                paused: false,
            });
        });
        tracing::info!(
            migration = %crate::migrate::MigrationId(self.id),
            it,
            sent,
            dirtied,
            ?decision,
            "iteration done"
        );
        match decision {
            Decision::Stop(reason) => {
                if reason == super::StopReason::Forced {
                    tracing::warn!(
                        migration = self.id,
                        "completion action force: pausing whatever the ceiling"
                    );
                }
                return Ok(Some(reason));
            }
            Decision::GiveUp(_) => {
                let notice = decider.notice(self.started.elapsed());
                let why = notice.map_or_else(|| "completion action".into(), |n| n.to_string());
                tracing::warn!(migration = self.id, "{why}; the guest stays here");
                return Err(MigrateError::NotConverged(why));
            }
            Decision::Continue => {}
        }
        if decider.over_ceiling() {
            self.let_the_link_drain(session, pipeline, decider.rate())?;
        }
        self.poll(session)?;
        Ok(None)
    }

    /// Over the ceiling, the frames queued before the link are often what keeps the pause
    /// long, and the guest dirties little: iterations would follow each other at once, each
    /// refused, spending the ceiling's iteration bound in moments (and a core). So the next
    /// iteration waits until the queue has drained (at most 1 s; at least 20 ms).
    fn let_the_link_drain(
        &self,
        session: &Session,
        pipeline: &SourcePipeline,
        rate: f64,
    ) -> Result<(), MigrateError> {
        let queued = |p: &SourcePipeline| {
            pause_costs(&p.codec_totals(), p.wire_bytes.load(Ordering::Relaxed)).queued_bytes
        };
        let expected = if rate > 0.0 {
            Duration::from_secs_f64(queued(pipeline) as f64 / rate)
        } else {
            Duration::ZERO
        };
        let most = expected.clamp(HELD_ITERATION_FLOOR, Duration::from_secs(1));
        let start = Instant::now();
        loop {
            self.poll(session)?;
            let waited = start.elapsed();
            if waited >= most || (waited >= HELD_ITERATION_FLOOR && queued(pipeline) == 0) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The completion timeout with action `abort` also ends an iteration midway: a long one
    /// (a large guest on a slow link) would otherwise run far past it.
    fn abort_when_due(&self) -> Result<(), MigrateError> {
        let o = &self.opts.converge;
        if o.completion_action != CompletionAction::Abort
            || self.paused.is_some()
            || self.deadline.is_none_or(|d| Instant::now() < d)
        {
            return Ok(());
        }
        let notice = super::converge::CompletionNotice {
            action: CompletionAction::Abort,
            cause: CompletionCause::Timeout,
            in_ms: None,
            iterations_left: None,
            applied: true,
        };
        tracing::warn!(migration = self.id, "{notice}; the guest stays here");
        self.update(|s| s.completion = Some(notice));
        Err(MigrateError::NotConverged(notice.to_string()))
    }

    /// Applies the decider's throttle to the guest if it changed; a backend that cannot
    /// throttle turns auto-converge off for this migration.
    fn follow_throttle(&self, decider: &mut StopDecider) {
        let want = decider.throttle_percent();
        if want == self.throttle.get() {
            return;
        }
        if let Err(e) = self.guest.throttle(want) {
            tracing::warn!(migration = self.id, "auto-converge off: {e}");
            decider.disable_throttle();
            return;
        }
        tracing::info!(
            migration = self.id,
            percent = want,
            "auto-converge: guest throttled"
        );
        self.throttle.set(want);
        self.update(|s| {
            s.throttle_percent = want;
            s.throttle_peak_percent = s.throttle_peak_percent.max(want);
        });
    }

    /// Gives the guest back all its vCPU time, if auto-converge took some; failures are
    /// logged.
    fn release_throttle(&self) {
        if self.throttle.get() == 0 {
            return;
        }
        match self.guest.throttle(0) {
            Ok(()) => {
                tracing::info!(migration = self.id, "auto-converge: throttle released");
                self.throttle.set(0);
                self.update(|s| s.throttle_percent = 0);
            }
            Err(e) => tracing::error!(migration = self.id, "releasing the throttle: {e}"),
        }
    }

    /// Pre-copy lost its link in iteration `it` (`cause`): reconnects, with backoff, within
    /// the resume policy's bounds, and leaves in `next` every page the destination may not
    /// hold as it is now: those of the iterations it did not acknowledge, and those dirtied
    /// since. Both ends start new pipelines, so both codec caches start empty together.
    fn resume(
        &mut self,
        session: &mut Session,
        pipeline: &mut SourcePipeline,
        cause: &MigrateError,
        it: u32,
        next: &mut DirtyBitmap,
        unacked: &mut Vec<(u32, DirtyBitmap)>,
    ) -> Result<(), MigrateError> {
        let policy = self.opts.resume;
        let why = cause.to_string();
        tracing::warn!(
            migration = %crate::migrate::MigrationId(self.id),
            it,
            "pre-copy lost its link: {why}; reconnecting (at most {} attempts in {} s)",
            policy.attempts,
            policy.within.as_secs()
        );
        session.teardown();
        if let Err(e) = pipeline.finish() {
            let e = MigrateError::from(e);
            if !e.is_link_lost() {
                return Err(e);
            }
        }
        self.update(|s| {
            s.phase = Phase::Reconnecting;
            s.link_error = Some(why.clone());
        });
        let broke = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        let mut tried = 0;
        let mut last = why.clone();
        let sure = policy.attempts.min(MIN_ATTEMPTS);
        while tried < policy.attempts {
            // The time budget decides whether a further attempt starts, never the first
            // few: each can last as long as the budget (its waits are bounded by the
            // timeout), so on a loaded host one slow attempt would otherwise be the last.
            let left = policy.within.saturating_sub(broke.elapsed());
            if left.is_zero() && tried >= sure {
                break;
            }
            self.sleep(if left.is_zero() {
                backoff
            } else {
                backoff.min(left)
            })?;
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tried += 1;
            match self.reconnect(tried, it + 1) {
                Ok((s, mut p, acked)) => {
                    p.carry_over(pipeline);
                    *session = s;
                    *pipeline = p;
                    self.acked.set(acked);
                    for (_, pages) in unacked.drain(..).filter(|(i, _)| *i > acked) {
                        next.merge(&pages);
                    }
                    self.guest.collect_dirty(next)?;
                    let resend = next.count();
                    self.update(|s| {
                        s.phase = Phase::Iterating;
                        s.resumes += 1;
                        s.remaining = resend;
                    });
                    tracing::info!(
                        migration = %crate::migrate::MigrationId(self.id),
                        attempt = tried,
                        acked,
                        resend,
                        "pre-copy resumed"
                    );
                    return Ok(());
                }
                // The destination is unreachable, the link broke again, or it asked us to
                // come back (busy, or still setting up an earlier attempt): try again.
                Err(e)
                    if e.is_link_lost()
                        || e.is_busy()
                        || matches!(e, MigrateError::Connect(..)) =>
                {
                    tracing::warn!(migration = %crate::migrate::MigrationId(self.id), attempt = tried, "reconnecting: {e}");
                    last = e.to_string();
                }
                // It refused (it no longer holds the migration), a wrong key, an abort.
                Err(e) => return Err(e),
            }
        }
        Err(MigrateError::LinkLost(format!(
            "{}; gave up reconnecting after {tried} attempt(s) in {} s (last: {last})",
            cause.detail(),
            broke.elapsed().as_secs()
        )))
    }

    /// One reconnection: a new session whose destination agrees to go on with iteration
    /// `iteration`; returns it with the last iteration the destination acknowledged.
    fn reconnect(
        &self,
        attempt: u32,
        iteration: u32,
    ) -> Result<(Session, SourcePipeline, u32), MigrateError> {
        let (mut session, mut pipeline) = self.connect(attempt)?;
        let answer = session
            .tx
            .send(&ToDest::Resume { iteration })
            .map_err(MigrateError::from)
            .and_then(|()| self.expect(&session, "resuming"));
        match answer {
            Ok(ToSource::Resumed { acked }) if acked < iteration => Ok((session, pipeline, acked)),
            other => {
                session.teardown();
                let _ = pipeline.finish();
                Err(match other {
                    Ok(m) => MigrateError::Peer(format!("expected Resumed, got {m:?}")),
                    Err(e) => e,
                })
            }
        }
    }

    /// Waits `d`, or less if the operator aborts.
    fn sleep(&self, d: Duration) -> Result<(), MigrateError> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if self.abort.load(Ordering::Relaxed) {
                return Err(MigrateError::Aborted);
            }
            std::thread::sleep(
                until
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50)),
            );
        }
        Ok(())
    }

    fn precopy_and_switch(
        &mut self,
        session: &mut Session,
        pipeline: &mut SourcePipeline,
    ) -> Result<Vec<IterationRecord>, MigrateError> {
        let o = self.opts;
        let pages = self.guest.page_count();
        let mut decider =
            StopDecider::new(o.policy, o.max_downtime, pages).with_converge(o.converge);
        self.deadline = o
            .converge
            .completion_timeout(pages)
            .map(|t| self.started + t);
        if let Some(n) = decider.notice(self.started.elapsed()) {
            tracing::info!(migration = self.id, "{n}");
            self.update(|s| s.completion = Some(n));
        }
        let mut next = DirtyBitmap::full(pages);
        let mut reports = Vec::new();
        // Pages sent in iterations the destination has not acknowledged yet: resent if the
        // link breaks.
        let mut unacked = Vec::new();
        let mut it = 0u32;
        self.update(|s| s.phase = Phase::Iterating);

        let reason = loop {
            it += 1;
            let step = self.iteration(
                session,
                pipeline,
                it,
                &mut next,
                &mut unacked,
                &mut decider,
                &mut reports,
            );
            match step {
                Ok(Some(reason)) => break reason,
                Ok(None) => {}
                Err(e) if e.is_link_lost() && o.resume.attempts > 0 => {
                    self.resume(session, pipeline, &e, it, &mut next, &mut unacked)?;
                }
                Err(e) => return Err(e),
            }
        };

        // Stop and copy.
        self.update(|s| {
            s.phase = Phase::StopAndCopy;
            s.stop_reason = Some(reason);
        });
        // The pause counts from the request: stopping a vCPU takes time the guest sees.
        let pausing = Instant::now();
        self.guest.pause()?;
        self.paused = Some(pausing);
        tracing::info!(
            migration = %crate::migrate::MigrationId(self.id),
            ms = millis(pausing.elapsed()),
            "guest paused"
        );
        // Paused: the throttle has nothing left to slow (and must not outlive the migration).
        self.release_throttle();
        // The destination announces the guest now, while the final pages travel.
        self.told_paused = true;
        session.tx.send(&ToDest::Paused)?;
        super::hold::at("source-paused", self.id);
        let wire_final = pipeline.wire_bytes.load(Ordering::Relaxed);
        self.guest.collect_dirty(&mut next)?;
        pipeline.digests.invalidate_dirty(&next);
        it += 1;
        let last = next.count();
        let frames = self.send_iteration(session, pipeline, it, next)?;
        let since = |p: Option<Instant>| p.map_or(0, |p| millis(p.elapsed()));
        tracing::info!(
            migration = %crate::migrate::MigrationId(self.id),
            pages = last,
            ms = since(self.paused),
            "final pages queued"
        );
        // Final goes first so the destination hashes its copy while we hash ours. A state
        // larger than a control message goes ahead of it in parts.
        let mut state = self.guest.state()?;
        let state_bytes = state.len() as u64;
        let last_len = state.len().checked_sub(1).map_or(0, |n| n % STATE_PART + 1);
        let final_part = state.split_off(state.len() - last_len);
        for part in state.chunks(STATE_PART) {
            session.tx.send(&ToDest::StatePart {
                bytes: part.to_vec(),
            })?;
        }
        session.tx.send(&ToDest::Final {
            iteration: it,
            frames,
            state: final_part,
        })?;
        // Everything is queued: close the data plane so the destination's pipeline ends
        // (and releases guest memory) before it verifies.
        self.drain(session, pipeline)?;
        tracing::info!(
            migration = %crate::migrate::MigrationId(self.id),
            ms = since(self.paused),
            "data plane drained"
        );
        let known = |c| pipeline.digests.known(c);
        let digest = self.guest.memory_digest_with(&known)?;
        tracing::info!(
            migration = %crate::migrate::MigrationId(self.id),
            ms = since(self.paused),
            reused = pipeline.digests.valid_chunks(),
            of = pipeline.digests.chunks(),
            "digest taken (chunks hashed while sending reused)"
        );
        session.tx.send(&ToDest::Digest { digest })?;
        let final_wire = pipeline.wire_bytes.load(Ordering::Relaxed) - wire_final;
        let (final_ms, saved_before) = (
            self.paused.map_or(0, |p| millis(p.elapsed())),
            self.status.lock().expect("status lock").saved,
        );
        let codec = pipeline.codec_totals();
        reports.push(IterationRecord {
            iteration: it,
            sent: last,
            dirtied: 0,
            wire_bytes: final_wire,
            ms: self.paused.map_or(0, |p| millis(p.elapsed())),
        });
        self.update(|s| {
            s.paused_bytes = Some(final_wire + state_bytes);
            s.state_bytes = Some(state_bytes);
            s.phase = Phase::Verifying;
            s.iteration = it;
            s.last_sent = last;
            s.remaining = 0;
            s.eta_ms = None;
            s.set_codec(&codec);
            let saved = s.saved_since(&saved_before);
            s.push_history(super::IterationPoint {
                iteration: it,
                sent: last,
                dirtied: 0,
                remaining: 0,
                wire_bytes: final_wire,
                ms: final_ms,
                saved,
                paused: true,
            });
        });
        match self.expect(session, "confirming it holds the guest")? {
            ToSource::Ready { digest: d } if d == digest => {}
            ToSource::Ready { digest: d } => {
                return Err(MigrateError::DigestMismatch {
                    ours: digest,
                    dest: d,
                });
            }
            m => return Err(MigrateError::Peer(format!("expected Ready, got {m:?}"))),
        }
        tracing::info!(
            migration = %crate::migrate::MigrationId(self.id),
            ms = since(self.paused),
            "destination ready"
        );
        super::hold::at("source-ready", self.id);
        // Last look before the commit: an abort, or a destination already gone (its
        // connection closed: it discards), means the guest stays here.
        self.poll(session)?;

        // COMMIT POINT: from here on the guest belongs to the destination.
        self.guest.hand_over()?;
        self.committed = true;
        tracing::info!(migration = %crate::migrate::MigrationId(self.id), ms = since(self.paused), "committed");
        let sent_commit = session.tx.send(&ToDest::Commit);
        super::hold::at("source-committed", self.id);
        let started = sent_commit
            .map_err(MigrateError::from)
            .and_then(|()| self.expect(session, "starting the guest"));
        let pause = self.paused.map(|p| millis(p.elapsed()));
        // The guest runs at the destination: let go of the disk here (the migration is
        // reported done once the disk is too).
        if let Some(steer) = self.disk.as_mut() {
            let (st, id) = (self.status, self.id);
            if super::disk::after_commit_step(st, id, "demotion", || steer.after_commit()) {
                super::disk::after_commit_step(st, id, "finish", || steer.finish());
            }
        }
        let codec = pipeline.codec_totals();
        let wire = pipeline.wire_bytes.load(Ordering::Relaxed);
        let phase = match started {
            Ok(ToSource::Started) => Phase::Completed,
            _ => Phase::CommittedUnconfirmed,
        };
        self.update(|s| {
            s.phase = phase;
            s.verified = Some(true);
            s.pause_ms = pause;
            s.wire_bytes = wire;
            s.set_codec(&codec);
        });
        if phase == Phase::CommittedUnconfirmed {
            tracing::error!(
                migration = %crate::migrate::MigrationId(self.id),
                "committed but the destination did not confirm the start; the guest must be started there"
            );
        }
        Ok(reports)
    }
}

//! The destination's side: accept a migration, decode it into a new guest, verify it, and
//! start the guest only when the source commits.
//!
//! Until `Commit` arrives nothing runs here: on abort, failure, a lost connection or a
//! timeout, the guest built so far is dropped (discarded) and the source keeps its own.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::announcer::Announcer;
use super::disk::{DrbdHost, SyncTask};
use super::{MigrateError, MigrationStatus, Phase, Role};
use crate::codec::CodecStats;
use crate::crypto::{Direction, PreSharedKey};
use crate::disk::drbd::{DrbdDisk, Side, Steer};
use crate::guest::DestGuest;
use crate::network::{AnnounceConfig, GuestIdentity};
use crate::pipeline::sink::SinkPipeline;
use crate::protocol::{
    AuthHello, ControlRx, ControlTx, Hello, MAX_CACHE_BYTES, MAX_STATE, ProtocolError, Proven,
    ToDest, ToSource, accept_opening, control_channel, send_welcome, text,
};
use crate::transport::SocketOptions;

/// Everything a destination needs to know.
#[derive(Debug, Clone)]
pub struct DestOptions {
    /// The pre-shared key.
    pub psk: PreSharedKey,
    /// Socket tuning.
    pub socket: SocketOptions,
    /// Pin pipeline threads to cores.
    pub pin_threads: bool,
    /// How long the source may stay silent.
    pub timeout: Duration,
    /// Largest guest accepted, in pages.
    pub max_guest_pages: u64,
    /// Most data streams accepted.
    pub max_streams: u32,
    /// How this host steers DRBD (`[drbd]`); without it, guests with a disk are refused.
    pub drbd: Option<DrbdHost>,
    /// Where this host announces the guests it receives (`[announce]`); without it, guests
    /// with a network identity are refused.
    pub announce: Option<AnnounceConfig>,
    /// How long a migration whose link broke in pre-copy is held for its source to
    /// reconnect.
    pub resume_window: Duration,
}

/// What moves with the guest at this end: its disk and its announcement.
#[derive(Debug, Default)]
struct Alongside {
    /// Whom to announce at the pause.
    identity: Option<GuestIdentity>,
    /// The disk's steering, when no step runs on a thread.
    steer: Option<Steer>,
    /// The bulk sync and the switch to protocol C, while they run.
    sync: Option<SyncTask>,
    /// The announcement, once the guest paused at the source.
    announcer: Option<Announcer>,
    /// `Prepared` was sent and the guest has not paused: a broken link may resume.
    resumable: bool,
    /// `Ready` was sent: from here only the source decides the guest's fate.
    ready: bool,
}

impl Alongside {
    /// After a failure before the commit: stop announcing, put the disk back as it was.
    fn undo(&mut self, status: &Arc<Mutex<MigrationStatus>>) {
        if let Some(a) = self.announcer.take() {
            a.stop();
        }
        if let Some(t) = self.sync.take() {
            self.steer = Some(t.cancel());
        }
        if let Some(steer) = self.steer.as_mut() {
            let id = status.lock().expect("status lock").id;
            super::disk::roll_back(steer, status, id);
        }
    }
}

/// The end result at the destination.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DestSummary {
    /// Final status.
    pub status: MigrationStatus,
    /// Codec counters over all streams.
    pub codec: CodecStats,
}

/// Builds the destination guest for a Hello (or says why not).
pub type GuestFactory<'a> = dyn FnOnce(&Hello) -> Result<Arc<dyn DestGuest>, String> + 'a;

/// Accepts one migration on `listener` into a new synthetic guest of the size the source
/// announces: the destination of `skyferry demo` and of the benchmarks.
pub fn receive_synthetic(
    listener: &TcpListener,
    opts: &DestOptions,
    abort: &AtomicBool,
) -> Result<DestSummary, MigrateError> {
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        0,
        Role::Destination,
        "",
        0,
    )));
    let factory = Box::new(|h: &Hello| {
        let target = crate::guest::synthetic::SyntheticTarget::new(h.guest_pages)
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(target) as Arc<dyn DestGuest>)
    });
    receive(listener, opts, factory, &status, abort)
}

/// Where a migration's data connections come from.
pub trait DataStreams {
    /// Called once the Hello names migration `id`, before the Welcome lets the source open
    /// its data streams; an error refuses the migration (`id` is already being received:
    /// a replayed or duplicated Hello).
    fn expect(&mut self, id: u64) -> Result<(), String>;

    /// Data stream `want` of migration `id`. Gives up when the source hangs up `control`
    /// (it refused our key check, or died) or after `timeout`.
    fn next(
        &mut self,
        control: &TcpStream,
        timeout: Duration,
        id: u64,
        want: u32,
    ) -> Result<TcpStream, MigrateError>;

    /// After pre-copy lost its link: the next control connection that proved the key with
    /// a Hello to resume migration `id`, within `window`. None when the window has passed or
    /// `abort` is set.
    fn resumed(
        &mut self,
        id: u64,
        window: Duration,
        abort: &AtomicBool,
    ) -> Option<(TcpStream, Box<AuthHello>)>;
}

/// Data streams accepted on the migration's own listener, one migration at a time (the
/// demo and the benchmarks; the daemon routes them, see `daemon::acceptor`).
#[derive(Debug)]
pub struct ListenerStreams<'a> {
    /// The listener.
    pub listener: &'a TcpListener,
    /// The key each stream proves it holds.
    pub psk: PreSharedKey,
}

impl DataStreams for ListenerStreams<'_> {
    fn expect(&mut self, _id: u64) -> Result<(), String> {
        Ok(())
    }

    fn next(
        &mut self,
        control: &TcpStream,
        timeout: Duration,
        id: u64,
        want: u32,
    ) -> Result<TcpStream, MigrateError> {
        accept_data(self.listener, &self.psk, control, timeout, id, want)
    }

    fn resumed(
        &mut self,
        id: u64,
        window: Duration,
        abort: &AtomicBool,
    ) -> Option<(TcpStream, Box<AuthHello>)> {
        let deadline = Instant::now() + window;
        self.listener.set_nonblocking(true).ok()?;
        let found = loop {
            if abort.load(Ordering::Relaxed) || Instant::now() >= deadline {
                break None;
            }
            match self.listener.accept() {
                Ok((mut c, peer)) => match prove(&mut c, &self.psk, window) {
                    Ok(Proven::Control(auth)) => break Some((c, auth)),
                    Ok(Proven::Data(_)) => {
                        tracing::warn!(%peer, "migration {id:x}: dropping a data stream while waiting for the source to reconnect");
                    }
                    Err(e) => tracing::warn!(%peer, "dropping a connection: {e}"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    tracing::warn!("migration {id:x}: waiting for the source to reconnect: {e}");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        self.listener.set_nonblocking(false).ok()?;
        found
    }
}

/// Accepts one migration on `listener` and carries it to its end.
pub fn receive(
    listener: &TcpListener,
    opts: &DestOptions,
    make_guest: Box<GuestFactory<'_>>,
    status: &Arc<Mutex<MigrationStatus>>,
    abort: &AtomicBool,
) -> Result<DestSummary, MigrateError> {
    // One migration: the first connection must be its control connection and prove the key.
    let started = Instant::now();
    let (mut control, _) = listener
        .accept()
        .map_err(|e| MigrateError::Connect("accepting the control connection".into(), e))?;
    let auth = match prove(&mut control, &opts.psk, opts.timeout) {
        Ok(Proven::Control(auth)) => auth,
        Ok(Proven::Data(s)) => {
            let e = MigrateError::Peer(format!(
                "data stream {} came before its migration's control connection",
                s.stream
            ));
            return Err(fail(status, started, e));
        }
        Err(e) => return Err(fail(status, started, e.into())),
    };
    tune(&mut control, opts)?;
    receive_on(
        control,
        &auth,
        &mut ListenerStreams {
            listener,
            psk: opts.psk.clone(),
        },
        opts,
        make_guest,
        status,
        abort,
    )
}

/// Carries the migration whose control connection is `control` (its Hello `auth` proved the
/// key; the socket is tuned, see [`tune`]) to its end, its data streams coming from `streams`.
pub fn receive_on(
    mut control: TcpStream,
    auth: &AuthHello,
    streams: &mut dyn DataStreams,
    opts: &DestOptions,
    make_guest: Box<GuestFactory<'_>>,
    status: &Arc<Mutex<MigrationStatus>>,
    abort: &AtomicBool,
) -> Result<DestSummary, MigrateError> {
    let started = Instant::now();
    let hello = &auth.hello;
    // Every line this migration logs here from now on names it.
    let _span =
        tracing::info_span!("migration", id = %super::MigrationId(hello.migration_id)).entered();
    if hello.resume > 0 {
        // A reconnection that found no migration waiting for it (the acceptor routes the
        // others to theirs): say so, so the source stops trying.
        let why = format!(
            "migration {:x} is not held here for resuming (it was discarded, its resume window \
             passed, or this daemon restarted)",
            hello.migration_id
        );
        send_welcome(&mut control, &opts.psk, auth, Err(why.clone()))?;
        return Err(MigrateError::Peer(format!("refused a reconnection: {why}")));
    }
    *status.lock().expect("status lock") = MigrationStatus::new(
        hello.migration_id,
        Role::Destination,
        &hello.guest,
        hello.guest_pages,
    );

    let verdict = check_hello(hello, opts)
        .and_then(|()| crate::limits::check_incoming(hello))
        .and_then(|()| streams.expect(hello.migration_id));
    let guest = verdict.clone().and_then(|()| make_guest(hello));
    let keys = send_welcome(
        &mut control,
        &opts.psk,
        auth,
        guest.as_ref().map(|_| ()).map_err(Clone::clone),
    )?;
    let refusal = match (&verdict, &guest) {
        (Err(why), _) | (_, Err(why)) => Some(why.clone()),
        _ => None,
    };
    let (Some(keys), Ok(guest)) = (keys, guest) else {
        let why = refusal.unwrap_or_else(|| "refused".into());
        return Err(fail(
            status,
            started,
            MigrateError::Peer(format!("refused: {why}")),
        ));
    };
    let (mut link, first) =
        match Link::open(control, streams, hello, &keys, &guest, opts, &mut false) {
            Ok(l) => l,
            Err(e) => return Err(fail(status, started, e)),
        };
    let mut alongside = Alongside::default();
    let mut acked = 0;
    let mut first = Some(first);
    let result = loop {
        let result = follow(
            first.take(),
            &mut link,
            guest.as_ref(),
            status,
            abort,
            opts,
            &mut alongside,
            &mut acked,
            started,
        );
        match result {
            Err(e) if e.is_link_lost() && alongside.resumable => {
                // Pre-copy lost its link: hold what arrived for the source to come back.
                let tail = link.pipeline.stop();
                if let Err(p) = tail {
                    let p = MigrateError::from(p);
                    if !p.is_link_lost() {
                        break Err(p);
                    }
                }
                match wait_resume(streams, hello, &guest, opts, status, abort, &e) {
                    Ok((mut resumed, iteration)) => {
                        resumed.pipeline.carry_over(&link.pipeline);
                        link = resumed;
                        tracing::info!(
                            migration = %crate::migrate::MigrationId(hello.migration_id),
                            iteration,
                            acked,
                            "pre-copy resumed"
                        );
                        if let Err(e) = link.tx.send(&ToSource::Resumed { acked }) {
                            break Err(e.into());
                        }
                        let mut st = status.lock().expect("status lock");
                        st.phase = Phase::Iterating;
                        st.resumes += 1;
                    }
                    Err(e) => break Err(e),
                }
            }
            other => break other,
        }
    };
    let Link {
        mut tx,
        mut rx,
        mut pipeline,
    } = link;
    let codec = pipeline.codec_totals();
    match result {
        Ok(()) => {
            let tail = pipeline.finish();
            if let Err(e) = tail {
                tracing::warn!("pipeline after the start: {e}");
            }
            let mut st = status.lock().expect("status lock");
            st.set_codec(&codec);
            st.elapsed_ms = millis(started.elapsed());
            Ok(DestSummary {
                status: st.clone(),
                codec,
            })
        }
        Err(e)
            if alongside.ready
                && matches!(e, MigrateError::Protocol(_) | MigrateError::Timeout(..)) =>
        {
            // Ready was sent: the source may have committed since. Neither discard (the
            // guest would be lost) nor start (it may run at the source): hold it, paused.
            let id = hello.migration_id;
            let why = format!(
                "in doubt: lost the source after telling it we were ready ({e}); it may have \
                 committed. The guest is held here, paused. If the source's status says \
                 committed-unconfirmed, start it here: skyferry resolve {id:x} --start; if it \
                 says failed or aborted: skyferry resolve {id:x} --discard"
            );
            tracing::error!(migration = %crate::migrate::MigrationId(id), "{why}");
            if let Some(a) = alongside.announcer.take() {
                a.detach();
            }
            let mut st = status.lock().expect("status lock");
            st.phase = Phase::InDoubt;
            st.error = Some(why.clone());
            st.elapsed_ms = millis(started.elapsed());
            Err(MigrateError::InDoubt(why))
        }
        Err(e) => {
            // The data streams may have closed under a wait because the operator aborted at
            // the source: the Abort then already waits on the control channel. Say so.
            let e = match rx.recv::<ToDest>() {
                Ok(ToDest::Abort { operator: true, .. }) => MigrateError::Aborted,
                _ => e,
            };
            // Discard: stop the pipeline and drop the half-built guest.
            let _ = tx.send(&ToSource::Failed {
                reason: e.to_string(),
            });
            // The source waits for this end's disk to let go before it restores its own.
            alongside.undo(status);
            tx.shutdown();
            let tail = pipeline.stop();
            drop(guest);
            // A broken link is usually the pipeline's own failure (a bad frame, say); prefer it.
            let e = match (e, tail) {
                (e, Err(p)) if e.is_link_lost() => p.into(),
                (e, _) => e,
            };
            Err(fail(status, started, e))
        }
    }
}

/// One session's connections: the control channel and the data pipeline. A migration has
/// one, or several if its pre-copy resumed after the link broke.
struct Link {
    tx: ControlTx,
    rx: ControlRx,
    pipeline: SinkPipeline,
}

impl Link {
    /// After the Welcome: takes the data streams, opens the control channel, waits for the
    /// source's first sealed message, and only then (the source proved it holds the key:
    /// `proven` is set) starts the pipeline. Returns the link and that first message.
    fn open(
        control: TcpStream,
        streams: &mut dyn DataStreams,
        hello: &Hello,
        keys: &crate::crypto::MigrationKeys,
        guest: &Arc<dyn DestGuest>,
        opts: &DestOptions,
        proven: &mut bool,
    ) -> Result<(Link, ToDest), MigrateError> {
        let mut data = Vec::new();
        let mut stream_keys = Vec::new();
        for want in 1..=hello.streams {
            let d = streams.next(&control, opts.timeout, hello.migration_id, want)?;
            // The receive ring waits on its own terms; the driver times out on progress.
            d.set_read_timeout(None)
                .map_err(|e| MigrateError::Connect("data timeout".into(), e))?;
            opts.socket
                .apply(&d)
                .map_err(|e| MigrateError::Connect("tuning a data socket".into(), e))?;
            data.push(d);
            stream_keys.push(keys.stream_key(want, Direction::SourceToDest));
        }
        let (tx, mut rx) = control_channel(&control, keys, Direction::DestToSource)?;
        // The decoders' caches are allocated only for a source that proved it holds the
        // key: its first sealed message must open (the Hello and the data streams are
        // cleartext, and anyone could open them to make this host allocate streams x cache).
        let first = first_sealed(&mut rx, opts.timeout)?;
        *proven = true;
        let frame_size = usize::try_from(hello.frame_size).unwrap_or(usize::MAX);
        let pipeline = SinkPipeline::start(
            guest,
            data,
            &stream_keys,
            &hello.codec,
            frame_size,
            opts.pin_threads,
        )?;
        Ok((Link { tx, rx, pipeline }, first))
    }
}

/// Pre-copy lost its link (`cause`): waits, up to the resume window, for the source to
/// reconnect and prove it holds the key. Connections that are not this migration's source
/// resuming are refused and the wait goes on. Returns the new link and the iteration the
/// source goes on with.
fn wait_resume(
    streams: &mut dyn DataStreams,
    hello: &Hello,
    guest: &Arc<dyn DestGuest>,
    opts: &DestOptions,
    status: &Arc<Mutex<MigrationStatus>>,
    abort: &AtomicBool,
    cause: &MigrateError,
) -> Result<(Link, u32), MigrateError> {
    let id = hello.migration_id;
    let window = opts.resume_window;
    tracing::warn!(
        migration = %crate::migrate::MigrationId(id),
        "pre-copy lost its link: {cause}; holding what arrived for {} s for the source to reconnect",
        window.as_secs()
    );
    {
        let mut st = status.lock().expect("status lock");
        st.phase = Phase::Reconnecting;
        st.link_error = Some(cause.to_string());
    }
    // The window counts from the last sign of the source: the break, then each
    // reconnection that proved the key (a source whose attempt failed here after that is
    // still trying, and gets a whole window again). A reconnection that did not prove it
    // extends nothing: a peer without the key cannot keep the migration held.
    let mut deadline = Instant::now() + window;
    let mut failed = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some((control, auth)) = streams.resumed(id, left, abort) else {
            if abort.load(Ordering::Relaxed) {
                return Err(MigrateError::Aborted);
            }
            let tries = match failed {
                0 => String::new(),
                n => format!(" after {n} failed reconnection(s), see the log"),
            };
            return Err(MigrateError::LinkLost(format!(
                "{}; the source did not reconnect within {} s{tries}",
                cause.detail(),
                window.as_secs()
            )));
        };
        let mut proven = false;
        match resume_link(control, &auth, streams, hello, guest, opts, &mut proven) {
            Ok(r) => return Ok(r),
            Err(e) => {
                failed += 1;
                if proven {
                    deadline = Instant::now() + window;
                }
                tracing::warn!(
                    migration = %crate::migrate::MigrationId(id),
                    "a reconnection failed and was closed: {e}; still holding the migration \
                     for {} s for the source to try again",
                    deadline.saturating_duration_since(Instant::now()).as_secs()
                );
            }
        }
    }
}

/// Takes one reconnection: it must be the same migration's source (same id, guest, streams,
/// codec and frame size), hold the key, and open with `Resume`.
fn resume_link(
    mut control: TcpStream,
    auth: &AuthHello,
    streams: &mut dyn DataStreams,
    original: &Hello,
    guest: &Arc<dyn DestGuest>,
    opts: &DestOptions,
    proven: &mut bool,
) -> Result<(Link, u32), MigrateError> {
    tune(&mut control, opts)?;
    let h = &auth.hello;
    let verdict = same_migration(original, h);
    let Some(keys) = send_welcome(&mut control, &opts.psk, auth, verdict.clone())? else {
        let why = verdict.err().unwrap_or_default();
        return Err(MigrateError::Peer(format!("refused: {why}")));
    };
    let (mut link, first) = Link::open(control, streams, h, &keys, guest, opts, proven)?;
    match first {
        ToDest::Resume { iteration } => Ok((link, iteration)),
        m => {
            link.tx.shutdown();
            let _ = link.pipeline.stop();
            Err(MigrateError::Peer(format!(
                "a reconnection opened with {m:?}, not Resume"
            )))
        }
    }
}

/// Tunes a control connection whose Hello proved the key.
pub fn tune(control: &mut TcpStream, opts: &DestOptions) -> Result<(), MigrateError> {
    opts.socket
        .apply(control)
        .map_err(|e| MigrateError::Connect("tuning the control socket".into(), e))?;
    control
        .set_read_timeout(Some(opts.timeout))
        .map_err(|e| MigrateError::Connect("control timeout".into(), e))
}

/// Greets a connection accepted on a listener of its own and reads its opening, within
/// `timeout` (blocking: the demo and the benchmarks; the daemon's acceptor does this for
/// many connections at once).
fn prove(
    c: &mut TcpStream,
    psk: &PreSharedKey,
    timeout: Duration,
) -> Result<Proven, ProtocolError> {
    c.set_nonblocking(false)
        .and_then(|()| c.set_read_timeout(Some(timeout.min(Duration::from_secs(5)))))
        .map_err(|e| ProtocolError::io("a new connection", e))?;
    accept_opening(c, psk)
}

/// A reconnection's Hello must describe the migration it resumes.
fn same_migration(original: &Hello, h: &Hello) -> Result<(), String> {
    let same = h.resume > 0
        && h.migration_id == original.migration_id
        && h.guest_pages == original.guest_pages
        && h.streams == original.streams
        && h.codec == original.codec
        && h.frame_size == original.frame_size
        && h.backend == original.backend;
    if same {
        Ok(())
    } else {
        Err(format!(
            "a reconnection to migration {:x} must describe the same migration",
            original.migration_id
        ))
    }
}

/// Accepts data stream `want` of migration `id`, dropping any other connection (another
/// migration arriving meanwhile waits for its turn and fails its handshake cleanly). Gives
/// up when the source hangs up its control connection (it refused our key check, or died)
/// or after `timeout`.
fn accept_data(
    listener: &TcpListener,
    psk: &PreSharedKey,
    control: &std::net::TcpStream,
    timeout: Duration,
    id: u64,
    want: u32,
) -> Result<std::net::TcpStream, MigrateError> {
    let io = |what: &str, e| MigrateError::Connect(what.to_string(), e);
    let deadline = Instant::now() + timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| io("listener", e))?;
    let result = loop {
        match listener.accept() {
            Ok((mut d, peer)) => match prove(&mut d, psk, timeout) {
                Ok(Proven::Data(h)) if h.migration_id == id && h.stream == want => {
                    break Ok(d);
                }
                other => tracing::warn!(
                    %peer,
                    "dropping a connection that is not data stream {want} of migration {id:x}: {other:?}"
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => break Err(io("accepting a data stream", e)),
        }
        if let Err(e) = source_still_opening(control, timeout, deadline) {
            break Err(e);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    listener
        .set_nonblocking(false)
        .map_err(|e| io("listener", e))?;
    result
}

/// Between looks for a data stream: fails once the source has hung up its control
/// connection (it refused our key check, or died; nothing is consumed from it) or the
/// `deadline` for opening the streams has passed.
pub(crate) fn source_still_opening(
    control: &TcpStream,
    timeout: Duration,
    deadline: Instant,
) -> Result<(), MigrateError> {
    let io = |e| MigrateError::Connect("control".into(), e);
    control.set_nonblocking(true).map_err(io)?;
    let peeked = control.peek(&mut [0u8; 1]);
    control.set_nonblocking(false).map_err(io)?;
    match peeked {
        Ok(0) => Err(MigrateError::Peer(
            "source hung up before opening its data streams (did its key check fail?)".into(),
        )),
        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => Err(io(e)),
        _ if Instant::now() >= deadline => Err(MigrateError::Timeout(
            timeout.as_secs(),
            "opening data streams",
        )),
        _ => Ok(()),
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn fail(status: &Arc<Mutex<MigrationStatus>>, started: Instant, e: MigrateError) -> MigrateError {
    let mut st = status.lock().expect("status lock");
    st.phase = if matches!(e, MigrateError::Aborted) {
        Phase::Aborted
    } else {
        Phase::Failed
    };
    st.error = Some(e.to_string());
    st.elapsed_ms = millis(started.elapsed());
    st.job.ended_at_ms = Some(super::job_stats::unix_ms());
    e
}

/// What this host is willing to receive from a Hello that proved the key (its version was
/// checked from the header). Public for the fuzz target (`dataplane/fuzz`), which runs every
/// Hello it reads through it.
pub fn check_hello(h: &Hello, opts: &DestOptions) -> Result<(), String> {
    if h.guest_pages == 0 || h.guest_pages > opts.max_guest_pages {
        return Err(format!(
            "guest of {} pages exceeds this host's limit of {} pages",
            h.guest_pages, opts.max_guest_pages
        ));
    }
    if h.streams == 0 || h.streams > opts.max_streams {
        return Err(format!(
            "{} streams requested, this host accepts 1..={}",
            h.streams, opts.max_streams
        ));
    }
    h.codec.validate().map_err(|e| e.to_string())?;
    // Every data stream's decoder allocates this cache (and a page index of 40 bytes per
    // block, written at once) as soon as the streams announce themselves in the clear, before
    // anything is authenticated: without a bound, a peer without the key could ask for the
    // 4 TiB `validate` allows per stream and abort this daemon with a failed allocation, or
    // bring in the OOM killer (found by the `handshake` fuzz target).
    if h.codec.uses_cache() && h.codec.cache_bytes > MAX_CACHE_BYTES {
        return Err(format!(
            "codec cache of {} bytes per stream exceeds this host's limit of {MAX_CACHE_BYTES}",
            h.codec.cache_bytes
        ));
    }
    let frame = usize::try_from(h.frame_size).unwrap_or(usize::MAX);
    if !(crate::frame::MIN_FRAME_SIZE..=crate::frame::MAX_FRAME_SIZE).contains(&frame) {
        return Err(format!("frame size {frame} outside the supported range"));
    }
    check_hello_text(h)
}

/// The Hello's strings, checked before any of them is kept, shown or used to name a file:
/// the guest label, the backend and the destination.
pub fn check_hello_text(h: &Hello) -> Result<(), String> {
    text::check_name("the guest label", &h.guest, text::MAX_LABEL)?;
    text::check_name("the backend", &h.backend, text::MAX_BACKEND)?;
    if let Some(d) = &h.destination {
        text::check_name("the destination", d, text::MAX_DESTINATION)?;
    }
    Ok(())
}

/// Waits until every stream has decoded `frames[s]` frames, watching the control channel
/// and the local abort flag meanwhile: an Abort from the source (whose data streams then
/// stop short) is seen at once, not after the data timeout.
/// Other messages that arrive meanwhile (the source may run ahead) go to `later`, in order.
fn wait_frames(
    pipeline: &SinkPipeline,
    rx: &mut ControlRx,
    later: &mut std::collections::VecDeque<ToDest>,
    abort: &AtomicBool,
    frames: &[u64],
    timeout: Duration,
) -> Result<(), MigrateError> {
    const SLICE: Duration = Duration::from_millis(100);
    let progress = &pipeline.progress;
    let (mut last, mut moved) = (progress.decoded(), Instant::now());
    loop {
        match progress.wait_for(frames, SLICE) {
            Ok(()) => return Ok(()),
            // A data stream failed: its link broke, or it carried a bad frame (the caller
            // tells which from the pipeline's own error).
            Err(why) if progress.failure().is_some() => return Err(MigrateError::LinkLost(why)),
            Err(_) => {}
        }
        if abort.load(Ordering::Relaxed) {
            return Err(MigrateError::Aborted);
        }
        // The control channel's read timeout is short (set by `follow`): this polls it.
        match rx.recv::<ToDest>() {
            Ok(ToDest::Abort { reason, operator }) => {
                return Err(if operator {
                    MigrateError::Aborted
                } else {
                    MigrateError::Peer(format!("source failed: {}", text::from_peer(&reason)))
                });
            }
            Ok(other) => later.push_back(other),
            Err(e) if e.is_timeout() => {}
            Err(e) => return Err(e.into()),
        }
        let now = progress.decoded();
        if now != last {
            (last, moved) = (now, Instant::now());
        } else if moved.elapsed() > timeout {
            return Err(MigrateError::LinkLost(format!(
                "no frame arrived for {} s (decoded {now:?}, expected {frames:?})",
                timeout.as_secs()
            )));
        }
    }
}

/// Checks what moves with the guest against this host's config, and starts the disk's sync.
fn prepare(
    disk: Option<String>,
    network: Option<crate::protocol::NetworkIdentity>,
    opts: &DestOptions,
    status: &Arc<Mutex<MigrationStatus>>,
    alongside: &mut Alongside,
) -> Result<(), MigrateError> {
    if let Some(n) = network {
        let g = GuestIdentity::try_from(n)
            .map_err(|e| MigrateError::Unsupported(format!("the guest's network identity: {e}")))?;
        let Some(cfg) = &opts.announce else {
            return Err(MigrateError::Unsupported(format!(
                "the guest ({}) is to be announced here, but this host has no [announce] \
                 section naming the interface to announce it on",
                g.mac
            )));
        };
        if nix::net::if_::if_nametoindex(cfg.interface.as_str()).is_err() {
            return Err(MigrateError::Unsupported(format!(
                "announce.interface {:?} does not exist on this host (`ip link` lists them)",
                cfg.interface
            )));
        }
        alongside.identity = Some(g);
    }
    if let Some(json) = disk {
        let Some(host) = &opts.drbd else {
            return Err(MigrateError::Unsupported(
                "the guest has a DRBD disk, but this host has no [drbd] section to steer it".into(),
            ));
        };
        let disk: DrbdDisk = serde_json::from_str(&json)
            .map_err(|e| MigrateError::Unsupported(format!("the guest's DRBD disk: {e}")))?;
        status.lock().expect("status lock").phase = Phase::Preparing;
        let steer = host.steer(disk, Side::Destination, status)?;
        alongside.sync = Some(SyncTask::spawn(steer, true)?);
    }
    Ok(())
}

/// The guest runs here: record the commit on the disk, then, on a thread (it waits for the
/// source to demote), return to one primary and protocol A.
fn disk_after_commit(mut steer: Steer, status: &Arc<Mutex<MigrationStatus>>, id: u64) {
    let committed =
        super::disk::after_commit_step(status, id, "commit check", || steer.after_commit());
    if !committed {
        return;
    }
    let status = status.clone();
    let spawned = std::thread::Builder::new()
        .name("sf-drbd-finish".into())
        .spawn(move || {
            super::disk::after_commit_step(&status, id, "finish", || steer.finish());
        });
    if let Err(e) = spawned {
        tracing::error!(migration = %crate::migrate::MigrationId(id), "cannot finish the disk's steps: {e}");
    }
}

/// The source's first sealed message (its `Prepare`), within `timeout`.
fn first_sealed(rx: &mut ControlRx, timeout: Duration) -> Result<ToDest, MigrateError> {
    rx.set_timeout(Some(timeout))?;
    let m = rx.recv::<ToDest>().map_err(|e| match e {
        e if e.is_timeout() => {
            MigrateError::Timeout(timeout.as_secs(), "sending its first sealed message")
        }
        e => MigrateError::Peer(format!("the source's first sealed message: {e}")),
    })?;
    rx.set_timeout(None)?;
    Ok(m)
}

/// Follows the source's control messages to the end (or until this session's link breaks).
/// `acked` is the last iteration acknowledged, across sessions.
#[allow(clippy::too_many_arguments)]
fn follow(
    first: Option<ToDest>,
    link: &mut Link,
    guest: &dyn DestGuest,
    status: &Arc<Mutex<MigrationStatus>>,
    abort: &AtomicBool,
    opts: &DestOptions,
    alongside: &mut Alongside,
    acked: &mut u32,
    started: Instant,
) -> Result<(), MigrateError> {
    let Link { tx, rx, pipeline } = link;
    let timeout = opts.timeout;
    let id = status.lock().expect("status lock").id;
    rx.set_timeout(Some(Duration::from_millis(200)))?;
    let mut silent = Instant::now();
    let mut seen_bytes = 0;
    // After Final: (iteration, our digest, state) until the source's digest arrives.
    let mut final_state = None;
    // A large state blob's parts, before Final.
    let mut state_parts = Vec::new();
    // Messages read while waiting for frames, handled in order before reading more.
    let mut later: std::collections::VecDeque<ToDest> = first.into_iter().collect();
    loop {
        // Once Ready is sent only the source may abort: it may have committed already.
        if abort.load(Ordering::Relaxed) && !alongside.ready {
            return Err(MigrateError::Aborted);
        }
        if alongside.sync.as_ref().is_some_and(SyncTask::is_finished) {
            let (steer, r) = alongside.sync.take().expect("checked").join();
            alongside.steer = Some(steer);
            r?;
            tx.send(&ToSource::Prepared)?;
            alongside.resumable = true;
            status.lock().expect("status lock").phase = Phase::Iterating;
            silent = Instant::now();
        }
        let msg = match later.pop_front().map_or_else(|| rx.recv::<ToDest>(), Ok) {
            Ok(m) => m,
            // The source says nothing while the disks sync; the sync has its own deadline.
            Err(e) if e.is_timeout() && alongside.sync.is_some() => {
                silent = Instant::now();
                continue;
            }
            Err(e) if e.is_timeout() => {
                // Data arriving is life too: iteration 1 of a large guest sends no control
                // message for as long as it takes.
                let now = pipeline.wire_bytes.load(Ordering::Relaxed);
                if now != seen_bytes {
                    seen_bytes = now;
                    silent = Instant::now();
                }
                if silent.elapsed() > timeout {
                    return Err(MigrateError::Timeout(
                        timeout.as_secs(),
                        "source went silent",
                    ));
                }
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        silent = Instant::now();
        let wire = pipeline.wire_bytes.load(Ordering::Relaxed);
        match msg {
            ToDest::Prepare { disk, network } => {
                prepare(disk, network, opts, status, alongside)?;
                if alongside.sync.is_none() {
                    tx.send(&ToSource::Prepared)?;
                    alongside.resumable = true;
                    status.lock().expect("status lock").phase = Phase::Iterating;
                }
            }
            ToDest::DiskSyncing { sync_percent } => {
                tracing::debug!(
                    migration = %crate::migrate::MigrationId(id),
                    ?sync_percent,
                    "the source's disk is syncing"
                );
            }
            ToDest::Paused => {
                alongside.resumable = false;
                status.lock().expect("status lock").phase = Phase::StopAndCopy;
                if let (Some(g), Some(cfg)) = (alongside.identity, &opts.announce) {
                    let a = Announcer::start(cfg.clone(), g, status, id, "destination")
                        .map_err(|e| MigrateError::Connect("starting the announcer".into(), e))?;
                    alongside.announcer = Some(a);
                }
            }
            ToDest::IterationEnd { iteration, frames } => {
                wait_frames(pipeline, rx, &mut later, abort, &frames, timeout)?;
                tx.send(&ToSource::IterationAck { iteration })?;
                *acked = (*acked).max(iteration);
                let received = pipeline.codec_totals().pages_total();
                let mut st = status.lock().expect("status lock");
                st.iteration = iteration;
                st.wire_bytes = wire;
                st.pages_sent = received;
                st.job.dirty_sync_count = iteration;
                st.elapsed_ms = millis(started.elapsed());
            }
            ToDest::StatePart { bytes } => {
                if state_parts.len() + bytes.len() > MAX_STATE {
                    return Err(MigrateError::Peer(format!(
                        "state blob larger than {} MiB",
                        MAX_STATE >> 20
                    )));
                }
                state_parts.extend_from_slice(&bytes);
            }
            ToDest::Final {
                iteration,
                frames,
                state,
            } => {
                let state = if state_parts.is_empty() {
                    state
                } else {
                    let mut all = std::mem::take(&mut state_parts);
                    all.extend_from_slice(&state);
                    all
                };
                status.lock().expect("status lock").phase = Phase::Verifying;
                let t = Instant::now();
                wait_frames(pipeline, rx, &mut later, abort, &frames, timeout)?;
                tracing::info!(ms = t.elapsed().as_millis(), "final frames decoded");
                // The source closed the data streams after the last frame: the pipeline ends
                // and releases guest memory before it is hashed.
                pipeline.finish()?;
                tracing::info!(ms = t.elapsed().as_millis(), "data plane closed");
                let known = |c| pipeline.digests.known(c);
                let ours = guest.memory_digest_with(&known);
                tracing::info!(
                    ms = t.elapsed().as_millis(),
                    reused = pipeline.digests.valid_chunks(),
                    of = pipeline.digests.chunks(),
                    "memory digest taken (chunks hashed on arrival reused)"
                );
                final_state = Some((iteration, ours, state));
            }
            ToDest::Digest { digest } => {
                let Some((iteration, ours, state)) = final_state.take() else {
                    return Err(MigrateError::Peer("memory digest before Final".into()));
                };
                if ours != digest {
                    return Err(MigrateError::DigestMismatch {
                        ours: digest,
                        dest: ours,
                    });
                }
                guest.set_state(&state)?;
                // The guest is paused at the source: this host's disk becomes Primary too,
                // so the guest can run here on it once committed.
                if let Some(steer) = alongside.steer.as_mut() {
                    steer.switchover()?;
                }
                tx.send(&ToSource::Ready { digest: ours })?;
                alongside.ready = true;
                super::hold::at("dest-ready", id);
                let mut st = status.lock().expect("status lock");
                st.iteration = iteration;
                st.verified = Some(true);
                st.wire_bytes = wire;
            }
            ToDest::Commit if alongside.ready => {
                guest.start()?;
                if let Some(steer) = alongside.steer.take() {
                    disk_after_commit(steer, status, id);
                }
                if let Some(a) = alongside.announcer.take() {
                    a.detach();
                }
                tx.send(&ToSource::Started)?;
                let received = pipeline.codec_totals().pages_total();
                let mut st = status.lock().expect("status lock");
                st.phase = Phase::Completed;
                // Everything arrived: what was received, and nothing left.
                st.pages_sent = received;
                st.remaining = 0;
                st.elapsed_ms = millis(started.elapsed());
                st.job.ended_at_ms = Some(super::job_stats::unix_ms());
                return Ok(());
            }
            ToDest::Commit => {
                return Err(MigrateError::Peer(
                    "commit before the destination was ready".into(),
                ));
            }
            ToDest::Abort { reason, operator } => {
                return Err(if operator {
                    MigrateError::Aborted
                } else {
                    MigrateError::Peer(format!("source failed: {}", text::from_peer(&reason)))
                });
            }
            ToDest::Resume { .. } => {
                return Err(MigrateError::Peer(
                    "Resume is only a reconnection's first message".into(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::CodecConfig;

    fn opts() -> DestOptions {
        DestOptions {
            psk: PreSharedKey::from_bytes([1; 32]),
            socket: SocketOptions::default(),
            pin_threads: false,
            timeout: Duration::from_secs(1),
            max_guest_pages: 1 << 20,
            max_streams: 4,
            drbd: None,
            announce: None,
            resume_window: Duration::from_secs(1),
        }
    }

    fn hello() -> Hello {
        Hello {
            migration_id: 1,
            source_nonce: [2; 32],
            guest_pages: 1 << 10,
            streams: 2,
            codec: CodecConfig::default(),
            frame_size: 1 << 16,
            backend: "synthetic".into(),
            guest: "g".into(),
            destination: None,
            resume: 0,
        }
    }

    #[test]
    fn a_hello_asking_for_a_huge_cache_is_refused() {
        let mut h = hello();
        assert_eq!(check_hello(&h, &opts()), Ok(()));
        h.codec.cache_bytes = MAX_CACHE_BYTES;
        assert_eq!(check_hello(&h, &opts()), Ok(()));
        // What the codec itself allows, and every data stream's decoder would allocate.
        h.codec.cache_bytes = 4 << 40;
        assert!(h.codec.validate().is_ok());
        let why = check_hello(&h, &opts()).unwrap_err();
        assert!(why.contains("exceeds this host's limit"), "{why}");
        // Without CBR and deltas there is no cache: its size does not matter.
        h.codec = CodecConfig {
            cache_bytes: 4 << 40,
            ..CodecConfig::baseline()
        };
        assert_eq!(check_hello(&h, &opts()), Ok(()));
    }
}

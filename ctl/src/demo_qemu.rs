//! `skyferry demo --guest qemu`: a real QEMU guest live-migrated between two QEMUs on this
//! host.
//!
//! The guest is the test guest (`skyferry test-guest`): a small Linux whose `/init` dirties
//! memory and prints a numbered heartbeat on its serial console every 200 ms. The demo boots
//! it in a source QEMU (RAM in a shared file), starts a destination QEMU paused with
//! `-incoming defer` on a RAM file of its own, and migrates between them in this process, like
//! the synthetic demo: a destination thread (`receive` with the `qemu` backend, in its
//! operator-started mode) and a source thread (`migrate` of a [`QemuGuest`]) over real
//! loopback TCP. skyferry carries the RAM; QEMU carries only its device state, inside the
//! state blob.
//!
//! That the guest kept running is checked from the outside: the heartbeat counter lives in
//! guest memory and stops while the guest is paused, so the destination's serial console
//! must go on from the number the source printed last.
//!
//! Everything lives in a private scratch directory (under /dev/shm, so both RAM files stay in
//! memory), removed at the end together with both QEMUs, on success and on error.

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::guest::qemu::qmp::Qmp;
use dataplane::guest::qemu::{QemuDestConfig, QemuGuest, QemuSourceConfig, QemuTarget};
use dataplane::guest::{DestGuest, SourceGuest};
use dataplane::migrate::dest::{GuestFactory, receive};
use dataplane::migrate::{MigrationStatus, Phase, Role};
use dataplane::page::PAGE_SIZE;
use dataplane::protocol::Hello;
use dataplane::units::{format_duration, format_size};
use serde_json::json;

use crate::demo::{
    Args, Outcome, POLL, TIMEOUT, join_destination, json_report, millis, snapshot, source_options,
    spawn_source, verdict,
};
use crate::progress::{Progress, summary_table};
use crate::testguest::{self, Accel, QEMU, QemuOptions, TestGuest, Workload};

/// Guest memory unless `--mem` says otherwise.
pub(crate) const DEFAULT_MEM: u64 = 256 << 20;
/// The smallest guest that boots the test guest's kernel with room for its 32 MiB buffer.
const MIN_MEM: u64 = 64 << 20;
/// Heartbeats the source guest must print before the migration starts.
const BOOT_HEARTBEATS: u64 = 3;
/// How long the source guest may take to print them (TCG boots in about 5 s).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the guest may take, after the commit, to print a heartbeat at the destination.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source QEMU may take to quit after the hand-over.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Scratch directories are named this, then the demo's pid and a random tag.
const SCRATCH_PREFIX: &str = "skyferry-demo-";
/// The guest's name in the Hello (the destination checks it can name files).
const LABEL: &str = "qemu-demo";

/// What a QEMU demo found, beyond the migration itself.
pub(crate) struct QemuOutcome {
    /// The migration; `setup` is the time to boot the source guest and start the
    /// destination QEMU, `wall` the whole demo.
    pub(crate) outcome: Outcome,
    pub(crate) pages: u64,
    /// Bytes of QEMU's own device-state stream (0 if the switchover never got there).
    pub(crate) device_state_bytes: u64,
    /// The source's last heartbeat before the pause.
    pub(crate) heartbeat_at_pause: Option<u64>,
    /// The first heartbeat the destination printed after the pause's number.
    pub(crate) heartbeat_after: Option<u64>,
    /// From the end of the migration to that heartbeat on the destination's console.
    pub(crate) resumed_after: Option<Duration>,
    /// The guest went on at the destination from where it paused.
    pub(crate) guest_resumed: bool,
    /// The source QEMU exited after the hand-over (`None`: no hand-over).
    pub(crate) source_quit: Option<bool>,
    /// The destination's serial log at the end, for an error message.
    dest_log_tail: String,
}

pub fn run(args: &Args) -> Result<(), String> {
    let mem = args.mem();
    let (pages, ram_mib) = guest_size(mem)?;
    let codec = CodecConfig {
        compression: args.compression,
        ..args.optimizations.codec()
    };
    // Two RAM files (one per QEMU) plus the block caches: the synthetic demo's arithmetic.
    crate::demo::check_memory(mem, args.streams, &codec)?;
    let chatty = !args.json;
    let w = Workload::default();
    if chatty {
        println!(
            "skyferry demo: a {} QEMU test guest ({}; writes {} pages/s, {} MiB hot of {} MiB) \
             live-migrated between two QEMUs over loopback TCP",
            format_size(mem),
            args.accel.name(),
            w.rate,
            w.hot_mib,
            w.mem_mib
        );
        println!("{}", crate::demo::settings_line(args));
    }
    let guest = testguest::build(&testguest::default_dir()?)?;
    let mut view = if args.json {
        Progress::stderr()
    } else {
        Progress::new()
    };
    let q = migrate_qemu(args, &guest, pages, ram_mib, codec, &mut view, chatty)?;
    report(args, &q)
}

/// Pages and MiB of a guest of `mem` bytes, which QEMU's `-m` takes in whole MiB.
fn guest_size(mem: u64) -> Result<(u64, u32), String> {
    let mib = u32::try_from(mem >> 20)
        .ok()
        .filter(|_| mem.is_multiple_of(1 << 20));
    match mib {
        Some(mib) if mem >= MIN_MEM => Ok((mem / PAGE_SIZE as u64, mib)),
        _ => Err(format!(
            "--mem is {mem} bytes: a QEMU guest needs a whole number of MiB, at least {}",
            format_size(MIN_MEM)
        )),
    }
}

/// Boots the guest, migrates it, and checks that it runs on at the destination. Errors are
/// for a demo that could not get as far as a migration; a migration that fails is in the
/// outcome. Both QEMUs are stopped and the scratch directory removed before this returns.
pub(crate) fn migrate_qemu(
    args: &Args,
    guest: &TestGuest,
    pages: u64,
    ram_mib: u32,
    codec: CodecConfig,
    view: &mut Progress,
    chatty: bool,
) -> Result<QemuOutcome, String> {
    let started = Instant::now();
    let say = |s: &str| {
        if chatty {
            println!("  {s}");
        }
    };
    // Dropped last (declared first): the QEMUs are gone before their files.
    let scratch = Scratch::new()?;
    let src = scratch.instance("source");
    let dst = scratch.instance("dest");

    say(&format!(
        "booting the source guest ({})...",
        args.accel.name()
    ));
    let mut source_qemu = QemuProcess::start(
        guest,
        &src.options(ram_mib, args.accel, false),
        "source",
        &src,
    )?;
    let booted = wait_heartbeats(
        &mut source_qemu,
        args.accel,
        &src.log,
        BOOT_HEARTBEATS,
        BOOT_TIMEOUT,
    )?;
    say(&format!(
        "source guest up after {}: heartbeat {}",
        format_duration(started.elapsed()),
        booted
    ));

    // The destination waits for the device state, paused; its RAM file has the source's
    // size from the start (the backend checks it) and holds nothing yet.
    create_ram_file(&dst.ram, pages * PAGE_SIZE as u64)?;
    let mut dest_qemu = QemuProcess::start(
        guest,
        &dst.options(ram_mib, args.accel, true),
        "destination",
        &dst,
    )?;
    wait_incoming(&mut dest_qemu, &dst.qmp)?;
    let setup = started.elapsed();
    say("destination QEMU waiting (-incoming defer); migrating...");

    let psk = PreSharedKey::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let id = getrandom::u64().map_err(|e| format!("cannot make a migration id: {e}"))?;
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the loopback address: {e}"))?;
    let source_guest = Arc::new(
        QemuGuest::open(QemuSourceConfig {
            qmp: src.qmp.clone(),
            ram_file: src.ram.clone(),
            timeout: TIMEOUT,
            quit_after_handover: true,
        })
        .map_err(|e| format!("cannot open the source guest: {e}"))?,
    );
    if source_guest.page_count() != pages {
        return Err(format!(
            "the source RAM file has {} pages, not {pages}",
            source_guest.page_count()
        ));
    }

    let dest_abort = Arc::new(AtomicBool::new(false));
    let dest = {
        let config = QemuDestConfig {
            ram_file: utf8(&dst.ram)?,
            qmp: utf8(&dst.qmp)?,
            command: Vec::new(),
        };
        let opts = crate::demo::dest_options(psk.clone(), pages, args.streams);
        let abort = dest_abort.clone();
        thread::Builder::new()
            .name("sf-demo-dest".into())
            .spawn(move || {
                let status = Arc::new(Mutex::new(MigrationStatus::new(
                    0,
                    Role::Destination,
                    "",
                    0,
                )));
                let factory: Box<GuestFactory<'static>> = Box::new(move |h: &Hello| {
                    let target = QemuTarget::prepare(&config, &h.guest, h.guest_pages, TIMEOUT)
                        .map_err(|e| e.to_string())?;
                    Ok(Arc::new(target) as Arc<dyn DestGuest>)
                });
                receive(&listener, &opts, factory, &status, &abort)
            })
            .map_err(|e| format!("cannot start the destination thread: {e}"))?
    };

    let opts = source_options(args, addr, psk, codec, LABEL);
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        id,
        Role::Source,
        LABEL,
        pages,
    )));
    let source = spawn_source(source_guest.clone(), opts, id, &status)?;
    let snapshot = || snapshot(&status);
    // The heartbeat when the switchover starts; the guest is paused right after the phase
    // changes, so the number is final once the migration is over (see below).
    let mut at_stop = None;
    let mut drawn: Option<Instant> = None;
    while !source.is_finished() {
        let st = snapshot();
        if at_stop.is_none() && switching_over(st.phase) {
            at_stop = testguest::read_heartbeats(&src.log)?.last;
        }
        if drawn.is_none_or(|t| t.elapsed() >= POLL) {
            view.update(&st);
            drawn = Some(Instant::now());
        }
        thread::sleep(Duration::from_millis(20));
    }
    let source = source
        .join()
        .map_err(|_| "the source thread panicked".to_string())?;
    // The summary's own status when there is one, so the closing line and the summary
    // table give the same total time.
    let last = source
        .as_ref()
        .map_or_else(|_| snapshot(), |s| s.status.clone());
    view.finish(&last);
    let dest = join_destination(dest, source.is_ok(), &dest_abort, addr);
    let ended = Instant::now();
    let final_status = source.as_ref().map_or(&last, |s| &s.status);
    let handed_over = matches!(
        final_status.phase,
        Phase::Completed | Phase::CommittedUnconfirmed
    );
    let device_state_bytes = source_guest.device_state_bytes();
    drop(source_guest);

    let mut q = QemuOutcome {
        outcome: Outcome {
            source,
            dest,
            status: last,
            setup,
            wall: Duration::ZERO,
        },
        pages,
        device_state_bytes,
        heartbeat_at_pause: at_stop,
        heartbeat_after: None,
        resumed_after: None,
        guest_resumed: false,
        source_quit: None,
        dest_log_tail: String::new(),
    };
    if handed_over {
        // The source guest never ran again after the pause (it was handed over), so the last
        // complete heartbeat in its log is the one printed before the pause, even if the
        // phase was seen a moment before the pause took effect.
        let paused_at = testguest::read_heartbeats(&src.log)?.last;
        q.heartbeat_at_pause = paused_at.max(at_stop);
        q.source_quit = Some(source_qemu.exits_within(QUIT_TIMEOUT));
        if let Some(at_pause) = q.heartbeat_at_pause {
            say(&format!(
                "waiting for the guest at the destination to go on from heartbeat {at_pause}..."
            ));
            let deadline = ended + RESUME_TIMEOUT;
            loop {
                let hb = testguest::read_heartbeats(&dst.log)?;
                if let Some(n) = hb.last.filter(|&n| n > at_pause) {
                    q.heartbeat_after = Some(n);
                    q.resumed_after = Some(ended.elapsed());
                    q.guest_resumed = true;
                    break;
                }
                if Instant::now() >= deadline || dest_qemu.exited().is_some() {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        if !q.guest_resumed {
            q.dest_log_tail = log_tail(&dst.log);
        }
    }
    drop(dest_qemu);
    drop(source_qemu);
    drop(scratch);
    q.outcome.wall = started.elapsed();
    Ok(q)
}

/// The source has reached (or passed) the switchover, where it pauses the guest.
fn switching_over(p: Phase) -> bool {
    matches!(
        p,
        Phase::StopAndCopy | Phase::Verifying | Phase::Completed | Phase::CommittedUnconfirmed
    )
}

fn utf8(p: &Path) -> Result<String, String> {
    p.to_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("not UTF-8: {}", p.display()))
}

/// Waits until the guest has printed `want` heartbeats; returns the last one.
fn wait_heartbeats(
    qemu: &mut QemuProcess,
    accel: Accel,
    log: &Path,
    want: u64,
    timeout: Duration,
) -> Result<u64, String> {
    let start = Instant::now();
    loop {
        let hb = testguest::read_heartbeats(log)?;
        if hb.count >= want {
            return Ok(hb.last.unwrap_or(0));
        }
        if let Some(why) = qemu.exited() {
            return Err(format!(
                "{why}, after {} heartbeats; serial log ends:\n{}",
                hb.count,
                log_tail(log)
            ));
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "the source guest printed {} of {want} heartbeats in {} s under {}{}; serial \
                 log ends:\n{}",
                hb.count,
                timeout.as_secs(),
                accel.name(),
                if accel == Accel::Kvm {
                    " (a host whose /dev/kvm is slow or nested may do better with --accel tcg)"
                } else {
                    ""
                },
                log_tail(log)
            ));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the destination QEMU answers on QMP and waits for an incoming migration.
/// The session is closed again: the backend opens its own (QMP serves one client at a time).
fn wait_incoming(qemu: &mut QemuProcess, qmp: &Path) -> Result<(), String> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        match Qmp::connect(qmp, TIMEOUT) {
            Ok(mut q) => {
                let s = q
                    .status()
                    .map_err(|e| format!("destination QEMU at {}: {e}", qmp.display()))?;
                return if s.status == "inmigrate" {
                    Ok(())
                } else {
                    Err(format!(
                        "the destination QEMU is {:?}, not waiting for a migration",
                        s.status
                    ))
                };
            }
            Err(e) => {
                if let Some(why) = qemu.exited() {
                    return Err(why);
                }
                if Instant::now() >= deadline {
                    return Err(format!(
                        "the destination QEMU did not answer on QMP within {} s: {e}",
                        TIMEOUT.as_secs()
                    ));
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Creates an empty (sparse) RAM file of `bytes` bytes.
fn create_ram_file(path: &Path, bytes: u64) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// The last lines of a serial log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => return format!("(cannot read {}: {e})", path.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        // The guest's kernel runs with `quiet`: an empty log means /init never ran.
        return "(empty: the guest's kernel printed nothing and /init never ran)".into();
    }
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// The files of one QEMU in the scratch directory.
struct Instance {
    ram: PathBuf,
    qmp: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
}

impl Instance {
    /// This QEMU's command line options: the default workload; a destination (`incoming`)
    /// waits paused with `-incoming defer`.
    fn options(&self, ram_mib: u32, accel: Accel, incoming: bool) -> QemuOptions<'_> {
        QemuOptions {
            ram_mib,
            ram_file: &self.ram,
            qmp_socket: &self.qmp,
            serial_log: &self.log,
            accel,
            workload: Workload::default(),
            incoming_defer: incoming,
            start_paused: incoming,
        }
    }
}

/// A private directory for the demo's files (in /dev/shm when there is one), removed on
/// drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self, String> {
        let shm = Path::new("/dev/shm");
        let base = if shm.is_dir() {
            shm.to_owned()
        } else {
            std::env::temp_dir()
        };
        remove_stale(&base);
        let tag = getrandom::u64().map_err(|e| format!("cannot make a name: {e}"))?;
        let dir = base.join(format!(
            "{SCRATCH_PREFIX}{}-{:08x}",
            std::process::id(),
            tag & 0xffff_ffff
        ));
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    fn instance(&self, name: &str) -> Instance {
        let f = |ext: &str| self.0.join(format!("{name}.{ext}"));
        Instance {
            ram: f("ram"),
            qmp: f("qmp"),
            log: f("log"),
            stderr: f("stderr"),
        }
    }
}

/// Removes the scratch directories of demos that are gone without cleaning up (killed, or
/// interrupted by Ctrl-C, which ends QEMU too but skips our drops): their RAM files would
/// hold memory until the next reboot.
fn remove_stale(base: &Path) {
    if !Path::new("/proc/self").exists() {
        return; // no way to tell a live demo from a dead one
    }
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let pid = name
            .to_str()
            .and_then(|n| n.strip_prefix(SCRATCH_PREFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && !Path::new("/proc").join(pid.to_string()).exists()
        {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A QEMU this demo started; killed and reaped on drop unless it has exited.
struct QemuProcess {
    child: Child,
    name: &'static str,
    stderr: PathBuf,
}

impl QemuProcess {
    fn start(
        guest: &TestGuest,
        options: &QemuOptions<'_>,
        name: &'static str,
        files: &Instance,
    ) -> Result<Self, String> {
        let argv = guest.qemu_argv(options)?;
        let stderr = fs::File::create(&files.stderr)
            .map_err(|e| format!("cannot create {}: {e}", files.stderr.display()))?;
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    format!("`{QEMU}` not found: install qemu-system-x86")
                }
                _ => format!("cannot start the {name} {QEMU}: {e}"),
            })?;
        Ok(QemuProcess {
            child,
            name,
            stderr: files.stderr.clone(),
        })
    }

    /// If QEMU has exited: how, with what it said.
    fn exited(&mut self) -> Option<String> {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => s.to_string(),
            Ok(None) => return None,
            Err(e) => format!("cannot be waited for ({e})"),
        };
        let said = fs::read_to_string(&self.stderr).unwrap_or_default();
        Some(format!(
            "the {} QEMU exited ({status}): {}",
            self.name,
            said.trim_end()
        ))
    }

    /// Waits up to `limit` for QEMU to exit by itself.
    fn exits_within(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.exited().is_some() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Prints the result (table or JSON) and decides the exit status.
fn report(args: &Args, q: &QemuOutcome) -> Result<(), String> {
    let o = &q.outcome;
    let summary = o.source.as_ref().ok();
    let status = summary.map_or(&o.status, |s| &s.status);
    let codec = summary.map(|s| &s.codec);
    let (verified, error) = verdict(o);
    let error = error.or_else(|| resume_error(q));
    if args.json {
        println!("{}", json(args, q, verified, error.as_deref()));
    } else {
        let iterations = summary.map_or(&[][..], |s| &s.iterations[..]);
        println!();
        print!("{}", summary_table(status, codec, iterations));
        if q.device_state_bytes > 0 {
            println!(
                "  {:<17}  {} (QEMU's own stream, in the state blob)",
                "device state",
                format_size(q.device_state_bytes)
            );
        }
        if let Some(p) = q.heartbeat_at_pause {
            println!(
                "  {:<17}  {p} at the pause; {}",
                "guest heartbeat",
                match (q.heartbeat_after, q.resumed_after) {
                    (Some(n), Some(t)) => format!(
                        "{n} at the destination, {} after the migration ended",
                        format_duration(t)
                    ),
                    _ => "none after it at the destination".into(),
                }
            );
        }
        // One total time (the migration's, above); the set-up came before it.
        println!(
            "  {:<17}  {} to boot the source guest and start the destination QEMU, before the migration began",
            "set-up",
            format_duration(o.setup)
        );
        println!();
        if verified {
            println!(
                "verified: the destination's memory matches the source's (digests of all {} \
                 pages agree at both ends)",
                crate::progress::group(q.pages)
            );
        }
        if q.guest_resumed {
            println!(
                "the guest runs on at the destination: its heartbeat went on from {} to {}{}",
                q.heartbeat_at_pause.unwrap_or(0),
                q.heartbeat_after.unwrap_or(0),
                match q.source_quit {
                    Some(true) => "; the source QEMU has quit",
                    _ => "",
                }
            );
        }
        if q.source_quit == Some(false) {
            println!(
                "warning: the source QEMU did not quit after the hand-over (the demo stopped it)"
            );
        }
    }
    error.map_or(Ok(()), Err)
}

/// Why a migration that completed still failed the demo: the guest did not go on.
fn resume_error(q: &QemuOutcome) -> Option<String> {
    if q.guest_resumed {
        return None;
    }
    Some(match q.heartbeat_at_pause {
        Some(p) => format!(
            "the guest did not run on at the destination: no heartbeat after {p} within {} s; \
             its serial log ends:\n{}",
            RESUME_TIMEOUT.as_secs(),
            q.dest_log_tail
        ),
        None => "the source guest's serial log has no heartbeat to compare with".into(),
    })
}

/// The synthetic demo's JSON object, with the QEMU guest's own figures.
fn json(args: &Args, q: &QemuOutcome, verified: bool, error: Option<&str>) -> serde_json::Value {
    let o = &q.outcome;
    let summary = o.source.as_ref().ok();
    let status = summary.map_or(&o.status, |s| &s.status);
    let mut v = json_report(
        args,
        q.pages,
        o,
        status,
        summary.map(|s| &s.codec),
        verified,
        error,
    );
    let w = Workload::default();
    v["guest"] = "qemu".into();
    v["accel"] = args.accel.name().into();
    v["workload"] = format!(
        "test-guest pattern={} rate={} hot_mib={} mem_mib={}",
        w.pattern.name(),
        w.rate,
        w.hot_mib,
        w.mem_mib
    )
    .into();
    v["seed"] = serde_json::Value::Null;
    v["speed"] = serde_json::Value::Null;
    v["device_state_bytes"] = q.device_state_bytes.into();
    v["paused_bytes"] = json!(status.paused_bytes);
    v["guest_resumed"] = q.guest_resumed.into();
    v["heartbeat_at_pause"] = json!(q.heartbeat_at_pause);
    v["heartbeat_after"] = json!(q.heartbeat_after);
    v["resumed_after_ms"] = json!(q.resumed_after.map(millis));
    v["source_qemu_quit"] = json!(q.source_quit);
    v
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::progress::Style;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("demo").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn flags_and_sizes() {
        let a = parse(&["--guest", "qemu"]);
        assert_eq!(a.mem(), DEFAULT_MEM);
        assert_eq!(guest_size(a.mem()).unwrap(), (65536, 256));
        let a = parse(&["--guest", "qemu", "--mem", "1G", "--accel", "kvm"]);
        assert_eq!(guest_size(a.mem()).unwrap().1, 1024);
        assert_eq!(a.accel, Accel::Kvm);
        for bad in [32 << 20, (256 << 20) + 4096] {
            let e = guest_size(bad).unwrap_err();
            assert!(e.contains("whole number of MiB, at least 64.00 MiB"), "{e}");
        }
    }

    #[test]
    fn scratch_of_dead_demos_is_removed() {
        let base = std::env::temp_dir().join(format!(
            "skyferry-demo-test-{}-{:x}",
            std::process::id(),
            getrandom::u64().unwrap()
        ));
        // Above Linux's largest pid_max (2^22): no such process.
        let dead = base.join(format!("{SCRATCH_PREFIX}4294967-0000beef"));
        let live = base.join(format!("{SCRATCH_PREFIX}{}-0000cafe", std::process::id()));
        let other = base.join("skyferry-demo-notapid");
        for d in [&dead, &live, &other] {
            fs::create_dir_all(d).unwrap();
            fs::write(d.join("x.ram"), b"ram").unwrap();
        }
        remove_stale(&base);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
        fs::remove_dir_all(&base).unwrap();
    }

    /// The whole QEMU demo on this host: boot the test guest under TCG, migrate it between
    /// two QEMUs, and see it run on at the destination. Skipped only without QEMU.
    #[test]
    fn qemu_demo_migrates_a_running_guest() {
        if Command::new(QEMU).arg("--version").output().is_err() {
            eprintln!("skipped: {QEMU} is not installed (Debian: apt-get install qemu-system-x86)");
            return;
        }
        let a = parse(&["--guest", "qemu", "--mem", "128MiB", "--json"]);
        let (pages, mib) = guest_size(a.mem()).unwrap();
        let guest = testguest::build(&testguest::default_dir().unwrap()).unwrap();
        let mut view = Progress::with_writer(Box::new(std::io::sink()), Style::Quiet, 80);
        let codec = a.optimizations.codec();
        let q = migrate_qemu(&a, &guest, pages, mib, codec, &mut view, false).unwrap();
        let (verified, error) = verdict(&q.outcome);
        let v = json(&a, &q, verified, error.as_deref());
        assert!(verified, "{error:?}");
        assert!(q.guest_resumed, "{:?}", resume_error(&q));
        assert!(q.device_state_bytes > 0);
        assert_eq!(q.source_quit, Some(true), "the source QEMU quits");
        assert!(q.heartbeat_after.unwrap() > q.heartbeat_at_pause.unwrap());
        assert_eq!(v["guest_resumed"], true);
        assert_eq!(v["guest_pages"], pages);
        assert!(v["device_state_bytes"].as_u64().unwrap() > 0);
        assert!(v["bytes_on_wire"].as_u64().unwrap() > 0);
        assert!(v["pause_ms"].as_u64().is_some(), "{v}");
        assert!(report(&a, &q).is_ok());
    }
}

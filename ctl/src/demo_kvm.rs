//! `skyferry demo --guest kvm`: a KVM micro-VM running the project's self-checking test
//! guest, live-migrated between two micro-VMs in this process over loopback TCP. After the
//! commit the guest sweeps its memory at the destination and reports the bad pages, and says
//! how long a pause it saw on its own clock.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::guest::kvm::{ArrivalCheck, KvmGuest, KvmGuestConfig, KvmTarget, KvmTargetOptions};
use dataplane::guest::{DestGuest, GuestCheck, SourceGuest};
use dataplane::migrate::dest::receive;
use dataplane::migrate::{MigrationStatus, Role};
use dataplane::page::PAGE_SIZE;
use dataplane::units::{format_duration, format_size};
use serde_json::json;

use crate::demo::{
    Args, Outcome, POLL, dest_options, join_destination, json_report, snapshot, source_options,
    spawn_source, verdict,
};
use crate::progress::{Progress, summary_table};

/// Guest memory unless `--mem` says otherwise: small, since on a nested host the guest runs
/// under instruction emulation and sweeps about 1.5 MiB/s.
pub(crate) const DEFAULT_MEM: u64 = 4 << 20;
/// How long the guest runs at the source before the migration starts.
const WARM_UP: Duration = Duration::from_millis(500);
/// How long the arrival check may take, at least.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(300);
/// And per page on top: where KVM emulates guest instructions the guest sweeps a written
/// page in about 2.7 ms (4 GiB: most of an hour; `--arrival-check host` takes seconds).
const SWEEP_PER_PAGE: Duration = Duration::from_millis(3);
/// How long the guest may take to count on at the destination.
const RESUME_TIMEOUT: Duration = Duration::from_secs(10);

/// What the guest said of the migration.
struct GuestReport {
    /// Its counter when it paused at the source.
    at_pause: Option<u64>,
    /// What it says at the destination (None: it never got there).
    dest: Option<GuestCheck>,
    /// How long the arrival check took, from the end of the migration to its report.
    check_time: Option<Duration>,
}

pub fn run(args: &Args) -> Result<(), String> {
    dataplane::guest::kvm::available().map_err(|e| format!("--guest kvm: {e}"))?;
    let mem = args.mem();
    if !mem.is_multiple_of(PAGE_SIZE as u64) {
        return Err(format!(
            "--mem is {mem} bytes: a KVM guest needs a whole number of 4 KiB pages"
        ));
    }
    let pages = mem / PAGE_SIZE as u64;
    dataplane::guest::kvm::program::check_size(pages).map_err(|e| e.to_string())?;
    let codec = CodecConfig {
        compression: args.compression,
        ..args.optimizations.codec()
    };
    crate::demo::check_memory(mem, args.streams, &codec)?;
    let chatty = !args.json;
    if chatty {
        println!(
            "skyferry demo: a {} KVM micro-VM running the self-checking test guest ({} \
             writes, seed {}, speed {}) live-migrated over loopback TCP",
            format_size(mem),
            args.workload,
            args.seed,
            args.speed
        );
        println!("{}", crate::demo::settings_line(args));
    }
    let mut view = if args.json {
        Progress::stderr()
    } else {
        Progress::new()
    };
    let (o, g) = migrate_kvm(args, pages, codec, &mut view)?;
    report(args, pages, &o, &g)
}

fn migrate_kvm(
    args: &Args,
    pages: u64,
    codec: CodecConfig,
    view: &mut Progress,
) -> Result<(Outcome, GuestReport), String> {
    let started = Instant::now();
    let psk = PreSharedKey::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let id = getrandom::u64().map_err(|e| format!("cannot make a migration id: {e}"))?;
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("cannot listen on loopback: {e}"))?;
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the loopback address: {e}"))?;
    let label = format!("kvm-{}-demo", args.workload);
    let check = args.arrival_check;
    let guest = Arc::new(
        KvmGuest::boot(&KvmGuestConfig {
            pages,
            workload: args.workload,
            seed: args.seed,
            speed: args.speed,
        })
        .map_err(|e| format!("cannot boot the guest: {e}"))?,
    );
    thread::sleep(WARM_UP);
    let setup = started.elapsed();

    let target: Arc<Mutex<Option<Arc<KvmTarget>>>> = Arc::default();
    let slot = target.clone();
    let dest_abort = Arc::new(AtomicBool::new(false));
    let opts = dest_options(psk.clone(), pages, args.streams);
    let abort = dest_abort.clone();
    let dest = thread::Builder::new()
        .name("sf-demo-dest".into())
        .spawn(move || {
            let status = Arc::new(Mutex::new(MigrationStatus::new(
                0,
                Role::Destination,
                "",
                0,
            )));
            let factory = Box::new(move |h: &dataplane::protocol::Hello| {
                let t = Arc::new(
                    KvmTarget::new(
                        h.guest_pages,
                        KvmTargetOptions {
                            arrival_check: check,
                        },
                    )
                    .map_err(|e| e.to_string())?,
                );
                *slot.lock().expect("target slot") = Some(t.clone());
                Ok(t as Arc<dyn DestGuest>)
            });
            receive(&listener, &opts, factory, &status, &abort)
        })
        .map_err(|e| format!("cannot start the destination thread: {e}"))?;

    let opts = source_options(args, addr, psk, codec, &label);
    let status = Arc::new(Mutex::new(MigrationStatus::new(
        id,
        Role::Source,
        &label,
        pages,
    )));
    let source = spawn_source(guest.clone(), opts, id, &status)?;
    while !source.is_finished() {
        view.update(&snapshot(&status));
        thread::sleep(POLL);
    }
    let source = source
        .join()
        .map_err(|_| "the source thread panicked".to_string())?;
    // The summary's own status when there is one: one total time in both places.
    let last = source
        .as_ref()
        .map_or_else(|_| snapshot(&status), |s| s.status.clone());
    view.finish(&last);
    let dest = join_destination(dest, source.is_ok(), &dest_abort, addr);
    let at_pause = guest.self_check().and_then(|c| c.progress_at_switch);
    drop(guest);

    let target = target.lock().expect("target slot").take();
    let mut check_time = None;
    let dest_check = target.filter(|_| source.is_ok()).map(|t| {
        // The arrival check, then the counter going on from where it paused.
        if check != ArrivalCheck::Off {
            let per_page = SWEEP_PER_PAGE * u32::try_from(pages).unwrap_or(u32::MAX);
            let checking = Instant::now();
            check_time = t
                .wait_arrival_sweep(SWEEP_TIMEOUT + per_page)
                .map(|_| checking.elapsed());
        }
        let deadline = Instant::now() + RESUME_TIMEOUT;
        let mut check = t.self_check().unwrap_or_default();
        while check.progress_at_switch.is_none_or(|p| check.progress <= p)
            && Instant::now() < deadline
            && check.failure.is_none()
        {
            thread::sleep(Duration::from_millis(20));
            check = t.self_check().unwrap_or_default();
        }
        check
    });
    Ok((
        Outcome {
            source,
            dest,
            status: last,
            setup,
            wall: started.elapsed(),
        },
        GuestReport {
            at_pause,
            dest: dest_check,
            check_time,
        },
    ))
}

/// Why the guest's own account of the migration is not a clean one, if it is not.
fn guest_error(g: &GuestReport, check: ArrivalCheck) -> Option<String> {
    let Some(d) = &g.dest else {
        return Some("the guest never ran at the destination".into());
    };
    if let Some(f) = &d.failure {
        return Some(format!("the guest stopped at the destination: {f}"));
    }
    if d.progress_at_switch != g.at_pause {
        return Some(format!(
            "the guest's counter was {:?} at the pause but {:?} as it arrived",
            g.at_pause, d.progress_at_switch
        ));
    }
    match d.bad_pages {
        None if check == ArrivalCheck::Off => {
            (!d.resumed).then(|| "the guest did not run on at the destination".into())
        }
        None => Some(format!(
            "the {check}'s check at the destination never reported"
        )),
        Some(0) if d.resumed => None,
        Some(0) => Some("the guest did not run on at the destination".into()),
        Some(n) => Some(format!("the {check}'s check found {n} bad pages")),
    }
}

fn report(args: &Args, pages: u64, o: &Outcome, g: &GuestReport) -> Result<(), String> {
    let summary = o.source.as_ref().ok();
    let status = summary.map_or(&o.status, |s| &s.status);
    let codec = summary.map(|s| &s.codec);
    let (verified, error) = verdict(o);
    let error = error.or_else(|| guest_error(g, args.arrival_check));
    let d = g.dest.clone().unwrap_or_default();
    if args.json {
        let mut obj = json_report(args, pages, o, status, codec, verified, error.as_deref());
        let extra = json!({
            "guest": "kvm",
            "guest_resumed": d.resumed,
            "guest_bad_pages": d.bad_pages,
            "guest_checked_by": d.checked_by,
            "guest_check_ms": g.check_time.map(|t| t.as_millis()),
            "guest_downtime_ms": d.downtime_ms,
            "guest_progress_at_pause": g.at_pause,
            "guest_progress_at_arrival": d.progress_at_switch,
            "guest_progress_after": d.progress,
        });
        if let (Some(o), Some(e)) = (obj.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        println!("{obj}");
    } else {
        let iterations = summary.map_or(&[][..], |s| &s.iterations[..]);
        println!();
        print!("{}", summary_table(status, codec, iterations));
        println!(
            "  {:<17}  {} (driver: {})",
            "guest's downtime",
            d.downtime_ms.map_or("not measured".into(), |ms| format!(
                "{ms:.1} ms on its clock"
            )),
            status
                .pause_ms
                .map_or("-".into(), |ms| format!("{ms} ms paused"))
        );
        println!(
            "  {:<17}  {} at the pause, {} at the destination now",
            "guest counter",
            g.at_pause.map_or("-".into(), |p| p.to_string()),
            d.progress
        );
        // One total time (the migration's, above); the set-up came before it.
        println!(
            "  {:<17}  {} to boot and warm up the guest, before the migration began",
            "set-up",
            format_duration(o.setup)
        );
        println!();
        if verified {
            println!(
                "verified: the destination's memory matches the source's (digests of all {} \
                 pages agree at both ends)",
                crate::progress::group(pages)
            );
        }
        if let Some(0) = d.bad_pages {
            println!(
                "the guest runs on at the destination, and {} of every page found none bad",
                if d.checked_by.as_deref() == Some("host") {
                    "the host's check (by the guest's rules)"
                } else {
                    "its own sweep"
                }
            );
        }
    }
    error.map_or(Ok(()), Err)
}

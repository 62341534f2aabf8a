//! Xen domains migrated through the real pipeline (loopback TCP, AES-256-GCM, both ends in
//! this process) with the xen backend at both ends, on the test double of Xen's libraries
//! (`xen-ffi/double/`): the double keeps each domain in a file, so the test plays the guest
//! and the toolstack and reads back what each end did.

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::Duration;

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::guest::xen::{LibraryPaths, XenGuest, XenSourceConfig, XenTarget};
use dataplane::guest::{DestGuest, SourceGuest};
use dataplane::migrate::dest::{DestOptions, DestSummary, receive};
use dataplane::migrate::source::{SourceOptions, SourceSummary, migrate};
use dataplane::migrate::{MigrateError, MigrationStatus, Phase, Policy, Role};
use dataplane::transport::SocketOptions;
use skyferry_xen_ffi::double::{self, Domain, Event, EventKind, Fault, XenDouble};

/// 16 MiB domains, with a few holes where an HVM guest has its MMIO hole.
const PAGES: u64 = 4096;
const HOLES: std::ops::Range<u64> = 3000..3040;

struct Host {
    double: XenDouble,
    dir: PathBuf,
    libs: LibraryPaths,
}

/// The double, built once, with this process's "host" directory in XEN_DOUBLE_DIR; `None`
/// (with the reason printed) where Xen's headers are missing, unless CI requires them.
fn host() -> Option<&'static Host> {
    static HOST: OnceLock<Result<Host, String>> = OnceLock::new();
    let host = HOST.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("xen-double");
        let so = double::build(&out).map_err(|e| e.to_string())?;
        let dir = out.join(format!("dataplane-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // SAFETY: this runs once, before any test calls into the double (each gets there
        // through host(), which waits for it), so no thread reads the environment meanwhile.
        unsafe { std::env::set_var("XEN_DOUBLE_DIR", &dir) };
        Ok(Host {
            double: XenDouble::load(&so).map_err(|e| e.to_string())?,
            dir,
            libs: LibraryPaths::both(so),
        })
    });
    match host {
        Ok(h) => Some(h),
        Err(e) if std::env::var_os("SKYFERRY_REQUIRE_XEN").is_none() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("the Xen test double is required here: {e}"),
    }
}

/// A page's content, by frame and generation: some zero, some repeated, most unique.
fn content(gfn: u64, generation: u64) -> Vec<u8> {
    let mut page = vec![0u8; 4096];
    match gfn % 8 {
        0 => {}               // zero page
        1 => page.fill(0xab), // the same page many times
        _ => {
            let mut x = gfn.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation;
            for chunk in page.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
    page
}

/// A domain as the toolstack made it: `PAGES` frames, holes at `HOLES`; the source is filled
/// and has an HVM context, the destination is empty and paused (`xl create -p`).
fn domain(h: &'static Host, domid: u32, source: bool) -> Domain<'static> {
    let d = h
        .double
        .create_domain(&h.dir, domid, PAGES)
        .expect("create a domain");
    for gfn in HOLES {
        d.set_hole(gfn, true).unwrap();
    }
    if source {
        for gfn in (0..PAGES).filter(|g| !HOLES.contains(g)) {
            d.write(gfn, 0, &content(gfn, 0)).unwrap();
        }
        let ctx: Vec<u8> = (0..7000u32).map(|i| (i * 7 % 251) as u8).collect();
        d.set_context(&ctx).unwrap();
    } else {
        d.toolstack_pause().unwrap();
    }
    d
}

fn dest_opts() -> DestOptions {
    DestOptions {
        resume_window: std::time::Duration::from_secs(120),
        psk: PreSharedKey::from_bytes([9; 32]),
        socket: SocketOptions::default(),
        pin_threads: false,
        timeout: Duration::from_secs(10),
        max_guest_pages: 1 << 20,
        max_streams: 8,
        drbd: None,
        announce: None,
    }
}

fn source_opts(port: u16, policy: Policy, codec: CodecConfig) -> SourceOptions {
    SourceOptions {
        resume: Default::default(),
        peer: format!("127.0.0.1:{port}").parse().unwrap(),
        psk: PreSharedKey::from_bytes([9; 32]),
        streams: 2,
        codec,
        policy,
        max_downtime: None,
        converge: Default::default(),
        // 16 MiB in about 100 ms: long enough for the guest's writes to matter.
        max_bandwidth: Some(160 << 20),
        socket: SocketOptions::default(),
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE,
        pin_threads: false,
        timeout: Duration::from_secs(10),
        guest_label: "xen-test".into(),
        group: None,
        disk: None,
        network: None,
    }
}

struct Outcome {
    source: Result<SourceSummary, MigrateError>,
    dest: Result<DestSummary, MigrateError>,
    /// Pages the test wrote as the guest while the migration ran.
    guest_writes: u64,
}

/// Migrates domain `src` into domain `dst`, writing to the source as its guest until it is
/// paused.
fn run(h: &'static Host, src: &Domain<'static>, dst: u32, policy: Policy) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dest = {
        let libs = h.libs.clone();
        thread::spawn(move || {
            let factory = Box::new(move |hello: &dataplane::protocol::Hello| {
                let domid = hello
                    .destination
                    .as_deref()
                    .and_then(|d| d.parse().ok())
                    .ok_or("no destination domain")?;
                let t = XenTarget::prepare(&libs, domid, hello.guest_pages)
                    .map_err(|e| e.to_string())?;
                Ok(Arc::new(t) as Arc<dyn DestGuest>)
            });
            let status = Arc::new(Mutex::new(MigrationStatus::new(
                0,
                Role::Destination,
                "",
                0,
            )));
            receive(
                &listener,
                &dest_opts(),
                factory,
                &status,
                &AtomicBool::new(false),
            )
        })
    };
    let done = AtomicBool::new(false);
    let (source, guest_writes) = thread::scope(|s| {
        // The guest: rewrites pages (a hot set and scattered ones) until it is paused.
        let writer = s.spawn(|| {
            let mut n = 0u64;
            while !done.load(Ordering::Relaxed) {
                n += 1;
                let gfn = if n.is_multiple_of(3) {
                    n * 37 % PAGES
                } else {
                    n % 64
                };
                if HOLES.contains(&gfn) {
                    continue;
                }
                match src.write(gfn, 0, &content(gfn, n)) {
                    Ok(()) => thread::sleep(Duration::from_micros(200)),
                    // Paused: a paused guest does not write.
                    Err(_) => thread::sleep(Duration::from_millis(1)),
                }
            }
            n
        });
        let source = XenGuest::open(XenSourceConfig {
            libraries: h.libs.clone(),
            domid: src.domid(),
            dest_domid: dst,
        })
        .map_err(MigrateError::Guest)
        .and_then(|guest| {
            let status = Arc::new(Mutex::new(MigrationStatus::new(0, Role::Source, "", 0)));
            migrate(
                Arc::new(guest) as Arc<dyn SourceGuest>,
                &source_opts(port, policy, CodecConfig::default()),
                0x5eed,
                &status,
                &Arc::new(AtomicBool::new(false)),
            )
        });
        done.store(true, Ordering::Relaxed);
        (source, writer.join().unwrap())
    });
    // If the source failed before connecting, the destination still waits: let it time out.
    if source.is_err() {
        let _ = std::net::TcpStream::connect(("127.0.0.1", port));
    }
    Outcome {
        source,
        dest: dest.join().unwrap(),
        guest_writes,
    }
}

fn kinds(events: &[Event]) -> Vec<EventKind> {
    events.iter().filter_map(Event::kind).collect()
}

fn find(events: &[Event], kind: EventKind) -> Option<&Event> {
    events.iter().find(|e| e.kind() == Some(kind))
}

/// Both ends' memory, frame by frame.
fn assert_same_memory(a: &Domain<'_>, b: &Domain<'_>) {
    for gfn in 0..PAGES {
        assert!(
            a.read(gfn).unwrap() == b.read(gfn).unwrap(),
            "frame {gfn} differs between source and destination"
        );
    }
}

#[test]
fn a_running_domain_migrates_with_writes_between_iterations() {
    let Some(h) = host() else { return };
    for (policy, src_id, dst_id) in [(Policy::Smart, 11, 12), (Policy::XenDefault, 13, 14)] {
        let src = domain(h, src_id, true);
        let dst = domain(h, dst_id, false);
        // The double also writes 300 pages right after each dirty-log round: writes that
        // land exactly between iterations.
        src.set_writes_per_round(300, 42);
        let o = run(h, &src, dst_id, policy);
        let s = o
            .source
            .unwrap_or_else(|e| panic!("{policy:?}: source: {e}"));
        let d = o
            .dest
            .unwrap_or_else(|e| panic!("{policy:?}: destination: {e}"));
        assert_eq!(s.status.phase, Phase::Completed);
        assert_eq!(s.status.verified, Some(true));
        assert_eq!(d.status.phase, Phase::Completed);
        assert!(s.iterations.len() >= 2, "{:?}", s.iterations);
        eprintln!(
            "{policy:?}: {} iterations (sent/dirtied: {}), {} pages written by the test's \
             guest, {} by the double between rounds, {} ms total, {} ms paused",
            s.iterations.len(),
            s.iterations
                .iter()
                .map(|i| format!("{}/{}", i.sent, i.dirtied))
                .collect::<Vec<_>>()
                .join(" "),
            o.guest_writes,
            src.status().guest_writes,
            s.status.elapsed_ms,
            s.status.pause_ms.unwrap_or(0),
        );
        assert!(o.guest_writes > 10, "the guest wrote {}", o.guest_writes);
        assert!(src.status().guest_writes >= 300, "{:?}", src.status());

        // Memory and context arrived, holes stayed holes.
        assert_same_memory(&src, &dst);
        assert_eq!(dst.context(), src.context());
        assert_eq!(dst.status().holes, HOLES.end - HOLES.start);
        assert_eq!(dst.status().mapped_write, PAGES - (HOLES.end - HOLES.start));

        // The source: log-dirty on, rounds, paused once, a final round, its context taken,
        // log-dirty off; never unpaused: the guest now runs at the destination only.
        let se = src.events();
        let k = kinds(&se);
        assert_eq!(k.first(), Some(&EventKind::LogdirtyEnable), "{k:?}");
        assert_eq!(
            k.iter().filter(|&&e| e == EventKind::Pause).count(),
            1,
            "{k:?}"
        );
        assert!(!k.contains(&EventKind::Unpause), "{k:?}");
        assert!(!k.contains(&EventKind::Failed), "{k:?}");
        let pause = find(&se, EventKind::Pause).unwrap();
        let cleans: Vec<&Event> = se
            .iter()
            .filter(|e| e.kind() == Some(EventKind::Clean))
            .collect();
        assert!(cleans.len() >= 2, "{k:?}");
        let last = cleans.last().unwrap();
        assert!(
            last.flags & double::EVF_FINAL != 0 && last.seq > pause.seq,
            "{k:?}"
        );
        assert!(
            cleans[..cleans.len() - 1]
                .iter()
                .all(|c| c.flags & double::EVF_FINAL == 0)
        );
        assert!(find(&se, EventKind::GetContext).unwrap().seq > pause.seq);
        assert_eq!(k.last(), Some(&EventKind::LogdirtyOff), "{k:?}");
        assert_eq!(src.status().pause_count, 1);
        assert_eq!(src.status().logdirty, 0);

        // The destination: paused by the toolstack, its context loaded, then unpaused once,
        // after the source paused.
        let de = dst.events();
        assert_eq!(
            kinds(&de),
            [EventKind::Pause, EventKind::SetContext, EventKind::Unpause]
        );
        assert!(
            de[2].time_ns > pause.time_ns,
            "destination ran before the source paused"
        );
        assert_eq!(dst.status().pause_count, 0);
    }
}

/// The failures before the commit: each names its cause, the destination domain stays
/// paused and untouched by a context, and the source domain runs on with log-dirty off.
fn assert_failed_cleanly(o: &Outcome, src: &Domain<'_>, dst: &Domain<'_>, want: &str) {
    let e = o
        .source
        .as_ref()
        .expect_err("the migration must fail")
        .to_string();
    assert!(e.contains(want), "error {e:?} does not say {want:?}");
    let st = src.status();
    assert_eq!(st.pause_count, 0, "the source domain must be left running");
    assert_eq!(st.logdirty, 0, "log-dirty mode must be off again");
    let k = kinds(&src.events());
    assert_eq!(
        k.iter().filter(|&&e| e == EventKind::Pause).count(),
        k.iter().filter(|&&e| e == EventKind::Unpause).count(),
        "{k:?}"
    );
    assert_eq!(
        dst.status().pause_count,
        1,
        "the destination must stay paused"
    );
    assert!(!kinds(&dst.events()).contains(&EventKind::SetContext));
}

#[test]
fn a_frame_that_fails_to_map_aborts_with_the_source_running() {
    let Some(h) = host() else { return };
    let src = domain(h, 21, true);
    let dst = domain(h, 22, false);
    src.set_fault(Fault::MapFrame, 777, libc::EFAULT).unwrap();
    let o = run(h, &src, 22, Policy::Smart);
    assert_failed_cleanly(&o, &src, &dst, "frame 0x309");
    let e = o.source.unwrap_err().to_string();
    assert!(
        e.contains("Bad address") && e.contains("map guest frames"),
        "{e}"
    );
}

#[test]
fn a_log_dirty_failure_aborts_with_the_source_running() {
    let Some(h) = host() else { return };
    let src = domain(h, 23, true);
    let dst = domain(h, 24, false);
    src.set_fault(Fault::LogdirtyRound, 2, libc::EIO).unwrap();
    let o = run(h, &src, 24, Policy::Smart);
    assert_failed_cleanly(&o, &src, &dst, "xc_logdirty_control on domain 23 failed");
}

#[test]
fn a_pause_failure_aborts_with_the_source_running() {
    let Some(h) = host() else { return };
    let src = domain(h, 25, true);
    let dst = domain(h, 26, false);
    src.set_fault(Fault::Pause, 0, libc::EBUSY).unwrap();
    let o = run(h, &src, 26, Policy::Smart);
    assert_failed_cleanly(&o, &src, &dst, "pause the source domain");
    // It got as far as stop-and-copy and sent pages, yet the guest never stopped.
    assert!(
        kinds(&src.events()).contains(&EventKind::Clean),
        "{:?}",
        kinds(&src.events())
    );
}

#[test]
fn missing_domains_are_named_and_nothing_runs_twice() {
    let Some(h) = host() else { return };
    // No source domain: refused before anything starts.
    let e = XenGuest::open(XenSourceConfig {
        libraries: h.libs.clone(),
        domid: 99,
        dest_domid: 98,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("Xen domain 99 does not exist"), "{e}");

    // No destination domain: the destination refuses, the source runs on.
    let src = domain(h, 27, true);
    let o = run(h, &src, 98, Policy::Smart);
    let e = o.source.as_ref().unwrap_err().to_string();
    assert!(e.contains("Xen domain 98 does not exist"), "{e}");
    assert_eq!(src.status().pause_count, 0);
    assert_eq!(src.status().logdirty, 0);

    // A destination domain that is running (not created paused) is refused: filling a
    // running guest would run two.
    let running = h.double.create_domain(&h.dir, 28, PAGES).unwrap();
    let e = XenTarget::prepare(&h.libs, 28, PAGES)
        .unwrap_err()
        .to_string();
    assert!(e.contains("domain 28 is running"), "{e}");
    // And one of another size.
    running.toolstack_pause().unwrap();
    let e = XenTarget::prepare(&h.libs, 28, PAGES * 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("size mismatch"), "{e}");
}

#[test]
fn a_destination_with_other_holes_is_refused_before_it_runs() {
    let Some(h) = host() else { return };
    // A hole here where the source has memory: that page cannot land, the digests differ
    // (the destination's log says why).
    let src = domain(h, 31, true);
    let dst = domain(h, 32, false);
    dst.set_hole(10, true).unwrap();
    let o = run(h, &src, 32, Policy::Smart);
    let e = o.source.as_ref().unwrap_err().to_string();
    assert!(e.contains("memory verification failed"), "{e}");
    assert_eq!(src.status().pause_count, 0, "the source runs on");
    assert_eq!(dst.status().pause_count, 1, "the destination never ran");

    // Memory here where the source has a hole: the zero page lands, but the hole summaries
    // in the state blob differ.
    let src = domain(h, 33, true);
    let dst = domain(h, 34, false);
    src.set_hole(11, true).unwrap();
    let o = run(h, &src, 34, Policy::Smart);
    let e = o.source.as_ref().unwrap_err().to_string();
    assert!(e.contains("physmap differs"), "{e}");
    assert_eq!(src.status().pause_count, 0, "the source runs on");
    assert_eq!(dst.status().pause_count, 1, "the destination never ran");
}

//! Whole migrations between two threads over real loopback TCP, with synthetic guests.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticOptions, SyntheticTarget};
use dataplane::guest::workload::Workload;
use dataplane::guest::{DestGuest, SourceGuest};
use dataplane::migrate::dest::{DestOptions, DestSummary, receive};
use dataplane::migrate::source::{SourceOptions, SourceSummary, migrate};
use dataplane::migrate::{MigrateError, MigrationStatus, Phase, Policy, Role};
use dataplane::transport::SocketOptions;

const PAGES: u64 = 4096; // 16 MiB

fn dest_opts(psk: u8) -> DestOptions {
    DestOptions {
        resume_window: std::time::Duration::from_secs(120),
        psk: PreSharedKey::from_bytes([psk; 32]),
        socket: SocketOptions::default(),
        pin_threads: false,
        timeout: Duration::from_secs(10),
        max_guest_pages: 1 << 20,
        max_streams: 8,
        drbd: None,
        announce: None,
    }
}

fn source_opts(port: u16, psk: u8, policy: Policy, codec: CodecConfig) -> SourceOptions {
    SourceOptions {
        resume: Default::default(),
        peer: format!("127.0.0.1:{port}").parse().unwrap(),
        psk: PreSharedKey::from_bytes([psk; 32]),
        streams: 2,
        codec,
        policy,
        max_downtime: None,
        converge: Default::default(),
        // Slow enough that the guest's writers matter, fast enough for a quick test.
        max_bandwidth: Some(200 << 20),
        socket: SocketOptions::default(),
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE,
        pin_threads: false,
        timeout: Duration::from_secs(10),
        guest_label: "test-guest".into(),
        group: None,
        disk: None,
        network: None,
    }
}

struct Outcome {
    source: Result<SourceSummary, MigrateError>,
    dest: Result<DestSummary, MigrateError>,
    dest_status: MigrationStatus,
    target: Arc<SyntheticTarget>,
    guest: Arc<SyntheticGuest>,
}

fn run(
    workload: Workload,
    policy: Policy,
    codec: CodecConfig,
    psk_dest: u8,
    abort_once_sending: bool,
) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let dest_status = Arc::new(Mutex::new(MigrationStatus::new(
        0,
        Role::Destination,
        "",
        0,
    )));
    let target_slot: Arc<Mutex<Option<Arc<SyntheticTarget>>>> = Arc::default();
    let dest = {
        let (st, slot) = (dest_status.clone(), target_slot.clone());
        thread::spawn(move || {
            let factory = Box::new(move |h: &dataplane::protocol::Hello| {
                let t = Arc::new(SyntheticTarget::new(h.guest_pages).map_err(|e| e.to_string())?);
                *slot.lock().unwrap() = Some(t.clone());
                Ok(t as Arc<dyn DestGuest>)
            });
            receive(
                &listener,
                &dest_opts(psk_dest),
                factory,
                &st,
                &AtomicBool::new(false),
            )
        })
    };
    let guest = Arc::new(
        SyntheticGuest::with_options(
            PAGES,
            workload,
            7,
            SyntheticOptions {
                speed: 4.0,
                writers: 1,
            },
        )
        .unwrap(),
    );
    let status = Arc::new(Mutex::new(MigrationStatus::new(0, Role::Source, "", 0)));
    let abort = Arc::new(AtomicBool::new(false));
    if abort_once_sending {
        // Abort on an event, not a timer: the first pages on the wire. The bandwidth cap
        // makes the first iteration last about 80 ms, so the abort lands during pre-copy
        // however fast or slow the machine is.
        let (abort, status) = (abort.clone(), status.clone());
        thread::spawn(move || {
            while status.lock().unwrap().pages_sent == 0 {
                thread::sleep(Duration::from_millis(1));
            }
            abort.store(true, std::sync::atomic::Ordering::Relaxed);
        });
    }
    let source = migrate(
        guest.clone() as Arc<dyn SourceGuest>,
        &source_opts(port, 1, policy, codec),
        0x5eed,
        &status,
        &abort,
    );
    let dest = dest.join().unwrap();
    let target = target_slot
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| Arc::new(SyntheticTarget::new(1).unwrap()));
    let dest_status = dest_status.lock().unwrap().clone();
    Outcome {
        source,
        dest,
        dest_status,
        target,
        guest,
    }
}

#[test]
fn tpcw_migrates_and_verifies_with_smart_stop() {
    let o = run(
        Workload::Tpcw,
        Policy::Smart,
        CodecConfig::default(),
        1,
        false,
    );
    if o.source.is_err() {
        eprintln!(
            "dest: {:?}\nstatus {:?}",
            o.dest.as_ref().err(),
            o.dest_status
        );
    }
    let s = o.source.expect("source");
    let d = o.dest.expect("destination");
    assert_eq!(s.status.phase, Phase::Completed);
    assert_eq!(s.status.verified, Some(true));
    assert_eq!(d.status.phase, Phase::Completed);
    assert!(s.status.stop_reason.is_some());
    assert!(s.iterations.len() >= 2, "{:?}", s.iterations);
    // The guest now runs at the destination, and never again at the source.
    assert!(o.guest.resume().is_err());
    let before = o.target.writes();
    thread::sleep(Duration::from_millis(300));
    assert!(o.target.writes() > before, "the destination guest runs");
}

#[test]
fn baseline_codec_and_xen_policy_also_verify() {
    let o = run(
        Workload::Kernel,
        Policy::XenDefault,
        CodecConfig::baseline(),
        1,
        false,
    );
    let s = o.source.expect("source");
    assert_eq!(s.status.phase, Phase::Completed);
    assert_eq!(
        s.codec.saved_zero + s.codec.saved_cbr + s.codec.saved_delta,
        0
    );
    o.dest.expect("destination");
}

#[test]
fn wrong_key_is_refused_and_the_guest_keeps_running() {
    let o = run(
        Workload::Idle,
        Policy::Smart,
        CodecConfig::default(),
        2,
        false,
    );
    let err = o.source.expect_err("must fail");
    assert!(err.to_string().contains("pre-shared key"), "{err}");
    assert!(o.dest.is_err());
    // Never paused, still ours.
    assert!(
        o.guest.memory_digest().is_err(),
        "digest needs a paused guest: it is running"
    );
    assert_eq!(o.dest_status.phase, Phase::Failed);
}

#[test]
fn abort_leaves_the_guest_running_at_the_source() {
    let o = run(
        Workload::Specjbb,
        Policy::XenDefault,
        CodecConfig::default(),
        1,
        true,
    );
    let err = o.source.expect_err("aborted");
    assert!(matches!(err, MigrateError::Aborted), "{err}");
    assert!(o.dest.is_err(), "destination discards");
    assert_ne!(o.dest_status.phase, Phase::Completed);
    // The source guest still runs: its writers go on.
    let before = o.guest.writes();
    thread::sleep(Duration::from_millis(300));
    assert!(o.guest.writes() > before);
    assert!(o.guest.resume().is_ok() || o.guest.writes() > before);
}

#[test]
fn compressed_frames_migrate_and_verify() {
    use dataplane::codec::Compression;
    for compression in [Compression::Zstd1, Compression::Lz4] {
        let codec = CodecConfig {
            compression,
            ..CodecConfig::default()
        };
        let o = run(Workload::Kernel, Policy::Smart, codec, 1, false);
        let s = o.source.expect("source");
        let d = o.dest.expect("destination");
        assert_eq!(s.status.phase, Phase::Completed, "{compression}");
        assert_eq!(s.status.verified, Some(true));
        // Kernel-compile memory is mostly text and code: frames shrink.
        assert!(
            s.codec.frames_compressed > 0,
            "{compression}: {:?}",
            s.codec
        );
        assert_eq!(s.codec.frames_compressed, d.codec.frames_compressed);
        assert_eq!(s.codec.saved_compress, d.codec.saved_compress);
        assert_eq!(s.status.saved.compress, s.codec.saved_compress);
    }
}

#[test]
fn auto_compression_migrates_and_verifies() {
    // Whether `auto` compresses here depends on this host's load; either way the guest must
    // arrive intact.
    let codec = CodecConfig {
        compression: dataplane::codec::Compression::Auto,
        ..CodecConfig::default()
    };
    let o = run(Workload::Tpcw, Policy::Smart, codec, 1, false);
    let s = o.source.expect("source");
    let d = o.dest.expect("destination");
    assert_eq!(s.status.verified, Some(true));
    assert_eq!(s.codec.frames_compressed, d.codec.frames_compressed);
}

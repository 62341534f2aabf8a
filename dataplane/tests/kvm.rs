//! The `kvm` backend on the real kernel: the test guest runs, checks itself, pauses and
//! resumes, and moves between two micro-VMs in this process through the backend traits.
//!
//! Needs /dev/kvm; without it the tests skip with the reason, unless `SKYFERRY_REQUIRE_KVM`
//! is set, when they fail instead. Guests are small: on a nested host the guest runs under
//! instruction emulation, about a million instructions per second.

use std::time::{Duration, Instant};

use dataplane::guest::kvm::program::Status;
use dataplane::guest::kvm::{KvmGuest, KvmGuestConfig, KvmTarget, KvmTargetOptions};
use dataplane::guest::workload::Workload;
use dataplane::guest::{DestGuest, DirtyBitmap, SourceGuest};
use dataplane::page::PageBatch;

const SWEEP: Duration = Duration::from_secs(60);

fn have_kvm(test: &str) -> bool {
    match dataplane::guest::kvm::available() {
        Ok(()) => true,
        Err(why) => {
            assert!(
                std::env::var_os("SKYFERRY_REQUIRE_KVM").is_none(),
                "SKYFERRY_REQUIRE_KVM is set but {why}"
            );
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

fn boot(mib: u64, workload: Workload, speed: f64) -> KvmGuest {
    KvmGuest::boot(&KvmGuestConfig {
        pages: mib * 256,
        workload,
        seed: 7,
        speed,
    })
    .expect("boot the test guest")
}

/// Waits until the guest's progress counter passes `at_least`.
fn wait_progress(status: impl Fn() -> Status, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = status().progress;
        if p >= at_least {
            return p;
        }
        assert!(Instant::now() < deadline, "progress stuck at {p}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_guest_runs_and_its_sweep_finds_nothing_wrong() {
    if !have_kvm("the_guest_runs_and_its_sweep_finds_nothing_wrong") {
        return;
    }
    let g = boot(2, Workload::Kernel, 1.0);
    wait_progress(|| g.status(), 20);
    let report = g.sweep(SWEEP).expect("sweep");
    assert_eq!(report.bad, 0, "bad pages {:?}", report.pages);
    g.pause().unwrap();
    assert_eq!(g.host_check().unwrap(), vec![], "the host's check agrees");
    let paused = g.status().progress;
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(g.status().progress, paused, "a paused guest does not run");
    g.resume().unwrap();
    wait_progress(|| g.status(), paused + 1);
}

#[test]
fn the_sweep_finds_exactly_one_corrupted_page() {
    if !have_kvm("the_sweep_finds_exactly_one_corrupted_page") {
        return;
    }
    let g = boot(1, Workload::Tpcw, 1.0);
    g.corrupt_before_next_sweep();
    let report = g.sweep(SWEEP).expect("sweep");
    assert_eq!(report.bad, 1, "bad pages {:?}", report.pages);
    assert_eq!(report.pages, vec![255]);
    g.pause().unwrap();
    assert_eq!(g.host_check().unwrap().len(), 1, "the host's check agrees");
}

#[test]
fn dirty_log_reports_the_guests_writes() {
    if !have_kvm("dirty_log_reports_the_guests_writes") {
        return;
    }
    let g = boot(1, Workload::Specjbb, 2.0);
    g.start_dirty_log().unwrap();
    let before = g.status().progress;
    wait_progress(|| g.status(), before + 10);
    let mut bitmap = DirtyBitmap::new(g.page_count());
    g.collect_dirty(&mut bitmap).unwrap();
    assert!(bitmap.count() > 0, "writes show in the dirty log");
    g.pause().unwrap();
    let mut again = DirtyBitmap::new(g.page_count());
    g.collect_dirty(&mut again).unwrap(); // whatever ran before the pause
    let mut none = DirtyBitmap::new(g.page_count());
    g.collect_dirty(&mut none).unwrap();
    assert_eq!(none.count(), 0, "a paused guest dirties nothing");
}

/// A whole migration through the traits, in process: every page, then the dirty ones
/// while paused, then the state; the guest continues at the destination.
#[test]
fn the_guest_moves_between_two_micro_vms() {
    if !have_kvm("the_guest_moves_between_two_micro_vms") {
        return;
    }
    let src = boot(2, Workload::Tpcw, 2.0);
    let dst = KvmTarget::new(src.page_count(), KvmTargetOptions::default()).unwrap();
    src.start_dirty_log().unwrap();
    // One writer for everything: a page belongs to its first writer for good.
    let mut w = dst.writer(Box::new(|_| true)).unwrap();
    let mut copy = |pfns: Vec<u64>| {
        for chunk in pfns.chunks(64) {
            let mut batch = PageBatch::with_capacity(64);
            src.read_pages(chunk, &mut batch).unwrap();
            for (pfn, page) in batch.iter() {
                w.write_page(pfn, &page.0);
            }
        }
    };
    copy((0..src.page_count()).collect());
    wait_progress(|| src.status(), 10);
    src.pause().unwrap();
    let mut dirty = DirtyBitmap::new(src.page_count());
    src.collect_dirty(&mut dirty).unwrap();
    assert!(dirty.count() > 0);
    copy(dirty.iter().collect());
    drop(w);
    let paused = src.status().progress;
    dst.set_state(&src.state().unwrap()).unwrap();
    assert_eq!(dst.memory_digest(), src.memory_digest().unwrap());
    src.hand_over().unwrap();
    dst.start().unwrap();
    let report = dst.wait_arrival_sweep(SWEEP).expect("arrival sweep");
    assert_eq!(report.bad, 0, "bad pages {:?}", report.pages);
    wait_progress(|| dst.status(), paused + 1);
    let check = dst.self_check().unwrap();
    assert_eq!(check.progress_at_switch, Some(paused));
    assert!(check.resumed);
    let downtime = check.downtime_ms.expect("the guest measured its arrival");
    eprintln!("guest-seen downtime {downtime:.1} ms");
    assert!(src.resume().is_err(), "a handed-over guest never resumes");
}

#[test]
fn a_state_blob_of_another_size_is_refused() {
    if !have_kvm("a_state_blob_of_another_size_is_refused") {
        return;
    }
    let src = boot(1, Workload::Idle, 1.0);
    src.pause().unwrap();
    let blob = src.state().unwrap();
    let other = KvmTarget::new(512, KvmTargetOptions::default()).unwrap();
    let e = other.set_state(&blob).unwrap_err().to_string();
    assert!(e.contains("size mismatch"), "{e}");
    let e = other.set_state(b"QEMU....").unwrap_err().to_string();
    assert!(e.contains("not a KVM state blob"), "{e}");
}

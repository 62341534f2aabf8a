//! The `kvm` backend on the real kernel: the test guest runs, checks itself, pauses and
//! resumes, and moves between two micro-VMs in this process through the backend traits.
//!
//! Needs /dev/kvm; without it the tests skip with the reason, unless `SKYFERRY_REQUIRE_KVM`
//! is set, when they fail instead. Guests are small: on a nested host the guest runs under
//! instruction emulation, about a million instructions per second.

use std::time::{Duration, Instant};

use dataplane::guest::kvm::program::{Status, Sweeper};
use dataplane::guest::kvm::{ArrivalCheck, KvmGuest, KvmGuestConfig, KvmTarget, KvmTargetOptions};
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
    let report = g.sweep(Sweeper::Guest, SWEEP).expect("sweep");
    assert_eq!(report.bad, 0, "bad pages {:?}", report.pages);
    assert_eq!(report.by, Sweeper::Guest);
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
    let report = g.sweep(Sweeper::Guest, SWEEP).expect("sweep");
    assert_eq!(report.bad, 1, "bad pages {:?}", report.pages);
    assert_eq!(report.pages, vec![255]);
    g.pause().unwrap();
    assert_eq!(g.host_check().unwrap().len(), 1, "the host's check agrees");
}

/// The host's sweep, taken while the program waits between two operations, judges as the
/// program's own does: nothing on a running guest, then exactly the corrupted page, which
/// the program's sweep then finds too. The guest runs on after each. (Idle writes only its
/// hot set at the start of memory, so nothing heals the corrupted last page in between.)
#[test]
fn the_host_sweep_between_two_writes_agrees_with_the_guests_own() {
    if !have_kvm("the_host_sweep_between_two_writes_agrees_with_the_guests_own") {
        return;
    }
    let g = boot(2, Workload::Idle, 25.0);
    let mut at = wait_progress(|| g.status(), 20);
    let report = g.sweep(Sweeper::Host, SWEEP).expect("host sweep");
    assert_eq!(
        (report.bad, report.by),
        (0, Sweeper::Host),
        "bad pages {:?}",
        report.pages
    );
    at = wait_progress(|| g.status(), at + 10);
    g.corrupt_before_next_sweep();
    let report = g.sweep(Sweeper::Host, SWEEP).expect("host sweep");
    assert_eq!(report.bad, 1, "bad pages {:?}", report.pages);
    assert_eq!(report.pages, vec![511]);
    wait_progress(|| g.status(), at + 10);
    let report = g.sweep(Sweeper::Guest, SWEEP).expect("guest sweep");
    assert_eq!(report.bad, 1, "the guest agrees: {:?}", report.pages);
    assert_eq!(report.pages, vec![511]);
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
/// while paused, then the state; the guest continues at the destination, checked there
/// by itself and, the second time, by the host.
#[test]
fn the_guest_moves_between_two_micro_vms() {
    if !have_kvm("the_guest_moves_between_two_micro_vms") {
        return;
    }
    for check in [ArrivalCheck::Guest, ArrivalCheck::Host] {
        move_guest(check);
    }
}

fn move_guest(arrival_check: ArrivalCheck) {
    let src = boot(2, Workload::Tpcw, 2.0);
    let dst = KvmTarget::new(src.page_count(), KvmTargetOptions { arrival_check }).unwrap();
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
    assert_eq!(check.checked_by.as_deref(), Some(arrival_check.name()));
    assert_eq!(check.progress_at_switch, Some(paused));
    assert!(check.resumed);
    let downtime = check.downtime_ms.expect("the guest measured its arrival");
    eprintln!("{arrival_check} check: guest-seen downtime {downtime:.1} ms");
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

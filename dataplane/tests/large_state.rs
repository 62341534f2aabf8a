//! A state blob larger than a control message (a QEMU guest with big private ROMs or video
//! memory) travels in parts ahead of `Final` and arrives whole.

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane::codec::CodecConfig;
use dataplane::crypto::PreSharedKey;
use dataplane::guest::synthetic::{SyntheticGuest, SyntheticTarget};
use dataplane::guest::workload::Workload;
use dataplane::guest::{DestGuest, DirtyBitmap, GuestError, PageWriter, SourceGuest};
use dataplane::migrate::dest::{DestOptions, receive};
use dataplane::migrate::source::{SourceOptions, migrate};
use dataplane::migrate::{MigrationStatus, Phase, Policy, Role};
use dataplane::page::{PageBatch, Pfn};
use dataplane::protocol::CONTROL_FRAME_SIZE;
use dataplane::transport::SocketOptions;

/// Padding appended to the synthetic state: two and a half control frames.
fn padding() -> Vec<u8> {
    (0..CONTROL_FRAME_SIZE * 5 / 2)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect()
}

struct BigStateSource(SyntheticGuest);

impl SourceGuest for BigStateSource {
    fn backend(&self) -> &'static str {
        self.0.backend()
    }
    fn page_count(&self) -> u64 {
        self.0.page_count()
    }
    fn start_dirty_log(&self) -> Result<(), GuestError> {
        self.0.start_dirty_log()
    }
    fn collect_dirty(&self, b: &mut DirtyBitmap) -> Result<(), GuestError> {
        self.0.collect_dirty(b)
    }
    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError> {
        self.0.read_pages(pfns, batch)
    }
    fn pause(&self) -> Result<(), GuestError> {
        self.0.pause()
    }
    fn resume(&self) -> Result<(), GuestError> {
        self.0.resume()
    }
    fn state(&self) -> Result<Vec<u8>, GuestError> {
        let mut s = self.0.state()?;
        s.extend_from_slice(&padding());
        Ok(s)
    }
    fn memory_digest(&self) -> Result<u64, GuestError> {
        self.0.memory_digest()
    }
    fn hand_over(&self) -> Result<(), GuestError> {
        self.0.hand_over()
    }
}

struct BigStateTarget {
    inner: SyntheticTarget,
    got_padding: Mutex<bool>,
}

impl DestGuest for BigStateTarget {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn page_count(&self) -> u64 {
        self.inner.page_count()
    }
    fn writer(
        &self,
        owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    ) -> Result<Box<dyn PageWriter>, GuestError> {
        self.inner.writer(owns)
    }
    fn set_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let pad = padding();
        let split = blob
            .len()
            .checked_sub(pad.len())
            .ok_or_else(|| GuestError::BadState("blob shorter than its padding".into()))?;
        if blob[split..] != pad[..] {
            return Err(GuestError::BadState("padding arrived damaged".into()));
        }
        *self.got_padding.lock().unwrap() = true;
        self.inner.set_state(&blob[..split])
    }
    fn memory_digest(&self) -> u64 {
        self.inner.memory_digest()
    }
    fn start(&self) -> Result<(), GuestError> {
        self.inner.start()
    }
}

#[test]
fn a_state_larger_than_a_control_frame_arrives_whole() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let target: Arc<Mutex<Option<Arc<BigStateTarget>>>> = Arc::default();
    let slot = target.clone();
    let dest = std::thread::spawn(move || {
        let opts = DestOptions {
            resume_window: std::time::Duration::from_secs(120),
            psk: PreSharedKey::from_bytes([3; 32]),
            socket: SocketOptions::default(),
            pin_threads: false,
            timeout: Duration::from_secs(10),
            max_guest_pages: 1 << 20,
            max_streams: 8,
            drbd: None,
            announce: None,
        };
        let status = Arc::new(Mutex::new(MigrationStatus::new(
            0,
            Role::Destination,
            "",
            0,
        )));
        let factory = Box::new(move |h: &dataplane::protocol::Hello| {
            let t = Arc::new(BigStateTarget {
                inner: SyntheticTarget::new(h.guest_pages).map_err(|e| e.to_string())?,
                got_padding: Mutex::new(false),
            });
            *slot.lock().unwrap() = Some(t.clone());
            Ok(t as Arc<dyn DestGuest>)
        });
        receive(&listener, &opts, factory, &status, &AtomicBool::new(false))
    });
    let guest = Arc::new(BigStateSource(
        SyntheticGuest::new(1024, Workload::Idle, 5).unwrap(),
    ));
    let opts = SourceOptions {
        resume: Default::default(),
        peer: format!("127.0.0.1:{port}").parse().unwrap(),
        psk: PreSharedKey::from_bytes([3; 32]),
        streams: 1,
        codec: CodecConfig::default(),
        policy: Policy::Smart,
        max_downtime: None,
        converge: Default::default(),
        max_bandwidth: None,
        socket: SocketOptions::default(),
        frame_size: dataplane::frame::DEFAULT_FRAME_SIZE,
        pin_threads: false,
        timeout: Duration::from_secs(10),
        guest_label: "big-state".into(),
        group: None,
        disk: None,
        network: None,
    };
    let status = Arc::new(Mutex::new(MigrationStatus::new(0, Role::Source, "", 0)));
    let s = migrate(guest, &opts, 7, &status, &AtomicBool::new(false)).expect("migrates");
    dest.join().unwrap().expect("destination");
    assert_eq!(s.status.phase, Phase::Completed);
    assert!(s.status.state_bytes.unwrap() > CONTROL_FRAME_SIZE as u64 * 2);
    let t = target.lock().unwrap().clone().unwrap();
    assert!(
        *t.got_padding.lock().unwrap(),
        "the whole blob reached set_state"
    );
}

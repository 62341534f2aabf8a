//! The guest's DRBD disk in a migration, on one host: how this host runs drbdadm
//! ([`DrbdHost`], from `[drbd]`), the steering built for one migration with its phase
//! mirrored into the migration's status, and the bulk sync run beside the driver
//! ([`SyncTask`]) so the driver keeps watching the peer and the operator while it lasts.
//!
//! Where the drivers call each step (see `protocol`): `bulk_sync` and `before_memory`
//! between `Prepare` and `Prepared`, on both hosts; `switchover` at the destination before
//! `Ready`; `after_commit` and `finish` on both hosts once the guest runs at the
//! destination; `roll_back` on any failure before the commit, the destination first.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::MigrationStatus;
use crate::disk::drbd::{
    DiskStatus, DrbdDisk, DrbdError, Drbdadm, Side, Steer, SteerTiming, local_hostname,
};

/// How this host runs DRBD's tools (`[drbd]` in the daemon's config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrbdHost {
    /// drbdadm to run.
    pub drbdadm: PathBuf,
    /// drbdsetup for drbdadm and for queries (default: the one beside drbdadm).
    pub drbdsetup: Option<PathBuf>,
    /// Where resource files are written (`/etc/drbd.d`).
    pub resource_dir: PathBuf,
    /// This host's node name in resource files (default: `uname -n`, as drbdadm's).
    pub node: Option<String>,
    /// Longest a single drbdadm or drbdsetup command may run.
    pub command_timeout: Duration,
    /// How long the steps wait for DRBD.
    pub timing: SteerTiming,
}

impl Default for DrbdHost {
    fn default() -> Self {
        DrbdHost {
            drbdadm: "/usr/sbin/drbdadm".into(),
            drbdsetup: None,
            resource_dir: crate::disk::drbd::DEFAULT_RESOURCE_DIR.into(),
            node: None,
            command_timeout: Duration::from_secs(60),
            timing: SteerTiming::default(),
        }
    }
}

impl DrbdHost {
    /// Writes `disk`'s resource file here and builds the steering of this host's `side`,
    /// which keeps `status.disk` current.
    pub fn steer(
        &self,
        disk: DrbdDisk,
        side: Side,
        status: &Arc<Mutex<MigrationStatus>>,
    ) -> Result<Steer, DrbdError> {
        disk.validate()?;
        let file = disk.write_resource_file(&self.resource_dir)?;
        let mut adm = Drbdadm::new()
            .with_program(&self.drbdadm)
            .with_config(file)
            .with_timeout(self.command_timeout);
        if let Some(s) = &self.drbdsetup {
            adm = adm.with_drbdsetup(s);
        }
        let host = match &self.node {
            Some(n) => {
                adm = adm.with_node(n);
                n.clone()
            }
            None => local_hostname().map_err(|e| DrbdError::Host {
                context: "reading this host's name",
                source: e,
            })?,
        };
        let steer = Steer::new(disk, side, &host, adm)?.with_timing(self.timing);
        let shown = status.clone();
        let mut disk_status = steer.status();
        status.lock().expect("status lock").disk = Some(disk_status.clone());
        Ok(steer.on_progress(move |phase, pct| {
            disk_status.phase = phase;
            if pct.is_some() {
                disk_status.sync_percent = pct;
            }
            shown.lock().expect("status lock").disk = Some(disk_status.clone());
        }))
    }
}

/// The bulk sync (and, at the destination, the switch to protocol C after it) running on
/// its own thread, which owns the steering until it ends.
#[derive(Debug)]
pub struct SyncTask {
    handle: JoinHandle<(Steer, Result<(), DrbdError>)>,
    abort: Arc<AtomicBool>,
}

impl SyncTask {
    /// Starts `bulk_sync`, then `before_memory` too if `then_protocol_c`.
    pub fn spawn(mut steer: Steer, then_protocol_c: bool) -> Result<SyncTask, DrbdError> {
        let abort = steer.abort_handle();
        let handle = std::thread::Builder::new()
            .name("sf-drbd-sync".into())
            .spawn(move || {
                let r = steer.bulk_sync();
                let r = r.and_then(|()| {
                    if then_protocol_c {
                        steer.before_memory()
                    } else {
                        Ok(())
                    }
                });
                (steer, r)
            })
            .map_err(|e| DrbdError::Host {
                context: "starting the DRBD sync thread",
                source: e,
            })?;
        Ok(SyncTask { handle, abort })
    }

    /// True once the steps ended, well or not.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the end; the steering comes back with the outcome.
    pub fn join(self) -> (Steer, Result<(), DrbdError>) {
        self.handle
            .join()
            .expect("the DRBD sync thread does not panic")
    }

    /// Ends the wait early (within a tenth of a second) and takes the steering back.
    pub fn cancel(self) -> Steer {
        self.abort.store(true, Ordering::Relaxed);
        let (steer, _) = self.join();
        // The flag also ends later waits; a roll back has its own.
        steer.abort_handle().store(false, Ordering::Relaxed);
        steer
    }
}

/// Rolls `steer` back after a failed migration, recording the outcome in `status`.
pub fn roll_back(steer: &mut Steer, status: &Arc<Mutex<MigrationStatus>>, id: u64) {
    match steer.roll_back() {
        Ok(report) => {
            tracing::info!(migration = %crate::migrate::MigrationId(id), "disk rolled back: {report}")
        }
        Err(e) => {
            tracing::error!(migration = %crate::migrate::MigrationId(id), "disk roll back incomplete: {e}");
            status.lock().expect("status lock").disk_error = Some(e.to_string());
        }
    }
}

/// Runs `step` after the commit, when a failure no longer changes where the guest runs: it
/// is logged and shown in `status` for the operator.
pub fn after_commit_step(
    status: &Arc<Mutex<MigrationStatus>>,
    id: u64,
    what: &str,
    step: impl FnOnce() -> Result<(), DrbdError>,
) -> bool {
    match step() {
        Ok(()) => true,
        Err(e) => {
            tracing::error!(
                migration = %crate::migrate::MigrationId(id),
                "disk {what} after the commit failed: {e}; the guest runs at the destination, \
                 the disk needs the operator"
            );
            status.lock().expect("status lock").disk_error = Some(e.to_string());
            false
        }
    }
}

/// What `status.disk` says right now.
pub fn current(status: &Arc<Mutex<MigrationStatus>>) -> Option<DiskStatus> {
    status.lock().expect("status lock").disk.clone()
}

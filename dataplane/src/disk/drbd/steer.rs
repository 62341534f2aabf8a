//! The disk's part of a migration, on one host: a state machine whose steps each run
//! drbdadm and then check with drbdsetup that DRBD is where the step needs it.
//!
//! ```text
//!                 source (guest runs here)            destination
//! bulk_sync       net-options --protocol=A            net-options --protocol=A
//!                 wait: Established, both UpToDate,   (same wait)
//!                 nothing out of sync
//! before_memory   net-options --protocol=C            net-options --protocol=C
//!   ... memory pre-copy; the guest pauses at the source ...
//! switchover      (nothing)                           net-options --protocol=C
//!                                                       --allow-two-primaries=yes
//!                                                     primary
//!   ... the guest commits and resumes at the destination ...
//! after_commit    secondary                           (checks it is Primary; records
//!                                                      the commit)
//! finish          net-options --protocol=A            net-options --protocol=A
//!                   --allow-two-primaries=no            --allow-two-primaries=no
//! ```
//!
//! Both hosts issue the protocol changes, although DRBD forwards a `net-options` change to
//! a connected peer: if the link drops between the two, the peer never hears of it, and
//! on reconnecting DRBD refuses a pair whose protocols or `allow-two-primaries` differ.
//!
//! The order inside a step is DRBD's: it refuses `allow-two-primaries` without protocol C,
//! refuses a second Primary without `allow-two-primaries`, and refuses to forbid two
//! primaries while both nodes are Primary, which is why `finish` and `roll_back` on a
//! Primary first wait (up to [`SteerTiming::role_wait`]) for the peer to be Secondary.
//!
//! Roll back restores the roles as they were before the migration: the destination
//! demotes if it was promoted, the source stays Primary, then two primaries are forbidden
//! again and the protocol returns to A. Once the guest has committed at the destination
//! (this host's `after_commit` or `finish` ran), roll back never moves a role: the guest
//! runs on the destination's disk, and demoting it there would pull the disk from under
//! it. It then only restores the network options, when DRBD lets it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::drbdadm::Drbdadm;
use super::error::{DrbdError, Step};
use super::resource::{DrbdDisk, DrbdNode};
use super::status::{DiskState, ResourceStatus, Role};

/// Which end of the migration this host is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The guest runs here before the migration; its disk is Primary here.
    Source,
    /// The guest runs here after the migration.
    Destination,
}

impl Side {
    /// This host's role while the guest runs at the source.
    fn role_before(self) -> Role {
        match self {
            Side::Source => Role::Primary,
            Side::Destination => Role::Secondary,
        }
    }

    /// This host's role once the migration is done.
    fn role_after(self) -> Role {
        match self {
            Side::Source => Role::Secondary,
            Side::Destination => Role::Primary,
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Source => Side::Destination,
            Side::Destination => Side::Source,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Where the disk is in the migration, for `skyferry status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskPhase {
    /// Nothing done yet.
    Idle,
    /// Asynchronous replication, waiting for the disks to be equal.
    BulkSync,
    /// The disks are equal (protocol A).
    Synced,
    /// Synchronous replication: every write reaches both disks.
    ProtocolC,
    /// The destination is Primary too.
    DualPrimary,
    /// The guest committed at the destination; the source has let go.
    Committed,
    /// One primary, protocol A again: finished.
    Done,
    /// A failed migration's changes were undone.
    RolledBack,
    /// A step failed, or a roll back could not undo everything.
    Failed,
}

impl fmt::Display for DiskPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DiskPhase::Idle => "idle",
            DiskPhase::BulkSync => "bulk-sync",
            DiskPhase::Synced => "synced",
            DiskPhase::ProtocolC => "protocol-c",
            DiskPhase::DualPrimary => "dual-primary",
            DiskPhase::Committed => "committed",
            DiskPhase::Done => "done",
            DiskPhase::RolledBack => "rolled-back",
            DiskPhase::Failed => "failed",
        })
    }
}

/// The disk's state for `skyferry status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The DRBD resource.
    pub resource: String,
    /// This host's side.
    pub side: Side,
    /// Where the disk is.
    pub phase: DiskPhase,
    /// How much of the disk was in sync at the last look, percent.
    pub sync_percent: Option<f64>,
}

/// How long the steering waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SteerTiming {
    /// The longest the bulk copy may take. At the paper's 4 MB/s resync rate a 100 GB disk
    /// takes 7 hours; the default allows a day.
    pub sync_deadline: Duration,
    /// How often the bulk copy's progress is read.
    pub poll_interval: Duration,
    /// How long a Primary waits for its peer to become Secondary before it forbids two
    /// primaries again (`finish` at the destination, `roll_back` at the source).
    pub role_wait: Duration,
}

impl Default for SteerTiming {
    fn default() -> Self {
        SteerTiming {
            sync_deadline: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_secs(1),
            role_wait: Duration::from_secs(30),
        }
    }
}

/// One drbdadm command of the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmCommand {
    /// `net-options --protocol=A R`
    ProtocolA,
    /// `net-options --protocol=C R`
    ProtocolC,
    /// `net-options --protocol=C --allow-two-primaries=yes R`: DRBD refuses two primaries
    /// without protocol C, so both go in one change.
    AllowTwoPrimaries,
    /// `primary R`
    Primary,
    /// `secondary R`
    Secondary,
    /// `net-options --protocol=A --allow-two-primaries=no R`
    OnePrimary,
}

impl AdmCommand {
    /// drbdadm's arguments for `resource`.
    pub fn args(self, resource: &str) -> Vec<String> {
        let args: &[&str] = match self {
            AdmCommand::ProtocolA => &["net-options", "--protocol=A"],
            AdmCommand::ProtocolC => &["net-options", "--protocol=C"],
            AdmCommand::AllowTwoPrimaries => {
                &["net-options", "--protocol=C", "--allow-two-primaries=yes"]
            }
            AdmCommand::Primary => &["primary"],
            AdmCommand::Secondary => &["secondary"],
            AdmCommand::OnePrimary => &["net-options", "--protocol=A", "--allow-two-primaries=no"],
        };
        args.iter()
            .map(|a| (*a).to_string())
            .chain(std::iter::once(resource.to_string()))
            .collect()
    }
}

/// The drbdadm commands `step` issues on `side`, in order. For [`Step::RollBack`] this is
/// the most it issues: the destination demotes only if it was promoted.
pub fn planned(step: Step, side: Side) -> Vec<AdmCommand> {
    use AdmCommand::*;
    match (step, side) {
        (Step::BulkSync, _) => vec![ProtocolA],
        (Step::BeforeMemory, _) => vec![ProtocolC],
        (Step::Switchover, Side::Destination) => vec![AllowTwoPrimaries, Primary],
        (Step::Switchover, Side::Source) => vec![],
        (Step::AfterCommit, Side::Source) => vec![Secondary],
        (Step::AfterCommit, Side::Destination) => vec![],
        (Step::Finish, _) => vec![OnePrimary],
        (Step::RollBack, Side::Destination) => vec![Secondary, OnePrimary],
        (Step::RollBack, Side::Source) => vec![OnePrimary],
    }
}

/// What a roll back did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RollBackReport {
    /// The resource.
    pub resource: String,
    /// This host's side.
    pub side: Side,
    /// The drbdadm commands it ran and that succeeded.
    pub done: Vec<String>,
    /// What it left alone on purpose, and why.
    pub notes: Vec<String>,
    /// What failed or could not be done, with what to do by hand.
    pub failed: Vec<String>,
}

impl fmt::Display for RollBackReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: ", self.side, self.resource)?;
        if self.done.is_empty() {
            f.write_str("ran nothing")?;
        } else {
            write!(f, "ran `{}`", self.done.join("`, `"))?;
        }
        for n in &self.notes {
            write!(f, "; {n}")?;
        }
        if !self.failed.is_empty() {
            write!(f, "; FAILED: {}", self.failed.join("; "))?;
        }
        Ok(())
    }
}

type Progress = Box<dyn FnMut(DiskPhase, Option<f64>) + Send>;

/// What a check between steps requires of DRBD's state.
#[derive(Default)]
struct Expect {
    role: Option<Role>,
    peer_role: Option<Role>,
    local_up_to_date: bool,
    in_sync: bool,
}

/// Steers one guest's DRBD resource through a migration, on one host.
pub struct Steer {
    disk: DrbdDisk,
    side: Side,
    local: DrbdNode,
    peer: DrbdNode,
    drbdadm: Drbdadm,
    timing: SteerTiming,
    phase: DiskPhase,
    sync_percent: Option<f64>,
    /// `primary` was issued here (even if it failed: it may have half-happened).
    promoted: bool,
    /// The guest committed at the destination, as far as this host was told.
    committed: bool,
    abort: Arc<AtomicBool>,
    progress: Option<Progress>,
}

impl fmt::Debug for Steer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Steer")
            .field("resource", &self.disk.resource)
            .field("side", &self.side)
            .field("local", &self.local.name)
            .field("peer", &self.peer.name)
            .field("phase", &self.phase)
            .field("sync_percent", &self.sync_percent)
            .field("promoted", &self.promoted)
            .field("committed", &self.committed)
            .finish_non_exhaustive()
    }
}

impl Steer {
    /// Steering for `disk` on the host named `host` (its `uname -n`, see
    /// [`super::local_hostname`]), which is the migration's `side`.
    pub fn new(
        disk: DrbdDisk,
        side: Side,
        host: &str,
        drbdadm: Drbdadm,
    ) -> Result<Self, DrbdError> {
        disk.validate()?;
        let local = disk.node(host)?.clone();
        let peer = disk.peer_of(host)?.clone();
        Ok(Steer {
            disk,
            side,
            local,
            peer,
            drbdadm,
            timing: SteerTiming::default(),
            phase: DiskPhase::Idle,
            sync_percent: None,
            promoted: false,
            committed: false,
            abort: Arc::new(AtomicBool::new(false)),
            progress: None,
        })
    }

    /// Waits this long (defaults: [`SteerTiming::default`]).
    pub fn with_timing(mut self, timing: SteerTiming) -> Self {
        self.timing = timing;
        self
    }

    /// Calls `f` with the phase and the sync percentage at each change of phase and at
    /// each look at the bulk copy's progress.
    pub fn on_progress(mut self, f: impl FnMut(DiskPhase, Option<f64>) + Send + 'static) -> Self {
        self.progress = Some(Box::new(f));
        self
    }

    /// Setting this flag ends a step's wait (the bulk copy, `finish` waiting for the peer
    /// to demote) with [`DrbdError::Aborted`] within a tenth of a second. It does not
    /// shorten [`Steer::roll_back`], which is what an abort leads to.
    pub fn abort_handle(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.abort)
    }

    /// Where the disk is.
    pub fn phase(&self) -> DiskPhase {
        self.phase
    }

    /// The state for `skyferry status`.
    pub fn status(&self) -> DiskStatus {
        DiskStatus {
            resource: self.disk.resource.clone(),
            side: self.side,
            phase: self.phase,
            sync_percent: self.sync_percent,
        }
    }

    /// This host's side.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The disk being steered.
    pub fn disk(&self) -> &DrbdDisk {
        &self.disk
    }

    /// Both hosts, before the memory migration starts: protocol A, then waits until the
    /// disks are equal (connected, `Established`, both `UpToDate`, nothing out of sync),
    /// reporting progress, for up to [`SteerTiming::sync_deadline`]. A `Steer` runs one
    /// migration: after a roll back, the next attempt takes a new one.
    pub fn bulk_sync(&mut self) -> Result<(), DrbdError> {
        let step = Step::BulkSync;
        self.run(step, &[DiskPhase::Idle], |s| {
            s.set_phase(DiskPhase::BulkSync);
            let st = s.query(step)?;
            s.expect(
                step,
                "before the bulk copy",
                &st,
                &Expect {
                    role: Some(s.side.role_before()),
                    ..Expect::default()
                },
            )?;
            s.adm(step, AdmCommand::ProtocolA)?;
            s.expect_net(step, AdmCommand::ProtocolA, "A", None)?;
            s.wait_in_sync(step)?;
            s.sync_percent = Some(100.0);
            Ok(DiskPhase::Synced)
        })
    }

    /// Both hosts, once in sync and before the memory pre-copy: protocol C, so every write
    /// the guest makes from now on is on both disks before it completes.
    pub fn before_memory(&mut self) -> Result<(), DrbdError> {
        let step = Step::BeforeMemory;
        self.run(step, &[DiskPhase::Synced], |s| {
            s.adm(step, AdmCommand::ProtocolC)?;
            s.expect_net(step, AdmCommand::ProtocolC, "C", None)?;
            let st = s.query(step)?;
            s.expect(
                step,
                "after switching to protocol C",
                &st,
                &Expect {
                    role: Some(s.side.role_before()),
                    peer_role: Some(s.side.other().role_before()),
                    in_sync: true,
                    ..Expect::default()
                },
            )?;
            Ok(DiskPhase::ProtocolC)
        })
    }

    /// The destination, at the switchover (guest paused at the source): allows two
    /// primaries and promotes this host, so the guest can resume here on an up-to-date
    /// disk. At the source it does nothing, so a driver may call it on both hosts.
    pub fn switchover(&mut self) -> Result<(), DrbdError> {
        let step = Step::Switchover;
        self.run(step, &[DiskPhase::ProtocolC], |s| {
            if s.side == Side::Source {
                return Ok(DiskPhase::ProtocolC);
            }
            s.adm(step, AdmCommand::AllowTwoPrimaries)?;
            s.expect_net(step, AdmCommand::AllowTwoPrimaries, "C", Some(true))?;
            s.promoted = true;
            s.adm(step, AdmCommand::Primary)?;
            let st = s.query(step)?;
            s.expect(
                step,
                "after drbdadm primary",
                &st,
                &Expect {
                    role: Some(Role::Primary),
                    in_sync: true,
                    ..Expect::default()
                },
            )?;
            Ok(DiskPhase::DualPrimary)
        })
    }

    /// After the guest committed at the destination. The source demotes itself; the
    /// destination checks it is Primary and records the commit, so that a later
    /// [`Steer::roll_back`] leaves its disk Primary under the running guest. Call it on
    /// both hosts.
    pub fn after_commit(&mut self) -> Result<(), DrbdError> {
        let step = Step::AfterCommit;
        let from: &[DiskPhase] = match self.side {
            Side::Source => &[DiskPhase::ProtocolC, DiskPhase::DualPrimary],
            Side::Destination => &[DiskPhase::DualPrimary],
        };
        self.run(step, from, |s| {
            s.committed = true;
            match s.side {
                Side::Source => {
                    s.adm(step, AdmCommand::Secondary)?;
                    let st = s.query(step)?;
                    s.expect(
                        step,
                        "after drbdadm secondary",
                        &st,
                        &Expect {
                            role: Some(Role::Secondary),
                            ..Expect::default()
                        },
                    )?;
                }
                Side::Destination => {
                    let st = s.query(step)?;
                    s.expect(
                        step,
                        "after the commit",
                        &st,
                        &Expect {
                            role: Some(Role::Primary),
                            local_up_to_date: true,
                            ..Expect::default()
                        },
                    )?;
                }
            }
            Ok(DiskPhase::Committed)
        })
    }

    /// Both hosts, last: one primary and protocol A again. The destination first waits
    /// for the source to be Secondary (DRBD refuses to forbid two primaries while both are).
    pub fn finish(&mut self) -> Result<(), DrbdError> {
        let step = Step::Finish;
        let from: &[DiskPhase] = match self.side {
            Side::Source => &[DiskPhase::Committed],
            Side::Destination => &[DiskPhase::Committed, DiskPhase::DualPrimary],
        };
        self.run(step, from, |s| {
            s.committed = true;
            let st = s.query(step)?;
            if st.role == Role::Primary {
                s.wait_peer_not_primary(step, true)?;
            }
            s.adm(step, AdmCommand::OnePrimary)?;
            s.expect_net(step, AdmCommand::OnePrimary, "A", Some(false))?;
            let st = s.query(step)?;
            s.expect(
                step,
                "at the end",
                &st,
                &Expect {
                    role: Some(s.side.role_after()),
                    ..Expect::default()
                },
            )?;
            Ok(DiskPhase::Done)
        })
    }

    /// After a failure anywhere in the migration: puts DRBD back as it was (see the
    /// module documentation) and says what it did. On a host that already finished its
    /// part it does nothing. Roll back the destination first; the
    /// source waits up to [`SteerTiming::role_wait`] for it to be Secondary. The phase
    /// ends [`DiskPhase::RolledBack`], or [`DiskPhase::Failed`] with
    /// [`DrbdError::RollBackIncomplete`] when something could not be undone; calling it
    /// again retries.
    pub fn roll_back(&mut self) -> Result<RollBackReport, DrbdError> {
        let step = Step::RollBack;
        let res = self.disk.resource.clone();
        let mut report = RollBackReport {
            resource: res.clone(),
            side: self.side,
            done: Vec::new(),
            notes: Vec::new(),
            failed: Vec::new(),
        };
        if self.phase == DiskPhase::Done {
            // The other host may have failed after this one finished; this one has
            // nothing left to undo, and its phase stays Done.
            report
                .notes
                .push("this host had finished its part; nothing to undo".into());
            return Ok(report);
        }
        tracing::info!(resource = %res, side = %self.side, phase = %self.phase, "rolling the disk back");
        let st = match self.query(step) {
            Ok(st) => Some(st),
            Err(e) => {
                report.failed.push(e.to_string());
                None
            }
        };
        let mut one_primary_possible = true;
        match self.side {
            Side::Destination if self.committed => report
                .notes
                .push("the guest committed here, so this disk stays Primary under it".into()),
            Side::Destination
                if self.promoted || st.as_ref().is_some_and(|s| s.role == Role::Primary) =>
            {
                let cmd = AdmCommand::Secondary;
                match self.adm(step, cmd) {
                    Ok(()) => {
                        report.done.push(self.line(cmd));
                        match self.query(step) {
                            Ok(st) if st.role == Role::Secondary => self.promoted = false,
                            Ok(st) => {
                                one_primary_possible = false;
                                report.failed.push(format!(
                                    "drbdadm secondary succeeded but DRBD reports: {}",
                                    st.summary(self.peer.node_id)
                                ));
                            }
                            Err(e) => report.failed.push(e.to_string()),
                        }
                    }
                    Err(e) => {
                        one_primary_possible = false;
                        report.failed.push(format!(
                            "{e} (is the device still open here? demote it with \
                             `drbdadm secondary {res}`)"
                        ));
                    }
                }
            }
            Side::Destination => {}
            Side::Source if self.committed => report.notes.push(
                "the guest committed at the destination, so this host's role is left as it is"
                    .into(),
            ),
            // The source keeps the guest's disk: it stays Primary.
            Side::Source => {}
        }
        if one_primary_possible {
            let primary_here = match self.query(step) {
                Ok(st) => st.role == Role::Primary,
                Err(_) => self.side == Side::Source,
            };
            if primary_here && let Err(e) = self.wait_peer_not_primary(step, false) {
                one_primary_possible = false;
                report.failed.push(e.to_string());
            }
        }
        let reset = AdmCommand::OnePrimary;
        if one_primary_possible {
            match self
                .adm(step, reset)
                .and_then(|()| self.expect_net(step, reset, "A", Some(false)))
            {
                Ok(()) => report.done.push(self.line(reset)),
                Err(e) => report.failed.push(e.to_string()),
            }
        } else {
            report.failed.push(format!(
                "two primaries may still be allowed, with protocol C; once only one node is \
                 Primary, run `drbdadm {}` on both",
                reset.args(&res).join(" ")
            ));
        }
        if report.failed.is_empty() {
            tracing::info!(%report, "disk rolled back");
            self.set_phase(DiskPhase::RolledBack);
            Ok(report)
        } else {
            tracing::error!(%report, "disk roll back incomplete");
            self.set_phase(DiskPhase::Failed);
            Err(DrbdError::RollBackIncomplete { report })
        }
    }

    /// Runs one step from one of the phases `from`; a failure leaves the phase Failed.
    fn run(
        &mut self,
        step: Step,
        from: &[DiskPhase],
        body: impl FnOnce(&mut Self) -> Result<DiskPhase, DrbdError>,
    ) -> Result<(), DrbdError> {
        if !from.contains(&self.phase) {
            return Err(DrbdError::OutOfOrder {
                step,
                resource: self.disk.resource.clone(),
                phase: self.phase,
                needs: from
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" or "),
            });
        }
        tracing::info!(resource = %self.disk.resource, side = %self.side, %step, "disk step");
        match body(self) {
            Ok(next) => {
                self.set_phase(next);
                Ok(())
            }
            Err(e) => {
                tracing::warn!(resource = %self.disk.resource, side = %self.side, %step, error = %e, "disk step failed");
                self.set_phase(DiskPhase::Failed);
                Err(e)
            }
        }
    }

    fn set_phase(&mut self, phase: DiskPhase) {
        self.phase = phase;
        self.report();
    }

    fn report(&mut self) {
        if let Some(f) = &mut self.progress {
            f(self.phase, self.sync_percent);
        }
    }

    fn line(&self, cmd: AdmCommand) -> String {
        self.drbdadm.command_line(&cmd.args(&self.disk.resource))
    }

    fn adm(&self, step: Step, cmd: AdmCommand) -> Result<(), DrbdError> {
        let out = self.drbdadm.run(step, &cmd.args(&self.disk.resource))?;
        tracing::info!(command = %self.line(cmd), stderr = %out.stderr.trim(), "drbdadm");
        Ok(())
    }

    /// DRBD's state, checked to be this host's node of this resource.
    fn query(&self, step: Step) -> Result<ResourceStatus, DrbdError> {
        let st = self.drbdadm.status(step, &self.disk.resource)?;
        if let Some(id) = st.node_id
            && id != self.local.node_id
        {
            return Err(self.unexpected(
                step,
                "reading its state",
                format!(
                    "DRBD runs it as node {id}, but the configuration makes this host ({}) \
                     node {}",
                    self.local.name, self.local.node_id
                ),
                &st,
            ));
        }
        Ok(st)
    }

    fn unexpected(
        &self,
        step: Step,
        after: &str,
        problems: String,
        st: &ResourceStatus,
    ) -> DrbdError {
        DrbdError::Unexpected {
            step,
            resource: self.disk.resource.clone(),
            after: after.into(),
            problems,
            state: st.summary(self.peer.node_id),
        }
    }

    fn expect(
        &self,
        step: Step,
        after: &str,
        st: &ResourceStatus,
        e: &Expect,
    ) -> Result<(), DrbdError> {
        let mut problems = Vec::new();
        if let Some(want) = &e.role
            && &st.role != want
        {
            problems.push(format!("this host is {}, expected {want}", st.role));
        }
        let conn = st.connection(self.peer.node_id);
        if let Some(want) = &e.peer_role {
            match conn {
                Some(c) if &c.peer_role == want => {}
                Some(c) => problems.push(format!("the peer is {}, expected {want}", c.peer_role)),
                None => problems.push(format!("no connection to the peer {}", self.peer.name)),
            }
        }
        if e.local_up_to_date {
            for d in st
                .devices
                .iter()
                .filter(|d| d.disk_state != DiskState::UpToDate)
            {
                problems.push(format!(
                    "volume {} disk is {}, expected UpToDate",
                    d.volume, d.disk_state
                ));
            }
        }
        if e.in_sync
            && let Err(not) = st.in_sync_with(self.peer.node_id)
        {
            problems.extend(not.into_iter().map(|n| format!("{n}, expected in sync")));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(self.unexpected(step, after, problems.join(", "), st))
        }
    }

    /// Checks with `drbdsetup show` that a `net-options` change took.
    fn expect_net(
        &self,
        step: Step,
        cmd: AdmCommand,
        protocol: &str,
        two_primaries: Option<bool>,
    ) -> Result<(), DrbdError> {
        let o = self
            .drbdadm
            .net_options(step, &self.disk.resource, self.peer.node_id)?;
        let mut problems = Vec::new();
        if o.protocol != protocol {
            problems.push(format!("protocol is {}, expected {protocol}", o.protocol));
        }
        if let Some(want) = two_primaries
            && o.allow_two_primaries != want
        {
            problems.push(format!(
                "allow-two-primaries is {}, expected {}",
                yes_no(o.allow_two_primaries),
                yes_no(want)
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        Err(DrbdError::Unexpected {
            step,
            resource: self.disk.resource.clone(),
            after: format!("after `{}`", self.line(cmd)),
            problems: problems.join(", "),
            state: format!(
                "connection to {}: protocol {}, allow-two-primaries {}",
                self.peer.name,
                o.protocol,
                yes_no(o.allow_two_primaries)
            ),
        })
    }

    /// Why waiting for the sync is pointless, if it is.
    fn hopeless(&self, st: &ResourceStatus) -> Option<String> {
        let want = self.side.role_before();
        if st.role != want {
            return Some(format!("this host became {}, expected {want}", st.role));
        }
        if let Some(d) = st.devices.iter().find(|d| {
            matches!(
                d.disk_state,
                DiskState::Diskless | DiskState::Failed | DiskState::Detaching
            )
        }) {
            return Some(format!(
                "volume {} disk is {}: there is nothing to sync",
                d.volume, d.disk_state
            ));
        }
        let c = st.connection(self.peer.node_id)?;
        if c.connection_state == super::status::ConnectionState::StandAlone {
            return Some(
                "the connection is StandAlone: DRBD does not reconnect by itself (after a split \
                 brain or `drbdadm disconnect`); check `drbdadm status`"
                    .into(),
            );
        }
        if c.peer_role == Role::Primary && self.side == Side::Source {
            return Some("the destination is Primary too, before the switchover".into());
        }
        None
    }

    fn wait_in_sync(&mut self, step: Step) -> Result<(), DrbdError> {
        let deadline = Instant::now() + self.timing.sync_deadline;
        loop {
            self.check_abort(step)?;
            let st = self.query(step)?;
            if let Some(why) = self.hopeless(&st) {
                return Err(self.unexpected(step, "while waiting for the sync", why, &st));
            }
            if let Some(p) = st.sync_percent(self.peer.node_id) {
                self.sync_percent = Some(p);
            }
            self.report();
            let not = match st.in_sync_with(self.peer.node_id) {
                Ok(()) => return Ok(()),
                Err(not) => not,
            };
            if Instant::now() >= deadline {
                return Err(DrbdError::SyncDeadline {
                    step,
                    resource: self.disk.resource.clone(),
                    after: self.timing.sync_deadline,
                    problems: not.join(", "),
                    state: st.summary(self.peer.node_id),
                });
            }
            self.sleep(
                step,
                self.timing.poll_interval.min(deadline - Instant::now()),
                true,
            )?;
        }
    }

    /// Polls until the peer is not Primary, for up to [`SteerTiming::role_wait`].
    fn wait_peer_not_primary(&mut self, step: Step, abortable: bool) -> Result<(), DrbdError> {
        let deadline = Instant::now() + self.timing.role_wait;
        loop {
            let st = self.query(step)?;
            let peer_primary = st
                .connection(self.peer.node_id)
                .is_some_and(|c| c.peer_role == Role::Primary);
            if !peer_primary {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.unexpected(
                    step,
                    "before forbidding two primaries",
                    format!(
                        "the peer {} is still Primary after {:?}, and DRBD refuses to forbid \
                         two primaries while both are",
                        self.peer.name, self.timing.role_wait
                    ),
                    &st,
                ));
            }
            self.sleep(
                step,
                self.timing.poll_interval.min(deadline - Instant::now()),
                abortable,
            )?;
        }
    }

    fn check_abort(&self, step: Step) -> Result<(), DrbdError> {
        if self.abort.load(Ordering::Relaxed) {
            return Err(DrbdError::Aborted {
                step,
                resource: self.disk.resource.clone(),
            });
        }
        Ok(())
    }

    /// Sleeps `d`; if `abortable`, in slices short enough that an abort is seen promptly.
    fn sleep(&self, step: Step, d: Duration, abortable: bool) -> Result<(), DrbdError> {
        let end = Instant::now() + d;
        loop {
            if abortable {
                self.check_abort(step)?;
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_and_plans() {
        assert_eq!(
            AdmCommand::AllowTwoPrimaries.args("web1"),
            [
                "net-options",
                "--protocol=C",
                "--allow-two-primaries=yes",
                "web1"
            ]
        );
        assert_eq!(AdmCommand::Primary.args("web1"), ["primary", "web1"]);
        assert_eq!(
            planned(Step::Switchover, Side::Destination),
            [AdmCommand::AllowTwoPrimaries, AdmCommand::Primary]
        );
        assert!(planned(Step::Switchover, Side::Source).is_empty());
        assert_eq!(
            planned(Step::AfterCommit, Side::Source),
            [AdmCommand::Secondary]
        );
    }

    #[test]
    fn status_serialises_for_the_cli() {
        let s = DiskStatus {
            resource: "web1".into(),
            side: Side::Destination,
            phase: DiskPhase::DualPrimary,
            sync_percent: Some(100.0),
        };
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            r#"{"resource":"web1","side":"destination","phase":"dual-primary","sync_percent":100.0}"#
        );
        for p in [
            DiskPhase::ProtocolC,
            DiskPhase::RolledBack,
            DiskPhase::BulkSync,
        ] {
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::Value::String(p.to_string())
            );
        }
    }
}

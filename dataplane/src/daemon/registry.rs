//! Every migration this daemon runs or has run, and the guests it hosts.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::acceptor::{self, Limits, Receive, RoutedStreams, Router};
use super::config::Settings;
use super::control::{Request, Response, StartRequest};
use crate::coordinator::{Coordinator, GroupOptions};
use crate::crypto::PreSharedKey;
use crate::guest::kvm::{KvmGuest, KvmGuestConfig, KvmTarget};
use crate::guest::qemu::{QemuGuest, QemuSourceConfig, QemuTarget};
use crate::guest::synthetic::{SyntheticGuest, SyntheticOptions, SyntheticTarget};
use crate::guest::workload::Workload;
use crate::guest::xen::{XenGuest, XenSourceConfig, XenTarget};
use crate::guest::{DestGuest, SourceGuest};
use crate::migrate::dest::{DestOptions, check_hello_text, receive_on, tune};
use crate::migrate::source::{SourceDisk, SourceNetwork, SourceOptions, migrate};
use crate::migrate::{MigrationStatus, Phase, Role};
use crate::network::GuestIdentity;
use crate::page::PAGE_SIZE;
use crate::protocol::{AuthHello, send_welcome, text};

struct Entry {
    status: Arc<Mutex<MigrationStatus>>,
    abort: Arc<AtomicBool>,
    /// The guest, kept alive: at the source it runs here again if the migration fails (and
    /// is let go once it runs at the destination); at the destination it runs here once the
    /// migration completes.
    source: Arc<Mutex<Option<Arc<dyn SourceGuest>>>>,
    target: Arc<Mutex<Option<Arc<dyn DestGuest>>>>,
    /// When its thread ended (then its phase is final, in doubt, or held by a guest).
    ended: Arc<Mutex<Option<std::time::Instant>>>,
}

impl Entry {
    fn new(
        status: Arc<Mutex<MigrationStatus>>,
        abort: Arc<AtomicBool>,
        source: Arc<Mutex<Option<Arc<dyn SourceGuest>>>>,
        target: Arc<Mutex<Option<Arc<dyn DestGuest>>>>,
    ) -> Self {
        Entry {
            status,
            abort,
            source,
            target,
            ended: Arc::default(),
        }
    }

    /// When this row may go: its migration ended for good and it holds no guest (a guest
    /// that runs here, or waits here in doubt, keeps its row).
    fn expirable_since(&self) -> Option<std::time::Instant> {
        let ended = (*self.ended.lock().expect("entry lock"))?;
        let final_ = self.status.lock().expect("status lock").phase.is_final();
        let holds = self.source.lock().expect("slot lock").is_some()
            || self.target.lock().expect("slot lock").is_some();
        (final_ && !holds).then_some(ended)
    }
}

/// Ends a migration's row on its thread's end, so the row never contradicts the log: a
/// migration that ended with `result` is not left in a phase that says it goes on.
fn settle(
    status: &Mutex<MigrationStatus>,
    ended: &Mutex<Option<std::time::Instant>>,
    result: Result<(), String>,
) {
    let mut st = status.lock().expect("status lock");
    if let Err(why) = result
        && !st.phase.is_final()
        && st.phase != Phase::InDoubt
    {
        st.phase = Phase::Failed;
        st.error = Some(why);
    }
    *ended.lock().expect("entry lock") = Some(std::time::Instant::now());
}

/// Migration `id` among `entries`, or the error response that says it is not here.
fn find(entries: &[Entry], id: u64) -> Result<&Entry, Response> {
    entries
        .iter()
        .find(|e| e.status.lock().expect("status lock").id == id)
        .ok_or_else(|| Response::Error {
            message: format!("no migration {id:x} on this host"),
        })
}

/// The daemon's state.
pub struct Registry {
    settings: Settings,
    psk: PreSharedKey,
    entries: Mutex<Vec<Entry>>,
    /// The Synchronized Arrival coordinator this daemon serves, if it does.
    coordinator: Option<Arc<Coordinator>>,
    /// How many migrations run at once each way, and who waits.
    admission: super::admission::Admission,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry for a daemon with these settings.
    pub fn new(settings: Settings, psk: PreSharedKey) -> Arc<Self> {
        let coordinator = settings
            .coordinator
            .listen
            .map(|_| Coordinator::new(psk.clone()));
        Arc::new(Registry {
            psk,
            entries: Mutex::new(Vec::new()),
            coordinator,
            admission: super::admission::Admission::new(
                settings.admission.outbound,
                settings.admission.inbound,
                settings.admission.inbound_wait,
            ),
            settings,
        })
    }

    /// This host's admission gates.
    pub fn admission(&self) -> &super::admission::Admission {
        &self.admission
    }

    /// Every migration's status as `status` shows it.
    pub fn snapshot(&self) -> Vec<MigrationStatus> {
        let entries = self.entries.lock().expect("registry lock");
        entries
            .iter()
            .map(|e| {
                let mut s = e.status.lock().expect("status lock").clone();
                // A guest that checks itself says how it is doing here, live: at the
                // destination once it arrived, at the source while it runs here (also after
                // a failed migration gave it back).
                let target = e.target.lock().expect("slot lock").clone();
                let source = e.source.lock().expect("slot lock").clone();
                if let Some(check) = target
                    .and_then(|t| t.self_check())
                    .or_else(|| source.and_then(|g| g.self_check()))
                {
                    s.guest_check = Some(check);
                }
                s.derive_job();
                s
            })
            .collect()
    }

    /// The coordinator this daemon serves (`[coordinator] listen`), if any.
    pub fn coordinator(&self) -> Option<&Arc<Coordinator>> {
        self.coordinator.as_ref()
    }

    fn group_status(&self, group: &str) -> Response {
        if let Some(c) = &self.coordinator {
            return match c.show(group) {
                Some(g) => Response::Group { group: Box::new(g) },
                None => Response::Error {
                    message: format!("no group {group:?} at this host's coordinator"),
                },
            };
        }
        let Some(addr) = self.settings.coordinator.address else {
            return Response::Error {
                message: "this host has no [coordinator] in its config".into(),
            };
        };
        match crate::coordinator::show(addr, &self.psk, group) {
            Ok(g) => Response::Group { group: Box::new(g) },
            Err(e) => Response::Error {
                message: format!("coordinator {addr}: {e}"),
            },
        }
    }

    /// Answers one control request.
    pub fn handle(self: &Arc<Self>, req: Request) -> Response {
        match req {
            Request::Start(s) => match self.start(&s) {
                Ok(id) => Response::Started { id },
                Err(message) => Response::Error { message },
            },
            Request::Abort { id } => self.abort(id),
            Request::Resolve { id, start } => self.resolve(id, start),
            Request::GroupStatus { group } => self.group_status(&group),
            Request::Status { id } => {
                {
                    let mut entries = self.entries.lock().expect("registry lock");
                    self.expire(&mut entries);
                }
                let migrations = self
                    .snapshot()
                    .into_iter()
                    .filter(|s| id.is_none_or(|id| s.id == id))
                    .collect::<Vec<_>>();
                if let Some(id) = id
                    && migrations.is_empty()
                {
                    return Response::Error {
                        message: format!("no migration {id:x} on this host"),
                    };
                }
                Response::Status { migrations }
            }
        }
    }

    /// Forgets ended rows beyond `[status] max_finished` (the oldest first) or older than
    /// `[status] finished_ttl`.
    fn expire(&self, entries: &mut Vec<Entry>) {
        let now = std::time::Instant::now();
        let ttl = self.settings.status_finished_ttl;
        entries.retain(|e| {
            e.expirable_since()
                .is_none_or(|t| now.saturating_duration_since(t) < ttl)
        });
        let mut ended: Vec<(std::time::Instant, usize)> = entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.expirable_since().map(|t| (t, i)))
            .collect();
        let max = self.settings.status_max_finished;
        if ended.len() > max {
            ended.sort_unstable();
            let mut gone = vec![false; entries.len()];
            for &(_, i) in &ended[..ended.len() - max] {
                gone[i] = true;
            }
            let mut i = 0;
            entries.retain(|_| {
                i += 1;
                !gone[i - 1]
            });
        }
    }

    /// Adds a row, forgetting expired ones.
    fn add(&self, entry: Entry) {
        let mut entries = self.entries.lock().expect("registry lock");
        self.expire(&mut entries);
        entries.push(entry);
    }

    /// Starts or discards a guest held in doubt.
    fn resolve(&self, id: u64, start: bool) -> Response {
        let entries = self.entries.lock().expect("registry lock");
        let e = match find(&entries, id) {
            Ok(e) => e,
            Err(r) => return r,
        };
        let phase = e.status.lock().expect("status lock").phase;
        if phase != Phase::InDoubt {
            return Response::Error {
                message: format!(
                    "migration {id:x} is not in doubt ({phase:?}); there is nothing to resolve"
                ),
            };
        }
        let Some(guest) = e.target.lock().expect("slot lock").take() else {
            return Response::Error {
                message: format!("migration {id:x} holds no guest"),
            };
        };
        let (phase, note) = if start {
            if let Err(err) = guest.start() {
                *e.target.lock().expect("slot lock") = Some(guest);
                return Response::Error {
                    message: format!("starting the guest of {id:x}: {err}"),
                };
            }
            *e.target.lock().expect("slot lock") = Some(guest);
            (
                Phase::Completed,
                "was in doubt; started here by the operator",
            )
        } else {
            drop(guest);
            (
                Phase::Failed,
                "was in doubt; discarded here by the operator",
            )
        };
        tracing::warn!(migration = %crate::migrate::MigrationId(id), "{note}");
        let mut st = e.status.lock().expect("status lock");
        st.phase = phase;
        st.error = Some(note.into());
        Response::Resolved {
            status: Box::new(st.clone()),
        }
    }

    fn abort(&self, id: u64) -> Response {
        let entries = self.entries.lock().expect("registry lock");
        let e = match find(&entries, id) {
            Ok(e) => e,
            Err(r) => return r,
        };
        let phase = e.status.lock().expect("status lock").phase;
        if phase.is_final() {
            return Response::Error {
                message: format!(
                    "migration {id:x} has already ended ({phase:?}); nothing to abort"
                ),
            };
        }
        e.abort.store(true, Ordering::Relaxed);
        Response::Aborting { id }
    }

    fn start(self: &Arc<Self>, r: &StartRequest) -> Result<u64, String> {
        let s = &self.settings;
        let peer = std::net::ToSocketAddrs::to_socket_addrs(&r.to)
            .map_err(|e| format!("destination {:?}: {e}", r.to))?
            .next()
            .ok_or_else(|| format!("destination {:?} resolves to no address", r.to))?;
        let mut codec = s.codec.clone();
        if let Some(o) = &r.optimizations {
            codec.set_optimizations(o)?;
        }
        if let Some(c) = &r.compression {
            codec.compression = c.parse()?;
        }
        let policy = match &r.policy {
            Some(p) => p.parse()?,
            None => s.policy,
        };
        let streams = r.streams.unwrap_or(s.streams);
        self.check_start_fits(r, streams, &codec)?;
        let id = u64::from_le_bytes(
            crate::crypto::HandshakeNonce::random()
                .map_err(|e| e.to_string())?
                .0[..8]
                .try_into()
                .expect("8 bytes"),
        );
        let label = r.guest.clone().unwrap_or_else(|| match (&r.qemu, &r.xen) {
            (_, Some(x)) => format!("domain-{}", x.domid),
            // The destination names its RAM file and QEMU after the guest.
            (Some(q), None) => q
                .ram_file
                .file_stem()
                .map_or_else(|| "qemu-guest".into(), |s| s.to_string_lossy().into_owned()),
            (None, None) if r.kvm => format!("kvm-{}-{:x}", r.workload, id & 0xffff),
            (None, None) => format!("{}-{:x}", r.workload, id & 0xffff),
        });
        text::check_name("the guest label", &label, text::MAX_LABEL)?;
        let opts = SourceOptions {
            peer,
            psk: self.psk.clone(),
            streams,
            codec,
            policy,
            max_downtime: r
                .max_downtime_ms
                .map(std::time::Duration::from_millis)
                .or(s.max_downtime),
            converge: crate::migrate::converge::ConvergeOptions {
                completion_timeout_per_gib: match r.completion_timeout_per_gib_ms {
                    Some(0) => None,
                    Some(ms) => Some(std::time::Duration::from_millis(ms)),
                    None => s.converge.completion_timeout_per_gib,
                },
                completion_action: match &r.completion_action {
                    Some(a) => a.parse()?,
                    None => s.converge.completion_action,
                },
                auto_converge: r.auto_converge.unwrap_or(s.converge.auto_converge),
            },
            max_bandwidth: match r.max_bandwidth {
                Some(0) => None,
                Some(b) => Some(b),
                None => s.max_bandwidth,
            },
            socket: s.socket.clone(),
            frame_size: s.frame_size,
            pin_threads: s.pin_threads,
            timeout: s.source_timeout,
            guest_label: label.clone(),
            group: self.group_options(r)?,
            disk: self.disk_options(r)?,
            network: self.network_options(r)?,
            resume: s.resume,
        };
        if let Some(refused) = self.admission.outbound.would_refuse() {
            return Err(refused.to_string());
        }
        let guest = self.source_guest(r)?;
        let pages = guest.page_count();
        let status = Arc::new(Mutex::new(MigrationStatus::new(
            id,
            Role::Source,
            &label,
            pages,
        )));
        let abort = Arc::new(AtomicBool::new(false));
        let kept = Arc::new(Mutex::new(Some(guest.clone())));
        let gate = self.admission.outbound.clone();
        let entry = Entry::new(status.clone(), abort.clone(), kept.clone(), Arc::default());
        let ended = entry.ended.clone();
        self.add(entry);
        std::thread::Builder::new()
            .name(format!("sf-migrate-{:x}", id & 0xffff))
            .spawn(move || {
                let mid = crate::migrate::MigrationId(id);
                // Waits here, queued, while this host sends its limit of migrations.
                let permit = gate.acquire(&status, &abort, None);
                let result = match &permit {
                    Ok(_) => match migrate(guest, &opts, id, &status, &abort) {
                        Ok(s) => {
                            tracing::info!(migration = %mid, phase = ?s.status.phase, "migration ended");
                            Ok(())
                        }
                        Err(e) => {
                            tracing::warn!(migration = %mid, "migration failed: {e}");
                            Err(e.to_string())
                        }
                    },
                    Err(refused) => Err(super::admission::not_admitted(refused, &status)),
                };
                drop(permit);
                let check = kept
                    .lock()
                    .expect("registry lock")
                    .as_ref()
                    .and_then(|g| g.self_check());
                let mut st = status.lock().expect("status lock");
                if check.is_some() {
                    st.guest_check = check;
                }
                let phase = st.phase;
                drop(st);
                if matches!(phase, Phase::Completed | Phase::CommittedUnconfirmed) {
                    // It runs at the destination now and never again here: free its memory.
                    kept.lock().expect("registry lock").take();
                }
                settle(&status, &ended, result);
                super::metrics::count_ended(&status.lock().expect("status lock"));
            })
            .map_err(|e| e.to_string())?;
        Ok(id)
    }

    /// Refuses a start request whose guest (when this daemon hosts it), streams and caches do
    /// not fit the limits and this host's memory, before anything is allocated for it.
    fn check_start_fits(
        &self,
        r: &StartRequest,
        streams: u32,
        codec: &crate::codec::CodecConfig,
    ) -> Result<(), String> {
        use crate::limits::{HostMemory, MigrationMemory, check_guest_size};
        // A running QEMU guest's or Xen domain's memory is already there.
        let hosted = r.qemu.is_none() && r.xen.is_none();
        if hosted {
            check_guest_size(r.mem).map_err(|e| e.to_string())?;
        }
        MigrationMemory {
            guest_bytes: if hosted { r.mem } else { 0 },
            streams,
            cache_bytes: if codec.uses_cache() {
                codec.cache_bytes
            } else {
                0
            },
            frame_size: self.settings.frame_size as u64,
        }
        .check(&HostMemory::read().map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())
    }

    /// The guest a start request names: a running QEMU guest or Xen domain, or a new KVM
    /// micro-VM or synthetic guest.
    fn source_guest(&self, r: &StartRequest) -> Result<Arc<dyn SourceGuest>, String> {
        if let Some(x) = &r.xen {
            let guest = XenGuest::open(XenSourceConfig {
                libraries: self.settings.xen.libraries.clone(),
                domid: x.domid,
                dest_domid: x.dest_domid,
            })
            .map_err(|e| e.to_string())?;
            return Ok(Arc::new(guest));
        }
        if let Some(q) = &r.qemu {
            let guest = QemuGuest::open(QemuSourceConfig {
                qmp: q.qmp.clone(),
                ram_file: q.ram_file.clone(),
                timeout: self.settings.qemu.timeout,
                quit_after_handover: self.settings.qemu.quit_source_after_commit,
            })
            .map_err(|e| e.to_string())?;
            return Ok(Arc::new(guest));
        }
        let workload: Workload = r
            .workload
            .parse()
            .map_err(|e: crate::guest::workload::UnknownWorkload| e.to_string())?;
        if r.kvm {
            let guest = KvmGuest::boot(&KvmGuestConfig {
                pages: r.mem / PAGE_SIZE as u64,
                workload,
                seed: r.seed,
                speed: r.speed,
            })
            .map_err(|e| e.to_string())?;
            return Ok(Arc::new(guest));
        }
        let pages = r.mem / PAGE_SIZE as u64;
        if pages == 0 {
            return Err(format!(
                "guest memory of {} bytes is less than a page",
                r.mem
            ));
        }
        let guest = SyntheticGuest::with_options(
            pages,
            workload,
            r.seed,
            SyntheticOptions {
                speed: r.speed,
                writers: 1,
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(Arc::new(guest))
    }

    /// The DRBD disk of a start request, checked against this host.
    fn disk_options(&self, r: &StartRequest) -> Result<Option<SourceDisk>, String> {
        let Some(disk) = &r.disk else {
            return Ok(None);
        };
        let host =
            self.settings.drbd.clone().ok_or(
                "--disk needs DRBD steering here: add a [drbd] section to this host's config",
            )?;
        disk.validate().map_err(|e| e.to_string())?;
        // This host must be one of the resource's two nodes, and the source (Primary).
        let me = match &host.node {
            Some(n) => n.clone(),
            None => crate::disk::drbd::local_hostname()
                .map_err(|e| format!("reading this host's name: {e}"))?,
        };
        disk.node(&me).map_err(|e| e.to_string())?;
        Ok(Some(SourceDisk {
            disk: disk.clone(),
            host,
        }))
    }

    /// The guest's network identity of a start request.
    fn network_options(&self, r: &StartRequest) -> Result<Option<SourceNetwork>, String> {
        let Some(mac) = &r.mac else {
            if r.ip.is_some() {
                return Err("--ip needs --mac: the announcement comes from the guest's MAC".into());
            }
            return Ok(None);
        };
        let guest = GuestIdentity {
            mac: mac
                .parse()
                .map_err(|e: crate::network::MacError| e.to_string())?,
            ip: r.ip,
        };
        guest.check().map_err(|e| e.to_string())?;
        Ok(Some(SourceNetwork {
            guest,
            announce_here: self.settings.announce.clone(),
        }))
    }

    /// Synchronized Arrival options of a start request.
    fn group_options(&self, r: &StartRequest) -> Result<Option<GroupOptions>, String> {
        let Some(group) = &r.group else {
            if r.group_failure.is_some() || r.group_pace || r.group_size.is_some() {
                return Err("--group-size, --group-failure and --pace are for --group G".into());
            }
            return Ok(None);
        };
        if group.is_empty() || group.len() > 64 {
            return Err("a group name has 1 to 64 characters".into());
        }
        let coordinator = self.settings.coordinator.address.ok_or(
            "--group needs a coordinator: set [coordinator] address (or listen) in this host's config",
        )?;
        Ok(Some(GroupOptions {
            coordinator,
            group: group.clone(),
            size: r.group_size.unwrap_or(0),
            on_failure: r.group_failure.as_deref().unwrap_or("abort").parse()?,
            pace: r.group_pace,
        }))
    }

    /// The destination guest for an incoming Hello.
    fn dest_guest(&self, h: &crate::protocol::Hello) -> Result<Arc<dyn DestGuest>, String> {
        match h.backend.as_str() {
            "synthetic" | "image" => Ok(Arc::new(
                SyntheticTarget::new(h.guest_pages).map_err(|e| e.to_string())?,
            )),
            "qemu" if self.settings.qemu.receive => Ok(Arc::new(
                QemuTarget::prepare(
                    &self.settings.qemu.dest,
                    &h.guest,
                    h.guest_pages,
                    self.settings.qemu.timeout,
                )
                .map_err(|e| e.to_string())?,
            )),
            "qemu" => Err(
                "this host does not receive QEMU guests: its config has no [qemu] section".into(),
            ),
            "xen" if self.settings.xen.receive => {
                let domid = h
                    .destination
                    .as_deref()
                    .and_then(|d| d.parse::<u32>().ok())
                    .ok_or_else(|| {
                        format!(
                            "a Xen domain needs the id of the paused domain to fill here \
                             (skyferry start --dest-domid); got {:?}",
                            h.destination
                        )
                    })?;
                Ok(Arc::new(
                    XenTarget::prepare(&self.settings.xen.libraries, domid, h.guest_pages)
                        .map_err(|e| e.to_string())?,
                ))
            }
            "xen" => Err(
                "this host does not receive Xen domains: its config has no [xen] section".into(),
            ),
            "kvm" if self.settings.kvm.receive => Ok(Arc::new(
                KvmTarget::new(h.guest_pages, self.settings.kvm.target)
                    .map_err(|e| e.to_string())?,
            )),
            "kvm" => Err(
                "this host does not receive KVM micro-VMs: its config has no [kvm] section".into(),
            ),
            other => Err(format!("this host cannot run {other:?} guests")),
        }
    }

    /// Receives migrations on `listener`, as many at once as `[listen] max_migrations`,
    /// forever.
    pub fn listen(self: &Arc<Self>, listener: &TcpListener) {
        let router = Arc::new(Router::default());
        let (this, routes) = (self.clone(), router.clone());
        let receive: Receive =
            Arc::new(move |control, auth| this.receive_one(control, &auth, &routes));
        let s = &self.settings;
        let limits = Limits {
            psk: self.psk.clone(),
            handshake_timeout: s.handshake_timeout,
            max_unauthenticated: s.max_unauthenticated,
            max_per_address: s.max_unauthenticated_per_address,
        };
        acceptor::serve(listener, &router, &receive, limits);
    }

    /// Receives the migration whose control connection is `control`, on this thread. Its
    /// Hello proved the key: only now does it take a slot and a status row.
    fn receive_one(
        self: &Arc<Self>,
        mut control: TcpStream,
        auth: &AuthHello,
        router: &Arc<Router>,
    ) {
        let s = &self.settings;
        let opts = DestOptions {
            psk: self.psk.clone(),
            socket: s.socket.clone(),
            pin_threads: s.pin_threads,
            timeout: s.listen_timeout,
            max_guest_pages: s.max_guest_pages,
            max_streams: s.max_streams,
            drbd: s.drbd.clone(),
            announce: s.announce.clone(),
            resume_window: s.resume_window,
        };
        let h = &auth.hello;
        let peer = control
            .peer_addr()
            .map_or_else(|_| "?".into(), |a| a.to_string());
        if let Err(e) = tune(&mut control, &opts) {
            tracing::warn!(%peer, "incoming migration: {e}");
            return;
        }
        // Strings are checked before any is kept or shown: a bad one gets a refusal, no row.
        if let Err(why) = check_hello_text(h) {
            tracing::warn!(%peer, migration = %crate::migrate::MigrationId(h.migration_id), "refused a migration: {why}");
            let _ = send_welcome(&mut control, &self.psk, auth, Err(why));
            return;
        }
        let status = Arc::new(Mutex::new(MigrationStatus::new(
            h.migration_id,
            Role::Destination,
            &h.guest,
            h.guest_pages,
        )));
        let abort = Arc::new(AtomicBool::new(false));
        let target: Arc<Mutex<Option<Arc<dyn DestGuest>>>> = Arc::default();
        let entry = Entry::new(
            status.clone(),
            abort.clone(),
            Arc::default(),
            target.clone(),
        );
        let ended = entry.ended.clone();
        // A reconnection that reached this thread names no migration held here: it is
        // refused, and leaves no row.
        if h.resume == 0 {
            self.add(entry);
        }
        let slot = target.clone();
        let this = self.clone();
        // Held while the migration is received here.
        let permit = Arc::new(Mutex::new(None));
        let (held, queued, stop) = (permit.clone(), status.clone(), abort.clone());
        let busy = Arc::new(AtomicBool::new(false));
        let busy_flag = busy.clone();
        let factory = Box::new(move |h: &crate::protocol::Hello| {
            // The source proved the key: beyond this host's limit it waits, in line. A full
            // queue, or a wait that ran out, is a busy refusal: its source asks again later.
            let gate = &this.admission.inbound;
            let p = gate
                .acquire(&queued, &stop, Some(this.admission.inbound_wait))
                .map_err(|e| {
                    busy_flag.store(true, Ordering::Release);
                    let l = &this.settings.admission.inbound;
                    format!(
                        "{}: {e} (listen.max_migrations = {}, listen.queue = {})",
                        crate::migrate::BUSY_REFUSAL,
                        l.running,
                        l.queue
                    )
                })?;
            *held.lock().expect("permit lock") = Some(p);
            let t = this.dest_guest(h)?;
            *slot.lock().expect("slot lock") = Some(t.clone());
            Ok(t)
        });
        let mut streams = RoutedStreams::new(router.clone());
        let id = crate::migrate::MigrationId(h.migration_id);
        let result = match receive_on(control, auth, &mut streams, &opts, factory, &status, &abort)
        {
            Ok(_) => {
                tracing::info!(migration = %id, "migration received; the guest runs here");
                Ok(())
            }
            // Held, paused, until the operator resolves it.
            Err(e @ crate::migrate::MigrateError::InDoubt(_)) => {
                tracing::error!("{e}");
                Err(e.to_string())
            }
            Err(e) => {
                tracing::warn!(migration = %id, "incoming migration failed: {e}");
                // Discard the half-built guest.
                target.lock().expect("slot lock").take();
                Err(e.to_string())
            }
        };
        drop(streams);
        permit.lock().expect("permit lock").take();
        let busy = busy.load(Ordering::Acquire);
        settle(&status, &ended, result);
        if busy {
            // Refused as busy: its source asks again, and its own row says it waits.
            self.entries
                .lock()
                .expect("registry lock")
                .retain(|e| !Arc::ptr_eq(&e.status, &status));
        } else if h.resume == 0 {
            let st = status.lock().expect("status lock");
            if st.phase.is_final() {
                super::metrics::count_ended(&st);
            }
        }
    }
}

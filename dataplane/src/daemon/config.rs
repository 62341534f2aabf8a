//! The daemon's TOML configuration. Every key is documented in `configs/*.toml`; unknown keys
//! are refused so a typo is an error rather than a silently ignored setting.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::codec::{CodecConfig, DEFAULT_DELTA_THRESHOLD};
use crate::migrate::Policy;
use crate::transport::{Congestion, SocketOptions};
use crate::units::{parse_duration, parse_rate, parse_size};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// the file cannot be read
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// the TOML is malformed, a key is unknown or a value is invalid
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line.
        message: String,
    },
}

/// `[daemon]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSection {
    /// Unix socket for the CLI, created mode 0600.
    pub control_socket: PathBuf,
    /// Pre-shared key file (64 hex digits); must not be readable by group or others.
    pub psk_file: PathBuf,
    /// Log filter (`error`..`trace`, or a tracing directive); `RUST_LOG` overrides it.
    pub log: String,
    /// Control clients that may be sending their request at once; when more come, the one
    /// waiting longest is closed.
    pub control_clients: usize,
    /// How long a control client may take to send its request.
    pub control_idle: String,
}

impl Default for DaemonSection {
    fn default() -> Self {
        DaemonSection {
            control_socket: "/run/skyferry/control.sock".into(),
            psk_file: "/etc/skyferry/psk".into(),
            log: "info".into(),
            control_clients: 64,
            control_idle: "10s".into(),
        }
    }
}

/// `[listen]`: receiving migrations.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// Address for incoming migrations; empty: this host does not receive.
    pub address: String,
    /// Largest guest accepted.
    pub max_guest: String,
    /// Most data streams one migration may open.
    pub max_streams: u32,
    /// Most migrations received at once; more wait in the admission queue.
    pub max_migrations: usize,
    /// Most authenticated migrations waiting for a slot; beyond, refused with the reason.
    pub queue: usize,
    /// Longest one waits (its source waits for the answer meanwhile), then it is refused.
    pub queue_wait: String,
    /// How long a peer may stay silent.
    pub timeout: String,
    /// How long a migration whose link broke in pre-copy is held for its source to
    /// reconnect; then it is discarded.
    pub resume_window: String,
    /// How long a new connection has to prove it holds the key (its Hello or StreamHello,
    /// answering the greeting); then it is closed.
    pub handshake_timeout: String,
    /// Connections that have not proven the key, at once; when full, the oldest is closed.
    pub max_unauthenticated: usize,
    /// Of those, from one address; when full, that address's oldest is closed.
    pub max_unauthenticated_per_address: usize,
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            address: String::new(),
            max_guest: "256GiB".into(),
            max_streams: 16,
            max_migrations: 16,
            queue: 16,
            queue_wait: "20s".into(),
            timeout: "30s".into(),
            resume_window: "120s".into(),
            handshake_timeout: "5s".into(),
            max_unauthenticated: 4096,
            max_unauthenticated_per_address: 1024,
        }
    }
}

/// `[status]`: how long `skyferry status` remembers migrations that ended.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusSection {
    /// Most ended migrations kept (the oldest go first).
    pub max_finished: usize,
    /// How long an ended migration is kept.
    pub finished_ttl: String,
}

impl Default for StatusSection {
    fn default() -> Self {
        StatusSection {
            max_finished: 256,
            finished_ttl: "24h".into(),
        }
    }
}

/// `[network]`: socket tuning for both roles.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// SO_SNDBUF per data stream.
    pub send_buffer: String,
    /// SO_RCVBUF per data stream.
    pub recv_buffer: String,
    /// `bbr` or `cubic`.
    pub congestion: String,
    /// TCP_NODELAY.
    pub nodelay: bool,
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            send_buffer: "8MiB".into(),
            recv_buffer: "8MiB".into(),
            congestion: "bbr".into(),
            nodelay: true,
        }
    }
}

/// `[source]`: defaults for migrations started on this host (the CLI may override).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceSection {
    /// Data streams per migration.
    pub streams: u32,
    /// `smart` or `xen-default`.
    pub policy: String,
    /// The pause ceiling (`""`: none); `downtime_limit` is its old name.
    #[serde(alias = "downtime_limit")]
    pub max_downtime: String,
    /// Completion timeout per GiB of guest (`""`: none).
    pub completion_timeout_per_gib: String,
    /// `abort` or `force`.
    pub completion_action: String,
    /// Throttle a guest whose dirtying outpaces the link.
    pub auto_converge: bool,
    /// Send-side rate limit (`""`: none).
    pub max_bandwidth: String,
    /// Data frame size.
    pub frame_size: String,
    /// Block cache per stream, each end.
    pub cache: String,
    /// `all`, `none`, or a list like `zero,cbr,delta`.
    pub optimizations: String,
    /// Largest page delta sent, bytes.
    pub delta_threshold: usize,
    /// Carry a running cache digest in frame headers.
    pub verify_caches: bool,
    /// Frame-body compression: `off`, `lz4`, `zstd1`, `zstd3` or `auto`.
    pub compression: String,
    /// Pin pipeline threads to cores.
    pub pin_threads: bool,
    /// How long the destination may stay silent.
    pub timeout: String,
    /// Reconnections tried when pre-copy loses its link (0: fail at once).
    pub resume_attempts: u32,
    /// Time in which further reconnections may start, from the break on (the first three
    /// are made however long each takes).
    pub resume_within: String,
    /// Most migrations sent at once (0: no limit); more wait in the admission queue.
    pub max_migrations: usize,
    /// Most migrations waiting for a slot; beyond, `start` is refused.
    pub queue: usize,
    /// How long a migration refused because the destination is busy keeps asking again,
    /// with backoff ("0s": fail at once).
    pub busy_retry_within: String,
}

impl Default for SourceSection {
    fn default() -> Self {
        SourceSection {
            streams: 4,
            policy: "smart".into(),
            max_downtime: String::new(),
            completion_timeout_per_gib: String::new(),
            completion_action: "abort".into(),
            auto_converge: false,
            max_bandwidth: String::new(),
            frame_size: "64KiB".into(),
            cache: "100MiB".into(),
            optimizations: "all".into(),
            delta_threshold: DEFAULT_DELTA_THRESHOLD,
            verify_caches: true,
            compression: "off".into(),
            pin_threads: true,
            timeout: "30s".into(),
            resume_attempts: 8,
            resume_within: "60s".into(),
            max_migrations: 0,
            queue: 64,
            busy_retry_within: "5m".into(),
        }
    }
}

/// `[qemu]`: QEMU guests. At the destination its presence lets this host receive them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuSection {
    /// Destination RAM file of an incoming guest (`{guest}`: its name).
    pub ram_file: String,
    /// Destination QEMU's QMP socket.
    pub qmp: String,
    /// Command that starts the destination QEMU, with `-incoming defer`; empty: the operator
    /// starts it before the migration.
    pub command: Vec<String>,
    /// How long a QMP reply, a QEMU start or the device-state migration may take.
    pub timeout: String,
    /// After the commit, the source QEMU quits (nobody can `cont` a second copy).
    pub quit_source_after_commit: bool,
}

impl Default for QemuSection {
    fn default() -> Self {
        let d = crate::guest::qemu::QemuDestConfig::default();
        QemuSection {
            ram_file: d.ram_file,
            qmp: d.qmp,
            command: d.command,
            timeout: "30s".into(),
            quit_source_after_commit: true,
        }
    }
}

/// `[kvm]`: micro-VMs this daemon hosts. At the destination its presence lets this host
/// receive them.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KvmSection {
    /// Who checks an arriving guest's memory as soon as it runs, before it writes again:
    /// `guest` (its own sweep), `host` (the host, by the guest's rules, at native speed) or
    /// `off`. `skyferry status` shows the bad pages.
    pub arrival_check: crate::guest::kvm::ArrivalCheck,
}

/// KVM settings, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvmSettings {
    /// This host receives KVM micro-VMs (the config has a `[kvm]` section).
    pub receive: bool,
    /// How arriving guests are treated.
    pub target: crate::guest::kvm::KvmTargetOptions,
}

/// QEMU settings, checked.
#[derive(Debug, Clone)]
pub struct QemuSettings {
    /// This host receives QEMU guests (the config has a `[qemu]` section).
    pub receive: bool,
    /// Where incoming guests go.
    pub dest: crate::guest::qemu::QemuDestConfig,
    /// QMP and device-state bound.
    pub timeout: Duration,
    /// Quit the source QEMU after the commit.
    pub quit_source_after_commit: bool,
}

/// `[xen]`: Xen HVM domains (skyferryd in dom0). At the destination its presence lets this
/// host receive them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XenSection {
    /// libxenctrl to load: a soname or a path (default: Xen 4.17's, the ABI of the bindings).
    pub xenctrl: String,
    /// libxenforeignmemory to load.
    pub xenforeignmemory: String,
}

impl Default for XenSection {
    fn default() -> Self {
        XenSection {
            xenctrl: skyferry_xen_ffi::XENCTRL_SONAME.into(),
            xenforeignmemory: skyferry_xen_ffi::XENFOREIGNMEMORY_SONAME.into(),
        }
    }
}

/// Xen settings, checked.
#[derive(Debug, Clone)]
pub struct XenSettings {
    /// This host receives Xen domains (the config has a `[xen]` section).
    pub receive: bool,
    /// Which libraries to load.
    pub libraries: crate::guest::xen::LibraryPaths,
}

/// `[coordinator]`: Synchronized Arrival (`skyferry start --group G`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorSection {
    /// Serve the coordinator on this address (`host:port`); empty: do not serve it.
    pub listen: String,
    /// Where this host's grouped migrations report (default: `listen`, this daemon's own).
    pub address: String,
}

/// Coordinator settings, checked.
#[derive(Debug, Clone, Default)]
pub struct CoordinatorSettings {
    /// Serve the coordinator here.
    pub listen: Option<std::net::SocketAddr>,
    /// Where grouped migrations report.
    pub address: Option<std::net::SocketAddr>,
}

/// `[drbd]`: guests whose disk DRBD replicates (`skyferry start --disk`). At the
/// destination its presence lets this host receive them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DrbdSection {
    /// drbdadm to run.
    pub drbdadm: PathBuf,
    /// drbdsetup for drbdadm and for status queries (empty: the one beside drbdadm).
    pub drbdsetup: String,
    /// Where the resource files go (`/etc/drbd.conf` includes `drbd.d/*.res`).
    pub resource_dir: PathBuf,
    /// This host's node name in the resource files (empty: `uname -n`, as drbdadm's own).
    pub node: String,
    /// Longest a single drbdadm or drbdsetup command may run.
    pub command_timeout: String,
    /// Longest the disks may take to get in sync before the memory migration starts.
    pub sync_deadline: String,
    /// How often the bulk copy's progress is read.
    pub poll_interval: String,
    /// How long a Primary waits for its peer to demote before forbidding two primaries.
    pub role_wait: String,
}

impl Default for DrbdSection {
    fn default() -> Self {
        let d = crate::migrate::disk::DrbdHost::default();
        DrbdSection {
            drbdadm: d.drbdadm,
            drbdsetup: String::new(),
            resource_dir: d.resource_dir,
            node: String::new(),
            command_timeout: "60s".into(),
            sync_deadline: "24h".into(),
            poll_interval: "1s".into(),
            role_wait: "30s".into(),
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// `[daemon]`
    pub daemon: DaemonSection,
    /// `[listen]`
    pub listen: ListenSection,
    /// `[status]`
    pub status: StatusSection,
    /// `[network]`
    pub network: NetworkSection,
    /// `[source]`
    pub source: SourceSection,
    /// `[qemu]`
    pub qemu: Option<QemuSection>,
    /// `[xen]`
    pub xen: Option<XenSection>,
    /// `[kvm]`
    pub kvm: Option<KvmSection>,
    /// `[coordinator]`
    pub coordinator: CoordinatorSection,
    /// `[drbd]`
    pub drbd: Option<DrbdSection>,
    /// `[announce]`
    pub announce: Option<crate::network::AnnounceConfig>,
    /// `[metrics]`
    pub metrics: MetricsSection,
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSection {
    /// Where to serve `GET /metrics`; empty: not served.
    pub listen: String,
}

/// The configuration with every value parsed and checked.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Control socket path.
    pub control_socket: PathBuf,
    /// How many control clients may wait, and how long.
    pub control_clients: crate::daemon::control_server::ClientLimits,
    /// Key file path.
    pub psk_file: PathBuf,
    /// Log filter.
    pub log: String,
    /// Where to receive migrations, if at all.
    pub listen: Option<std::net::SocketAddr>,
    /// Largest guest accepted, pages.
    pub max_guest_pages: u64,
    /// Most streams accepted.
    pub max_streams: u32,
    /// Destination silence limit.
    pub listen_timeout: Duration,
    /// How long a broken pre-copy is held for its source to come back.
    pub resume_window: Duration,
    /// How long a new connection has to prove the key.
    pub handshake_timeout: Duration,
    /// Unauthenticated connections at once.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections at once from one address.
    pub max_unauthenticated_per_address: usize,
    /// Ended migrations kept for `status`.
    pub status_max_finished: usize,
    /// How long an ended migration is kept for `status`.
    pub status_finished_ttl: Duration,
    /// Socket tuning.
    pub socket: SocketOptions,
    /// Default streams.
    pub streams: u32,
    /// Default policy.
    pub policy: Policy,
    /// Default pause ceiling.
    pub max_downtime: Option<Duration>,
    /// Default completion timeout, its action, auto-converge.
    pub converge: crate::migrate::converge::ConvergeOptions,
    /// Default rate limit, bytes/s.
    pub max_bandwidth: Option<u64>,
    /// Data frame size.
    pub frame_size: usize,
    /// Default codec.
    pub codec: CodecConfig,
    /// Pin threads.
    pub pin_threads: bool,
    /// Source silence limit.
    pub source_timeout: Duration,
    /// Reconnecting after a broken pre-copy.
    pub resume: crate::migrate::source::ResumePolicy,
    /// QEMU guests.
    pub qemu: QemuSettings,
    /// Xen domains.
    pub xen: XenSettings,
    /// KVM micro-VMs.
    pub kvm: KvmSettings,
    /// Synchronized Arrival.
    pub coordinator: CoordinatorSettings,
    /// DRBD disks, if this host steers them.
    pub drbd: Option<crate::migrate::disk::DrbdHost>,
    /// Where guests are announced after a switchover, if this host does.
    pub announce: Option<crate::network::AnnounceConfig>,
    /// Admission limits and queues, sent and received.
    pub admission: AdmissionSettings,
    /// Where the Prometheus endpoint listens, if it is served.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Admission limits (`[source]` and `[listen]` `max_migrations`, `queue`, `queue_wait`).
#[derive(Debug, Clone, Copy)]
pub struct AdmissionSettings {
    /// Migrations sent from here.
    pub outbound: super::admission::Limits,
    /// Migrations received here.
    pub inbound: super::admission::Limits,
    /// Longest an incoming migration waits for a slot.
    pub inbound_wait: Duration,
}

impl DaemonConfig {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks config text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        };
        let c: DaemonConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let key = |k: &str, e: String| invalid(format!("{k}: {e}"));
        let size = |k: &str, v: &str| parse_size(v).map_err(|e| key(k, e.to_string()));
        let dur = |k: &str, v: &str| parse_duration(v).map_err(|e| key(k, e.to_string()));
        let opt = |v: &str| (!v.trim().is_empty()).then(|| v.to_string());

        let listen = opt(&c.listen.address)
            .map(|a| {
                a.parse()
                    .map_err(|e| key("listen.address", format!("{a:?}: {e}")))
            })
            .transpose()?;
        let mut codec = CodecConfig {
            cache_bytes: size("source.cache", &c.source.cache)?,
            delta_threshold: c.source.delta_threshold,
            verify_caches: c.source.verify_caches,
            compression: c
                .source
                .compression
                .parse()
                .map_err(|e| key("source.compression", e))?,
            ..CodecConfig::default()
        };
        codec
            .set_optimizations(&c.source.optimizations)
            .map_err(|e| key("source.optimizations", e))?;
        codec.validate().map_err(|e| key("source", e.to_string()))?;
        let frame_size =
            usize::try_from(size("source.frame_size", &c.source.frame_size)?).unwrap_or(usize::MAX);
        let limit = |e: crate::limits::LimitError| invalid(e.to_string());
        crate::limits::check_frame_size("source.frame_size", frame_size).map_err(limit)?;
        crate::limits::check_streams("source.streams", c.source.streams).map_err(limit)?;
        crate::limits::check_cache("source.cache", &codec).map_err(limit)?;
        crate::limits::check_streams("listen.max_streams", c.listen.max_streams).map_err(limit)?;
        crate::limits::check_max_migrations(c.listen.max_migrations).map_err(limit)?;
        crate::limits::check_control_clients(c.daemon.control_clients).map_err(limit)?;
        let control_idle = dur("daemon.control_idle", &c.daemon.control_idle)?;
        crate::limits::check_control_idle(control_idle).map_err(limit)?;
        let max_guest = size("listen.max_guest", &c.listen.max_guest)?;
        crate::limits::check_guest_size(max_guest)
            .map_err(|e| key("listen.max_guest", e.to_string()))?;
        if c.listen.max_unauthenticated == 0 || c.listen.max_unauthenticated_per_address == 0 {
            return Err(key(
                "listen.max_unauthenticated",
                "both it and max_unauthenticated_per_address must be at least 1".into(),
            ));
        }
        Ok(Settings {
            control_socket: c.daemon.control_socket,
            control_clients: crate::daemon::control_server::ClientLimits {
                clients: c.daemon.control_clients,
                idle: control_idle,
            },
            psk_file: c.daemon.psk_file,
            log: c.daemon.log,
            listen,
            max_guest_pages: max_guest / crate::page::PAGE_SIZE as u64,
            max_streams: c.listen.max_streams,
            listen_timeout: dur("listen.timeout", &c.listen.timeout)?,
            resume_window: dur("listen.resume_window", &c.listen.resume_window)?,
            handshake_timeout: dur("listen.handshake_timeout", &c.listen.handshake_timeout)?,
            max_unauthenticated: c.listen.max_unauthenticated,
            max_unauthenticated_per_address: c.listen.max_unauthenticated_per_address,
            status_max_finished: c.status.max_finished,
            status_finished_ttl: dur("status.finished_ttl", &c.status.finished_ttl)?,
            socket: SocketOptions {
                send_buffer: usize::try_from(size("network.send_buffer", &c.network.send_buffer)?)
                    .unwrap_or(usize::MAX),
                recv_buffer: usize::try_from(size("network.recv_buffer", &c.network.recv_buffer)?)
                    .unwrap_or(usize::MAX),
                nodelay: c.network.nodelay,
                congestion: c
                    .network
                    .congestion
                    .parse::<Congestion>()
                    .map_err(|e| key("network.congestion", e))?,
            },
            streams: c.source.streams,
            policy: c
                .source
                .policy
                .parse()
                .map_err(|e| key("source.policy", e))?,
            max_downtime: opt(&c.source.max_downtime)
                .map(|v| dur("source.max_downtime", &v))
                .transpose()?,
            converge: crate::migrate::converge::ConvergeOptions {
                completion_timeout_per_gib: opt(&c.source.completion_timeout_per_gib)
                    .map(|v| dur("source.completion_timeout_per_gib", &v))
                    .transpose()?,
                completion_action: c
                    .source
                    .completion_action
                    .parse()
                    .map_err(|e| key("source.completion_action", e))?,
                auto_converge: c.source.auto_converge,
            },
            max_bandwidth: opt(&c.source.max_bandwidth)
                .map(|v| parse_rate(&v).map_err(|e| key("source.max_bandwidth", e.to_string())))
                .transpose()?,
            frame_size,
            codec,
            pin_threads: c.source.pin_threads,
            source_timeout: dur("source.timeout", &c.source.timeout)?,
            resume: crate::migrate::source::ResumePolicy {
                attempts: c.source.resume_attempts,
                within: dur("source.resume_within", &c.source.resume_within)?,
                busy_within: dur("source.busy_retry_within", &c.source.busy_retry_within)?,
            },
            qemu: qemu_settings(c.qemu, &key)?,
            xen: xen_settings(c.xen, &key)?,
            kvm: KvmSettings {
                receive: c.kvm.is_some(),
                target: crate::guest::kvm::KvmTargetOptions {
                    arrival_check: c.kvm.unwrap_or_default().arrival_check,
                },
            },
            coordinator: coordinator_settings(&c.coordinator, &key)?,
            drbd: c.drbd.map(|d| drbd_settings(d, &key)).transpose()?,
            announce: c
                .announce
                .map(|a| {
                    a.validate().map_err(|e| invalid(e.to_string()))?;
                    Ok(a)
                })
                .transpose()?,
            admission: AdmissionSettings {
                outbound: super::admission::Limits {
                    running: c.source.max_migrations,
                    queue: c.source.queue,
                },
                inbound: super::admission::Limits {
                    running: c.listen.max_migrations,
                    queue: c.listen.queue,
                },
                inbound_wait: dur("listen.queue_wait", &c.listen.queue_wait)?,
            },
            metrics_listen: opt(&c.metrics.listen)
                .map(|a| {
                    a.parse()
                        .map_err(|e| key("metrics.listen", format!("{a:?}: {e}")))
                })
                .transpose()?,
        })
    }
}

fn drbd_settings(
    d: DrbdSection,
    key: &dyn Fn(&str, String) -> ConfigError,
) -> Result<crate::migrate::disk::DrbdHost, ConfigError> {
    let dur = |k: &str, v: &str| parse_duration(v).map_err(|e| key(k, e.to_string()));
    let opt = |v: String| (!v.trim().is_empty()).then_some(v);
    Ok(crate::migrate::disk::DrbdHost {
        drbdadm: d.drbdadm,
        drbdsetup: opt(d.drbdsetup).map(PathBuf::from),
        resource_dir: d.resource_dir,
        node: opt(d.node),
        command_timeout: dur("drbd.command_timeout", &d.command_timeout)?,
        timing: crate::disk::drbd::SteerTiming {
            sync_deadline: dur("drbd.sync_deadline", &d.sync_deadline)?,
            poll_interval: dur("drbd.poll_interval", &d.poll_interval)?,
            role_wait: dur("drbd.role_wait", &d.role_wait)?,
        },
    })
}

fn qemu_settings(
    q: Option<QemuSection>,
    key: &dyn Fn(&str, String) -> ConfigError,
) -> Result<QemuSettings, ConfigError> {
    let receive = q.is_some();
    let q = q.unwrap_or_default();
    for (k, v) in [("qemu.ram_file", &q.ram_file), ("qemu.qmp", &q.qmp)] {
        if !v.contains("{guest}") {
            return Err(key(
                k,
                format!("{v:?} must contain {{guest}}, so each guest has its own"),
            ));
        }
    }
    if !q.command.is_empty() && !q.command.iter().any(|a| a.contains("-incoming")) {
        return Err(key(
            "qemu.command",
            "must start QEMU waiting for a migration: add \"-incoming\", \"defer\"".into(),
        ));
    }
    Ok(QemuSettings {
        receive,
        dest: crate::guest::qemu::QemuDestConfig {
            ram_file: q.ram_file,
            qmp: q.qmp,
            command: q.command,
        },
        timeout: parse_duration(&q.timeout).map_err(|e| key("qemu.timeout", e.to_string()))?,
        quit_source_after_commit: q.quit_source_after_commit,
    })
}

fn coordinator_settings(
    c: &CoordinatorSection,
    key: &dyn Fn(&str, String) -> ConfigError,
) -> Result<CoordinatorSettings, ConfigError> {
    let addr = |k: &str, v: &str| -> Result<Option<std::net::SocketAddr>, ConfigError> {
        if v.is_empty() {
            return Ok(None);
        }
        use std::net::ToSocketAddrs;
        v.to_socket_addrs()
            .map_err(|e| key(k, format!("{v:?}: {e}")))?
            .next()
            .map(Some)
            .ok_or_else(|| key(k, format!("{v:?} resolves to no address")))
    };
    let listen = addr("coordinator.listen", &c.listen)?;
    let address = addr("coordinator.address", &c.address)?.or(listen);
    Ok(CoordinatorSettings { listen, address })
}

fn xen_settings(
    x: Option<XenSection>,
    key: &dyn Fn(&str, String) -> ConfigError,
) -> Result<XenSettings, ConfigError> {
    let receive = x.is_some();
    let x = x.unwrap_or_default();
    for (k, v) in [
        ("xen.xenctrl", &x.xenctrl),
        ("xen.xenforeignmemory", &x.xenforeignmemory),
    ] {
        if v.is_empty() {
            return Err(key(k, "must name a library (a soname or a path)".into()));
        }
    }
    Ok(XenSettings {
        receive,
        libraries: crate::guest::xen::LibraryPaths {
            xenctrl: x.xenctrl.into(),
            xenforeignmemory: x.xenforeignmemory.into(),
        },
    })
}

/// Reads the pre-shared key, refusing a file others can read.
pub fn read_psk(path: &Path) -> Result<crate::crypto::PreSharedKey, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "key file {} has mode {mode:03o}; it must be readable by its owner only (chmod 600)",
            path.display()
        ));
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    crate::crypto::PreSharedKey::from_hex(&text)
        .map_err(|e| format!("key file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::DEFAULT_CACHE_BYTES;
    use crate::frame::DEFAULT_FRAME_SIZE;

    #[test]
    fn the_example_configs_parse() {
        for f in ["source.toml", "destination.toml"] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../configs")
                .join(f);
            DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn the_xen_section_receives_and_names_its_libraries() {
        let p = Path::new("t.toml");
        let none = DaemonConfig::parse("", p).unwrap();
        assert!(!none.xen.receive);
        assert_eq!(
            none.xen.libraries,
            crate::guest::xen::LibraryPaths::default()
        );
        let s = DaemonConfig::parse("[xen]\nxenctrl = \"/opt/double.so\"\n", p).unwrap();
        assert!(s.xen.receive);
        assert_eq!(s.xen.libraries.xenctrl, "/opt/double.so");
        let e = DaemonConfig::parse("[xen]\nxenforeignmemory = \"\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("xen.xenforeignmemory"), "{e}");
        let e = DaemonConfig::parse("[xen]\ndomid = 3\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("domid"), "{e}");
    }

    #[test]
    fn the_kvm_section_receives_and_says_who_checks_arrivals() {
        use crate::guest::kvm::ArrivalCheck;
        let p = Path::new("t.toml");
        let none = DaemonConfig::parse("", p).unwrap();
        assert!(!none.kvm.receive);
        let s = DaemonConfig::parse("[kvm]\n", p).unwrap();
        assert!(s.kvm.receive);
        assert_eq!(s.kvm.target.arrival_check, ArrivalCheck::Guest);
        let s = DaemonConfig::parse("[kvm]\narrival_check = \"host\"\n", p).unwrap();
        assert_eq!(s.kvm.target.arrival_check, ArrivalCheck::Host);
        let e = DaemonConfig::parse("[kvm]\narrival_check = \"sometimes\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("arrival_check") && e.contains("`guest`, `host`, `off`"),
            "{e}"
        );
        // The key this replaced is named, not silently ignored.
        let e = DaemonConfig::parse("[kvm]\nsweep_on_arrival = true\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("sweep_on_arrival"), "{e}");
    }

    #[test]
    fn the_coordinator_section_serves_and_addresses() {
        let p = Path::new("t.toml");
        let none = DaemonConfig::parse("", p).unwrap();
        assert_eq!(none.coordinator.listen, None);
        assert_eq!(none.coordinator.address, None);
        let own = DaemonConfig::parse("[coordinator]\nlisten = \"127.0.0.1:7411\"\n", p).unwrap();
        assert_eq!(own.coordinator.address, own.coordinator.listen);
        assert!(own.coordinator.listen.is_some());
        let other =
            DaemonConfig::parse("[coordinator]\naddress = \"127.0.0.1:7412\"\n", p).unwrap();
        assert_eq!(other.coordinator.listen, None);
        assert_eq!(other.coordinator.address.unwrap().port(), 7412);
        let e = DaemonConfig::parse("[coordinator]\nlisten = \"nowhere\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("coordinator.listen"), "{e}");
    }

    #[test]
    fn the_drbd_and_announce_sections_enable_what_moves_with_the_guest() {
        let p = Path::new("t.toml");
        let none = DaemonConfig::parse("", p).unwrap();
        assert_eq!(none.drbd, None);
        assert_eq!(none.announce, None);
        let s = DaemonConfig::parse(
            "[drbd]\nnode = \"dallas-3\"\nsync_deadline = \"2h\"\n\n[announce]\ninterface = \"br0\"\nrounds = 3\n",
            p,
        )
        .unwrap();
        let d = s.drbd.unwrap();
        assert_eq!(d.node.as_deref(), Some("dallas-3"));
        assert_eq!(d.drbdsetup, None);
        assert_eq!(d.timing.sync_deadline, Duration::from_secs(7200));
        assert_eq!(d.drbdadm, Path::new("/usr/sbin/drbdadm"));
        let a = s.announce.unwrap();
        assert_eq!((a.interface.as_str(), a.rounds), ("br0", 3));
        let e = DaemonConfig::parse("[drbd]\nrole_wait = \"soon\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("drbd.role_wait"), "{e}");
        let e = DaemonConfig::parse("[announce]\nrounds = 3\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("interface"), "{e}");
        let e = DaemonConfig::parse("[announce]\ninterface = \"a/b\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("announce.interface"), "{e}");
    }

    #[test]
    fn typos_and_bad_values_are_named() {
        let p = Path::new("t.toml");
        let e = DaemonConfig::parse("[source]\nstreemz = 3\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("streemz"), "{e}");
        let e = DaemonConfig::parse("[source]\ncache = \"12XB\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("source.cache"), "{e}");
        let e = DaemonConfig::parse("[source]\npolicy = \"fast\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("smart or xen-default"), "{e}");
        let e = DaemonConfig::parse("[network]\ncongestion = \"reno\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bbr or cubic"), "{e}");
        let e = DaemonConfig::parse("[source]\ncompression = \"gzip\"\n", p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("source.compression") && e.contains("auto"),
            "{e}"
        );
        let s = DaemonConfig::parse("[source]\ncompression = \"auto\"\n", p).unwrap();
        assert_eq!(s.codec.compression, crate::codec::Compression::Auto);
        let s = DaemonConfig::parse("", p).unwrap();
        assert_eq!(s.listen, None);
        assert_eq!(
            s.codec,
            CodecConfig {
                cache_bytes: DEFAULT_CACHE_BYTES,
                ..CodecConfig::default()
            }
        );
        assert_eq!(s.frame_size, DEFAULT_FRAME_SIZE);
    }
}

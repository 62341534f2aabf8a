//! The control socket's protocol: one JSON request per connection, one JSON response, each a
//! line. Only the daemon's own user (or root) may use it: the socket file is mode 0600 and
//! every connection's peer credentials are checked (SO_PEERCRED). `control_server` serves it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::migrate::MigrationStatus;

/// A running QEMU guest to migrate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuGuestSpec {
    /// Its QMP socket.
    pub qmp: std::path::PathBuf,
    /// Its RAM file (shared memory backend).
    pub ram_file: std::path::PathBuf,
}

/// A Xen HVM domain to migrate (skyferryd runs in dom0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XenGuestSpec {
    /// The domain here.
    pub domid: u32,
    /// The domain the destination's toolstack created paused to receive it.
    pub dest_domid: u32,
}

/// Start a migration: of a running QEMU guest (`qemu`), or else of a synthetic guest this
/// daemon creates and hosts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Destination daemon's migration address (`host:port`).
    pub to: String,
    /// A QEMU guest; the synthetic fields below are then unused.
    #[serde(default)]
    pub qemu: Option<QemuGuestSpec>,
    /// A Xen domain; the synthetic fields below are then unused.
    #[serde(default)]
    pub xen: Option<XenGuestSpec>,
    /// A KVM micro-VM this daemon boots with the test guest, its writes following
    /// `workload` at `speed`, of `mem` bytes.
    #[serde(default)]
    pub kvm: bool,
    /// Synchronized Arrival: the group this migration arrives with.
    #[serde(default)]
    pub group: Option<String>,
    /// Members in the group (0 or absent: whoever has joined).
    #[serde(default)]
    pub group_size: Option<usize>,
    /// What to do if another member fails: `abort` (default) or `continue`.
    #[serde(default)]
    pub group_failure: Option<String>,
    /// While held for the group, wait instead of iterating.
    #[serde(default)]
    pub group_pace: bool,
    /// The guest's DRBD-replicated disk (the `[disk]` table of `skyferry start --disk`).
    #[serde(default)]
    pub disk: Option<crate::disk::drbd::DrbdDisk>,
    /// The guest NIC's MAC, announced at the destination at the switchover.
    #[serde(default)]
    pub mac: Option<String>,
    /// The guest's IPv4 address (with `mac`: a gratuitous ARP goes out besides the RARP).
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// Synthetic workload (`kernel`, `tpcw`, `specjbb`, `idle`).
    pub workload: String,
    /// Guest memory, bytes.
    pub mem: u64,
    /// Workload seed.
    pub seed: u64,
    /// Write-rate multiplier of the synthetic guest.
    pub speed: f64,
    /// Guest name for displays.
    pub guest: Option<String>,
    /// Overrides of the config's `[source]` defaults.
    pub streams: Option<u32>,
    /// `smart` or `xen-default`.
    pub policy: Option<String>,
    /// `all`, `none` or a list.
    pub optimizations: Option<String>,
    /// `off`, `lz4`, `zstd1`, `zstd3` or `auto`.
    #[serde(default)]
    pub compression: Option<String>,
    /// Bytes per second; 0 means unlimited.
    pub max_bandwidth: Option<u64>,
    /// The pause ceiling, milliseconds (`downtime_limit_ms`: its old name).
    #[serde(alias = "downtime_limit_ms")]
    pub max_downtime_ms: Option<u64>,
    /// Completion timeout per GiB of guest, milliseconds; 0: none.
    #[serde(default)]
    pub completion_timeout_per_gib_ms: Option<u64>,
    /// `abort` or `force`.
    #[serde(default)]
    pub completion_action: Option<String>,
    /// Throttle a guest whose dirtying outpaces the link.
    #[serde(default)]
    pub auto_converge: Option<bool>,
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Start a migration.
    Start(Box<StartRequest>),
    /// Abort a migration before its commit.
    Abort {
        /// Migration id.
        id: u64,
    },
    /// Status of one migration, or of all.
    Status {
        /// Migration id; all when absent.
        id: Option<u64>,
    },
    /// Settles a migration held in doubt at this destination: start the guest here (the
    /// source committed) or discard it (the source kept it).
    Resolve {
        /// Migration id.
        id: u64,
        /// Start it here; else discard it.
        start: bool,
    },
    /// A Synchronized Arrival group, from this host's coordinator.
    GroupStatus {
        /// The group.
        group: String,
    },
}

/// A control response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Response {
    /// A migration started.
    Started {
        /// Its id.
        id: u64,
    },
    /// Abort requested; the migration stops at its next step.
    Aborting {
        /// Its id.
        id: u64,
    },
    /// A migration held in doubt was settled.
    Resolved {
        /// Its status now.
        status: Box<MigrationStatus>,
    },
    /// Migrations known to this daemon.
    Status {
        /// Their states, oldest first.
        migrations: Vec<MigrationStatus>,
    },
    /// A group's members, side by side.
    Group {
        /// The group.
        group: Box<crate::coordinator::Group>,
    },
    /// The request failed.
    Error {
        /// Why, for the operator.
        message: String,
    },
}

/// Only our own user (or root) may drive the daemon.
pub(super) fn peer_allowed(conn: &UnixStream) -> Result<(), String> {
    let cred = nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot read peer credentials: {e}"))?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() == me || cred.uid() == 0 {
        Ok(())
    } else {
        Err(format!(
            "uid {} may not use this daemon (owner uid {me})",
            cred.uid()
        ))
    }
}

/// Sends one request to a daemon and returns its response (the CLI's side).
pub fn request(path: &Path, req: &Request) -> Result<Response, String> {
    let mut conn = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach skyferryd at {}: {e} (is it running? pass --socket to use another)",
            path.display()
        )
    })?;
    let mut text = serde_json::to_string(req).map_err(|e| e.to_string())?;
    text.push('\n');
    conn.write_all(text.as_bytes())
        .map_err(|e| format!("sending to skyferryd: {e}"))?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| format!("reading from skyferryd: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("malformed response from skyferryd: {e}"))
}

//! DRBD's run-time state, from `drbdsetup status --json RESOURCE`.
//!
//! drbdsetup 9 prints an array of resources; each has its `role`, its `devices` (one per
//! volume, with the local `disk-state`) and its `connections` (one per peer, with
//! `connection-state`, `peer-role` and `peer_devices`, which carry `replication-state`,
//! `peer-disk-state`, `out-of-sync` in KiB and `percent-in-sync`). Fields skyferry does not
//! use are ignored, so newer drbdsetups with more fields still parse; the fields it does use
//! must be there and well formed. State names stay open-ended ([`DiskState::Other`] and
//! friends): a state this code does not know parses, and then fails whichever check
//! needed a specific one, with DRBD's own word in the message.

use std::fmt;

use serde::Deserialize;

/// Defines a DRBD state name as an enum that keeps names it does not know.
macro_rules! drbd_state {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A name this version of skyferry does not know, as DRBD printed it.
            Other(String),
        }

        impl $name {
            fn parse(s: &str) -> Self {
                match s {
                    $(stringify!($variant) => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }

            /// DRBD's name for it.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => stringify!($variant),)*
                    Self::Other(s) => s,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

drbd_state! {
    /// A node's role.
    Role {
        /// Writable; the guest's disk.
        Primary,
        /// Replica only.
        Secondary,
        /// Not known (a peer that is not connected).
        Unknown,
    }
}

drbd_state! {
    /// A disk's state (`disk-state`, `peer-disk-state`).
    DiskState {
        /// No backing disk.
        Diskless,
        /// Being attached.
        Attaching,
        /// Being detached.
        Detaching,
        /// I/O error.
        Failed,
        /// Attached, deciding its state with the peers.
        Negotiating,
        /// Partially written by a sync.
        Inconsistent,
        /// Consistent but known to be stale.
        Outdated,
        /// A peer's disk whose state is not known.
        DUnknown,
        /// Consistent, not yet known to be current.
        Consistent,
        /// Current.
        UpToDate,
    }
}

drbd_state! {
    /// A connection's state.
    ConnectionState {
        /// Not trying to connect (after `disconnect`, or a split brain).
        StandAlone,
        /// Going down.
        Disconnecting,
        /// About to try.
        Unconnected,
        /// Transient, on the way to Unconnected.
        Timeout,
        /// Transient, on the way to Unconnected.
        BrokenPipe,
        /// Transient, on the way to Unconnected.
        NetworkFailure,
        /// Transient, on the way to Unconnected.
        ProtocolError,
        /// Transient, on the way to Unconnected.
        TearDown,
        /// Waiting for the peer.
        Connecting,
        /// Connected.
        Connected,
    }
}

drbd_state! {
    /// A peer device's replication state.
    ReplicationState {
        /// Not replicating (not connected).
        Off,
        /// Replicating; nothing to resynchronise.
        Established,
        /// Starting a resync as its source.
        StartingSyncS,
        /// Starting a resync as its target.
        StartingSyncT,
        /// Exchanging bitmaps.
        WFBitMapS,
        /// Exchanging bitmaps.
        WFBitMapT,
        /// Waiting for the sync UUID.
        WFSyncUUID,
        /// Resynchronising, this node sends.
        SyncSource,
        /// Resynchronising, this node receives.
        SyncTarget,
        /// Online verify, this node leads.
        VerifyS,
        /// Online verify, the peer leads.
        VerifyT,
        /// Resync paused.
        PausedSyncS,
        /// Resync paused.
        PausedSyncT,
        /// Congested: writes are marked out of sync instead of sent (`on-congestion`).
        Ahead,
        /// The peer is Ahead.
        Behind,
    }
}

/// One resource as drbdsetup reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceStatus {
    /// The resource.
    pub name: String,
    /// This node's id, when DRBD has one.
    pub node_id: Option<u8>,
    /// This node's role.
    pub role: Role,
    /// The local volumes.
    pub devices: Vec<DeviceStatus>,
    /// One per peer.
    pub connections: Vec<ConnectionStatus>,
}

/// A local volume.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStatus {
    /// Volume number.
    pub volume: u32,
    /// The local disk.
    pub disk_state: DiskState,
}

/// The connection to one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionStatus {
    /// The peer's node id.
    pub peer_node_id: u8,
    /// The peer's name (`on NAME`).
    pub name: String,
    /// The connection.
    pub connection_state: ConnectionState,
    /// The peer's role, as this node sees it.
    pub peer_role: Role,
    /// One per volume.
    pub peer_devices: Vec<PeerDeviceStatus>,
}

/// Replication of one volume to one peer.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerDeviceStatus {
    /// Volume number.
    pub volume: u32,
    /// Replication state.
    pub replication_state: ReplicationState,
    /// The peer's disk, as this node sees it.
    pub peer_disk_state: DiskState,
    /// Data that differs between the two, KiB.
    pub out_of_sync_kib: u64,
    /// `100 * (1 - out_of_sync / size)`, when drbdsetup prints it.
    pub percent_in_sync: Option<f64>,
}

#[derive(Deserialize)]
struct RawResource {
    name: String,
    #[serde(rename = "node-id")]
    node_id: Option<i64>,
    role: String,
    devices: Vec<RawDevice>,
    connections: Vec<RawConnection>,
}

#[derive(Deserialize)]
struct RawDevice {
    volume: u32,
    #[serde(rename = "disk-state")]
    disk_state: String,
}

#[derive(Deserialize)]
struct RawConnection {
    #[serde(rename = "peer-node-id")]
    peer_node_id: u8,
    #[serde(default)]
    name: String,
    #[serde(rename = "connection-state")]
    connection_state: String,
    #[serde(rename = "peer-role")]
    peer_role: String,
    // drbdsetup spells this one with an underscore.
    #[serde(default)]
    peer_devices: Vec<RawPeerDevice>,
}

#[derive(Deserialize)]
struct RawPeerDevice {
    volume: u32,
    #[serde(rename = "replication-state")]
    replication_state: String,
    #[serde(rename = "peer-disk-state")]
    peer_disk_state: String,
    #[serde(rename = "out-of-sync")]
    out_of_sync: u64,
    #[serde(rename = "percent-in-sync")]
    percent_in_sync: Option<f64>,
}

/// Reads `resource` out of `drbdsetup status --json` output. The error says what is
/// missing or malformed.
pub fn parse_status(json: &str, resource: &str) -> Result<ResourceStatus, String> {
    let all: Vec<RawResource> =
        serde_json::from_str(json).map_err(|e| format!("not drbdsetup 9 status JSON ({e})"))?;
    let raw = all
        .into_iter()
        .find(|r| r.name == resource)
        .ok_or_else(|| format!("drbdsetup reports no resource {resource:?}; is it up?"))?;
    Ok(ResourceStatus {
        name: raw.name,
        // drbdsetup prints -1 when the resource has no node id yet.
        node_id: raw.node_id.and_then(|n| u8::try_from(n).ok()),
        role: Role::parse(&raw.role),
        devices: raw
            .devices
            .into_iter()
            .map(|d| DeviceStatus {
                volume: d.volume,
                disk_state: DiskState::parse(&d.disk_state),
            })
            .collect(),
        connections: raw
            .connections
            .into_iter()
            .map(|c| ConnectionStatus {
                peer_node_id: c.peer_node_id,
                name: c.name,
                connection_state: ConnectionState::parse(&c.connection_state),
                peer_role: Role::parse(&c.peer_role),
                peer_devices: c
                    .peer_devices
                    .into_iter()
                    .map(|p| PeerDeviceStatus {
                        volume: p.volume,
                        replication_state: ReplicationState::parse(&p.replication_state),
                        peer_disk_state: DiskState::parse(&p.peer_disk_state),
                        out_of_sync_kib: p.out_of_sync,
                        percent_in_sync: p.percent_in_sync,
                    })
                    .collect(),
            })
            .collect(),
    })
}

impl ResourceStatus {
    /// The connection to `peer`.
    pub fn connection(&self, peer: u8) -> Option<&ConnectionStatus> {
        self.connections.iter().find(|c| c.peer_node_id == peer)
    }

    /// How much of the disk is in sync with `peer`, in percent: the least of its volumes.
    pub fn sync_percent(&self, peer: u8) -> Option<f64> {
        self.connection(peer)?
            .peer_devices
            .iter()
            .map(|p| p.percent_in_sync)
            .try_fold(f64::INFINITY, |least, p| Some(least.min(p?)))
            .filter(|p| p.is_finite())
    }

    /// Whether this node and `peer` hold the same data and keep it so: connected, every
    /// volume `Established` with nothing out of sync, both disks `UpToDate`. `Err` lists
    /// what is not yet so.
    pub fn in_sync_with(&self, peer: u8) -> Result<(), Vec<String>> {
        let mut not = Vec::new();
        if self.devices.is_empty() {
            not.push("no local volume".to_string());
        }
        for d in &self.devices {
            if d.disk_state != DiskState::UpToDate {
                not.push(format!("volume {} disk is {}", d.volume, d.disk_state));
            }
        }
        match self.connection(peer) {
            None => not.push(format!("no connection to node {peer}")),
            Some(c) => {
                if c.connection_state != ConnectionState::Connected {
                    not.push(format!("connection is {}", c.connection_state));
                }
                if c.peer_devices.is_empty() {
                    not.push("no replicated volume".to_string());
                }
                for p in &c.peer_devices {
                    if p.replication_state != ReplicationState::Established {
                        not.push(format!(
                            "volume {} replication is {}",
                            p.volume, p.replication_state
                        ));
                    }
                    if p.peer_disk_state != DiskState::UpToDate {
                        not.push(format!(
                            "volume {} peer disk is {}",
                            p.volume, p.peer_disk_state
                        ));
                    }
                    if p.out_of_sync_kib != 0 {
                        not.push(format!(
                            "volume {} has {} KiB out of sync",
                            p.volume, p.out_of_sync_kib
                        ));
                    }
                }
            }
        }
        if not.is_empty() { Ok(()) } else { Err(not) }
    }

    /// One line for logs and errors: roles, disks, replication and sync towards `peer`.
    pub fn summary(&self, peer: u8) -> String {
        let disks: Vec<_> = self.devices.iter().map(|d| d.disk_state.as_str()).collect();
        let mut s = format!("{} {}, disk {}", self.name, self.role, disks.join("/"));
        match self.connection(peer) {
            None => s.push_str(&format!("; no connection to node {peer}")),
            Some(c) => {
                s.push_str(&format!(
                    "; peer {} {} {}",
                    c.name, c.connection_state, c.peer_role
                ));
                for p in &c.peer_devices {
                    s.push_str(&format!(
                        ", {} peer disk {}, {} KiB out of sync",
                        p.replication_state, p.peer_disk_state, p.out_of_sync_kib
                    ));
                    if let Some(pct) = p.percent_in_sync {
                        s.push_str(&format!(" ({pct:.2}% in sync)"));
                    }
                }
            }
        }
        s
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// What drbdsetup 9.22 prints (its printf formats, reproduced), for a source in the
    /// middle of its initial sync to peer 1.
    pub(crate) const SYNCING: &str = r#"[
{
  "name": "web1",
  "node-id": 0,
  "role": "Primary",
  "suspended": false,
  "suspended-user": false,
  "suspended-no-data": false,
  "suspended-fencing": false,
  "suspended-quorum": false,
  "force-io-failures": false,
  "write-ordering": "flush",
  "devices": [
    {
      "volume": 0,
      "minor": 10,
      "disk-state": "UpToDate",
      "client": false,
      "quorum": true,
      "size": 10485404,
      "read": 0,
      "written": 8,
      "al-writes": 1,
      "bm-writes": 0,
      "upper-pending": 0,
      "lower-pending": 0
    } ],
  "connections": [
    {
      "peer-node-id": 1,
      "name": "dallas-3",
      "connection-state": "Connected", 
      "congested": false,
      "peer-role": "Secondary",
      "ap-in-flight": 0,
      "rs-in-flight": 4096,
      "peer_devices": [
        {
          "volume": 0,
          "replication-state": "SyncSource",
          "peer-disk-state": "Inconsistent",
          "peer-client": false,
          "resync-suspended": "no",
          "received": 0,
          "sent": 4194304,
          "out-of-sync": 6291242,
          "pending": 0,
          "unacked": 0,
          "has-sync-details": true,
          "has-online-verify-details": false,
          "percent-in-sync": 40.00,
          "rs-total": 10485404,
          "rs-dt-start-ms": 61200,
          "rs-paused-ms": 0,
          "rs-dt0-ms": 3000,
          "rs-db0-sectors": 24576,
          "rs-dt1-ms": 3000,
          "rs-db1-sectors": 24576,
          "rs-failed": 0,
          "rs-same-csum": 0,
          "want": 0.00,
          "db0/dt0 [MiB/s]": 4.00,
          "db1/dt1 [MiB/s]": 4.00,
          "estimated-seconds-to-finish": 1536,
          "db/dt [MiB/s]": 4.00,
          "percent-resync-done": 40.00
        } ]
    } ]
}
]
"#;

    #[test]
    fn reads_a_sync_in_progress() {
        let s = parse_status(SYNCING, "web1").unwrap();
        assert_eq!(s.node_id, Some(0));
        assert_eq!(s.role, Role::Primary);
        assert_eq!(s.devices[0].disk_state, DiskState::UpToDate);
        let c = s.connection(1).unwrap();
        assert_eq!(c.connection_state, ConnectionState::Connected);
        assert_eq!(c.peer_role, Role::Secondary);
        let p = &c.peer_devices[0];
        assert_eq!(p.replication_state, ReplicationState::SyncSource);
        assert_eq!(p.peer_disk_state, DiskState::Inconsistent);
        assert_eq!(p.out_of_sync_kib, 6_291_242);
        assert_eq!(s.sync_percent(1), Some(40.0));
        assert_eq!(s.sync_percent(2), None);
        let not = s.in_sync_with(1).unwrap_err();
        assert_eq!(
            not,
            [
                "volume 0 replication is SyncSource",
                "volume 0 peer disk is Inconsistent",
                "volume 0 has 6291242 KiB out of sync"
            ]
        );
        assert_eq!(
            s.summary(1),
            "web1 Primary, disk UpToDate; peer dallas-3 Connected Secondary, SyncSource peer \
             disk Inconsistent, 6291242 KiB out of sync (40.00% in sync)"
        );
    }

    #[test]
    fn in_sync_needs_every_condition() {
        let synced = SYNCING
            .replace("SyncSource", "Established")
            .replace("\"Inconsistent\"", "\"UpToDate\"")
            .replace("6291242", "0")
            .replace("40.00", "100.00");
        let s = parse_status(&synced, "web1").unwrap();
        assert_eq!(s.in_sync_with(1), Ok(()));
        assert_eq!(s.sync_percent(1), Some(100.0));
        let s = parse_status(&synced.replace("\"Connected\"", "\"Connecting\""), "web1").unwrap();
        assert_eq!(s.in_sync_with(1).unwrap_err(), ["connection is Connecting"]);
        assert!(
            s.in_sync_with(7)
                .unwrap_err()
                .contains(&"no connection to node 7".to_string())
        );
    }

    #[test]
    fn unknown_fields_and_states_pass_missing_fields_do_not() {
        let newer = SYNCING
            .replace(
                "\"congested\": false,",
                "\"congested\": false, \"tls\": false,",
            )
            .replace("\"SyncSource\"", "\"SyncSourceWithFlair\"");
        let s = parse_status(&newer, "web1").unwrap();
        let r = &s.connections[0].peer_devices[0].replication_state;
        assert_eq!(r, &ReplicationState::Other("SyncSourceWithFlair".into()));
        assert_eq!(r.to_string(), "SyncSourceWithFlair");

        let e = parse_status(&SYNCING.replace("\"role\"", "\"rolle\""), "web1").unwrap_err();
        assert!(e.contains("missing field `role`"), "{e}");
        let e = parse_status(SYNCING, "db2").unwrap_err();
        assert!(e.contains("no resource \"db2\""), "{e}");
        let e = parse_status("# No currently configured DRBD found.", "web1").unwrap_err();
        assert!(e.contains("not drbdsetup 9 status JSON"), "{e}");
        assert!(parse_status("[\n]\n", "web1").is_err());
    }

    #[test]
    fn no_node_id_is_none() {
        let s = parse_status(
            &SYNCING.replace("\"node-id\": 0", "\"node-id\": -1"),
            "web1",
        );
        assert_eq!(s.unwrap().node_id, None);
    }
}

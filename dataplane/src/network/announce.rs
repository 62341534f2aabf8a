//! Sending the announcement: rounds of frames through an `AF_PACKET` socket, with QEMU's
//! backoff between rounds.
//!
//! The schedule is QEMU's (`announce-initial`, `-max`, `-rounds`, `-step`): the first round
//! goes out at once, and the pause after round `i` (from 0) is `initial + i * step`, capped
//! at `max`. With the defaults that is five rounds at 0, 50, 200, 450 and 800 ms. Repeating
//! matters because the first frames race the switchover: a switch may still be flushing the
//! old port, a neighbour may be inside its `locktime`, a frame may simply be lost.
//!
//! Each round sends a gratuitous ARP when the guest's IPv4 address is known, then a RARP.
//! The socket is `socket(AF_PACKET, SOCK_RAW, 0)`: raw, so skyferry writes the Ethernet
//! header with the guest's MAC as source (the kernel would otherwise put the host NIC's MAC
//! there), and protocol 0, so the kernel never queues received frames to it.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::net::if_::if_nametoindex;
use nix::sys::socket::{
    AddressFamily, LinkAddr, MsgFlags, SockFlag, SockType, SockaddrLike, bind, sendto, socket,
};
use serde::{Deserialize, Deserializer};

use super::frame::{self, ETHERTYPE_ARP, ETHERTYPE_RARP, MacAddr};
use crate::units::parse_duration;

/// QEMU's `announce-rounds` default.
pub const DEFAULT_ROUNDS: u32 = 5;
/// QEMU's `announce-initial` default.
pub const DEFAULT_INITIAL: Duration = Duration::from_millis(50);
/// QEMU's `announce-max` default.
pub const DEFAULT_MAX: Duration = Duration::from_millis(550);
/// QEMU's `announce-step` default.
pub const DEFAULT_STEP: Duration = Duration::from_millis(100);

/// Most rounds accepted (QEMU's limit too).
pub const MAX_ROUNDS: u32 = 1000;
/// Longest pause accepted between rounds (QEMU's limit for `announce-max`): an
/// announcement later than that no longer helps the switchover.
pub const MAX_PAUSE: Duration = Duration::from_secs(100);
/// How often a pause looks at the stop flag, which bounds how late a cancel takes effect.
const STOP_POLL: Duration = Duration::from_millis(10);
/// Linux's `IFNAMSIZ`, including the terminating NUL.
const IFNAMSIZ: usize = 16;

/// `[announce]`: where and how often the destination announces a guest it receives.
///
/// In TOML the durations are written like the rest of the config (`"50ms"`, `"1s"`):
///
/// ```toml
/// [announce]
/// interface = "br0"   # required: the bridge or uplink the guest's traffic uses
/// rounds = 5
/// initial = "50ms"
/// max = "550ms"
/// step = "100ms"
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    /// Interface the frames leave through: the bridge or uplink on the guest's network.
    pub interface: String,
    /// Rounds of frames; each round is one gratuitous ARP (if the IP is known) and one RARP.
    #[serde(default = "default_rounds")]
    pub rounds: u32,
    /// Pause after the first round.
    #[serde(default = "default_initial", deserialize_with = "duration")]
    pub initial: Duration,
    /// Longest pause between rounds.
    #[serde(default = "default_max", deserialize_with = "duration")]
    pub max: Duration,
    /// How much each pause grows over the one before.
    #[serde(default = "default_step", deserialize_with = "duration")]
    pub step: Duration,
}

fn default_rounds() -> u32 {
    DEFAULT_ROUNDS
}
fn default_initial() -> Duration {
    DEFAULT_INITIAL
}
fn default_max() -> Duration {
    DEFAULT_MAX
}
fn default_step() -> Duration {
    DEFAULT_STEP
}

/// A duration written the way operators write them elsewhere in the config.
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map_err(serde::de::Error::custom)
}

impl AnnounceConfig {
    /// Announcing on `interface` with QEMU's defaults.
    pub fn new(interface: impl Into<String>) -> Self {
        AnnounceConfig {
            interface: interface.into(),
            rounds: DEFAULT_ROUNDS,
            initial: DEFAULT_INITIAL,
            max: DEFAULT_MAX,
            step: DEFAULT_STEP,
        }
    }

    /// Checks the values; [`announce`] does too, so a config built in code is also checked.
    pub fn validate(&self) -> Result<(), AnnounceError> {
        let bad = |key: &'static str, message: String| Err(AnnounceError::Config { key, message });
        let name = &self.interface;
        // The kernel's own rule (dev_valid_name), so a bad name is caught here with a
        // message rather than later as "no such device".
        if name.is_empty() {
            return bad(
                "interface",
                "is required (the bridge or uplink, e.g. \"br0\")".into(),
            );
        }
        if name.len() >= IFNAMSIZ
            || name == "."
            || name == ".."
            || name
                .chars()
                .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
        {
            return bad(
                "interface",
                format!(
                    "{name:?} is not an interface name (at most {} bytes, no '/', ':' or spaces)",
                    IFNAMSIZ - 1
                ),
            );
        }
        if !(1..=MAX_ROUNDS).contains(&self.rounds) {
            return bad(
                "rounds",
                format!("{} must be between 1 and {MAX_ROUNDS}", self.rounds),
            );
        }
        if self.max > MAX_PAUSE {
            return bad(
                "max",
                format!("{:?} is longer than {MAX_PAUSE:?}", self.max),
            );
        }
        if self.initial > self.max {
            return bad(
                "initial",
                format!(
                    "{:?} is longer than max ({:?}): every pause would be max",
                    self.initial, self.max
                ),
            );
        }
        Ok(())
    }

    /// The pauses between rounds, in order (`rounds - 1` of them): the `i`th (from 0) is
    /// `initial + i * step`, capped at `max`, as QEMU's `qemu_announce_timer_step` counts.
    pub fn pauses(&self) -> Vec<Duration> {
        (0..self.rounds.saturating_sub(1))
            .map(|i| {
                self.step
                    .checked_mul(i)
                    .and_then(|grow| self.initial.checked_add(grow))
                    .map_or(self.max, |d| d.min(self.max))
            })
            .collect()
    }
}

/// Who is being announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestIdentity {
    /// The guest NIC's MAC: the Ethernet source of every frame.
    pub mac: MacAddr,
    /// The guest's IPv4 address, when known: then each round also carries a gratuitous ARP,
    /// which updates neighbours' ARP caches and not only switches' MAC tables.
    pub ip: Option<Ipv4Addr>,
}

impl GuestIdentity {
    /// A guest known by MAC only: RARP alone is sent.
    pub fn mac_only(mac: MacAddr) -> Self {
        GuestIdentity { mac, ip: None }
    }

    /// Refuses an IPv4 address no guest NIC can have (unspecified, loopback, multicast,
    /// broadcast).
    pub fn check(&self) -> Result<(), AnnounceError> {
        match self.ip {
            Some(ip)
                if ip.is_unspecified()
                    || ip.is_loopback()
                    || ip.is_multicast()
                    || ip.is_broadcast() =>
            {
                // 0.0.0.0 would turn the frame into an address probe (RFC 5227), and the
                // others are never one host's address.
                Err(AnnounceError::GuestIp { ip })
            }
            _ => Ok(()),
        }
    }
}

/// What [`announce`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AnnounceReport {
    /// Rounds sent in full.
    pub rounds: u32,
    /// Frames sent, over all rounds.
    pub frames: u32,
    /// The stop flag ended the announcement before its last round.
    pub cancelled: bool,
}

/// Why a guest could not be announced.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// a configuration value cannot be used
    #[error("announce.{key}: {message}")]
    Config {
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// the guest's IP address is not one a host can have
    #[error("cannot announce guest IP {ip}: not a unicast host address")]
    GuestIp {
        /// The address.
        ip: Ipv4Addr,
    },
    /// the interface does not exist (in this network namespace)
    #[error(
        "cannot announce on {interface}: no such network interface (check announce.interface; `ip link` lists them)"
    )]
    NoSuchInterface {
        /// The configured name.
        interface: String,
    },
    /// the process may not open a raw packet socket
    #[error(
        "cannot announce on {interface}: opening a raw packet socket was refused; skyferryd needs CAP_NET_RAW (run it as root, or grant it, e.g. systemd's AmbientCapabilities=CAP_NET_RAW)"
    )]
    NotPermitted {
        /// The configured name.
        interface: String,
    },
    /// the interface is administratively down
    #[error("cannot announce on {interface}: the interface is down (`ip link set {interface} up`)")]
    InterfaceDown {
        /// The configured name.
        interface: String,
    },
    /// any other failure of the socket
    #[error("cannot announce on {interface}: {op}: {source}")]
    Io {
        /// The configured name.
        interface: String,
        /// The call that failed.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Announces `guest` on `cfg.interface`: [`AnnounceConfig::rounds`] rounds, each a
/// gratuitous ARP (when the IP is known) and a RARP, with [`AnnounceConfig::pauses`] between
/// them.
///
/// It blocks for the whole schedule (about 0.8 s with the defaults), so the migration driver
/// runs it on its own thread and does not wait for it to go on with the switchover. `stop`
/// is read before each round and during each pause: raising it ends the announcement within
/// about 10 ms, with [`AnnounceReport::cancelled`] set. Frames already sent are not taken
/// back.
///
/// Needs `CAP_NET_RAW` in the network namespace of the calling thread, which is where
/// `cfg.interface` is looked up. The first error ends the announcement.
pub fn announce(
    cfg: &AnnounceConfig,
    guest: &GuestIdentity,
    stop: &AtomicBool,
) -> Result<AnnounceReport, AnnounceError> {
    cfg.validate()?;
    guest.check()?;
    let socket = PacketSocket::open(&cfg.interface)?;
    let mut frames = Vec::with_capacity(2);
    if let Some(ip) = guest.ip {
        frames.push((
            ETHERTYPE_ARP,
            frame::pad(frame::gratuitous_arp(guest.mac, ip)),
        ));
    }
    frames.push((ETHERTYPE_RARP, frame::pad(frame::rarp(guest.mac))));

    let mut report = AnnounceReport::default();
    let pauses = cfg.pauses();
    for round in 0..cfg.rounds {
        let cancelled = match round.checked_sub(1) {
            None => stop.load(Ordering::Relaxed),
            Some(before) => pause(pauses[before as usize], stop),
        };
        if cancelled {
            report.cancelled = true;
            break;
        }
        for (ethertype, bytes) in &frames {
            socket.send(bytes, *ethertype)?;
            report.frames += 1;
        }
        report.rounds += 1;
        tracing::debug!(
            interface = %cfg.interface,
            mac = %guest.mac,
            ip = ?guest.ip,
            round = report.rounds,
            "announced guest"
        );
    }
    Ok(report)
}

/// Sleeps for `d` unless `stop` is raised first; true if it was.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return true;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::sleep(left.min(STOP_POLL));
    }
}

/// A send-only `AF_PACKET` socket bound to one interface.
#[derive(Debug)]
struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
    interface: String,
}

impl PacketSocket {
    fn open(interface: &str) -> Result<Self, AnnounceError> {
        let io = |op, e: Errno| AnnounceError::Io {
            interface: interface.to_string(),
            op,
            source: e.into(),
        };
        // Resolve the name first: it needs no privilege, so a wrong name is reported as
        // such even when the capability is missing too.
        let ifindex = match if_nametoindex(interface) {
            Ok(i) => i32::try_from(i).map_err(|_| io("if_nametoindex", Errno::ERANGE))?,
            Err(Errno::ENODEV) => {
                return Err(AnnounceError::NoSuchInterface {
                    interface: interface.to_string(),
                });
            }
            Err(e) => return Err(io("if_nametoindex", e)),
        };
        let fd = socket(
            AddressFamily::Packet,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map_err(|e| match e {
            Errno::EPERM | Errno::EACCES => AnnounceError::NotPermitted {
                interface: interface.to_string(),
            },
            e => io("socket(AF_PACKET, SOCK_RAW)", e),
        })?;
        // Protocol 0 in the bind as in the socket: the socket is tied to the interface but
        // receives nothing.
        bind(fd.as_raw_fd(), &link_addr(ifindex, 0)).map_err(|e| match e {
            Errno::ENODEV => AnnounceError::NoSuchInterface {
                interface: interface.to_string(),
            },
            e => io("bind", e),
        })?;
        Ok(PacketSocket {
            fd,
            ifindex,
            interface: interface.to_string(),
        })
    }

    /// Sends one whole Ethernet frame whose ethertype is `ethertype`.
    fn send(&self, bytes: &[u8], ethertype: u16) -> Result<(), AnnounceError> {
        // The address repeats the ethertype because the kernel takes the packet's protocol
        // (skb->protocol, which qdiscs, taps and drivers read) from it. Recent kernels parse
        // it out of the frame when it is 0, older ones (before 5.1) leave it 0.
        let sent = sendto(
            self.fd.as_raw_fd(),
            bytes,
            &link_addr(self.ifindex, ethertype),
            MsgFlags::empty(),
        )
        .map_err(|e| match e {
            Errno::ENETDOWN => AnnounceError::InterfaceDown {
                interface: self.interface.clone(),
            },
            // The interface went away after the socket was bound.
            Errno::ENXIO | Errno::ENODEV => AnnounceError::NoSuchInterface {
                interface: self.interface.clone(),
            },
            e => AnnounceError::Io {
                interface: self.interface.clone(),
                op: "send",
                source: e.into(),
            },
        })?;
        // A packet socket sends a frame whole or not at all; anything else is a kernel bug
        // worth a loud error rather than a truncated frame on the wire.
        if sent != bytes.len() {
            return Err(AnnounceError::Io {
                interface: self.interface.clone(),
                op: "send",
                source: std::io::Error::other(format!("sent {sent} of {} bytes", bytes.len())),
            });
        }
        Ok(())
    }
}

/// The link-layer address of `ifindex` for frames of `ethertype` (0: none), with the
/// broadcast MAC as destination (for SOCK_RAW the kernel reads the destination from the
/// frame; the address only has to be well formed).
fn link_addr(ifindex: i32, ethertype: u16) -> LinkAddr {
    let sll = libc::sockaddr_ll {
        sll_family: libc::sa_family_t::try_from(libc::AF_PACKET)
            .expect("AF_PACKET fits in sa_family_t"),
        sll_protocol: ethertype.to_be(),
        sll_ifindex: ifindex,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0],
    };
    let len = libc::socklen_t::try_from(size_of::<libc::sockaddr_ll>())
        .expect("sockaddr_ll's size fits in socklen_t");
    // SAFETY: `sll` is a live, fully initialised `sockaddr_ll` on this stack frame and `len`
    // is exactly its size, so `from_raw` reads only initialised memory inside it (and copies
    // it out before `sll` goes away). nix offers no safe constructor for `LinkAddr`.
    unsafe { LinkAddr::from_raw((&raw const sll).cast(), Some(len)) }
        .expect("an AF_PACKET sockaddr_ll of the right length is a LinkAddr")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg(rounds: u32, initial: u64, max: u64, step: u64) -> AnnounceConfig {
        AnnounceConfig {
            rounds,
            initial: ms(initial),
            max: ms(max),
            step: ms(step),
            ..AnnounceConfig::new("eth0")
        }
    }

    #[test]
    fn qemu_default_schedule() {
        let c = AnnounceConfig::new("eth0");
        assert_eq!(c.pauses(), [ms(50), ms(150), ms(250), ms(350)]);
        c.validate().unwrap();
    }

    #[test]
    fn pauses_are_capped_at_max() {
        assert_eq!(
            cfg(8, 50, 300, 100).pauses(),
            [ms(50), ms(150), ms(250), ms(300), ms(300), ms(300), ms(300)]
        );
        // No step: a steady beat.
        assert_eq!(cfg(3, 20, 20, 0).pauses(), [ms(20), ms(20)]);
        // One round: nothing to wait for.
        assert!(cfg(1, 50, 550, 100).pauses().is_empty());
    }

    #[test]
    fn pauses_do_not_overflow() {
        let c = AnnounceConfig {
            step: Duration::MAX,
            ..cfg(MAX_ROUNDS, 50, 550, 0)
        };
        let p = c.pauses();
        assert_eq!(p.len(), 999);
        assert_eq!(p[0], ms(50));
        assert!(p[1..].iter().all(|&d| d == ms(550)));
    }

    #[test]
    fn config_from_toml_with_defaults() {
        let c: AnnounceConfig = toml::from_str("interface = \"br0\"").unwrap();
        assert_eq!(c, AnnounceConfig::new("br0"));
        let c: AnnounceConfig = toml::from_str(
            "interface = \"eth1\"\nrounds = 3\ninitial = \"10ms\"\nmax = \"1s\"\nstep = \"250ms\"",
        )
        .unwrap();
        assert_eq!(c, cfg(3, 10, 1000, 250).with_interface("eth1"));
    }

    #[test]
    fn config_toml_errors() {
        let e = toml::from_str::<AnnounceConfig>("rounds = 3").unwrap_err();
        assert!(e.to_string().contains("interface"), "{e}");
        let e =
            toml::from_str::<AnnounceConfig>("interface = \"br0\"\ninitial = \"50\"").unwrap_err();
        assert!(e.to_string().contains("50"), "{e}");
        let e = toml::from_str::<AnnounceConfig>("interface = \"br0\"\nround = 3").unwrap_err();
        assert!(e.to_string().contains("round"), "{e}");
    }

    #[test]
    fn config_validation() {
        let key = |c: AnnounceConfig| match c.validate() {
            Err(AnnounceError::Config { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(key(AnnounceConfig::new("")), "interface");
        assert_eq!(key(AnnounceConfig::new("a-very-long-name0")), "interface");
        assert_eq!(key(AnnounceConfig::new("eth0:1")), "interface");
        assert_eq!(key(AnnounceConfig::new("../eth0")), "interface");
        assert_eq!(key(cfg(0, 50, 550, 100)), "rounds");
        assert_eq!(key(cfg(MAX_ROUNDS + 1, 50, 550, 100)), "rounds");
        assert_eq!(key(cfg(5, 600, 550, 100)), "initial");
        assert_eq!(key(cfg(5, 50, 200_000, 100)), "max");
        AnnounceConfig::new("a-long-name-0").validate().unwrap();
        cfg(MAX_ROUNDS, 0, 0, 0).validate().unwrap();
        let e = AnnounceConfig::new("").validate().unwrap_err().to_string();
        assert!(e.starts_with("announce.interface: "), "{e}");
    }

    #[test]
    fn guest_ip_must_be_a_host_address() {
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        for ip in [
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::LOCALHOST,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::new(224, 0, 0, 1),
        ] {
            let g = GuestIdentity { mac, ip: Some(ip) };
            assert!(
                matches!(g.check(), Err(AnnounceError::GuestIp { .. })),
                "{ip}"
            );
        }
        GuestIdentity::mac_only(mac).check().unwrap();
        GuestIdentity {
            mac,
            ip: Some(Ipv4Addr::new(192, 0, 2, 10)),
        }
        .check()
        .unwrap();
    }

    #[test]
    fn no_such_interface_is_named() {
        // Resolving the name needs no privilege, so this runs anywhere.
        let c = AnnounceConfig::new(format!("sfno{}", std::process::id() % 100_000));
        let g = GuestIdentity::mac_only("52:54:00:12:34:56".parse().unwrap());
        let e = announce(&c, &g, &AtomicBool::new(false)).unwrap_err();
        assert!(
            matches!(&e, AnnounceError::NoSuchInterface { interface } if *interface == c.interface),
            "{e:?}"
        );
        assert!(e.to_string().contains(&c.interface), "{e}");
    }

    #[test]
    fn pause_stops_early() {
        let stop = AtomicBool::new(true);
        let t = Instant::now();
        assert!(pause(Duration::from_secs(10), &stop));
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(!pause(ms(1), &AtomicBool::new(false)));
    }

    impl AnnounceConfig {
        fn with_interface(self, interface: &str) -> Self {
            AnnounceConfig {
                interface: interface.into(),
                ..self
            }
        }
    }
}

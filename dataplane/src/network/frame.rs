//! The announcement frames, built without I/O: a gratuitous ARP request and a RARP request
//! (RFC 826, RFC 903, RFC 5227 section 3), both 42 bytes of Ethernet + ARP header.
//!
//! ```text
//!  0      6      12     14    16    18   19   20    22     28     32     38    42
//! +------+------+------+-----+-----+----+----+-----+------+------+------+------+
//! | dst  | src  | type |htype|ptype|hlen|plen| op  | sha  | spa  | tha  | tpa  |
//! +------+------+------+-----+-----+----+----+-----+------+------+------+------+
//!   Ethernet header      ARP header (same layout for RARP)
//! ```
//!
//! |            | gratuitous ARP          | RARP (as QEMU's `qemu_announce_self`) |
//! |------------|-------------------------|---------------------------------------|
//! | dst        | ff:ff:ff:ff:ff:ff       | ff:ff:ff:ff:ff:ff                     |
//! | src, sha   | guest MAC               | guest MAC                             |
//! | type       | 0x0806 (ARP)            | 0x8035 (RARP)                         |
//! | op         | 1 (request)             | 3 (reverse request)                   |
//! | spa        | guest IP                | 0.0.0.0                               |
//! | tha        | 00:00:00:00:00:00       | guest MAC                             |
//! | tpa        | guest IP                | 0.0.0.0                               |
//!
//! The gratuitous ARP is a *request* with sender IP = target IP: RFC 5227 recommends the
//! request form, and Linux treats a request with `spa == tpa` as gratuitous and lets it
//! override a neighbour entry at once, while a gratuitous *reply* must also carry
//! `tha == sha`. The RARP carries no IP at all; it exists so that switches learn the MAC's new
//! port even when skyferry does not know the guest's address.
//!
//! 42 bytes is below Ethernet's 60-byte minimum (64 with the FCS). An `AF_PACKET` raw socket
//! sends exactly the bytes it is given (it pads nothing); many NIC drivers pad short frames,
//! but software paths such as veth deliver the 42 bytes as they are, and a switch may drop a
//! runt. So the sender pads with [`pad`], as QEMU does.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Ethertype of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Ethertype of RARP.
pub const ETHERTYPE_RARP: u16 = 0x8035;
/// ARP hardware type: Ethernet.
pub const HTYPE_ETHERNET: u16 = 1;
/// ARP protocol type: IPv4 (its ethertype).
pub const PTYPE_IPV4: u16 = 0x0800;
/// ARP opcode: request.
pub const OP_REQUEST: u16 = 1;
/// RARP opcode: reverse request.
pub const OP_REVERSE_REQUEST: u16 = 3;
/// Ethernet broadcast.
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// Bytes of an ARP or RARP frame over Ethernet, without padding.
pub const ARP_FRAME_LEN: usize = size_of::<ArpFrame>();
/// Smallest Ethernet frame without the FCS (the kernel's `ETH_ZLEN`).
pub const ETH_MIN_LEN: usize = 60;

const _: () = assert!(ARP_FRAME_LEN == 42);

/// A MAC address that can name a guest's NIC: unicast and not all zeros.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr([u8; 6]);

/// A MAC address that cannot be a guest's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// the text is not a MAC address
    #[error(
        "{input:?} is not a MAC address: write six two-digit hex bytes separated by ':', like 52:54:00:12:34:56"
    )]
    Syntax {
        /// What was given.
        input: String,
    },
    /// the group bit is set, so it names a multicast group (or broadcast), not a NIC
    #[error("{mac} is a multicast address (lowest bit of the first byte set), not a NIC's")]
    Multicast {
        /// The address.
        mac: String,
    },
    /// all zeros is no NIC's address
    #[error("00:00:00:00:00:00 is not a NIC's address")]
    Zero,
}

impl MacAddr {
    /// Checks that `octets` can be a NIC's address.
    pub fn new(octets: [u8; 6]) -> Result<Self, MacError> {
        if octets == [0; 6] {
            return Err(MacError::Zero);
        }
        if octets[0] & 1 != 0 {
            return Err(MacError::Multicast {
                mac: MacAddr(octets).to_string(),
            });
        }
        Ok(MacAddr(octets))
    }

    /// The six bytes, in wire order.
    pub const fn octets(self) -> [u8; 6] {
        self.0
    }
}

impl FromStr for MacAddr {
    type Err = MacError;

    /// `52:54:00:12:34:56`, either case; `-` is accepted as the separator too (Windows
    /// writes MACs that way), but not a mix, and every byte has two digits.
    fn from_str(input: &str) -> Result<Self, MacError> {
        let syntax = || MacError::Syntax {
            input: input.to_string(),
        };
        let sep = if input.contains(':') { ':' } else { '-' };
        let mut octets = [0u8; 6];
        let mut parts = input.split(sep);
        for o in &mut octets {
            let part = parts.next().ok_or_else(syntax)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(syntax());
            }
            *o = u8::from_str_radix(part, 16).map_err(|_| syntax())?;
        }
        if parts.next().is_some() {
            return Err(syntax());
        }
        MacAddr::new(octets)
    }
}

impl fmt::Display for MacAddr {
    /// Lowercase with colons, as `ip link` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// An Ethernet frame carrying an ARP or RARP packet for IPv4 over Ethernet, big-endian on the
/// wire (Linux: `struct ethhdr` + `struct arphdr` + the Ethernet/IPv4 address fields).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned,
)]
#[repr(C)]
pub struct ArpFrame {
    /// Ethernet destination.
    pub dst: [u8; 6],
    /// Ethernet source.
    pub src: [u8; 6],
    /// [`ETHERTYPE_ARP`] or [`ETHERTYPE_RARP`].
    pub ethertype: U16,
    /// [`HTYPE_ETHERNET`].
    pub htype: U16,
    /// [`PTYPE_IPV4`].
    pub ptype: U16,
    /// Hardware address length: 6.
    pub hlen: u8,
    /// Protocol address length: 4.
    pub plen: u8,
    /// [`OP_REQUEST`], [`OP_REVERSE_REQUEST`], ...
    pub op: U16,
    /// Sender hardware address.
    pub sha: [u8; 6],
    /// Sender protocol address.
    pub spa: [u8; 4],
    /// Target hardware address.
    pub tha: [u8; 6],
    /// Target protocol address.
    pub tpa: [u8; 4],
}

impl ArpFrame {
    /// Reads the first [`ARP_FRAME_LEN`] bytes of a received frame (padding after them is
    /// ignored); `None` if it is shorter. Fields are not checked.
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        Self::read_from_prefix(bytes).ok().map(|(f, _)| f)
    }

    /// A broadcast frame from `mac` with the Ethernet/IPv4 constants filled in.
    fn broadcast(mac: MacAddr, ethertype: u16, op: u16) -> Self {
        ArpFrame {
            dst: BROADCAST,
            src: mac.octets(),
            ethertype: U16::new(ethertype),
            htype: U16::new(HTYPE_ETHERNET),
            ptype: U16::new(PTYPE_IPV4),
            hlen: 6,
            plen: 4,
            op: U16::new(op),
            sha: mac.octets(),
            spa: [0; 4],
            tha: [0; 6],
            tpa: [0; 4],
        }
    }
}

/// A gratuitous ARP request announcing that `ip` is at `mac`, broadcast from `mac`.
pub fn gratuitous_arp(mac: MacAddr, ip: Ipv4Addr) -> [u8; ARP_FRAME_LEN] {
    let frame = ArpFrame {
        spa: ip.octets(),
        tpa: ip.octets(),
        ..ArpFrame::broadcast(mac, ETHERTYPE_ARP, OP_REQUEST)
    };
    zerocopy::transmute!(frame)
}

/// A RARP reverse request for `mac` (the frame QEMU sends after a migration), broadcast from
/// `mac`. The target hardware address is the MAC itself: RARP asks "what is my IP?".
pub fn rarp(mac: MacAddr) -> [u8; ARP_FRAME_LEN] {
    let frame = ArpFrame {
        tha: mac.octets(),
        ..ArpFrame::broadcast(mac, ETHERTYPE_RARP, OP_REVERSE_REQUEST)
    };
    zerocopy::transmute!(frame)
}

/// `frame` followed by zeros up to Ethernet's minimum length.
pub fn pad(frame: [u8; ARP_FRAME_LEN]) -> [u8; ETH_MIN_LEN] {
    let mut out = [0; ETH_MIN_LEN];
    out[..ARP_FRAME_LEN].copy_from_slice(&frame);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_mac() -> MacAddr {
        "52:54:00:12:34:56".parse().unwrap()
    }

    #[test]
    fn gratuitous_arp_bytes() {
        let f = gratuitous_arp(guest_mac(), Ipv4Addr::new(192, 0, 2, 10));
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst: broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src: guest
            0x08, 0x06,                         // ARP
            0x00, 0x01,                         // Ethernet
            0x08, 0x00,                         // IPv4
            6, 4,                               // address lengths
            0x00, 0x01,                         // request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // sha: guest
            192, 0, 2, 10,                      // spa: guest
            0, 0, 0, 0, 0, 0,                   // tha: unknown (RFC 5227)
            192, 0, 2, 10,                      // tpa: guest again, which makes it gratuitous
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn rarp_bytes() {
        let f = rarp(guest_mac());
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst: broadcast
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // src: guest
            0x80, 0x35,                         // RARP
            0x00, 0x01,                         // Ethernet
            0x08, 0x00,                         // IPv4
            6, 4,                               // address lengths
            0x00, 0x03,                         // reverse request
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // sha: guest
            0, 0, 0, 0,                         // spa: none
            0x52, 0x54, 0x00, 0x12, 0x34, 0x56, // tha: guest
            0, 0, 0, 0,                         // tpa: none
        ];
        assert_eq!(f, want);
    }

    #[test]
    fn padded_to_ethernet_minimum() {
        let f = rarp(guest_mac());
        let p = pad(f);
        assert_eq!(p.len(), 60);
        assert_eq!(&p[..42], &f[..]);
        assert!(p[42..].iter().all(|&b| b == 0));
    }

    #[test]
    fn parse_reads_back_what_was_built() {
        let ip = Ipv4Addr::new(10, 1, 2, 3);
        let p = pad(gratuitous_arp(guest_mac(), ip));
        let f = ArpFrame::parse(&p).unwrap();
        assert_eq!(f.ethertype.get(), ETHERTYPE_ARP);
        assert_eq!(f.op.get(), OP_REQUEST);
        assert_eq!(f.sha, guest_mac().octets());
        assert_eq!(Ipv4Addr::from(f.spa), ip);
        assert_eq!(Ipv4Addr::from(f.tpa), ip);
        assert!(ArpFrame::parse(&p[..41]).is_none());
    }

    #[test]
    fn mac_parses_and_formats() {
        let m: MacAddr = "52:54:00:AB:cd:EF".parse().unwrap();
        assert_eq!(m.octets(), [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        assert_eq!(m.to_string().parse::<MacAddr>().unwrap(), m);
        assert_eq!("52-54-00-ab-cd-ef".parse::<MacAddr>().unwrap(), m);
        // Locally administered unicast (bit 1 of the first byte) is a fine guest MAC.
        assert!("02:00:00:00:00:01".parse::<MacAddr>().is_ok());
    }

    #[test]
    fn mac_syntax_errors() {
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:00:12:34:5",
            "52:54:0:12:34:56",
            "52:54:00:12:34:5g",
            "52:54:00-12:34:56",
            "525400123456",
            "52:54:00:12:34:56:",
            " 52:54:00:12:34:56",
            "+2:54:00:12:34:56",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(matches!(e, MacError::Syntax { .. }), "{bad:?}: {e:?}");
            assert!(e.to_string().contains("52:54:00:12:34:56"), "{e}");
        }
    }

    #[test]
    fn mac_rejects_multicast_and_zero() {
        for bad in [
            "01:00:5e:00:00:01",
            "33:33:00:00:00:01",
            "ff:ff:ff:ff:ff:ff",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(matches!(e, MacError::Multicast { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains(bad), "{e}");
        }
        assert_eq!(
            "00:00:00:00:00:00".parse::<MacAddr>().unwrap_err(),
            MacError::Zero
        );
        assert_eq!(MacAddr::new([0; 6]).unwrap_err(), MacError::Zero);
        assert!(MacAddr::new([1, 0, 0, 0, 0, 0]).is_err());
    }
}

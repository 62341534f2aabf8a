//! Network switchover: announcing a migrated guest at its new location (the CloudNet paper,
//! section IV-A3, "Maintaining Network Connections").
//!
//! When the guest pauses for the final iteration, the destination host broadcasts frames
//! from the guest's MAC on the guest's network, so that Ethernet switches move the MAC to the
//! destination's port and neighbours point the guest's IP at it. CloudNet sends them then,
//! rather than waiting for the guest to speak once it runs, so they propagate while the last
//! pages are still in flight. Two kinds go out ([`frame`]):
//!
//! - a gratuitous ARP request (sender IP = target IP = the guest's IP), when the guest's IPv4
//!   address is known: it updates switches and the ARP caches of hosts and routers;
//! - a RARP request, as QEMU's `qemu_announce_self` sends, which needs only the MAC: it
//!   updates switches.
//!
//! [`announce`] repeats them in rounds with QEMU's backoff, through an `AF_PACKET` raw socket
//! on the configured interface; it needs `CAP_NET_RAW`, blocks for the schedule, and stops
//! early when asked, so the migration driver runs it on its own thread.
//!
//! Neighbours and `locktime`: Linux ignores a new MAC for an ARP cache entry changed less
//! than `locktime` ago (default 1 s; it keeps the first of several answers). Since 4.13 it
//! makes an exception for a gratuitous ARP: a request with sender IP = target IP, where the
//! receiver classifies that IP as an ordinary unicast address (not one of its own, not a
//! broadcast), which needs only that it has some IPv4 address of its own. A neighbour on the
//! guest's LAN has one, so the first round already moves it; older kernels, and frames that
//! are not gratuitous, wait out `locktime`, which later rounds do.

pub mod announce;
pub mod frame;

pub use announce::{AnnounceConfig, AnnounceError, AnnounceReport, GuestIdentity, announce};
pub use frame::{MacAddr, MacError};

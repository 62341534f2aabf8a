//! DRBD 9, steered through its own tools, `drbdadm` and `drbdsetup` (CloudNet, sections
//! IV-A1 and V-B).
//!
//! - [`resource`]: a guest's disk configuration ([`DrbdDisk`]), checked, and the resource
//!   file rendered from it, written atomically (`/etc/drbd.d/skyferry-<resource>.res` on a
//!   real host).
//! - [`steer`]: the migration's disk sequence as a state machine ([`Steer`]), one method per
//!   step, each running drbdadm and then checking DRBD's state.
//! - [`drbdadm`]: running the tools with a time limit and their output captured.
//! - [`status`], [`show`]: reading `drbdsetup status --json` and `drbdsetup show`.
//!
//! # How drbdadm drives drbdsetup
//!
//! Found with drbd-utils 9.22 (Debian 12), which is what this code is written against:
//!
//! - drbdadm reads the configuration (`-c FILE`, else `/etc/drbd.conf`), finds this host's
//!   `on NAME` section by `uname -n`, and runs one drbdsetup command per change:
//!   `drbdadm net-options --protocol=C web1` runs
//!   `drbdsetup net-options web1 1 --_name=dallas-3 --after-sb-2pri=disconnect
//!   --after-sb-1pri=discard-secondary --after-sb-0pri=discard-zero-changes --protocol=C`:
//!   the peer's node id and name, and the whole `net` section of the file, with the command
//!   line's options overriding it (the file's `protocol A` is not sent when the command
//!   says C). So every change re-applies the file's net section, and the file has to be
//!   the same on both hosts. `drbdadm primary web1` runs `drbdsetup primary web1`,
//!   `secondary` likewise. Options are passed through unchecked; drbdsetup checks them.
//! - It runs the drbdsetup in its own directory (`/usr/sbin/drbdsetup` for
//!   `/usr/sbin/drbdadm`, plain `drbdsetup` when itself found through `PATH`).
//! - `--drbdsetup=PROGRAM` (and `--drbdmeta=PROGRAM`) make drbdadm run another program in
//!   its place, with the same arguments; none of the sequence's commands touches drbdmeta.
//!   drbdadm exits with the drbdsetup's exit status, after printing
//!   `Command '... ' terminated with exit code N` on stderr.
//! - `-d` (dry run) prints those drbdsetup command lines on stdout, one per line, naming
//!   the program as given (`drbdsetup`, or the `--drbdsetup=` path), and runs none of the
//!   sequence's commands. It is not entirely inert: `drbdadm -d adjust` still runs
//!   `drbdsetup show` to compute what to change.
//! - Without `-d`, commands that touch the network (`net-options`, `up`, `adjust`) first
//!   check that this host's address in the file is configured on one of its interfaces,
//!   and refuse with exit status 10 otherwise (`IP 10.0.0.1 not found on this host`). The
//!   dry run and `dump` only warn.
//! - `drbdadm status` takes no `--json`; the state is read with `drbdsetup status RESOURCE
//!   --json`. The protocol and `allow-two-primaries` are not in the status at all; they are
//!   read from `drbdsetup show RESOURCE --show-defaults` ([`show`] says why not `--json`).
//! - Without a DRBD kernel module drbdadm still works from the file and calls drbdsetup as
//!   usual; its version probe runs `modinfo` through the shell, which prints
//!   `sh: 1: modinfo: not found` on stderr on hosts without kmod. That line is noise.

pub mod drbdadm;
pub mod error;
pub mod resource;
pub mod show;
pub mod status;
pub mod steer;

pub use drbdadm::Drbdadm;
pub use error::{DrbdError, Step};
pub use resource::{DEFAULT_RESOURCE_DIR, DrbdDisk, DrbdNode, InvalidDisk};
pub use steer::{DiskPhase, DiskStatus, RollBackReport, Side, Steer, SteerTiming};

/// This host's name as drbdadm sees it (`uname -n`), to find its node in a [`DrbdDisk`].
pub fn local_hostname() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string())
}

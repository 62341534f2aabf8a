//! The `kvm` backend: a micro-VM that skyferryd hosts itself (docs/backends.md).
//!
//! One VM per guest, through rust-vmm's `kvm-ioctls`: guest RAM is a memfd mapping
//! registered as one memory slot, the source's dirty bitmap is KVM's dirty log (fetched and
//! cleared with `KVM_GET_DIRTY_LOG`), pause stops the one vCPU outside `KVM_RUN`, and the
//! state blob is the vCPU's state. The guest is the project's own test program
//! (`guest.S`): it writes memory in the synthetic models' patterns, in a form it can check,
//! and after a migration sweeps every page and reports what it found.
//!
//! - `layout.rs`: where everything sits in guest memory; shared with the assembler.
//! - `vm.rs`: the VM, its RAM and the vCPU thread (pause, resume, kick).
//! - `state.rs`: the versioned state blob.
//! - `program.rs`: the program's binary, boot, write models and port protocol.
//! - `pages.rs`: the page format and the host's copy of the guest's checks.
//! - `source.rs`, `target.rs`: the two ends.

pub mod layout;
pub mod pages;
pub mod program;
pub mod source;
pub mod state;
pub mod target;
pub mod vm;

pub use source::{KvmGuest, KvmGuestConfig};
pub use target::{ArrivalCheck, CORRUPT_VAR, KvmTarget, KvmTargetOptions};
pub use vm::available;

use super::GuestError;

/// The backend's name (in logs, status and the handshake).
pub const BACKEND: &str = "kvm";

fn err(op: &'static str, message: impl Into<String>) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message: message.into(),
    }
}

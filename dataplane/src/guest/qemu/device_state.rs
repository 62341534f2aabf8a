//! QEMU's device state, moved by QEMU's own migration with RAM left out.
//!
//! With the capability `x-ignore-shared` on both QEMUs, a migration skips RAM blocks backed
//! by shared files: what remains is device state and small private RAM blocks (ROMs), a few
//! hundred KiB. The source QEMU migrates into one end of a socket pair whose other end
//! skyferryd reads; the bytes become the migration's state blob and travel sealed on the
//! control connection with the final iteration (no extra WAN round trip, no second port, and
//! the same encryption as the pages). At the destination skyferryd feeds them to the waiting
//! QEMU the same way. Descriptors are passed over QMP (`getfd`), so no socket path is shared.
//!
//! The blob is `SKYFQEMU`, a version, the RAM size in bytes (checked at the destination),
//! then QEMU's stream unchanged.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::json;

use super::qmp::{Qmp, QmpError};
use super::{BACKEND, qmp_err};
use crate::guest::GuestError;

const MAGIC: &[u8; 8] = b"SKYFQEMU";
const VERSION: u16 = 1;
const HEADER: usize = 8 + 2 + 8;
/// Name under which the socket's descriptor is handed to QEMU.
const FD_NAME: &str = "skyferry-device-state";
/// Largest device state accepted (QEMU's is a few hundred KiB without RAM; a guest with
/// large private ROMs or video memory has a few MiB).
pub const MAX_STATE: usize = 256 << 20;

fn err(op: &'static str, message: impl Into<String>) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message: message.into(),
    }
}

/// Migrates the paused source QEMU's device state into a blob. QEMU ends in `postmigrate`;
/// `cont` still resumes it there if the migration fails later.
pub fn save(qmp: &mut Qmp, ram_bytes: u64, within: Duration) -> Result<Vec<u8>, GuestError> {
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| err("save device state", format!("socket pair: {e}")))?;
    qmp.set_capabilities(&[("x-ignore-shared", true)])
        .map_err(qmp_err("enable x-ignore-shared"))?;
    qmp.send_fd(FD_NAME, theirs.as_fd())
        .map_err(qmp_err("pass the state socket"))?;
    drop(theirs); // QEMU holds its copy; EOF comes when QEMU closes it
    ours.set_read_timeout(Some(within))
        .map_err(|e| err("save device state", e.to_string()))?;
    let reader = std::thread::Builder::new()
        .name("sf-qemu-state".into())
        .spawn(move || {
            let mut blob = Vec::with_capacity(1 << 20);
            blob.extend_from_slice(MAGIC);
            blob.extend_from_slice(&VERSION.to_le_bytes());
            blob.extend_from_slice(&ram_bytes.to_le_bytes());
            (&mut ours)
                .take(MAX_STATE as u64 + 1)
                .read_to_end(&mut blob)
                .map(|_| blob)
        })
        .map_err(|e| err("save device state", e.to_string()))?;
    let started = qmp.execute("migrate", Some(json!({ "uri": format!("fd:{FD_NAME}") })));
    let finished = started
        .and_then(|_| qmp.wait_migration(within))
        .map_err(qmp_err("migrate the device state"));
    // Leave the capability as we found it: a later migration by QEMU's own means with it on
    // would leave the RAM behind.
    let reset = |qmp: &mut Qmp| {
        if let Err(e) = qmp.set_capabilities(&[("x-ignore-shared", false)]) {
            tracing::warn!("could not turn x-ignore-shared off again: {e}");
        }
    };
    if let Err(e) = finished {
        // The reader sees EOF when QEMU drops the descriptor on failure; don't wait for it.
        let _ = qmp.execute("migrate_cancel", None);
        reset(qmp);
        return Err(e);
    }
    reset(qmp);
    let blob = reader
        .join()
        .map_err(|_| err("save device state", "reader thread panicked"))?
        .map_err(|e| err("save device state", format!("reading QEMU's stream: {e}")))?;
    if blob.len() > HEADER + MAX_STATE {
        return Err(err(
            "save device state",
            format!("QEMU's device state exceeds {} MiB", MAX_STATE >> 20),
        ));
    }
    Ok(blob)
}

/// The RAM size a blob was taken with, after checking its header.
pub fn ram_bytes(blob: &[u8]) -> Result<u64, GuestError> {
    if blob.len() < HEADER || &blob[..8] != MAGIC {
        return Err(GuestError::BadState(
            "not a QEMU device state from skyferry".into(),
        ));
    }
    let version = u16::from_le_bytes([blob[8], blob[9]]);
    if version != VERSION {
        return Err(GuestError::BadState(format!(
            "QEMU device state version {version}, this skyferryd reads {VERSION}"
        )));
    }
    Ok(u64::from_le_bytes(
        blob[10..HEADER].try_into().expect("8 bytes"),
    ))
}

/// Bytes of QEMU's own stream in a blob.
pub fn stream_len(blob: &[u8]) -> usize {
    blob.len().saturating_sub(HEADER)
}

/// Feeds a blob to the destination QEMU, which waits with `-incoming defer`, and waits until
/// it has loaded it. QEMU stays paused: `stop` during an incoming migration clears its
/// autostart (what `-S` does), and the state is checked after the load.
pub fn load(qmp: &mut Qmp, blob: &[u8], within: Duration) -> Result<(), GuestError> {
    ram_bytes(blob)?;
    let status = qmp
        .status()
        .map_err(qmp_err("query the destination QEMU"))?;
    if status.status != "inmigrate" {
        return Err(err(
            "load device state",
            format!(
                "the destination QEMU is {:?}, not waiting for a migration: start it with \
                 -incoming defer",
                status.status
            ),
        ));
    }
    qmp.execute("stop", None)
        .map_err(qmp_err("keep the destination paused after the load"))?;
    let changed = super::migration_settings::apply(qmp)?;
    let loaded = load_with(qmp, blob, within);
    super::migration_settings::restore(qmp, &changed);
    loaded
}

/// [`load`] once the settings are right.
fn load_with(qmp: &mut Qmp, blob: &[u8], within: Duration) -> Result<(), GuestError> {
    qmp.set_capabilities(&[("x-ignore-shared", true)])
        .map_err(qmp_err("enable x-ignore-shared"))?;
    let (mut ours, theirs) =
        UnixStream::pair().map_err(|e| err("load device state", format!("socket pair: {e}")))?;
    qmp.send_fd(FD_NAME, theirs.as_fd())
        .map_err(qmp_err("pass the state socket"))?;
    drop(theirs);
    // QEMU exits when a load fails unless told otherwise (QEMU 9.1+): keep it, unresumed, for
    // the operator to look at. Older QEMUs refuse the argument; they get the plain command.
    let uri = format!("fd:{FD_NAME}");
    let keep = qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": uri, "exit-on-error": false })),
    );
    match keep {
        Ok(_) => {}
        Err(QmpError::Refused { desc, .. }) if desc.contains("exit-on-error") => {
            qmp.execute("migrate-incoming", Some(json!({ "uri": uri })))
                .map_err(qmp_err("start the incoming migration"))?;
        }
        Err(e) => return Err(qmp_err("start the incoming migration")(e)),
    }
    // QEMU reads as it loads; if it fails midway it stops reading, and the write times out.
    ours.set_write_timeout(Some(within))
        .map_err(|e| err("load device state", e.to_string()))?;
    let wrote = ours.write_all(&blob[HEADER..]);
    let _ = ours.shutdown(std::net::Shutdown::Write);
    let loaded = qmp
        .wait_migration(within)
        .map_err(qmp_err("load the device state"));
    match (wrote, loaded) {
        (_, Err(e)) => return Err(e),
        (Err(e), Ok(_)) => return Err(err("load device state", format!("writing: {e}"))),
        (Ok(()), Ok(_)) => {}
    }
    // As at the source: QEMU's own next migration of this guest must carry its RAM.
    qmp.set_capabilities(&[("x-ignore-shared", false)])
        .map_err(qmp_err("turn x-ignore-shared off after the load"))?;
    let after = qmp
        .status()
        .map_err(qmp_err("query the destination QEMU"))?;
    if after.running {
        // Never two running copies: stop it again and fail the migration.
        let _ = qmp.execute("stop", None);
        return Err(err(
            "load device state",
            "the destination QEMU started the guest by itself after loading",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_checked() {
        let mut blob = MAGIC.to_vec();
        blob.extend_from_slice(&VERSION.to_le_bytes());
        blob.extend_from_slice(&(256u64 << 20).to_le_bytes());
        blob.extend_from_slice(b"QEVM");
        assert_eq!(ram_bytes(&blob).unwrap(), 256 << 20);
        assert_eq!(stream_len(&blob), 4);
        assert!(ram_bytes(&blob[..10]).is_err());
        blob[8] = 9;
        assert!(
            ram_bytes(&blob)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        assert!(ram_bytes(b"not a state blob at all").is_err());
    }
}

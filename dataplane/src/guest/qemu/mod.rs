//! The `qemu` backend: skyferry carries the RAM of a running QEMU guest, QEMU carries only
//! its device state (docs/backends.md).
//!
//! The guest's RAM is a shared file (`-object memory-backend-file,...,share=on`). At the
//! source skyferry reads it ([`ram_file`]) and finds dirty pages by content
//! ([`fingerprint`]); QMP ([`qmp`]) pauses and resumes the guest. At the switchover the source
//! QEMU migrates with `x-ignore-shared`, which leaves the shared RAM out, into the state blob
//! ([`device_state`]); the destination writes pages into its own RAM file ([`target`]), feeds
//! the blob to a QEMU waiting with `-incoming defer`, and `cont`s it at the commit.

pub mod device_state;
pub mod fingerprint;
pub mod migration_settings;
pub mod qmp;
pub mod ram_file;
pub mod source;
pub mod target;

pub use source::{QemuGuest, QemuSourceConfig};
pub use target::{QemuDestConfig, QemuTarget};

use super::GuestError;

/// Backend name in logs, status and the Hello.
pub const BACKEND: &str = "qemu";

/// Maps a QMP failure to a backend error that says what skyferry was doing.
fn qmp_err(op: &'static str) -> impl FnOnce(qmp::QmpError) -> GuestError {
    move |e| GuestError::Backend {
        backend: BACKEND,
        op,
        message: e.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    /// A private directory under /dev/shm (tmpfs, like real RAM files), removed on drop.
    #[derive(Debug)]
    pub struct TempDir(std::path::PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> Self {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("random");
            let base = if std::path::Path::new("/dev/shm").is_dir() {
                std::path::PathBuf::from("/dev/shm")
            } else {
                std::env::temp_dir()
            };
            let p = base.join(format!(
                "skyferry-test-{tag}-{}-{:x}",
                std::process::id(),
                u64::from_le_bytes(b)
            ));
            std::fs::create_dir(&p).expect("create test dir");
            TempDir(p)
        }

        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A scripted QMP server over a real Unix socket (`DIR/qmp`): greets, answers each
    /// command with the next canned reply (sent as given: each ends its own lines, and may
    /// carry events before its answer) and hands back the commands it got.
    pub fn scripted_qmp(
        replies: Vec<String>,
    ) -> (TempDir, std::thread::JoinHandle<Vec<serde_json::Value>>) {
        use std::io::{BufRead, BufReader, Write};
        let dir = TempDir::new("qmp");
        let listener = std::os::unix::net::UnixListener::bind(dir.path().join("qmp")).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let mut r = BufReader::new(s);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut got = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                got.push(serde_json::from_str(&line).unwrap());
                w.write_all(reply.as_bytes()).unwrap();
            }
            got
        });
        (dir, h)
    }
}

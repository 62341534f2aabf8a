//! The network switchover of one migration: the guest announced from this host (gratuitous
//! ARP and RARP, `network::announce`) on a thread of its own, so the pause is not spent
//! waiting for the rounds, and stoppable: the destination stops announcing when the
//! migration fails after the pause, and the source then announces the guest again where it
//! resumes, so the network learns it back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::MigrationStatus;
use crate::network::{AnnounceConfig, GuestIdentity, MacAddr};
use crate::protocol::NetworkIdentity;

/// An announcement under way.
#[derive(Debug)]
pub struct Announcer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<()>,
}

impl Announcer {
    /// Starts announcing `guest` on `cfg.interface`; the outcome goes to `status.network`
    /// (prefixed with `who`: where the guest is announced, "destination" or "source").
    pub fn start(
        cfg: AnnounceConfig,
        guest: GuestIdentity,
        status: &Arc<Mutex<MigrationStatus>>,
        id: u64,
        who: &'static str,
    ) -> std::io::Result<Announcer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let starting = format!("{who} announcing {} on {}", describe(&guest), cfg.interface);
        status.lock().expect("status lock").network = Some(starting);
        let shown = status.clone();
        let handle = std::thread::Builder::new()
            .name(format!("sf-announce-{:x}", id & 0xffff))
            .spawn(move || {
                let line = match crate::network::announce(&cfg, &guest, &flag) {
                    Ok(r) => {
                        let how = if r.cancelled { ", then stopped" } else { "" };
                        tracing::info!(
                            migration = %crate::migrate::MigrationId(id),
                            mac = %guest.mac,
                            rounds = r.rounds,
                            frames = r.frames,
                            cancelled = r.cancelled,
                            "announced the guest on {}",
                            cfg.interface
                        );
                        format!(
                            "{who} announced {} on {}: {} rounds, {} frames{how}",
                            describe(&guest),
                            cfg.interface,
                            r.rounds,
                            r.frames
                        )
                    }
                    Err(e) => {
                        tracing::error!(migration = %crate::migrate::MigrationId(id), "announcing the guest failed: {e}");
                        format!("{who} could not announce {}: {e}", describe(&guest))
                    }
                };
                shown.lock().expect("status lock").network = Some(line);
            })?;
        Ok(Announcer { stop, handle })
    }

    /// Stops between rounds (within 10 ms) and waits for the thread.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
    }

    /// Lets the rounds run to their end unwatched; the thread records the outcome.
    pub fn detach(self) {
        drop(self.handle);
    }
}

fn describe(g: &GuestIdentity) -> String {
    match g.ip {
        Some(ip) => format!("{} ({ip})", g.mac),
        None => g.mac.to_string(),
    }
}

impl From<GuestIdentity> for NetworkIdentity {
    fn from(g: GuestIdentity) -> Self {
        NetworkIdentity {
            mac: g.mac.octets(),
            ip: g.ip,
        }
    }
}

impl TryFrom<NetworkIdentity> for GuestIdentity {
    type Error = String;

    fn try_from(n: NetworkIdentity) -> Result<Self, String> {
        let g = GuestIdentity {
            mac: MacAddr::new(n.mac).map_err(|e| e.to_string())?,
            ip: n.ip,
        };
        g.check().map_err(|e| e.to_string())?;
        Ok(g)
    }
}

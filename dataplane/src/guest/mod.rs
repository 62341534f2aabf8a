//! Guest backends: what the pre-copy driver needs from a hypervisor, behind one trait per
//! side (docs/backends.md).
//!
//! The source side ([`SourceGuest`]) offers the page count, a fetch-and-clear dirty log,
//! stable copies of pages, pause/resume and an opaque CPU/device state blob. The destination
//! side ([`DestGuest`]) offers per-stream writers into guest memory, the state blob, and
//! starting the guest once the migration commits.

pub mod chunk_digest;
pub mod claims;
pub mod cpu_cgroup;
pub mod dirty;
pub mod image;
pub mod kvm;
pub mod qemu;
pub mod shm;

pub mod synthetic;
pub mod workload;
pub mod xen;

pub use dirty::DirtyBitmap;

use crate::page::{PageBatch, Pfn};

/// Bytes hashed per chunk by [`memory_digest`].
pub const DIGEST_CHUNK: usize = 1 << 20;

/// The canonical digest of guest memory, the same at both ends: XXH3-64 of the sequence of
/// XXH3-64 digests of each 1 MiB chunk (chunked so backends may hash chunks in parallel or
/// as they arrive, and combine them in order).
///
/// It runs while the guest is paused, so it hashes on every core: chunks are split into one
/// contiguous share per thread and combined in order.
pub fn memory_digest(mem: &[u8]) -> u64 {
    memory_digest_known(mem, &|_| None)
}

/// [`memory_digest`], taking chunk `c`'s hash from `known(c)` where it says it knows it (a
/// [`chunk_digest::ChunkDigests`] kept while pages streamed) and hashing only the rest.
pub fn memory_digest_known(mem: &[u8], known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> u64 {
    let chunks = mem.len().div_ceil(DIGEST_CHUNK).max(1);
    let hash = |c: usize| {
        let chunk =
            &mem[(c * DIGEST_CHUNK).min(mem.len())..((c + 1) * DIGEST_CHUNK).min(mem.len())];
        Ok::<_, std::convert::Infallible>(xxhash_rust::xxh3::xxh3_64(chunk))
    };
    match memory_digest_by_chunks(chunks, known, &hash) {
        Ok(d) => d,
    }
}

/// [`memory_digest`] of memory that is not one slice (a file read in pieces): `hash(c)` gives
/// chunk `c`'s XXH3-64 where `known(c)` does not. Chunks are hashed on every core, in one
/// contiguous share per thread, and combined in order.
pub fn memory_digest_by_chunks<E: Send>(
    chunks: usize,
    known: &(dyn Fn(usize) -> Option<u64> + Sync),
    hash: &(dyn Fn(usize) -> Result<u64, E> + Sync),
) -> Result<u64, E> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZero::get)
        .min(chunks.div_ceil(64)) // below 64 MiB a thread costs more than it saves
        .max(1);
    let per_share = chunks.div_ceil(threads).max(1);
    let mut digests = vec![0u64; chunks];
    std::thread::scope(|s| {
        let workers: Vec<_> = digests
            .chunks_mut(per_share)
            .enumerate()
            .map(|(i, out)| {
                s.spawn(move || {
                    for (j, d) in out.iter_mut().enumerate() {
                        let c = i * per_share + j;
                        *d = match known(c) {
                            Some(k) => k,
                            None => hash(c)?,
                        };
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().expect("digest thread panicked"))
    })?;
    let mut all = xxhash_rust::xxh3::Xxh3::new();
    for d in digests {
        all.update(&d.to_le_bytes());
    }
    Ok(all.digest())
}

/// Errors from a guest backend, written for the operator.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// the backend's hypervisor call failed
    #[error("{backend}: {op} failed: {message}")]
    Backend {
        /// Backend name (`synthetic`, `qemu`, `xen`, `kvm`).
        backend: &'static str,
        /// What was attempted.
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// a page number beyond the guest
    #[error("page {pfn} is beyond the guest's {page_count} pages")]
    PageOutOfRange {
        /// The page number.
        pfn: Pfn,
        /// Pages in the guest.
        page_count: u64,
    },
    /// the destination's guest does not match what the source sends
    #[error("guest size mismatch: source has {source_pages} pages, destination {dest_pages}")]
    SizeMismatch {
        /// Pages at the source.
        source_pages: u64,
        /// Pages at the destination.
        dest_pages: u64,
    },
    /// a state blob the backend cannot use
    #[error("guest state blob rejected: {0}")]
    BadState(String),
}

/// What a guest that checks itself says about a migration (the `kvm` backend's test
/// guest): its progress counter around the switch, whether it ran on, its own sweep of its
/// memory, and the pause it saw on its own clock.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GuestCheck {
    /// The progress counter when the guest paused (source) or as it arrived (destination).
    pub progress_at_switch: Option<u64>,
    /// The counter now.
    pub progress: u64,
    /// Destination: the guest has run here since the migration.
    pub resumed: bool,
    /// Bad pages the arrival check found, once it reported.
    pub bad_pages: Option<u64>,
    /// Who checked: `guest` (its own sweep) or `host` (the host, by the guest's rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_by: Option<String>,
    /// The gap the guest saw between its last instruction at the source and its first
    /// here, from its own clock, ms.
    pub downtime_ms: Option<f64>,
    /// Why the guest stopped for good, if it did.
    pub failure: Option<String>,
}

/// A running guest at the source.
///
/// Shared by the driver and the scan thread, so every method takes `&self`; backends
/// synchronise internally.
pub trait SourceGuest: Send + Sync {
    /// Backend name for logs and status.
    fn backend(&self) -> &'static str;

    /// Pages of guest memory.
    fn page_count(&self) -> u64;

    /// Starts dirty logging: from now on every written page shows up in
    /// [`collect_dirty`](Self::collect_dirty).
    fn start_dirty_log(&self) -> Result<(), GuestError>;

    /// Adds every page written since the last call (or since dirty logging started) to
    /// `bitmap`, and clears the log. A page written while this runs is reported now or by the
    /// next call, never lost.
    fn collect_dirty(&self, bitmap: &mut DirtyBitmap) -> Result<(), GuestError>;

    /// Appends stable copies of `pfns` to `batch`: the encoder never reads memory the guest
    /// may be writing. A page the guest changes during the copy is dirty again and goes in a
    /// later iteration.
    fn read_pages(&self, pfns: &[Pfn], batch: &mut PageBatch) -> Result<(), GuestError>;

    /// Stops the guest: no memory writes until [`resume`](Self::resume). Returns once no
    /// write is in flight.
    fn pause(&self) -> Result<(), GuestError>;

    /// Lets the guest run again (here: the migration failed or was aborted).
    fn resume(&self) -> Result<(), GuestError>;

    /// The CPU and device state, taken while paused.
    fn state(&self) -> Result<Vec<u8>, GuestError>;

    /// [`memory_digest`] of all guest memory, taken while paused: the destination must reach
    /// the same value once it holds everything.
    fn memory_digest(&self) -> Result<u64, GuestError>;

    /// [`memory_digest`], reusing the chunk hashes `known` vouches for (see
    /// [`memory_digest_known`]). Backends that can read a chunk directly override it; the
    /// default hashes everything.
    fn memory_digest_with(
        &self,
        known: &(dyn Fn(usize) -> Option<u64> + Sync),
    ) -> Result<u64, GuestError> {
        let _ = known;
        self.memory_digest()
    }

    /// Stops dirty logging and releases the guest for good: the migration committed and the
    /// guest now runs at the destination. The source must never resume it after this.
    fn hand_over(&self) -> Result<(), GuestError>;

    /// The migration is over, whatever its outcome (after `resume` or `hand_over`): release
    /// what the backend holds of the hypervisor (a QEMU's single QMP connection, say) so the
    /// operator's tools can use it. The default holds nothing.
    fn release(&self) {}

    /// Where the guest lands at the destination, when the operator chose it (xen: the id of
    /// the paused domain the destination's toolstack created). Travels in the handshake.
    fn destination(&self) -> Option<String> {
        None
    }

    /// What the guest says of itself, if it checks itself.
    fn self_check(&self) -> Option<GuestCheck> {
        None
    }

    /// Auto-converge: takes `percent` (1..=99) of the guest's vCPU time away, or gives it all
    /// back (0). The default cannot.
    fn throttle(&self, percent: u8) -> Result<(), GuestError> {
        let _ = percent;
        Err(GuestError::Backend {
            backend: self.backend(),
            op: "throttle",
            message: "this backend cannot throttle its guest".into(),
        })
    }
}

/// Writes one stream's pages into the destination guest's memory.
pub trait PageWriter: crate::codec::PageSink + Send {}

/// The guest being built at the destination.
pub trait DestGuest: Send + Sync {
    /// Backend name for logs and status.
    fn backend(&self) -> &'static str;

    /// Pages of guest memory.
    fn page_count(&self) -> u64;

    /// A writer for the pages that `owns(pfn)` selects. The caller guarantees that the sets
    /// of pages given to different writers are disjoint, and the writers check it.
    fn writer(
        &self,
        owns: Box<dyn Fn(Pfn) -> bool + Send + Sync>,
    ) -> Result<Box<dyn PageWriter>, GuestError>;

    /// Installs the CPU and device state sent at stop-and-copy.
    fn set_state(&self, blob: &[u8]) -> Result<(), GuestError>;

    /// [`memory_digest`] of all guest memory (the end-to-end check against the source's).
    fn memory_digest(&self) -> u64;

    /// [`memory_digest`], reusing the chunk hashes `known` vouches for; the default hashes
    /// everything.
    fn memory_digest_with(&self, known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> u64 {
        let _ = known;
        self.memory_digest()
    }

    /// Starts the guest: the migration committed.
    fn start(&self) -> Result<(), GuestError>;

    /// What the guest says of itself, if it checks itself.
    fn self_check(&self) -> Option<GuestCheck> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_the_hash_of_chunk_hashes_whatever_the_threads() {
        let mem: Vec<u8> = (0..(200 * DIGEST_CHUNK + 4096))
            .map(|i| u8::try_from(i * 31 % 251).expect("below 251"))
            .collect();
        let mut all = xxhash_rust::xxh3::Xxh3::new();
        for chunk in mem.chunks(DIGEST_CHUNK) {
            all.update(&xxhash_rust::xxh3::xxh3_64(chunk).to_le_bytes());
        }
        assert_eq!(memory_digest(&mem), all.digest());
        assert_eq!(memory_digest(&mem[..4096]), {
            let mut one = xxhash_rust::xxh3::Xxh3::new();
            one.update(&xxhash_rust::xxh3::xxh3_64(&mem[..4096]).to_le_bytes());
            one.digest()
        });
    }
}

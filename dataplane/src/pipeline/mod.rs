//! The threads around the sans-IO core (dataplane/ARCHITECTURE.md, "Threads").
//!
//! ```text
//! source: scan --page lists--> read+encode+seal[s] --sealed--> send (io_uring, all streams)
//! dest:   recv (io_uring, all streams) --frames--> open+decode[s] -> guest memory
//! ```
//!
//! Every stage is a named thread, pinned round-robin to the cores, fed by a bounded channel;
//! frame buffers come from a registered pool and go back to it, so memory is bounded and the
//! hot path allocates nothing. Page numbers are fixed to streams ([`stream_of`]), so updates
//! to a page never reorder. A stage that fails drops its channels, which stops the stages
//! around it; joining returns the first error.

mod autocompress;
pub mod sink;
pub mod source;

use std::thread::JoinHandle;

use crate::page::Pfn;

/// Pages per stream chunk: pages travel on streams in 2 MiB runs, so neighbours share a
/// stream (cheap page-number deltas) while streams stay balanced.
const CHUNK_SHIFT: u32 = 9;

/// The stream (0-based) that carries page `pfn` among `streams`.
pub fn stream_of(pfn: Pfn, streams: usize) -> usize {
    usize::try_from((pfn >> CHUNK_SHIFT) % streams as u64).expect("below the stream count")
}

/// The pipeline has stopped taking work (join it to learn why).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the pipeline has stopped")]
pub struct Stopped;

/// Why a pipeline stopped.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// the transport failed
    #[error(transparent)]
    Transport(#[from] crate::transport::TransportError),
    /// reading or writing guest memory failed
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// a frame from the peer was refused
    #[error("stream {stream}: {source}")]
    Open {
        /// Stream index.
        stream: usize,
        /// Why.
        source: crate::crypto::OpenError,
    },
    /// a frame's records were refused
    #[error("stream {stream}: {source}")]
    Decode {
        /// Stream index.
        stream: usize,
        /// Why.
        source: crate::codec::DecodeError,
    },
    /// a pipeline thread panicked (a bug)
    #[error("pipeline thread {0} panicked")]
    Panicked(String),
}

/// Spawns a named stage thread, pinned to core `slot % cores` when `pin` is set.
fn spawn_stage<T: Send + 'static>(
    name: String,
    slot: usize,
    pin: bool,
    f: impl FnOnce() -> Result<T, PipelineError> + Send + 'static,
) -> JoinHandle<Result<T, PipelineError>> {
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if pin
                && let Some(cores) = core_affinity::get_core_ids()
                && !cores.is_empty()
            {
                core_affinity::set_for_current(cores[slot % cores.len()]);
            }
            f()
        })
        .expect("spawning a pipeline thread")
}

/// What a stage thread hands back for its pipeline to drop later: its codec (the block cache,
/// up to hundreds of MiB), whose unmapping at thread exit would otherwise land in the
/// guest's pause (measured: 10-16 ms per stream). The pipeline drops it with itself, after
/// the switchover.
type Leftover = Option<Box<dyn Send>>;

/// What the stage threads left behind.
#[derive(Default)]
struct Leftovers(Vec<Box<dyn Send>>);

impl std::fmt::Debug for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Leftovers({})", self.0.len())
    }
}

/// Joins stage threads, keeping what they leave behind; returns the first error (a failed
/// stage makes its neighbours stop, so the first recorded failure is the cause, later ones
/// are consequences).
fn join_all(
    threads: Vec<JoinHandle<Result<Leftover, PipelineError>>>,
    leftovers: &mut Leftovers,
) -> Result<(), PipelineError> {
    let mut first = None;
    for t in threads {
        let name = t.thread().name().unwrap_or("?").to_string();
        match t.join() {
            Ok(Ok(left)) => leftovers.0.extend(left),
            Ok(Err(e)) => {
                first.get_or_insert(e);
            }
            Err(_) => {
                first.get_or_insert(PipelineError::Panicked(name));
            }
        }
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_take_2mib_runs_round_robin() {
        assert_eq!(stream_of(0, 3), 0);
        assert_eq!(stream_of(511, 3), 0);
        assert_eq!(stream_of(512, 3), 1);
        assert_eq!(stream_of(3 * 512, 3), 0);
        assert!((0..100_000).all(|p| stream_of(p, 1) == 0));
    }
}

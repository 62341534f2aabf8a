//! Limits on every sized request this host serves (guest memory, block caches, streams,
//! frames), checked against fixed bounds and against this host's memory, in one place. The
//! edges call it: the CLI (`skyferry start`), the control socket (a start request), the config
//! file, and a destination receiving an authenticated peer's Hello. A request over a limit gets
//! a clear error and nothing is allocated for it.

use crate::codec::CodecConfig;
use crate::page::PAGE_SIZE;
use crate::units::format_size;

/// Most data streams of one migration.
pub const MAX_STREAMS: u32 = 64;

/// Largest guest any backend is asked to hold (64 TiB): far beyond any host today, and small
/// enough that every size derived from it (bytes, bitmap words) fits a `u64`.
pub const MAX_GUEST_BYTES: u64 = 64 << 40;

/// Largest block cache per stream and end (also what a destination accepts in a Hello).
pub const MAX_CACHE_BYTES: u64 = crate::protocol::MAX_CACHE_BYTES;

/// Most migrations a destination receives at once (`listen.max_migrations`).
pub const MAX_MIGRATIONS: usize = 1024;

/// Most control clients waiting at once (`daemon.control_clients`).
pub const MAX_CONTROL_CLIENTS: usize = 4096;

/// Frame buffers each stream's pipeline keeps, for the memory estimate.
const FRAMES_PER_STREAM: u64 = 16;

/// A request over a limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// Outside a fixed bound.
    #[error("{what} of {value} is outside {min}..={max}")]
    OutOfRange {
        /// What was asked for.
        what: &'static str,
        /// How much, as written.
        value: String,
        /// Least allowed, as written.
        min: String,
        /// Most allowed, as written.
        max: String,
    },
    /// More memory than this host has free.
    #[error(
        "{what} needs {}, more than this host has available ({} available of {} total)",
        format_size(*need), format_size(*available), format_size(*total)
    )]
    HostMemory {
        /// What was asked for.
        what: String,
        /// Bytes it would take.
        need: u64,
        /// MemAvailable.
        available: u64,
        /// MemTotal.
        total: u64,
    },
    /// An allocation failed (the allocator said no; nothing aborted).
    #[error("cannot allocate {} for {what}", format_size(*bytes))]
    Allocation {
        /// What it was for.
        what: &'static str,
        /// Its size.
        bytes: u64,
    },
    /// /proc/meminfo could not be read.
    #[error("cannot read this host's memory (/proc/meminfo): {0}")]
    Meminfo(String),
}

/// This host's memory, from /proc/meminfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    /// MemTotal, bytes.
    pub total: u64,
    /// MemAvailable, bytes: what can be had without swapping.
    pub available: u64,
}

impl HostMemory {
    /// Reads /proc/meminfo now.
    pub fn read() -> Result<Self, LimitError> {
        let text = std::fs::read_to_string("/proc/meminfo")
            .map_err(|e| LimitError::Meminfo(e.to_string()))?;
        Self::parse(&text)
    }

    /// Parses /proc/meminfo's text.
    pub fn parse(text: &str) -> Result<Self, LimitError> {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
                .map(|kib| kib.saturating_mul(1024))
                .ok_or_else(|| LimitError::Meminfo(format!("no {name} line")))
        };
        Ok(HostMemory {
            total: field("MemTotal")?,
            available: field("MemAvailable")?,
        })
    }

    /// Refuses `need` bytes for `what` if they exceed the memory available now.
    pub fn check(&self, what: impl Into<String>, need: u64) -> Result<(), LimitError> {
        if need > self.available {
            return Err(LimitError::HostMemory {
                what: what.into(),
                need,
                available: self.available,
                total: self.total,
            });
        }
        Ok(())
    }
}

fn range<T: PartialOrd>(
    what: &'static str,
    value: T,
    min: T,
    max: T,
    show: impl Fn(&T) -> String,
) -> Result<(), LimitError> {
    if value < min || value > max {
        return Err(LimitError::OutOfRange {
            what,
            value: show(&value),
            min: show(&min),
            max: show(&max),
        });
    }
    Ok(())
}

fn bytes(v: &u64) -> String {
    format_size(*v)
}

/// A guest's memory size: at least a page, at most [`MAX_GUEST_BYTES`].
pub fn check_guest_size(bytes_: u64) -> Result<(), LimitError> {
    range(
        "guest memory",
        bytes_,
        PAGE_SIZE as u64,
        MAX_GUEST_BYTES,
        bytes,
    )
}

/// A stream count: 1..=[`MAX_STREAMS`].
pub fn check_streams(what: &'static str, streams: u32) -> Result<(), LimitError> {
    range(what, streams, 1, MAX_STREAMS, u32::to_string)
}

/// A block cache per stream, when the codec uses one: at most [`MAX_CACHE_BYTES`].
pub fn check_cache(what: &'static str, codec: &CodecConfig) -> Result<(), LimitError> {
    if !codec.uses_cache() {
        return Ok(());
    }
    range(what, codec.cache_bytes, 1024, MAX_CACHE_BYTES, bytes)
}

/// A frame size: between the frame format's bounds.
pub fn check_frame_size(what: &'static str, frame_size: usize) -> Result<(), LimitError> {
    range(
        what,
        frame_size,
        crate::frame::MIN_FRAME_SIZE,
        crate::frame::MAX_FRAME_SIZE,
        |v| format_size(*v as u64),
    )
}

/// The most concurrent incoming migrations: 1..=[`MAX_MIGRATIONS`].
pub fn check_max_migrations(n: usize) -> Result<(), LimitError> {
    range(
        "listen.max_migrations",
        n,
        1,
        MAX_MIGRATIONS,
        usize::to_string,
    )
}

/// Control clients waiting at once: 1..=[`MAX_CONTROL_CLIENTS`].
pub fn check_control_clients(n: usize) -> Result<(), LimitError> {
    range(
        "daemon.control_clients",
        n,
        1,
        MAX_CONTROL_CLIENTS,
        usize::to_string,
    )
}

/// `n` values made by `f` (from their index) in a vector, or an error when the memory cannot be
/// had: sized allocations go through here, so a failure is an error, never an abort.
pub fn try_vec<T>(
    what: &'static str,
    n: usize,
    f: impl FnMut(usize) -> T,
) -> Result<Vec<T>, LimitError> {
    let mut v = Vec::new();
    try_reserve(&mut v, what, n)?;
    v.extend((0..n).map(f));
    Ok(v)
}

/// Room for `n` more values in `v`, or an error when the memory cannot be had.
pub fn try_reserve<T>(v: &mut Vec<T>, what: &'static str, n: usize) -> Result<(), LimitError> {
    v.try_reserve_exact(n).map_err(|_| LimitError::Allocation {
        what,
        bytes: (n as u64).saturating_mul(std::mem::size_of::<T>() as u64),
    })
}

/// How long a control client may take to send its request: 100 ms to an hour (less would
/// close the CLI itself on a busy host).
pub fn check_control_idle(idle: std::time::Duration) -> Result<(), LimitError> {
    use std::time::Duration;
    range(
        "daemon.control_idle",
        idle,
        Duration::from_millis(100),
        Duration::from_secs(3600),
        |d| format!("{d:?}"),
    )
}

/// What one end of a migration will hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigrationMemory {
    /// Guest memory this daemon allocates (0 when the guest's memory belongs to a
    /// hypervisor already: a running QEMU guest or a Xen domain).
    pub guest_bytes: u64,
    /// Data streams.
    pub streams: u32,
    /// Block cache per stream (0 when the codec uses none).
    pub cache_bytes: u64,
    /// Frame size.
    pub frame_size: u64,
}

impl MigrationMemory {
    /// Bytes: the guest, each stream's cache with its indexes (under 64 bytes per 1 KiB
    /// block), and each stream's frame buffers. Saturates rather than wrapping.
    pub fn bytes(&self) -> u64 {
        let cache = self
            .cache_bytes
            .saturating_add(self.cache_bytes / 1024 * 64);
        let per_stream = cache.saturating_add(FRAMES_PER_STREAM.saturating_mul(self.frame_size));
        self.guest_bytes
            .saturating_add(u64::from(self.streams).saturating_mul(per_stream))
    }

    /// Checks the fixed bounds, then that it fits in `host`'s available memory.
    pub fn check(&self, host: &HostMemory) -> Result<(), LimitError> {
        if self.guest_bytes > 0 {
            check_guest_size(self.guest_bytes)?;
        }
        check_streams("streams", self.streams)?;
        range(
            "block cache per stream",
            self.cache_bytes,
            0,
            MAX_CACHE_BYTES,
            bytes,
        )?;
        host.check(
            format!(
                "a migration of a {} guest over {} streams",
                format_size(self.guest_bytes),
                self.streams
            ),
            self.bytes(),
        )
    }
}

/// Whether the guest an authenticated peer's Hello announces, and its streams' caches, fit in
/// this host's memory now (a destination calls it beside `check_hello`). A Xen domain's memory
/// is the hypervisor's, created before the migration: only the caches count then.
pub fn check_incoming(h: &crate::protocol::Hello) -> Result<(), String> {
    let guest_bytes = match h.backend.as_str() {
        "xen" => 0,
        _ => h.guest_pages.saturating_mul(PAGE_SIZE as u64),
    };
    let m = MigrationMemory {
        guest_bytes,
        streams: h.streams,
        cache_bytes: if h.codec.uses_cache() {
            h.codec.cache_bytes
        } else {
            0
        },
        frame_size: u64::from(h.frame_size),
    };
    HostMemory::read()
        .and_then(|host| m.check(&host))
        .map_err(|e| format!("refused by this host: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMINFO: &str = "MemTotal:       24000000 kB\nMemFree:          100000 kB\n\
                           MemAvailable:   20000000 kB\nBuffers:            1000 kB\n";

    #[test]
    fn meminfo_is_read() {
        let m = HostMemory::parse(MEMINFO).unwrap();
        assert_eq!(m.total, 24_000_000 * 1024);
        assert_eq!(m.available, 20_000_000 * 1024);
        assert!(HostMemory::parse("MemTotal: 1 kB\n").is_err());
    }

    #[test]
    fn a_guest_larger_than_the_host_is_refused() {
        let host = HostMemory::parse(MEMINFO).unwrap();
        let m = |guest_bytes| MigrationMemory {
            guest_bytes,
            streams: 4,
            cache_bytes: 100 << 20,
            frame_size: 64 << 10,
        };
        assert_eq!(m(1 << 30).check(&host), Ok(()));
        let err = m(64 << 30).check(&host).unwrap_err();
        assert!(matches!(err, LimitError::HostMemory { .. }), "{err}");
        assert!(err.to_string().contains("needs 64"), "{err}");
        // 8 EiB: over the fixed bound before any arithmetic on it.
        let err = m(8 << 60).check(&host).unwrap_err();
        assert!(matches!(err, LimitError::OutOfRange { .. }), "{err}");
        assert!(check_streams("streams", 0).is_err());
        assert!(check_streams("streams", 65).is_err());
    }

    #[test]
    fn an_allocation_too_large_is_an_error() {
        let err = try_vec("a test", usize::MAX / 8, |_| 0u64).unwrap_err();
        assert!(matches!(err, LimitError::Allocation { .. }), "{err}");
        assert_eq!(try_vec("a test", 3, |i| i).unwrap(), vec![0, 1, 2]);
    }
}

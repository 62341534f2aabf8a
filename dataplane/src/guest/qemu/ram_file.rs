//! A QEMU guest's RAM file (`memory-backend-file,share=on`), read with `pread`.
//!
//! Not through a mapping: on tmpfs (`/dev/shm`, the usual place) a read fault through a
//! shared mapping allocates every hole it touches, so one pass over a 4 GiB guest that uses
//! 1 GiB would make the host find 3 GiB more. `pread` of a hole copies the kernel's zero
//! page and allocates nothing (measured: 512 MiB of holes, +0 MiB Shmem by pread, +512 MiB
//! by reading a shared mapping). The kernel's copy is also the stable copy the encoder needs
//! of a page, taken without any `unsafe`: QEMU's writes race only with the kernel's copy.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use zerocopy::IntoBytes;

use super::BACKEND;
use crate::guest::{DIGEST_CHUNK, GuestError, memory_digest_by_chunks};
use crate::page::{PAGE_SIZE, Page, Pfn};

/// A RAM file opened for reading.
#[derive(Debug)]
pub struct RamFile {
    file: File,
    path: PathBuf,
    pages: u64,
}

fn err(op: &'static str, message: String) -> GuestError {
    GuestError::Backend {
        backend: BACKEND,
        op,
        message,
    }
}

impl RamFile {
    /// Opens `path` read-only; its size must be a whole, non-zero number of pages.
    pub fn open(path: &Path) -> Result<Self, GuestError> {
        let file = File::open(path)
            .map_err(|e| err("open the RAM file", format!("{}: {e}", path.display())))?;
        let len = file
            .metadata()
            .map_err(|e| err("open the RAM file", format!("{}: {e}", path.display())))?
            .len();
        if len == 0 || !len.is_multiple_of(PAGE_SIZE as u64) {
            return Err(err(
                "open the RAM file",
                format!(
                    "{} is {len} bytes, not a whole number of 4 KiB pages",
                    path.display()
                ),
            ));
        }
        Ok(RamFile {
            file,
            path: path.to_owned(),
            pages: len / PAGE_SIZE as u64,
        })
    }

    /// Pages in the file.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes in the file.
    pub fn bytes(&self) -> u64 {
        self.pages * PAGE_SIZE as u64
    }

    /// Reads pages `first..first + out.len()` into `out`.
    pub fn read(&self, first: Pfn, out: &mut [Page]) -> Result<(), GuestError> {
        let end = first + out.len() as u64;
        if end > self.pages {
            return Err(GuestError::PageOutOfRange {
                pfn: end - 1,
                page_count: self.pages,
            });
        }
        self.file
            .read_exact_at(out.as_mut_bytes(), first * PAGE_SIZE as u64)
            .map_err(|e| {
                err(
                    "read guest pages",
                    format!("{} at page {first}: {e}", self.path.display()),
                )
            })
    }

    /// [`memory_digest`](crate::guest::memory_digest) of the file, reusing the chunk hashes
    /// `known` vouches for.
    pub fn digest(&self, known: &(dyn Fn(usize) -> Option<u64> + Sync)) -> Result<u64, GuestError> {
        digest_file(&self.file, self.bytes(), &self.path, known)
    }
}

/// [`memory_digest`](crate::guest::memory_digest) of the first `len` bytes of `file`, read
/// in 1 MiB chunks with `pread` (so holes stay holes).
pub fn digest_file(
    file: &File,
    len: u64,
    path: &Path,
    known: &(dyn Fn(usize) -> Option<u64> + Sync),
) -> Result<u64, GuestError> {
    let chunks = usize::try_from(len.div_ceil(DIGEST_CHUNK as u64))
        .expect("a mapped guest's chunks fit in usize")
        .max(1);
    let hash = |c: usize| {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let at = (c * DIGEST_CHUNK) as u64;
        let n = usize::try_from(len.saturating_sub(at).min(DIGEST_CHUNK as u64))
            .expect("at most a chunk");
        BUF.with_borrow_mut(|buf| {
            buf.resize(DIGEST_CHUNK, 0);
            file.read_exact_at(&mut buf[..n], at)
                .map_err(|e| err("hash guest memory", format!("{}: {e}", path.display())))?;
            Ok(xxhash_rust::xxh3::xxh3_64(&buf[..n]))
        })
    };
    memory_digest_by_chunks(chunks, known, &hash)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::memory_digest;

    #[test]
    fn reads_runs_digests_like_memory_and_refuses_odd_files() {
        let dir = crate::guest::qemu::testutil::TempDir::new("ramfile");
        let p = dir.path().join("ram");
        let mut mem = vec![0u8; 3 * DIGEST_CHUNK + 5 * PAGE_SIZE];
        for (i, b) in mem.iter_mut().enumerate().skip(PAGE_SIZE) {
            *b = u8::try_from(i % 251).unwrap();
        }
        std::fs::write(&p, &mem).unwrap();
        let ram = RamFile::open(&p).unwrap();
        assert_eq!(ram.pages(), mem.len() as u64 / PAGE_SIZE as u64);
        let mut pages = vec![Page::zeroed(); 3];
        ram.read(1, &mut pages).unwrap();
        assert_eq!(&pages[1].0[..], &mem[2 * PAGE_SIZE..3 * PAGE_SIZE]);
        assert!(ram.read(ram.pages() - 1, &mut pages).is_err());
        assert_eq!(ram.digest(&|_| None).unwrap(), memory_digest(&mem));

        std::fs::write(&p, [1u8; 4097]).unwrap();
        let e = RamFile::open(&p).unwrap_err();
        assert!(e.to_string().contains("not a whole number"), "{e}");
        assert!(RamFile::open(&dir.path().join("missing")).is_err());
    }
}

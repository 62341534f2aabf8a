//! Guest memory in a shared-memory file (memfd), mapped shared.
//!
//! Real guests' memory belongs to the hypervisor and reaches skyferry as a shared mapping (a
//! QEMU `memory-backend-file,share=on`, a Xen foreign mapping). In-process guests (synthetic,
//! image) keep theirs the same way, so the kernel accounts it as shared memory (`RssShmem`)
//! apart from the pipeline's own anonymous memory: benchmarks can then show what skyferry
//! itself uses, whatever the guest's size.

use std::fs::File;

use memmap2::{Advice, MmapMut, MmapOptions};
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::GuestError;

/// A zero-filled, shared, read-write mapping of a fresh memfd of `len` bytes.
#[derive(Debug)]
pub struct SharedMemory {
    map: MmapMut,
}

impl SharedMemory {
    /// Creates the file and maps it; `populate` faults every page in now (as a hypervisor
    /// that preallocates guest memory does), so later writes take no page faults.
    pub fn new(name: &str, len: usize, populate: bool) -> Result<Self, GuestError> {
        let err = |op: &'static str, e: String| GuestError::Backend {
            backend: "memory",
            op,
            message: e,
        };
        let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC)
            .map_err(|e| err("memfd_create", e.to_string()))?;
        let file = File::from(fd);
        file.set_len(len as u64)
            .map_err(|e| err("size guest memory", e.to_string()))?;
        let mut opts = MmapOptions::new();
        opts.len(len);
        if populate {
            opts.populate();
        }
        // SAFETY: memmap2 requires that nobody else changes the file while it is mapped. The
        // memfd was created just above, is close-on-exec, and its only descriptor is dropped
        // at the end of this function: no other process or mapping can reach it, so every
        // access goes through this mapping and Rust's borrow rules on it.
        let map =
            unsafe { opts.map_mut(&file) }.map_err(|e| err("map guest memory", e.to_string()))?;
        Ok(SharedMemory { map })
    }

    /// Faults every page in now (as a running guest's memory is), keeping content.
    pub fn populate(&self) -> Result<(), GuestError> {
        self.map
            .advise(Advice::PopulateWrite)
            .map_err(|e| GuestError::Backend {
                backend: "memory",
                op: "populate guest memory",
                message: e.to_string(),
            })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the mapping is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The memory.
    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    /// The memory, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }

    /// Start of the mapping, for backends that hand out disjoint pages to several threads
    /// under their own synchronisation.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_filled_writable_and_sized() {
        let mut m = SharedMemory::new("test", 3 * 4096, false).unwrap();
        assert_eq!(m.len(), 3 * 4096);
        assert!(m.as_slice().iter().all(|&b| b == 0));
        m.as_mut_slice()[4096] = 7;
        assert_eq!(m.as_slice()[4096], 7);
        let p = SharedMemory::new("test", 4096, true).unwrap();
        assert!(p.as_slice().iter().all(|&b| b == 0));
    }
}

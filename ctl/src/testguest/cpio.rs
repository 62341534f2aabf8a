//! A writer for uncompressed cpio "newc" archives, the format the Linux kernel unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (magic `070701`, then 13 fields of 8 hex digits),
//! the NUL-terminated name padded so header + name end on a 4-byte boundary, then the data
//! padded to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

const MAGIC: &str = "070701";
pub const TRAILER: &str = "TRAILER!!!";

pub const S_IFDIR: u32 = 0o040_000;
pub const S_IFCHR: u32 = 0o020_000;
pub const S_IFREG: u32 = 0o100_000;

/// Builds an archive in memory; entries keep the order they are added in (the kernel creates
/// them in that order, so a directory must come before what it contains).
#[derive(Debug, Default)]
pub struct Writer {
    out: Vec<u8>,
    next_ino: u32,
}

impl Writer {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory; `perm` is the permission bits (e.g. 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), String> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// A character device node with the given major and minor numbers.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), String> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), String> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    /// Appends the trailer and returns the archive.
    pub fn finish(mut self) -> Vec<u8> {
        self.write(TRAILER, 0, 1, 0, (0, 0), &[]);
        self.out
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), String> {
        if name.is_empty() || name.starts_with('/') || name.contains('\0') || name == TRAILER {
            return Err(format!("cpio: invalid entry name {name:?}"));
        }
        if u32::try_from(data.len()).is_err() || u32::try_from(name.len() + 1).is_err() {
            return Err(format!(
                "cpio: {name:?} is too large for a newc archive (4 GiB)"
            ));
        }
        // Distinct inode numbers: the kernel treats entries sharing one (with nlink > 1) as
        // hard links.
        self.next_ino += 1;
        let ino = self.next_ino;
        self.write(name, ino, nlink, mode, rdev, data);
        Ok(())
    }

    /// Writes one entry; the caller has checked that the name and data sizes fit 32 bits.
    fn write(
        &mut self,
        name: &str,
        ino: u32,
        nlink: u32,
        mode: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) {
        let size = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        // uid, gid, mtime (0: reproducible archives), the device holding the file (0:0) and
        // the checksum (unused by newc) are all zero.
        let fields = [
            ino,
            mode,
            0,
            0,
            nlink,
            0,
            size(data.len()),
            0,
            0,
            rdev_major,
            rdev_minor,
            size(name.len() + 1),
            0,
        ];
        self.out.extend_from_slice(MAGIC.as_bytes());
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    /// The archive starts 4-aligned and every piece is padded, so aligning the total length
    /// aligns each name and data start.
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_LEN: usize = 110;

    #[derive(Debug, PartialEq)]
    struct Parsed {
        name: String,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    /// An independent reader: checks magic, field syntax, padding bytes and the trailer.
    fn parse(archive: &[u8]) -> Vec<Parsed> {
        assert!(
            archive.len().is_multiple_of(4),
            "archive length {}",
            archive.len()
        );
        let mut at = 0;
        let mut entries = Vec::new();
        loop {
            let header = &archive[at..at + HEADER_LEN];
            assert_eq!(&header[..6], b"070701", "magic at offset {at}");
            let field = |i: usize| {
                let hex = std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).unwrap();
                assert!(
                    hex.bytes().all(|b| b.is_ascii_hexdigit()),
                    "field {i}: {hex:?}"
                );
                u32::from_str_radix(hex, 16).unwrap()
            };
            let (filesize, namesize) = (field(6) as usize, field(11) as usize);
            let name_at = at + HEADER_LEN;
            assert_eq!(archive[name_at + namesize - 1], 0, "name is NUL-terminated");
            let name = std::str::from_utf8(&archive[name_at..name_at + namesize - 1]).unwrap();
            let data_at = (name_at + namesize).next_multiple_of(4);
            assert!(archive[name_at + namesize..data_at].iter().all(|&b| b == 0));
            let end = (data_at + filesize).next_multiple_of(4);
            assert!(archive[data_at + filesize..end].iter().all(|&b| b == 0));
            assert_eq!(field(12), 0, "check field");
            if name == TRAILER {
                assert_eq!(end, archive.len(), "nothing after the trailer");
                assert_eq!(filesize, 0);
                return entries;
            }
            entries.push(Parsed {
                name: name.to_owned(),
                ino: field(0),
                mode: field(1),
                nlink: field(4),
                rdev: (field(9), field(10)),
                data: archive[data_at..data_at + filesize].to_vec(),
            });
            at = end;
        }
    }

    #[test]
    fn entries_round_trip_with_newc_padding() {
        let mut w = Writer::new();
        w.dir("dev", 0o755).unwrap();
        w.char_dev("dev/console", 0o600, 5, 1).unwrap();
        // Names and data of every length modulo 4 exercise each padding case.
        for len in 0..8 {
            let data: Vec<u8> = (1..=len).collect();
            w.file(&"f".repeat(usize::from(len) + 1), 0o644, &data)
                .unwrap();
        }
        w.file("init", 0o755, b"\x7fELF...").unwrap();
        let entries = parse(&w.finish());

        assert_eq!(entries.len(), 11);
        assert_eq!(entries[0].name, "dev");
        assert_eq!(entries[0].mode, 0o040_755);
        assert_eq!(entries[0].nlink, 2);
        assert_eq!(entries[1].name, "dev/console");
        assert_eq!(entries[1].mode, 0o020_600);
        assert_eq!(entries[1].rdev, (5, 1));
        for (len, e) in entries[2..10].iter().enumerate() {
            assert_eq!(e.name.len(), len + 1);
            assert_eq!(e.data, (1..=u8::try_from(len).unwrap()).collect::<Vec<_>>());
            assert_eq!(e.mode, 0o100_644);
        }
        assert_eq!(entries[10].name, "init");
        assert_eq!(entries[10].mode, 0o100_755);
        assert_eq!(entries[10].data, b"\x7fELF...");
        let mut inos: Vec<u32> = entries.iter().map(|e| e.ino).collect();
        inos.dedup();
        assert_eq!(inos.len(), entries.len(), "inode numbers are distinct");
    }

    #[test]
    fn empty_archive_is_just_the_trailer() {
        let archive = Writer::new().finish();
        assert!(parse(&archive).is_empty());
        // 110-byte header + "TRAILER!!!\0" (11) = 121, padded to 124.
        assert_eq!(archive.len(), 124);
    }

    #[test]
    fn rejects_names_the_kernel_would_misread() {
        let mut w = Writer::new();
        for bad in ["", "/init", "a\0b", TRAILER] {
            assert!(w.file(bad, 0o644, b"").is_err(), "{bad:?}");
        }
    }
}

//! A writer for the "newc" cpio format, the one the Linux kernel unpacks as
//! an initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).

use std::io::{self, Write};

const MAGIC: &[u8; 6] = b"070701";
const TRAILER: &str = "TRAILER!!!";
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

/// Errors building an archive.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An entry name the kernel would reject or misplace.
    #[error("invalid archive path {0:?}: must be relative, without '..', empty components or NUL")]
    BadPath(String),
    /// The same path was added twice.
    #[error("duplicate archive path {0:?}")]
    Duplicate(String),
    /// A file larger than the format can describe (4 GiB).
    #[error("file {0:?} is too large for cpio newc")]
    TooLarge(String),
    /// Writing failed.
    #[error("writing the archive: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    CharDev { major: u32, minor: u32 },
}

#[derive(Debug, Clone)]
struct Entry {
    path: String,
    perm: u32,
    kind: Kind,
}

/// An archive under construction. Output is deterministic: inode numbers
/// follow insertion order, owners are root, and times are zero.
#[derive(Debug, Default)]
pub struct Archive {
    entries: Vec<Entry>,
}

fn check_path(path: &str) -> Result<(), Error> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\0')
        || path.split('/').any(|c| c.is_empty() || c == "..");
    if bad {
        Err(Error::BadPath(path.to_owned()))
    } else {
        Ok(())
    }
}

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&mut self, path: &str, perm: u32, kind: Kind) -> Result<&mut Self, Error> {
        check_path(path)?;
        if self.entries.iter().any(|e| e.path == path) {
            return Err(Error::Duplicate(path.to_owned()));
        }
        if let Kind::File(data) = &kind {
            if u32::try_from(data.len()).is_err() {
                return Err(Error::TooLarge(path.to_owned()));
            }
        }
        self.entries.push(Entry {
            path: path.to_owned(),
            perm: perm & 0o7777,
            kind,
        });
        Ok(self)
    }

    /// Adds a directory.
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<&mut Self, Error> {
        self.push(path, perm, Kind::Dir)
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, perm: u32, data: Vec<u8>) -> Result<&mut Self, Error> {
        self.push(path, perm, Kind::File(data))
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<&mut Self, Error> {
        self.push(path, 0o777, Kind::Symlink(target.to_owned()))
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<&mut Self, Error> {
        self.push(path, perm, Kind::CharDev { major, minor })
    }

    /// Writes the archive, trailer included.
    pub fn write_to<W: Write>(&self, out: &mut W) -> Result<u64, Error> {
        let mut w = Counting {
            inner: out,
            count: 0,
        };
        for (i, e) in self.entries.iter().enumerate() {
            let (mode, data, dev): (u32, &[u8], (u32, u32)) = match &e.kind {
                Kind::Dir => (S_IFDIR | e.perm, &[], (0, 0)),
                Kind::File(d) => (S_IFREG | e.perm, d, (0, 0)),
                Kind::Symlink(t) => (S_IFLNK | e.perm, t.as_bytes(), (0, 0)),
                Kind::CharDev { major, minor } => (S_IFCHR | e.perm, &[], (*major, *minor)),
            };
            let nlink = if matches!(e.kind, Kind::Dir) { 2 } else { 1 };
            write_entry(&mut w, (i + 1) as u32, mode, nlink, &e.path, data, dev)?;
        }
        write_entry(&mut w, 0, 0, 1, TRAILER, &[], (0, 0))?;
        w.flush()?;
        Ok(w.count)
    }

    /// The archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let mut v = Vec::new();
        self.write_to(&mut v)?;
        Ok(v)
    }
}

fn write_entry<W: Write>(
    w: &mut Counting<W>,
    ino: u32,
    mode: u32,
    nlink: u32,
    name: &str,
    data: &[u8],
    (rmajor, rminor): (u32, u32),
) -> io::Result<()> {
    let namesize = name.len() as u32 + 1;
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rmajor,
        rminor,
        namesize,
        0, // check
    ];
    w.write_all(MAGIC)?;
    for f in fields {
        write!(w, "{f:08x}")?;
    }
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    w.pad4()?;
    w.write_all(data)?;
    w.pad4()
}

struct Counting<'a, W: Write> {
    inner: &'a mut W,
    count: u64,
}

impl<W: Write> Counting<'_, W> {
    fn pad4(&mut self) -> io::Result<()> {
        let pad = (4 - (self.count % 4) as usize) % 4;
        self.write_all(&[0u8; 3][..pad])
    }
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal newc reader, independent of the writer's code paths.
    fn parse(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>, u32, u32)> {
        let mut out = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(off % 4, 0, "entry not 4-byte aligned");
            assert_eq!(&bytes[off..off + 6], MAGIC);
            let field = |i: usize| {
                let s = std::str::from_utf8(&bytes[off + 6 + i * 8..off + 14 + i * 8]).unwrap();
                u32::from_str_radix(s, 16).unwrap()
            };
            let (mode, size, rmaj, rmin, namesize) =
                (field(1), field(6), field(9), field(10), field(11));
            let name_start = off + 110;
            let name = std::str::from_utf8(&bytes[name_start..name_start + namesize as usize - 1])
                .unwrap()
                .to_owned();
            assert_eq!(bytes[name_start + namesize as usize - 1], 0);
            let data_start = (name_start + namesize as usize + 3) & !3;
            let data = bytes[data_start..data_start + size as usize].to_vec();
            off = (data_start + size as usize + 3) & !3;
            if name == TRAILER {
                assert_eq!(off, bytes.len());
                return out;
            }
            out.push((name, mode, data, rmaj, rmin));
        }
    }

    #[test]
    fn round_trips_every_kind() {
        let mut a = Archive::new();
        a.dir("dev", 0o755).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.file("init", 0o755, b"\x7fELF...".to_vec()).unwrap();
        a.file("empty", 0o644, Vec::new()).unwrap();
        a.symlink("sbin", "/").unwrap();
        let entries = parse(&a.to_bytes().unwrap());
        assert_eq!(entries.len(), 5);
        assert_eq!(entries[0].0, "dev");
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            entries[1],
            ("dev/console".into(), S_IFCHR | 0o600, vec![], 5, 1)
        );
        assert_eq!(entries[2].2, b"\x7fELF...");
        assert_eq!(entries[2].1, S_IFREG | 0o755);
        assert_eq!(entries[3].2, b"");
        assert_eq!(entries[4].1, S_IFLNK | 0o777);
        assert_eq!(entries[4].2, b"/");
    }

    #[test]
    fn padding_for_every_name_and_data_length() {
        for name_len in 1..9 {
            for data_len in 0..9 {
                let mut a = Archive::new();
                let name = "n".repeat(name_len);
                a.file(&name, 0o644, vec![7u8; data_len]).unwrap();
                let bytes = a.to_bytes().unwrap();
                assert_eq!(bytes.len() % 4, 0);
                let e = parse(&bytes);
                assert_eq!((e[0].0.as_str(), e[0].2.len()), (name.as_str(), data_len));
            }
        }
    }

    #[test]
    fn output_is_deterministic() {
        let build = || {
            let mut a = Archive::new();
            a.dir("proc", 0o555)
                .unwrap()
                .file("init", 0o755, vec![1, 2, 3])
                .unwrap();
            a.to_bytes().unwrap()
        };
        assert_eq!(build(), build());
    }

    #[test]
    fn rejects_bad_paths_and_duplicates() {
        let mut a = Archive::new();
        for bad in ["", "/init", "a/../b", "..", "a//b", "a/", "nul\0"] {
            assert!(
                matches!(a.dir(bad, 0o755), Err(Error::BadPath(_))),
                "{bad:?}"
            );
        }
        a.dir("dev", 0o755).unwrap();
        assert!(matches!(a.dir("dev", 0o755), Err(Error::Duplicate(_))));
    }

    #[test]
    fn system_cpio_reads_our_archive() {
        let mut a = Archive::new();
        a.dir("dev", 0o755).unwrap();
        a.char_dev("dev/console", 0o600, 5, 1).unwrap();
        a.file("init", 0o755, b"#!/bin/sh\n".to_vec()).unwrap();
        let bytes = a.to_bytes().unwrap();
        let mut child = std::process::Command::new("cpio")
            .args(["-it", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("cpio(1) is installed by the setup script");
        child.stdin.take().unwrap().write_all(&bytes).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "dev\ndev/console\ninit\n"
        );
    }
}

//! Guest memory in a snapshot: one raw file, the RAM regions one after the
//! other, written sparsely (all-zero pages are holes); restored by mapping
//! the file MAP_PRIVATE, so VMs restored from one snapshot share its pages
//! until they write them.
//!
//! Its digest ([`sparse_sha256_file`]) covers the content, page by page,
//! but only the pages that are not all zeros, each with its index: the
//! check before a restore then reads the file's data only, found with
//! `SEEK_DATA`/`SEEK_HOLE`, not its holes. A 2 GiB guest's file holds
//! ~50 MiB of data; hashing all of it, holes read as zeros, took ~2 s of
//! every restore.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

/// Granularity of the zero-page check.
pub const PAGE_SIZE: usize = 4096;
/// How much guest memory is copied out at a time.
const CHUNK: usize = 1 << 20;

/// What writing the memory file produced.
#[derive(Debug, Clone)]
pub struct Written {
    /// Logical size of the file (all of guest RAM).
    pub size: u64,
    /// Bytes of non-zero pages actually written.
    pub data_bytes: u64,
    /// The content's digest ([`sparse_sha256_file`]), hex.
    pub sha256: String,
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only splits
        // the slice at alignment boundaries.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Writes every RAM region of `memory`, in order, to `path`: zero pages
/// are left as holes.
pub fn write(memory: &GuestMemoryMmap, path: &Path) -> io::Result<Written> {
    let file = File::create(path)?;
    let total: u64 = memory.iter().map(|r| r.len()).sum();
    file.set_len(total)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut file_offset = 0u64;
    let mut data_bytes = 0u64;
    for region in memory.iter() {
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            region
                .read_slice(chunk, MemoryRegionAddress(done))
                .map_err(|e| io::Error::other(format!("reading guest memory: {e}")))?;
            // Write runs of non-zero pages; hash each non-zero page.
            let mut page = 0;
            while page < n {
                let end = (page + PAGE_SIZE).min(n);
                if is_zero(&chunk[page..end]) {
                    page = end;
                    continue;
                }
                let start = page;
                let mut stop = end;
                while stop < n {
                    let next = (stop + PAGE_SIZE).min(n);
                    if is_zero(&chunk[stop..next]) {
                        break;
                    }
                    stop = next;
                }
                let mut p = start;
                while p < stop {
                    let next = (p + PAGE_SIZE).min(stop);
                    hash_page(&mut hasher, file_offset + done + p as u64, &chunk[p..next]);
                    p = next;
                }
                file.write_all_at(&chunk[start..stop], file_offset + done + start as u64)?;
                data_bytes += (stop - start) as u64;
                page = stop;
            }
            done += n as u64;
        }
        file_offset += len;
    }
    file.sync_all()?;
    Ok(Written {
        size: total,
        data_bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Adds the non-zero page at byte `offset` of the memory file to a digest.
fn hash_page(hasher: &mut Sha256, offset: u64, page: &[u8]) {
    hasher.update((offset / PAGE_SIZE as u64).to_le_bytes());
    hasher.update(page);
}

/// The memory file's digest and its length: sha256 over each page that is
/// not all zeros, in order, as its index (u64, little endian) and its
/// bytes. Only the file's data is read (`SEEK_DATA`/`SEEK_HOLE`; a file
/// system without them reports everything as data, which is only
/// slower); a hole, like a page of zeros, adds nothing. Any change to the
/// content changes the digest.
pub fn sparse_sha256_file(path: &Path) -> io::Result<(u64, String)> {
    use std::os::fd::AsRawFd;
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let fd = file.as_raw_fd();
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let from = libc::off_t::try_from(from).map_err(io::Error::other)?;
        // SAFETY: lseek on a descriptor this function owns; it only moves
        // the file offset (the reads below are positioned).
        let at = unsafe { libc::lseek(fd, from, whence) };
        if at >= 0 {
            return Ok(Some(at as u64));
        }
        match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    // The next page not hashed yet: extents of blocks smaller than a page
    // can share one.
    let mut next_page = 0u64;
    let page = PAGE_SIZE as u64;
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut at = (data / page * page).max(next_page * page);
        let end = hole.div_ceil(page) * page;
        let end = end.min(len);
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            file.read_exact_at(&mut buf[..n], at)?;
            let mut off = 0;
            while off < n {
                let stop = (off + PAGE_SIZE).min(n);
                if !is_zero(&buf[off..stop]) {
                    hash_page(&mut hasher, at + off as u64, &buf[off..stop]);
                }
                off = stop;
            }
            at += n as u64;
        }
        next_page = end.div_ceil(page);
        pos = hole.max(end);
    }
    Ok((len, hex(&hasher.finalize())))
}

/// sha256 of a file's content, and its length.
pub fn sha256_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut len = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex(&hasher.finalize())))
}

/// Maps `path` as guest RAM laid out as `ranges` (guest address, length),
/// the regions one after the other in the file, MAP_PRIVATE: writes stay
/// in this process, unchanged pages are shared through the page cache.
pub fn map_private(path: &Path, ranges: &[(u64, u64)]) -> io::Result<GuestMemoryMmap> {
    let mut file = File::options().read(true).open(path)?;
    let total: u64 = ranges.iter().map(|&(_, len)| len).sum();
    let size = file.seek(SeekFrom::End(0))?;
    if size != total {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{size} bytes, the guest's RAM is {total}"),
        ));
    }
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for &(start, len) in ranges {
        let len_usize = usize::try_from(len).map_err(io::Error::other)?;
        let mapping = MmapRegionBuilder::new(len_usize)
            .with_file_offset(FileOffset::new(file.try_clone()?, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| io::Error::other(format!("mapping guest memory: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| io::Error::other("guest memory region wraps"))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_file_round_trips_through_a_private_mapping() {
        let ranges = [(0u64, 4u64 << 20)];
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[7u8; 5000], GuestAddress(0x20_0000 - 100))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("rtv-mem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let w = write(&mem, &path).unwrap();
        assert_eq!(w.size, 4 << 20);
        assert_eq!(w.data_bytes, 4 * PAGE_SIZE as u64);
        let (len, sha) = sparse_sha256_file(&path).unwrap();
        assert_eq!((len, sha.as_str()), (w.size, w.sha256.as_str()));
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(blocks < 1 << 20, "file is not sparse: {blocks} bytes");

        let restored = map_private(&path, &ranges).unwrap();
        let mut b = [0u8; 5];
        restored.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(&b, b"hello");
        // Writes stay private.
        restored
            .write_slice(b"HELLO", GuestAddress(0x1234))
            .unwrap();
        let again = map_private(&path, &ranges).unwrap();
        again.read_slice(&mut b, GuestAddress(0x1234)).unwrap();
        assert_eq!(&b, b"hello");
        assert!(map_private(&path, &[(0, 8 << 20)]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The digest reads only data, yet sees every change: a flipped byte in
    /// a data page, a byte written into a hole, a data page zeroed; and it
    /// is the content's, not the layout's (zeros written where a hole was
    /// change nothing).
    #[test]
    fn the_sparse_digest_sees_every_change_of_the_content() {
        let mem: GuestMemoryMmap =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
        mem.write_slice(b"kernel", GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[9u8; 3 * PAGE_SIZE], GuestAddress(0x40_0000))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("rtv-mem-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let w = write(&mem, &path).unwrap();
        let digest = || sparse_sha256_file(&path).unwrap().1;
        assert_eq!(digest(), w.sha256);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // Zeros written into a hole: the same content.
        f.write_all_at(&[0u8; PAGE_SIZE], 0x20_0000).unwrap();
        assert_eq!(digest(), w.sha256, "zeros where a hole was");
        // A flipped byte in a data page.
        f.write_all_at(b"Kernel", 0x1000).unwrap();
        assert_ne!(digest(), w.sha256, "a flipped byte");
        f.write_all_at(b"kernel", 0x1000).unwrap();
        assert_eq!(digest(), w.sha256);
        // A byte in a hole.
        f.write_all_at(&[1], 0x70_0000).unwrap();
        assert_ne!(digest(), w.sha256, "a byte in a hole");
        f.write_all_at(&[0], 0x70_0000).unwrap();
        assert_eq!(digest(), w.sha256);
        // A data page zeroed.
        f.write_all_at(&[0u8; PAGE_SIZE], 0x40_1000).unwrap();
        assert_ne!(digest(), w.sha256, "a data page zeroed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! FOPEN_KEEP_CACHE with close-to-open consistency, over any FUSE file
//! system (the device wraps fuse-backend-rs's passthrough in it).
//!
//! Linux's FUSE client drops an inode's page cache at every `open` whose
//! reply lacks FOPEN_KEEP_CACHE (`fuse_open_common` →
//! `invalidate_inode_pages2`), and the passthrough's `CachePolicy::Auto`
//! never sets it. On a PVM host, where guest kernel code is emulated, each
//! exec of a binary from the share then costs the invalidation of its
//! pages and the re-reading of its text through FUSE: most of an
//! `rtv exec` (guest-kernel/README.md, measured).
//!
//! [`KeepCache`] sets FOPEN_KEEP_CACHE on an OPEN reply exactly when the
//! host file is unchanged since the guest's previous open of the same FUSE
//! inode: same device, inode number, size, mtime and ctime (nanoseconds),
//! from a `getattr` of the file just opened. Anything else — the first open
//! of an inode, a file the host (or the guest, through the share) changed in
//! between, a failed `getattr`, a non-regular file — gets the inner file
//! system's reply unchanged, so the guest drops its pages and reads the file
//! anew, as before. Every open records what it saw, so the pages a guest
//! keeps were read after an open that saw the same file. A change that
//! leaves size, mtime and ctime as they were (two writes within one tick of
//! the host file system's timestamp clock, around the guest's read) is not
//! seen: the same limit as NFS's close-to-open and the kernel's own
//! `auto_inval_data`.
//!
//! The guest is untrusted: the nodeid is only a map key, recorded after
//! the inner file system opened it (an unknown nodeid fails there first),
//! so the map holds at most one entry per inode the inner file system holds;
//! an entry is dropped when the guest forgets its inode (the passthrough
//! never reuses an inode number) and all at INIT and DESTROY.
//!
//! The wrapper also pins each handle's open flags for READ and WRITE.
//! fuse-backend-rs 0.14's passthrough applies a READ or WRITE whose flags
//! differ from the handle's with `fcntl(F_SETFL)`, and when that fails
//! (`O_DIRECT` where the host file system has none, clearing `O_APPEND` on
//! an append-only file) it returns early while a `File` made from the
//! handle's raw descriptor is still live: the descriptor is closed under
//! the handle, whose number the next `open` of the VMM reuses, so a guest
//! could aim the handle at any file the VMM opens next (and a debug build
//! aborts at the double close). The guest's flags only mirror its own
//! `fcntl(F_SETFL)` after open: `O_APPEND` writes already carry their
//! offset (the guest kernel computes it) and `O_NONBLOCK` means nothing to
//! a regular file, so every READ and WRITE goes to the passthrough with the
//! flags its handle was opened with, which never calls `fcntl`.

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn};
use fuse_backend_rs::abi::virtio_fs::RemovemappingOne;
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::transport::FsCacheReqHandler;

/// What identifies the content of a host file between two opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    size: i64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Version {
    /// The version of a regular file; `None` for anything else.
    fn of(st: &stat64) -> Option<Self> {
        (st.st_mode & libc::S_IFMT == libc::S_IFREG).then_some(Self {
            dev: st.st_dev,
            ino: st.st_ino,
            size: st.st_size,
            mtime: (st.st_mtime, st.st_mtime_nsec),
            ctime: (st.st_ctime, st.st_ctime_nsec),
        })
    }
}

/// A FUSE file system that adds FOPEN_KEEP_CACHE to the OPEN replies of
/// `inner` when the file is unchanged since the previous open of its inode
/// (see the module's documentation).
pub struct KeepCache<FS> {
    inner: FS,
    /// The version each FUSE inode had at its last open.
    seen: Mutex<HashMap<u64, Version>>,
    /// The flags each open file handle was opened with.
    opened: Mutex<HashMap<u64, u32>>,
}

impl<FS: FileSystem> KeepCache<FS> {
    /// Wraps `inner`.
    pub fn new(inner: FS) -> Self {
        Self {
            inner,
            seen: Mutex::new(HashMap::new()),
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped file system.
    pub fn inner(&self) -> &FS {
        &self.inner
    }

    /// Number of inodes whose last open is remembered.
    pub fn remembered(&self) -> usize {
        self.seen().len()
    }

    fn seen(&self) -> MutexGuard<'_, HashMap<u64, Version>> {
        // The map holds plain values: a panic elsewhere cannot leave it
        // half-updated.
        self.seen.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn opened(&self) -> MutexGuard<'_, HashMap<u64, u32>> {
        self.opened.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flags `handle` was opened with: what READ and WRITE pass on.
    fn open_flags(&self, handle: u64) -> io::Result<u32> {
        self.opened()
            .get(&handle)
            .copied()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBADF))
    }
}

impl<FS: FileSystem> FileSystem for KeepCache<FS> {
    type Inode = FS::Inode;

    type Handle = FS::Handle;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        self.seen().clear();
        self.opened().clear();
        self.inner.init(capable)
    }

    fn destroy(&self) {
        self.seen().clear();
        self.opened().clear();
        self.inner.destroy()
    }

    fn forget(&self, ctx: &Context, inode: Self::Inode, count: u64) {
        let node: u64 = inode.into();
        self.seen().remove(&node);
        self.inner.forget(ctx, node.into(), count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(Self::Inode, u64)>) {
        let requests: Vec<(u64, u64)> = requests
            .into_iter()
            .map(|(inode, count)| (inode.into(), count))
            .collect();
        {
            let mut seen = self.seen();
            for (node, _) in &requests {
                seen.remove(node);
            }
        }
        self.inner.batch_forget(
            ctx,
            requests
                .into_iter()
                .map(|(node, count)| (node.into(), count))
                .collect(),
        )
    }

    fn open(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let node: u64 = inode.into();
        let (handle, mut opts, passthrough) =
            self.inner.open(ctx, node.into(), flags, fuse_flags)?;
        let fh: Option<u64> = handle.map(Into::into);
        if let Some(fh) = fh {
            self.opened().insert(fh, flags);
        }
        // The file just opened (its handle), else the inode.
        let now = self
            .inner
            .getattr(ctx, node.into(), fh.map(Into::into))
            .ok()
            .and_then(|(st, _)| Version::of(&st));
        let unchanged = {
            let mut seen = self.seen();
            match now {
                Some(v) => seen.insert(node, v) == Some(v),
                None => {
                    seen.remove(&node);
                    false
                }
            }
        };
        if unchanged && !opts.contains(OpenOptions::DIRECT_IO) {
            opts |= OpenOptions::KEEP_CACHE;
        }
        Ok((fh.map(Into::into), opts, passthrough))
    }

    fn lookup(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<Entry> {
        self.inner.lookup(ctx, parent, name)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Option<Self::Handle>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        attr: stat64,
        handle: Option<Self::Handle>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: Self::Inode) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: Self::Inode,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.inner.symlink(ctx, linkname, parent, name)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mknod(ctx, inode, name, mode, rdev, umask)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.inner.mkdir(ctx, parent, name, mode, umask)
    }

    fn unlink(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.rmdir(ctx, parent, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: Self::Inode,
        oldname: &CStr,
        newdir: Self::Inode,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        newparent: Self::Inode,
        newname: &CStr,
    ) -> io::Result<Entry> {
        self.inner.link(ctx, inode, newparent, newname)
    }

    fn create(
        &self,
        ctx: &Context,
        parent: Self::Inode,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<Self::Handle>, OpenOptions, Option<u32>)> {
        let flags = args.flags;
        let (entry, handle, opts, passthrough) = self.inner.create(ctx, parent, name, args)?;
        let fh: Option<u64> = handle.map(Into::into);
        if let Some(fh) = fh {
            self.opened().insert(fh, flags);
        }
        Ok((entry, fh.map(Into::into), opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        let fh: u64 = handle.into();
        let flags = self.open_flags(fh)?;
        self.inner
            .read(ctx, inode, fh.into(), w, size, offset, lock_owner, flags)
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        let fh: u64 = handle.into();
        let flags = self.open_flags(fh)?;
        self.inner.write(
            ctx,
            inode,
            fh.into(),
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        lock_owner: u64,
    ) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
    }

    #[allow(clippy::too_many_arguments)]
    fn release(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        let fh: u64 = handle.into();
        self.inner.release(
            ctx,
            inode,
            flags,
            fh.into(),
            flush,
            flock_release,
            lock_owner,
        )?;
        self.opened().remove(&fh);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: Self::Inode) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size)
    }

    fn listxattr(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        size: u32,
    ) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size)
    }

    fn removexattr(&self, ctx: &Context, inode: Self::Inode, name: &CStr) -> io::Result<()> {
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
    ) -> io::Result<(Option<Self::Handle>, OpenOptions)> {
        self.inner.opendir(ctx, inode, flags)
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdir(ctx, inode, handle, size, offset, add_entry)
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        self.inner
            .readdirplus(ctx, inode, handle, size, offset, add_entry)
    }

    fn fsyncdir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        datasync: bool,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        flags: u32,
        handle: Self::Handle,
    ) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)
    }

    #[allow(clippy::too_many_arguments)]
    fn setupmapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: Self::Inode, mask: u32) -> io::Result<()> {
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    /// Query file lock status
    fn getlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file read lock
    fn setlk(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    /// Grab a file write lock
    fn setlkw(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
    }

    /// send ioctl to the file
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    /// Query a file's block mapping info
    fn bmap(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        block: u64,
        blocksize: u32,
    ) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    /// Poll a file's events
    fn poll(
        &self,
        ctx: &Context,
        inode: Self::Inode,
        handle: Self::Handle,
        khandle: Self::Handle,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    /// Send notify reply.
    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    #[inline]
    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuse_backend_rs::api::filesystem::ROOT_ID;
    use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
    use std::path::PathBuf;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fs(dir: &Dir) -> KeepCache<PassthroughFs> {
        let cfg = Config {
            root_dir: dir.0.to_str().unwrap().to_string(),
            do_import: true,
            xattr: false,
            inode_file_handles: false,
            cache_policy: CachePolicy::Auto,
            ..Default::default()
        };
        let fs = KeepCache::new(PassthroughFs::new(cfg).unwrap());
        fs.init(FsOptions::empty()).unwrap();
        fs
    }

    fn keeps(fs: &KeepCache<PassthroughFs>, node: u64) -> bool {
        let ctx = Context::new();
        let (h, opts, _) = fs.open(&ctx, node, libc::O_RDONLY as u32, 0).unwrap();
        fs.release(&ctx, node, 0, h.unwrap(), false, false, None)
            .unwrap();
        opts.contains(OpenOptions::KEEP_CACHE)
    }

    #[test]
    fn unchanged_files_keep_the_cache_changed_ones_do_not() {
        let dir = Dir(std::env::temp_dir().join(format!("rtv-keep-cache-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let file = dir.0.join("f");
        std::fs::write(&file, "aaaa").unwrap();
        let fs = fs(&dir);
        let ctx = Context::new();
        let node = fs.lookup(&ctx, ROOT_ID, c"f").unwrap().inode;

        assert!(!keeps(&fs, node), "first open");
        assert!(keeps(&fs, node), "second open, unchanged");
        assert!(keeps(&fs, node), "third open, unchanged");
        // Same size, new content: mtime/ctime move.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&file, "bbbb").unwrap();
        assert!(!keeps(&fs, node), "changed on the host");
        assert!(keeps(&fs, node), "unchanged since");
        // Metadata only (ctime).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        assert!(!keeps(&fs, node), "chmod on the host");

        // Forgotten inodes are not remembered; a new lookup starts afresh.
        assert_eq!(fs.remembered(), 1);
        fs.forget(&ctx, node, 1);
        assert_eq!(fs.remembered(), 0);
        let again = fs.lookup(&ctx, ROOT_ID, c"f").unwrap().inode;
        assert!(!keeps(&fs, again), "first open after a forget");
        fs.batch_forget(&ctx, vec![(again, 1)]);
        assert_eq!(fs.remembered(), 0);

        // Directories and unknown nodeids: the inner reply, nothing kept.
        let ctx = Context::new();
        assert!(fs.open(&ctx, 0xdead_beef, 0, 0).is_err());
        assert!(fs.open(&ctx, u64::MAX, 0, 0).is_err());
        assert_eq!(fs.remembered(), 0);
        fs.destroy();
        assert_eq!(fs.remembered(), 0);
    }
}

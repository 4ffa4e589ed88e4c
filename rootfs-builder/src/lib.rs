//! Builds rtv's guest initramfs: the agent as `/init`, the mount points it
//! uses, and `/dev/console` so the kernel can give init its stdio.

pub mod cpio;

use std::path::Path;

/// Errors building the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The agent binary cannot be read.
    #[error("agent binary {path}: {source}")]
    ReadAgent {
        /// Its path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The agent is not a statically linked x86-64 ELF executable.
    #[error("agent binary {path} {reason}")]
    BadAgent {
        /// Its path.
        path: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The archive cannot be built.
    #[error(transparent)]
    Cpio(#[from] cpio::Error),
}

const PT_INTERP: u32 = 3;

/// Checks that `elf` is an x86-64 executable with no program interpreter
/// (a dynamically linked /init would find no loader in the initramfs).
pub fn check_static_elf(elf: &[u8]) -> Result<(), &'static str> {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("is not an ELF file");
    }
    if elf[4] != 2 || elf[5] != 1 || u16::from_le_bytes([elf[18], elf[19]]) != 62 {
        return Err("is not a 64-bit x86-64 ELF");
    }
    let phoff = u64::from_le_bytes(elf[32..40].try_into().map_err(|_| "has a bad header")?);
    let phentsize = usize::from(u16::from_le_bytes([elf[54], elf[55]]));
    let phnum = usize::from(u16::from_le_bytes([elf[56], elf[57]]));
    let phoff = usize::try_from(phoff).map_err(|_| "has a bad header")?;
    for i in 0..phnum {
        let start = i
            .checked_mul(phentsize)
            .and_then(|o| o.checked_add(phoff))
            .ok_or("has a bad program header table")?;
        let ptype = elf
            .get(start..start + 4)
            .ok_or("has a truncated program header table")?;
        if u32::from_le_bytes([ptype[0], ptype[1], ptype[2], ptype[3]]) == PT_INTERP {
            return Err("is dynamically linked (build it with -C target-feature=+crt-static)");
        }
    }
    Ok(())
}

/// The initramfs for `agent` (the bytes of a static executable).
pub fn agent_initramfs(agent: Vec<u8>) -> Result<cpio::Archive, cpio::Error> {
    let mut a = cpio::Archive::new();
    a.dir("dev", 0o755)?
        .char_dev("dev/console", 0o600, 5, 1)?
        .dir("proc", 0o555)?
        .dir("sys", 0o555)?
        .dir("run", 0o755)?
        .dir("tmp", 0o1777)?
        .file("init", 0o755, agent)?;
    Ok(a)
}

/// The busybox applets a test guest gets, as /bin symlinks.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "echo", "cat", "head", "seq", "wc", "sleep", "stty", "true", "false", "id", "ls", "env",
    "pwd", "kill", "ps", "hostname", "uname", "dd", "yes", "tr",
];

fn read_static(what: &'static str, path: &Path) -> Result<Vec<u8>, Error> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| Error::ReadAgent {
        path: shown.clone(),
        source,
    })?;
    check_static_elf(&bytes).map_err(|reason| Error::BadAgent {
        path: format!("{what} {shown}"),
        reason,
    })?;
    Ok(bytes)
}

/// Reads and checks the agent at `agent_path` (and, for test guests, a
/// static busybox to install as /bin/busybox with [`BUSYBOX_APPLETS`]) and
/// builds the initramfs.
pub fn build(agent_path: &Path, busybox: Option<&Path>) -> Result<Vec<u8>, Error> {
    let mut archive = agent_initramfs(read_static("agent", agent_path)?)?;
    if let Some(bb) = busybox {
        archive
            .dir("bin", 0o755)?
            .file("bin/busybox", 0o755, read_static("busybox", bb)?)?;
        for applet in BUSYBOX_APPLETS {
            archive.symlink(&format!("bin/{applet}"), "busybox")?;
        }
    }
    Ok(archive.to_bytes()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_check_on_real_binaries() {
        // This test binary is dynamically linked (it has an interpreter).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            check_static_elf(&me),
            Err("is dynamically linked (build it with -C target-feature=+crt-static)")
        );
        assert_eq!(check_static_elf(b"#!/bin/sh"), Err("is not an ELF file"));
    }

    #[test]
    fn initramfs_layout() {
        let bytes = agent_initramfs(vec![1, 2, 3]).unwrap().to_bytes().unwrap();
        let text = String::from_utf8_lossy(&bytes);
        for name in [
            "dev\0",
            "dev/console\0",
            "proc\0",
            "sys\0",
            "init\0",
            "TRAILER!!!\0",
        ] {
            assert!(text.contains(name), "{name}");
        }
    }
}

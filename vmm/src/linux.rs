//! Loading a Linux guest: the ELF vmlinux, the initramfs, the command line
//! and the boot information for PVH or the 64-bit boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::arch::boot::{self, Initrd};
use crate::arch::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::arch::regs::BootEntry;
use crate::vm::Vm;

/// Which boot protocol to enter the kernel with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH if the kernel has a PVH entry point, else the 64-bit protocol.
    #[default]
    Auto,
    /// PVH (32-bit entry, `hvm_start_info`).
    Pvh,
    /// The Linux 64-bit boot protocol (long mode, `boot_params`).
    Linux64,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "pvh" => Ok(Self::Pvh),
            "linux64" => Ok(Self::Linux64),
            other => Err(format!(
                "unknown boot protocol {other:?} (expected auto, pvh or linux64)"
            )),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// The ELF vmlinux.
    pub kernel: PathBuf,
    /// The initramfs (cpio), if any.
    pub initrd: Option<PathBuf>,
    /// The complete kernel command line.
    pub cmdline: String,
    /// The boot protocol.
    pub protocol: BootProtocol,
}

/// Errors loading a guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file cannot be opened or read.
    #[error("{kind} {path}: {source}")]
    File {
        /// "kernel" or "initramfs".
        kind: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel file is not an x86-64 ELF executable.
    #[error("kernel {path} is not an x86-64 ELF vmlinux: {reason}")]
    NotVmlinux {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// linux-loader refused the kernel.
    #[error("kernel {path}: {source}")]
    Load {
        /// The path.
        path: PathBuf,
        /// Why.
        source: linux_loader::loader::Error,
    },
    /// PVH was asked for but the kernel has no PVH entry point.
    #[error(
        "kernel {0} has no PVH entry point (build it with CONFIG_PVH=y, or boot with linux64)"
    )]
    NoPvhEntry(PathBuf),
    /// The initramfs does not fit in guest memory.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitrdTooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// The command line is not acceptable.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing to guest memory failed.
    #[error("writing {what} to guest memory: {reason}")]
    GuestWrite {
        /// What.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

const EM_X86_64: u16 = 62;
const ET_EXEC: u16 = 2;

/// Opens `path` and checks that it is a 64-bit little-endian x86-64 ELF
/// executable, the form of a vmlinux.
pub fn open_vmlinux(path: &Path) -> Result<File, Error> {
    let file_err = |source| Error::File {
        kind: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    if file.metadata().map_err(file_err)?.is_dir() {
        return Err(Error::NotVmlinux {
            path: path.into(),
            reason: "it is a directory",
        });
    }
    let mut ident = [0u8; 20];
    let not = |reason| Error::NotVmlinux {
        path: path.into(),
        reason,
    };
    file.read_exact(&mut ident)
        .map_err(|_| not("too short for an ELF header"))?;
    if &ident[..4] != b"\x7fELF" {
        return Err(not("no ELF magic (a bzImage or other file?)"));
    }
    if ident[4] != 2 {
        return Err(not("not a 64-bit ELF"));
    }
    if ident[5] != 1 {
        return Err(not("not little-endian"));
    }
    if u16::from_le_bytes([ident[16], ident[17]]) != ET_EXEC {
        return Err(not("not an executable ELF"));
    }
    if u16::from_le_bytes([ident[18], ident[19]]) != EM_X86_64 {
        return Err(not("built for another architecture"));
    }
    file.seek(SeekFrom::Start(0)).map_err(file_err)?;
    Ok(file)
}

/// Builds the final command line, checking what the kernel accepts.
pub fn build_cmdline(parts: &[&str]) -> Result<Cmdline, Error> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| Error::Cmdline(e.to_string()))?;
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        cmdline
            .insert_str(part)
            .map_err(|e| Error::Cmdline(format!("{part:?}: {e}")))?;
    }
    Ok(cmdline)
}

/// `cmdline` with each of `entries` appended unless it is already there
/// as a whole word.
pub fn with_device_entries(cmdline: &str, entries: &[String]) -> String {
    let mut out = cmdline.trim().to_string();
    for entry in entries {
        if !out.split_whitespace().any(|w| w == entry) {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(entry);
        }
    }
    out
}

/// Loads the kernel, initramfs, command line and boot information into the
/// VM's memory and returns the entry point to start the boot vCPU at.
pub fn load(vm: &Vm, config: &KernelConfig) -> Result<BootEntry, Error> {
    let mem = vm.memory();
    let mut kernel = open_vmlinux(&config.kernel)?;
    let initrd_file = match &config.initrd {
        Some(path) => {
            let file = File::open(path).map_err(|source| Error::File {
                kind: "initramfs",
                path: path.clone(),
                source,
            })?;
            let size = file
                .metadata()
                .map_err(|source| Error::File {
                    kind: "initramfs",
                    path: path.clone(),
                    source,
                })?
                .len();
            Some((path, file, size))
        }
        None => None,
    };
    let cmdline = build_cmdline(&[&with_device_entries(&config.cmdline, &vm.cmdline_entries())])?;

    let loaded =
        Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            Error::Load {
                path: config.kernel.clone(),
                source,
            }
        })?;

    let initrd = match initrd_file {
        Some((path, mut file, size)) => {
            let mem_size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
            let too_large = || Error::InitrdTooLarge {
                path: path.clone(),
                size,
            };
            let addr =
                boot::initrd_address(mem_size, loaded.kernel_end, size).ok_or_else(too_large)?;
            mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
                .map_err(|e| Error::File {
                    kind: "initramfs",
                    path: path.clone(),
                    source: std::io::Error::other(e.to_string()),
                })?;
            Some(Initrd { addr, size })
        }
        None => None,
    };

    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|e| Error::GuestWrite {
        what: "command line",
        reason: e.to_string(),
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .map_err(|e| Error::Cmdline(e.to_string()))?;

    let mem_size: u64 = mem.iter().map(vm_memory::GuestMemoryRegion::len).sum();
    let pvh_entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
        _ => None,
    };
    let use_pvh = match config.protocol {
        BootProtocol::Pvh => {
            Some(pvh_entry.ok_or_else(|| Error::NoPvhEntry(config.kernel.clone()))?)
        }
        BootProtocol::Auto => pvh_entry,
        BootProtocol::Linux64 => None,
    };
    let boot_err = |e: linux_loader::configurator::Error| Error::GuestWrite {
        what: "boot parameters",
        reason: e.to_string(),
    };
    match use_pvh {
        Some(entry) => {
            let (info, memmap, module) = boot::pvh_start_info(mem_size, initrd);
            let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if let Some(module) = module {
                params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&params, mem).map_err(boot_err)?;
            tracing::debug!(entry = format_args!("{entry:#x}"), "PVH boot");
            Ok(BootEntry::Pvh {
                entry,
                start_info: PVH_INFO_START,
            })
        }
        None => {
            let zero_page = boot::zero_page(mem_size, cmdline_len, initrd);
            let params = BootParams::new(&zero_page, GuestAddress(ZERO_PAGE_START));
            LinuxBootConfigurator::write_bootparams(&params, mem).map_err(boot_err)?;
            let entry = loaded.kernel_load.0;
            tracing::debug!(entry = format_args!("{entry:#x}"), "64-bit boot protocol");
            // The zero page is all the kernel reads; make sure it landed.
            let check: u16 = mem
                .read_obj(GuestAddress(ZERO_PAGE_START + 0x1fe))
                .map_err(|e| Error::GuestWrite {
                    what: "zero page",
                    reason: e.to_string(),
                })?;
            debug_assert_eq!(check, 0xaa55);
            Ok(BootEntry::Linux64 {
                entry,
                zero_page: ZERO_PAGE_START,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(bytes: &[u8]) -> (tempdir::Dir, PathBuf) {
        let dir = tempdir::Dir::new();
        let path = dir.0.join("f");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        (dir, path)
    }

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Self {
                let n = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos();
                let p =
                    std::env::temp_dir().join(format!("rtv-vmm-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn elf_header(class: u8, etype: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[16..18].copy_from_slice(&etype.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn vmlinux_checks_name_the_problem() {
        let cases: [(Vec<u8>, &str); 5] = [
            (
                b"MZ not an elf at all, padding padding".to_vec(),
                "no ELF magic",
            ),
            (elf_header(1, ET_EXEC, EM_X86_64), "not a 64-bit ELF"),
            (elf_header(2, 3, EM_X86_64), "not an executable"),
            (elf_header(2, ET_EXEC, 183), "another architecture"),
            (b"\x7fELF".to_vec(), "too short"),
        ];
        for (bytes, expect) in cases {
            let (_d, path) = temp_file(&bytes);
            let err = open_vmlinux(&path).unwrap_err().to_string();
            assert!(err.contains(expect), "{err}");
            assert!(err.contains(path.to_str().unwrap()), "{err}");
        }
        let (_d, path) = temp_file(&elf_header(2, ET_EXEC, EM_X86_64));
        open_vmlinux(&path).unwrap();
        let missing = open_vmlinux(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(missing.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn cmdline_is_joined_and_bounded() {
        let c = build_cmdline(&["console=ttyS0 quiet", "  ", "rtv.test=1"]).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 quiet rtv.test=1"
        );
        let long = "x".repeat(CMDLINE_MAX_SIZE);
        assert!(build_cmdline(&[&long]).is_err());
        assert!(build_cmdline(&["bad\u{1}char"]).is_err());
    }

    #[test]
    fn device_entries_are_appended_once() {
        let e = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            with_device_entries("console=ttyS0 ", &e),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        let already = "a virtio_mmio.device=4K@0xd0000000:5 b";
        assert_eq!(with_device_entries(already, &e), already);
        assert_eq!(with_device_entries("", &e), e[0]);
        assert_eq!(with_device_entries("x", &[]), "x");
    }

    #[test]
    fn boot_protocol_parses() {
        assert_eq!("pvh".parse::<BootProtocol>(), Ok(BootProtocol::Pvh));
        assert_eq!("linux64".parse::<BootProtocol>(), Ok(BootProtocol::Linux64));
        assert!("bios".parse::<BootProtocol>().is_err());
    }
}

//! Boot information handed to the guest kernel: the e820 memory map, the
//! Linux `boot_params` ("zero page") for the 64-bit boot protocol, and the
//! PVH `hvm_start_info`.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use super::layout::{
    low_ram_end, CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START,
    PVH_MEMMAP_START, PVH_MODLIST_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Boot protocol version we implement in the zero page (2.15).
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;

/// One entry of the guest memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// e820 type ([`E820_RAM`]).
    pub kind: u32,
}

/// The guest's memory map for `mem_size` bytes of RAM: conventional memory
/// below the EBDA, RAM from 1 MiB to the MMIO hole, and RAM above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    let low_end = low_ram_end(mem_size);
    if low_end > HIMEM_START {
        map.push(E820Entry {
            addr: HIMEM_START,
            size: low_end - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry {
            addr: MMIO_GAP_END,
            size: mem_size - MMIO_GAP_START,
            kind: E820_RAM,
        });
    }
    map
}

/// Where the initramfs goes: page-aligned at the top of RAM below the MMIO
/// hole, above `kernel_end`. `None` if it does not fit.
pub fn initrd_address(mem_size: u64, kernel_end: u64, initrd_size: u64) -> Option<u64> {
    let top = low_ram_end(mem_size);
    let start = top.checked_sub(initrd_size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

/// Location and size of the initramfs in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The zero page for the Linux 64-bit boot protocol.
pub fn zero_page(mem_size: u64, cmdline_len: usize, initrd: Option<Initrd>) -> boot_params {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.version = BOOT_PROTOCOL_VERSION;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    let map = e820_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

/// The PVH start info, its memory map, and the module list entry for the
/// initramfs, if any.
pub fn pvh_start_info(
    mem_size: u64,
    initrd: Option<Initrd>,
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Option<hvm_modlist_entry>,
) {
    let memmap: Vec<hvm_memmap_table_entry> = e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let module = initrd.map(|i| hvm_modlist_entry {
        paddr: i.addr,
        size: i.size,
        cmdline_paddr: 0,
        reserved: 0,
    });
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        flags: 0,
        nr_modules: u32::from(module.is_some()),
        modlist_paddr: if module.is_some() {
            PVH_MODLIST_START
        } else {
            0
        },
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    (info, memmap, module)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_for_small_guest() {
        let map = e820_map(128 << 20);
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: EBDA_START,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: HIMEM_START,
                    size: (128 << 20) - HIMEM_START,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_for_guest_above_4g() {
        let mem = 6u64 << 30;
        let map = e820_map(mem);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(map[2].addr, 1 << 32);
        let ram: u64 = map.iter().map(|e| e.size).sum();
        // Everything but the legacy hole between the EBDA and 1 MiB is RAM.
        assert_eq!(ram, mem - (HIMEM_START - EBDA_START));
        // No entry overlaps the MMIO hole.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END));
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let mem = 128u64 << 20;
        let addr = initrd_address(mem, 32 << 20, 10_000).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= mem);
        assert!(mem - addr < 10_000 + 4096);
        // Larger than the room above the kernel.
        assert_eq!(initrd_address(mem, 32 << 20, 100 << 20), None);
        assert_eq!(initrd_address(mem, 0, mem + 1), None);
        // Above 4 GiB of RAM it stays below the MMIO hole.
        let high = initrd_address(8 << 30, 32 << 20, 1 << 20).unwrap();
        assert!(high + (1 << 20) <= MMIO_GAP_START);
    }

    #[test]
    fn zero_page_fields() {
        let initrd = Initrd {
            addr: 0x7f0_0000,
            size: 12345,
        };
        let p = zero_page(128 << 20, 77, Some(initrd));
        let hdr = p.hdr;
        let (flag, magic, loader) = (hdr.boot_flag, hdr.header, hdr.type_of_loader);
        assert_eq!((flag, magic, loader), (0xaa55, 0x5372_6448, 0xff));
        let (ptr, size) = (hdr.cmd_line_ptr, hdr.cmdline_size);
        assert_eq!((u64::from(ptr), size), (CMDLINE_START, 77));
        let (image, rsize) = (hdr.ramdisk_image, hdr.ramdisk_size);
        assert_eq!((image, rsize), (0x7f0_0000, 12345));
        assert_eq!(p.e820_entries, 2);
        let second = p.e820_table[1];
        let (addr, size, kind) = (second.addr, second.size, second.type_);
        assert_eq!(
            (addr, size, kind),
            (HIMEM_START, (128 << 20) - HIMEM_START, E820_RAM)
        );
        let none = zero_page(128 << 20, 1, None).hdr;
        let (image, rsize) = (none.ramdisk_image, none.ramdisk_size);
        assert_eq!((image, rsize), (0, 0));
    }

    #[test]
    fn pvh_start_info_fields() {
        let initrd = Initrd {
            addr: 0x7f0_0000,
            size: 4096,
        };
        let (info, memmap, module) = pvh_start_info(256 << 20, Some(initrd));
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
        assert_eq!(info.memmap_entries as usize, memmap.len());
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        let module = module.unwrap();
        assert_eq!((module.paddr, module.size), (0x7f0_0000, 4096));
        let (info, _, module) = pvh_start_info(256 << 20, None);
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
        assert!(module.is_none());
    }
}

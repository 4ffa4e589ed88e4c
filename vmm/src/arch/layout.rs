//! Guest physical memory layout on x86_64.
//!
//! The low megabyte follows the PC conventions the Linux boot code expects;
//! the kernel itself loads where its ELF program headers say (16 MiB for a
//! default vmlinux). A 768 MiB hole below 4 GiB is kept free of RAM for MMIO
//! (LAPIC, IOAPIC and the virtio-mmio devices).

/// Global descriptor table used for the boot vCPU.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty) used for the boot vCPU.
pub const BOOT_IDT_START: u64 = 0x540;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map (follows the module list).
pub const PVH_MEMMAP_START: u64 = 0x6060;
/// Linux `boot_params` ("zero page") for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit boot protocol.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4 table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 entries of 2 MiB: the first GiB identity-mapped).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line the x86 kernel accepts (COMMAND_LINE_SIZE, including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table goes; RAM ends here in the low MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// First address above the legacy ISA hole (VGA, option ROMs, BIOS).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// Size of the 32-bit MMIO hole (up to 4 GiB).
pub const MMIO_GAP_SIZE: u64 = 0x3000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = MMIO_GAP_START + MMIO_GAP_SIZE;
/// Where virtio-mmio devices are placed, one 4 KiB window each.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
/// The IOAPIC's register window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's register window.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the VMX TSS and one for the identity map (Intel only).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's EPT identity-map page (Intel only).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

// The layout's invariants, checked at compile time.
const _: () =
    assert!(BOOT_STACK_POINTER > ZERO_PAGE_START + 0x1000 && BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(EBDA_START + 0x400 <= HIMEM_START);
const _: () = assert!(APIC_START > IOAPIC_START && IOAPIC_START > VIRTIO_MMIO_START);

/// Guest RAM regions for `mem_size` bytes of memory: RAM below the MMIO hole,
/// and what does not fit there above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

/// End (exclusive) of RAM below the MMIO hole.
pub fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let regions = ram_regions(4 << 30);
        assert_eq!(
            regions,
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
        assert_eq!(low_ram_end(4 << 30), MMIO_GAP_START);
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        // Each structure with its size, in increasing address order.
        let items = [
            (BOOT_GDT_START, 8 * 5),
            (BOOT_IDT_START, 8),
            (PVH_INFO_START, 0x38),
            (PVH_MODLIST_START, 0x20),
            (PVH_MEMMAP_START, 0x18 * 8),
            (ZERO_PAGE_START, 0x1000),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (EBDA_START, 0x400),
        ];
        for pair in items.windows(2) {
            assert!(
                pair[0].0 + pair[0].1 <= pair[1].0,
                "{:#x}+{:#x} overlaps {:#x}",
                pair[0].0,
                pair[0].1,
                pair[1].0
            );
        }
    }
}

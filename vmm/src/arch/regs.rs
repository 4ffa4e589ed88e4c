//! Initial vCPU state: general and special registers, FPU, MSRs, local APIC,
//! and the page tables and GDT the boot vCPU starts with.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use super::gdt::{self, kvm_segment_from_gdt, CODE_INDEX, DATA_INDEX, TSS_INDEX};
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// Local APIC register offsets and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being set.
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        /// What was being written.
        what: &'static str,
        /// The guest memory error.
        source: vm_memory::GuestMemoryError,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// The CPU mode and entry point the boot vCPU starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected mode, paging off, `ebx` = start info.
    Pvh {
        /// PVH entry point from the kernel's ELF note.
        entry: u64,
        /// Address of `hvm_start_info`.
        start_info: u64,
    },
    /// Linux 64-bit boot protocol: long mode, identity-mapped first GiB, `rsi` = zero page.
    Linux64 {
        /// 64-bit entry point (`startup_64`).
        entry: u64,
        /// Address of `boot_params`.
        zero_page: u64,
    },
    /// Real mode at `cs:ip` with `cs` base `cs << 4` (for tiny test guests).
    RealMode {
        /// Code segment.
        cs: u16,
        /// Instruction pointer.
        ip: u16,
    },
    /// Long mode at `entry` with nothing else set (for tiny test guests).
    Long64 {
        /// Entry point.
        entry: u64,
    },
}

/// Sets the FPU control words to their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("FPU state"))
}

/// The MSRs a vCPU boots with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Sets the boot MSRs. KVM implementations that refuse some of them (it
/// stops at the first it cannot set) get a warning, not an error: none is
/// needed to boot Linux.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|_| Error::Kvm {
        what: "MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("boot MSRs"))?;
    if set < entries.len() {
        tracing::warn!(
            msr = format_args!("{:#x}", entries[set].index),
            "KVM refused a boot MSR; continuing without it"
        );
    }
    Ok(())
}

/// Routes the legacy PIC through LINT0 (ExtINT) and NMIs through LINT1, as a
/// BIOS would before handing over.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("local APIC state"))?;
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let reg = read_lapic_reg(&lapic.regs, offset);
        write_lapic_reg(&mut lapic.regs, offset, (reg & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic).map_err(kvm("local APIC state"))
}

fn read_lapic_reg(regs: &[libc::c_char; 1024], offset: usize) -> u32 {
    let b = &regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn write_lapic_reg(regs: &mut [libc::c_char; 1024], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as libc::c_char;
    }
}

/// General-purpose registers for `entry`.
pub fn boot_regs(entry: BootEntry) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Pvh { entry, start_info } => {
            regs.rip = entry;
            regs.rbx = start_info;
        }
        BootEntry::Linux64 { entry, zero_page } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = zero_page;
        }
        BootEntry::RealMode { ip, .. } => regs.rip = u64::from(ip),
        BootEntry::Long64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
        }
    }
    regs
}

/// Writes the identity-mapping page tables for the first GiB (2 MiB pages).
pub fn write_page_tables<M: GuestMemory>(mem: &M) -> Result<(), Error> {
    let mem_err = |source| Error::Memory {
        what: "page tables",
        source,
    };
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(mem_err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(mem_err)?;
    let mut pde = [0u8; 4096];
    for (i, chunk) in pde.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pde, GuestAddress(PDE_START))
        .map_err(mem_err)
}

/// Special registers for `entry`; writes the GDT, IDT and (for long mode)
/// page tables to guest memory.
pub fn setup_sregs<M: GuestMemory>(mem: &M, vcpu: &VcpuFd, entry: BootEntry) -> Result<(), Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("special registers"))?;
    match entry {
        BootEntry::RealMode { cs, .. } => {
            sregs.cs.selector = cs;
            sregs.cs.base = u64::from(cs) << 4;
        }
        BootEntry::Pvh { .. } => {
            load_gdt(mem, &mut sregs, gdt::CODE32)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } | BootEntry::Long64 { .. } => {
            load_gdt(mem, &mut sregs, gdt::CODE64)?;
            write_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("special registers"))
}

fn load_gdt<M: GuestMemory>(mem: &M, sregs: &mut kvm_sregs, code: u64) -> Result<(), Error> {
    let table = gdt::boot_gdt(code);
    for (i, entry) in table.iter().enumerate() {
        let addr = GuestAddress(BOOT_GDT_START).unchecked_add(i as u64 * 8);
        mem.write_obj(*entry, addr)
            .map_err(|source| Error::Memory {
                what: "GDT",
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|source| Error::Memory {
            what: "IDT",
            source,
        })?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    let data = kvm_segment_from_gdt(table[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = kvm_segment_from_gdt(table[CODE_INDEX as usize], CODE_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(table[TSS_INDEX as usize], TSS_INDEX);
    Ok(())
}

/// Sets every register of the boot vCPU for `entry`.
pub fn setup_boot_vcpu<M: GuestMemory>(
    mem: &M,
    vcpu: &VcpuFd,
    entry: BootEntry,
) -> Result<(), Error> {
    setup_sregs(mem, vcpu, entry)?;
    vcpu.set_regs(&boot_regs(entry))
        .map_err(kvm("general registers"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    #[test]
    fn page_tables_identity_map_first_gib() {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pdpte, PDE_START | 3);
        for i in [0u64, 1, 8, 511] {
            let pde: u64 = mem.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "entry {i}");
        }
    }

    #[test]
    fn registers_per_boot_protocol() {
        let pvh = boot_regs(BootEntry::Pvh {
            entry: 0x100_0000,
            start_info: 0x6000,
        });
        assert_eq!((pvh.rip, pvh.rbx, pvh.rflags), (0x100_0000, 0x6000, 2));
        let l64 = boot_regs(BootEntry::Linux64 {
            entry: 0x100_0000,
            zero_page: 0x7000,
        });
        assert_eq!(
            (l64.rip, l64.rsi, l64.rsp),
            (0x100_0000, 0x7000, BOOT_STACK_POINTER)
        );
    }

    #[test]
    fn lapic_register_accessors() {
        let mut regs = [0 as libc::c_char; 1024];
        write_lapic_reg(&mut regs, APIC_LVT0, 0x0001_0700);
        assert_eq!(read_lapic_reg(&regs, APIC_LVT0), 0x0001_0700);
        assert_eq!(read_lapic_reg(&regs, APIC_LVT1), 0);
    }

    #[test]
    fn boot_msrs_enable_mtrr_write_back() {
        let msrs = boot_msr_entries();
        let def = msrs.iter().find(|m| m.index == MSR_MTRR_DEF_TYPE).unwrap();
        assert_eq!(def.data, (1 << 11) | 6);
    }
}

//! Segment descriptors for the boot vCPU's GDT, and their KVM form.

use kvm_bindings::kvm_segment;

/// Builds a segment descriptor from access/flags bits, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn limit(entry: u64) -> u32 {
    let raw = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32;
    if bit(entry, 55) == 1 {
        // 4 KiB granularity.
        (raw << 12) | 0xfff
    } else {
        raw
    }
}

fn bit(entry: u64, n: u32) -> u8 {
    ((entry >> n) & 1) as u8
}

/// The KVM segment register value for descriptor `entry` at GDT index `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let present = bit(entry, 47);
    kvm_segment {
        base: base(entry),
        limit: limit(entry),
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g: bit(entry, 55),
        avl: bit(entry, 52),
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

/// GDT index of the code segment (selector 0x10, `__BOOT_CS` in the Linux boot protocol).
pub const CODE_INDEX: u8 = 2;
/// GDT index of the data segment (selector 0x18, `__BOOT_DS`).
pub const DATA_INDEX: u8 = 3;
/// GDT index of the task state segment.
pub const TSS_INDEX: u8 = 4;

/// Code segment for 64-bit mode: present, DPL 0, execute/read, L=1.
pub const CODE64: u64 = gdt_entry(0xa09b, 0, 0xfffff);
/// Code segment for 32-bit protected mode (PVH entry): present, execute/read, D=1, 4 GiB.
pub const CODE32: u64 = gdt_entry(0xc09b, 0, 0xfffff);
/// Flat 4 GiB read/write data segment.
pub const DATA: u64 = gdt_entry(0xc093, 0, 0xfffff);
/// A busy 64-bit TSS (required to be valid by VMX on entry).
pub const TSS: u64 = gdt_entry(0x808b, 0, 0xfffff);

/// The boot GDT for a given code segment.
pub fn boot_gdt(code: u64) -> [u64; 5] {
    [0, 0, code, DATA, TSS]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_segment_fields() {
        let seg = kvm_segment_from_gdt(CODE64, CODE_INDEX);
        assert_eq!(seg.selector, 0x10);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(
            (seg.present, seg.dpl, seg.s, seg.l, seg.db, seg.g),
            (1, 0, 1, 1, 0, 1)
        );
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn code32_and_data_segment_fields() {
        let code = kvm_segment_from_gdt(CODE32, CODE_INDEX);
        assert_eq!((code.l, code.db, code.type_), (0, 1, 0xb));
        let data = kvm_segment_from_gdt(DATA, DATA_INDEX);
        assert_eq!(data.selector, 0x18);
        assert_eq!((data.type_, data.db, data.limit), (3, 1, 0xffff_ffff));
    }

    #[test]
    fn descriptor_round_trips_base_and_byte_limit() {
        let entry = gdt_entry(0x0093, 0x1234_5678, 0xabcde);
        let seg = kvm_segment_from_gdt(entry, 1);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0xabcde);
        assert_eq!(seg.g, 0);
        let absent = kvm_segment_from_gdt(0, 0);
        assert_eq!(absent.unusable, 1);
    }
}

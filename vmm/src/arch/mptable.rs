//! The Intel MultiProcessor Specification 1.4 table.
//!
//! Without ACPI, this is how the guest kernel learns how many vCPUs there
//! are, where the IOAPIC is and how ISA interrupts are routed. It is written
//! at the start of the EBDA, one of the places Linux scans for it.

use super::layout::{APIC_START, IOAPIC_START};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_FLAG_ENABLED: u8 = 1;
const CPU_FLAG_BSP: u8 = 2;
/// Family 6 (an arbitrary but plausible processor signature).
const CPU_SIGNATURE: u32 = 0x600;
/// FPU and APIC present.
const CPU_FEATURES: u32 = 0x201;
/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u8 = 24;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;

/// Size of the floating pointer structure.
const FPS_SIZE: usize = 16;
/// Size of the configuration table header.
const HEADER_SIZE: usize = 44;
/// The table must stay within the 1 KiB it is given.
pub const MAX_SIZE: usize = 1024;

/// Errors building the MP table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Too many vCPUs to describe in the space the table has.
    #[error("{0} vCPUs do not fit in the MP table (at most {max})", max = max_cpus())]
    TooManyCpus(u8),
    /// Zero vCPUs.
    #[error("a VM needs at least one vCPU")]
    NoCpus,
}

/// The largest vCPU count whose table fits in [`MAX_SIZE`].
pub const fn max_cpus() -> usize {
    let fixed = FPS_SIZE + HEADER_SIZE + 8 + 8 + 8 * IOAPIC_PINS as usize + 2 * 8;
    (MAX_SIZE - fixed) / 20
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer structure followed by the configuration
/// table, for a table placed at guest physical address `base`.
pub fn build(base: u64, num_cpus: u8) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 {
        return Err(Error::NoCpus);
    }
    if usize::from(num_cpus) > max_cpus() {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let ioapic_id = num_cpus + 1;

    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_FLAG_ENABLED | if cpu == 0 { CPU_FLAG_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // type, irq type, flags (conforming polarity and trigger), source bus, source irq, dest apic, dest pin
        entries.extend_from_slice(&[ENTRY_IOINT, MP_IRQ_INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_LINT, MP_IRQ_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[ENTRY_LINT, MP_IRQ_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_SIZE + entries.len();
    let mut header = Vec::with_capacity(table_len);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(MPC_SPEC_REV);
    header.push(0); // checksum, filled below
    header.extend_from_slice(b"RTV     ");
    header.extend_from_slice(b"RTV-MICROVM ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    debug_assert_eq!(header.len(), HEADER_SIZE);
    header.extend_from_slice(&entries);
    header[7] = checksum(&header);

    let mut fps = Vec::with_capacity(FPS_SIZE + table_len);
    fps.extend_from_slice(b"_MP_");
    fps.extend_from_slice(&((base + FPS_SIZE as u64) as u32).to_le_bytes());
    fps.extend_from_slice(&[1, MPC_SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fps[10] = checksum(&fps[..FPS_SIZE]);
    fps.extend_from_slice(&header);
    Ok(fps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_pointers_are_consistent() {
        for cpus in [1u8, 2, 8, max_cpus() as u8] {
            let table = build(0x9fc00, cpus).unwrap();
            assert!(table.len() <= MAX_SIZE);
            assert_eq!(&table[0..4], b"_MP_");
            assert_eq!(sum(&table[..16]), 0, "floating pointer checksum");
            let physptr = u32::from_le_bytes(table[4..8].try_into().unwrap());
            assert_eq!(physptr, 0x9fc00 + 16);
            let cfg = &table[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(sum(cfg), 0, "configuration table checksum");
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            assert_eq!(count, u16::from(cpus) + 2 + 24 + 2);
            // The first processor is the bootstrap processor.
            assert_eq!(cfg[HEADER_SIZE], ENTRY_PROCESSOR);
            assert_eq!(cfg[HEADER_SIZE + 3], CPU_FLAG_ENABLED | CPU_FLAG_BSP);
        }
    }

    #[test]
    fn rejects_bad_cpu_counts() {
        assert_eq!(build(0, 0), Err(Error::NoCpus));
        let too_many = max_cpus() as u8 + 1;
        assert_eq!(build(0, too_many), Err(Error::TooManyCpus(too_many)));
    }
}

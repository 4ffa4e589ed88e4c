//! The CPUID table each vCPU sees: KVM's supported set, with per-vCPU
//! topology and the hypervisor bit.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const ECX_HYPERVISOR: u32 = 1 << 31;
/// KVM's paravirtual feature leaf.
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;
/// KVM_FEATURE_PV_SEND_IPI and KVM_FEATURE_PV_SCHED_YIELD.
const KVM_PV_IPI_AND_YIELD: u32 = (1 << 11) | (1 << 13);
/// CPUID.1:EDX.HTT: the logical processor count in EBX[23:16] is valid.
const EDX_HTT: u32 = 1 << 28;

/// KVM's supported CPUID set (read once per VM).
pub fn supported(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// Adjusts `cpuid` for vCPU `index` of `count`; with `pvm`, hides the KVM
/// paravirtual features that do not work in PVM native mode.
pub fn for_vcpu(mut cpuid: CpuId, index: u8, count: u8, pvm: bool) -> CpuId {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // APIC ID, logical processor count, CLFLUSH line size (8 * 8 bytes).
                entry.ebx = (u32::from(index) << 24) | (u32::from(count) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                // x2APIC ID of this vCPU on every sub-leaf.
                entry.edx = u32::from(index);
            }
            LEAF_KVM_FEATURES if pvm => entry.eax &= !KVM_PV_IPI_AND_YIELD,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn sets_apic_id_count_and_hypervisor_bit() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 77,
                ..Default::default()
            },
        ];
        let cpuid = CpuId::from_entries(&entries).unwrap();
        let out = for_vcpu(cpuid.clone(), 3, 4, false);
        let e = out.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e[0].edx & EDX_HTT, 0);
        assert_eq!(e[1].edx, 3);
    }

    #[test]
    fn pvm_hides_pv_ipi_and_sched_yield() {
        let entries = [kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax: 0xffff,
            ..Default::default()
        }];
        let cpuid = CpuId::from_entries(&entries).unwrap();
        let hw = for_vcpu(cpuid.clone(), 0, 1, false);
        assert_eq!(hw.as_slice()[0].eax, 0xffff);
        let pvm = for_vcpu(cpuid, 0, 1, true);
        assert_eq!(pvm.as_slice()[0].eax, 0xffff & !((1 << 11) | (1 << 13)));
    }
}

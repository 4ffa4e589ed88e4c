//! A vCPU's KVM state: saved from a paused vCPU, set on a fresh one.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, kvm_xsave2, CpuId, Msrs, Xsave,
    KVM_MAX_CPUID_ENTRIES, KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use vmm_sys_util::fam::FamStruct;

/// MSR_IA32_TSC_DEADLINE: KVM drops writes while the local APIC timer is
/// not in TSC-deadline mode, so it is set again after the LAPIC.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// Most MSRs read or written in one KVM call.
const MSR_CHUNK: usize = 64;

/// What a vCPU thread needs to save its state, found once per VM.
#[derive(Debug, Clone)]
pub struct SaveParams {
    /// KVM's MSR index list (KVM_GET_MSR_INDEX_LIST).
    pub msr_indices: Vec<u32>,
    /// KVM_CAP_XSAVE2's size in bytes (0 if unsupported), or `None` when
    /// KVM has no XSAVE at all.
    pub xsave_size: Option<usize>,
    /// Whether KVM_GET_XCRS works.
    pub xcrs: bool,
}

/// The x87/SSE state as KVM_GET_FPU gives it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FpuState {
    /// ST0-ST7 (80-bit, in 16-byte slots).
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM0-XMM15.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The XSAVE area: the classic 4 KiB region and, with KVM_GET_XSAVE2,
/// what lies beyond it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XsaveState {
    /// The first 4 KiB, as 1024 32-bit words.
    pub region: Vec<u32>,
    /// 32-bit words past the first 4 KiB (KVM_GET_XSAVE2 only).
    pub extra: Vec<u32>,
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (and APIC ID).
    pub index: u8,
    /// The CPUID table the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR of KVM's index list that could be read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// The XSAVE area, where KVM has it.
    pub xsave: Option<XsaveState>,
    /// Extended control registers, where KVM has them.
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMM state.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
}

/// A KVM call on a vCPU that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Error {
    /// What was being saved or set.
    pub what: String,
    /// Why.
    pub source: kvm_ioctls::Error,
}

fn kvm(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> Error + '_ {
    move |source| Error {
        what: what.to_string(),
        source,
    }
}

fn msrs_of(entries: &[kvm_msr_entry]) -> Result<Msrs, Error> {
    Msrs::from_entries(entries).map_err(|_| Error {
        what: "MSR list".into(),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// Reads every MSR in `indices` that KVM lets the vCPU read. KVM_GET_MSRS
/// stops at the first MSR it cannot read; that one is left out.
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest: &[u32] = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = msrs_of(&entries)?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("reading MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < chunk.len() {
            tracing::debug!(
                msr = format_args!("{:#x}", chunk[read]),
                "MSR not readable; not saved"
            );
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

/// Writes `entries`; KVM_SET_MSRS stops at the first MSR it refuses, which
/// is skipped (and named in the returned list).
fn write_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<Vec<u32>, Error> {
    let mut refused = Vec::new();
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let written = fd.set_msrs(&msrs_of(chunk)?).map_err(kvm("setting MSRs"))?;
        if written < chunk.len() {
            refused.push(chunk[written].index);
            rest = &rest[written + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(refused)
}

/// Saves the state of a vCPU that is out of KVM_RUN (and whose last I/O
/// exit has been completed).
pub fn save(fd: &VcpuFd, index: u8, params: &SaveParams) -> Result<VcpuState, Error> {
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("reading CPUID"))?;
    let mp_state = fd.get_mp_state().map_err(kvm("reading the MP state"))?;
    let regs = fd.get_regs().map_err(kvm("reading registers"))?;
    let sregs = fd.get_sregs().map_err(kvm("reading special registers"))?;
    let fpu = fd.get_fpu().map_err(kvm("reading the FPU"))?;
    let xsave = match params.xsave_size {
        None => None,
        Some(size) if size > std::mem::size_of::<kvm_xsave>() => {
            let words = (size - std::mem::size_of::<kvm_xsave>()).div_ceil(4);
            let mut xsave = Xsave::new(words).map_err(|_| Error {
                what: "XSAVE buffer".into(),
                source: kvm_ioctls::Error::new(libc::ENOMEM),
            })?;
            // SAFETY: the buffer holds the size KVM_CAP_XSAVE2 reported.
            unsafe { fd.get_xsave2(&mut xsave) }.map_err(kvm("reading XSAVE (XSAVE2)"))?;
            let fam: &kvm_xsave2 = xsave.as_fam_struct_ref();
            Some(XsaveState {
                region: fam.xsave.region.to_vec(),
                extra: fam.as_slice().to_vec(),
            })
        }
        Some(_) => Some(XsaveState {
            region: fd
                .get_xsave()
                .map_err(kvm("reading XSAVE"))?
                .region
                .to_vec(),
            extra: Vec::new(),
        }),
    };
    let xcrs = if params.xcrs {
        Some(fd.get_xcrs().map_err(kvm("reading XCRs"))?)
    } else {
        None
    };
    let debug_regs = fd
        .get_debug_regs()
        .map_err(kvm("reading debug registers"))?;
    let lapic = fd.get_lapic().map_err(kvm("reading the local APIC"))?;
    let msrs = read_msrs(fd, &params.msr_indices)?;
    let events = fd.get_vcpu_events().map_err(kvm("reading vCPU events"))?;
    Ok(VcpuState {
        index,
        cpuid: cpuid.as_slice().to_vec(),
        msrs,
        regs,
        sregs,
        fpu: FpuState::from(&fpu),
        xsave,
        xcrs,
        debug_regs,
        lapic,
        events,
        mp_state,
    })
}

/// The saved CPUID table, to give the new vCPU before anything else.
pub fn cpuid_of(state: &VcpuState) -> Result<CpuId, Error> {
    CpuId::from_entries(&state.cpuid).map_err(|_| Error {
        what: "CPUID table".into(),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })
}

/// Sets a new vCPU (CPUID already set) to `state`: MSRs, special and
/// general registers, FPU/XSAVE, XCRs, debug registers, LAPIC, the TSC
/// deadline again, events, MP state.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let refused = write_msrs(fd, &state.msrs)?;
    if !refused.is_empty() {
        let list: Vec<String> = refused.iter().map(|m| format!("{m:#x}")).collect();
        tracing::warn!(vcpu = state.index, msrs = %list.join(","), "KVM refused saved MSRs");
    }
    fd.set_sregs(&state.sregs)
        .map_err(kvm("setting special registers"))?;
    fd.set_regs(&state.regs).map_err(kvm("setting registers"))?;
    fd.set_fpu(&kvm_fpu::from(&state.fpu))
        .map_err(kvm("setting the FPU"))?;
    if let Some(xsave) = &state.xsave {
        let mut region = kvm_xsave::default();
        if xsave.region.len() != region.region.len() {
            return Err(Error {
                what: format!("XSAVE area of {} words", xsave.region.len()),
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        region.region.copy_from_slice(&xsave.region);
        if xsave.extra.is_empty() {
            // SAFETY: a plain 4 KiB area, saved with KVM_GET_XSAVE from a
            // KVM whose XSAVE area fits it.
            unsafe { fd.set_xsave(&region) }.map_err(kvm("setting XSAVE"))?;
        } else {
            let mut buf = Xsave::new(xsave.extra.len()).map_err(|_| Error {
                what: "XSAVE buffer".into(),
                source: kvm_ioctls::Error::new(libc::ENOMEM),
            })?;
            // SAFETY: only plain data is written: the region and the FAM
            // words, whose length `Xsave::new` set.
            unsafe {
                let fam = buf.as_mut_fam_struct();
                fam.xsave.region = region.region;
            }
            buf.as_mut_slice().copy_from_slice(&xsave.extra);
            // SAFETY: the buffer is as large as the area saved with
            // KVM_GET_XSAVE2 on a KVM of this build (checked by the caller
            // against KVM_CAP_XSAVE2).
            unsafe { fd.set_xsave2(&buf) }.map_err(kvm("setting XSAVE (XSAVE2)"))?;
        }
    }
    if let Some(xcrs) = &state.xcrs {
        fd.set_xcrs(xcrs).map_err(kvm("setting XCRs"))?;
    }
    fd.set_debug_regs(&state.debug_regs)
        .map_err(kvm("setting debug registers"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm("setting the local APIC"))?;
    let deadline: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .filter(|m| m.index == MSR_IA32_TSC_DEADLINE)
        .copied()
        .collect();
    if !deadline.is_empty() {
        write_msrs(fd, &deadline)?;
    }
    let mut events = state.events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(kvm("setting vCPU events"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("setting the MP state"))?;
    Ok(())
}

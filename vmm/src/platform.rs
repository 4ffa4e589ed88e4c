//! Host platform detection and the PVM switches.
//!
//! On hosts whose /dev/kvm is PVM ("Pagetable-based Virtual Machine") and
//! the guest kernel has no PVM support, the guest kernel runs in PVM's
//! native mode: its code is emulated instruction by instruction and some
//! instructions are missing from the emulator. The guest then needs extra
//! kernel command-line arguments (`guest-kernel/cmdline-pvm.txt`). On
//! hardware KVM (VMX/SVM) none of this applies.

use std::path::Path;

/// The base command line every rtv guest gets.
pub const BASE_CMDLINE: &str = include_str!("../../guest-kernel/cmdline.txt");
/// What PVM native mode needs in addition.
pub const PVM_CMDLINE: &str = include_str!("../../guest-kernel/cmdline-pvm.txt");

/// Keeps the guest's user space off AVX and AVX-512 on PVM hosts.
///
/// In PVM native mode guest user code runs natively and sees the host's
/// CPUID and XCR0, so glibc picks AVX2/AVX-512 string functions; but the
/// guest kernel (XSAVE is cleared from it: the emulator lacks XRSTOR) saves
/// only the x87/SSE state when it switches processes, so one process's YMM
/// and ZMM registers leak into another's. Measured: busybox `echo` died with
/// SIGSEGV in 3 of 10 runs without this, 0 of 10 with it. The kernel passes
/// this to init as an environment variable; the agent passes it on to the
/// processes it starts.
pub const PVM_GUEST_ENV: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-FMA,-F16C,-AVX_Fast_Unaligned_Load";

/// Which kind of virtualization /dev/kvm provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Virtualization {
    /// Intel VMX or AMD SVM.
    Hardware,
    /// PVM (kvm_pvm module), guests in native (emulated-kernel) mode.
    Pvm,
    /// Neither could be identified.
    Unknown,
}

/// The setting of the PVM switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PvmMode {
    /// Detect from the host.
    #[default]
    Auto,
    /// Always apply the PVM accommodations.
    On,
    /// Never apply them.
    Off,
}

impl std::str::FromStr for PvmMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            other => Err(format!(
                "unknown PVM mode {other:?} (expected auto, on or off)"
            )),
        }
    }
}

/// Detects the host's virtualization.
pub fn detect() -> Virtualization {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Virtualization::Pvm;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if hw
        || Path::new("/sys/module/kvm_intel").exists()
        || Path::new("/sys/module/kvm_amd").exists()
    {
        Virtualization::Hardware
    } else {
        Virtualization::Unknown
    }
}

impl PvmMode {
    /// Whether the accommodations apply on this host.
    pub fn enabled(self) -> bool {
        match self {
            PvmMode::On => true,
            PvmMode::Off => false,
            PvmMode::Auto => detect() == Virtualization::Pvm,
        }
    }
}

/// `rtv.rng_seed=<64 hex digits>` from the host's RNG: the guest kernel
/// (patch 0005) credits it to its entropy pool at boot and hides it from
/// /proc/cmdline. Without it a guest with no hardware RNG the kernel trusts
/// (PVM hosts) waits minutes for its RNG to initialise.
pub fn rng_seed_arg() -> String {
    let mut seed = [0u8; 32];
    let mut filled = 0;
    while filled < seed.len() {
        // SAFETY: getrandom writes at most `len` bytes into the valid buffer.
        let n =
            unsafe { libc::getrandom(seed[filled..].as_mut_ptr().cast(), seed.len() - filled, 0) };
        if n <= 0 {
            // getrandom(2) cannot fail on a running Linux with a valid buffer
            // except by interruption; try again.
            continue;
        }
        filled += n as usize;
    }
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    format!("rtv.rng_seed={hex}")
}

/// `cmdline` with the RNG seed's value hidden, for logs.
pub fn redact_seed(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .map(|w| {
            if w.starts_with("rtv.rng_seed=") {
                "rtv.rng_seed=<redacted>"
            } else {
                w
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The guest command line: the base, the PVM arguments when `pvm`, a fresh
/// RNG seed, then `extra`.
pub fn guest_cmdline(pvm: bool, extra: &str) -> String {
    let seed = rng_seed_arg();
    let mut parts = vec![BASE_CMDLINE.trim()];
    if pvm {
        parts.push(PVM_CMDLINE.trim());
        parts.push(PVM_GUEST_ENV);
    }
    parts.push(&seed);
    parts.push(extra.trim());
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_composition() {
        let plain = guest_cmdline(false, "rtv.x=1");
        assert!(plain.starts_with(BASE_CMDLINE.trim()));
        assert!(plain.ends_with("rtv.x=1"));
        let pvm = guest_cmdline(true, "");
        if !PVM_CMDLINE.trim().is_empty() {
            assert!(pvm.contains(PVM_CMDLINE.trim()));
            assert!(!plain.contains(PVM_CMDLINE.trim()));
        }
        assert!(!pvm.ends_with(' '));
    }

    #[test]
    fn every_command_line_gets_a_fresh_seed() {
        let a = guest_cmdline(false, "");
        let b = guest_cmdline(false, "");
        let seed = |s: &str| {
            s.split_whitespace()
                .find(|w| w.starts_with("rtv.rng_seed="))
                .map(str::to_owned)
        };
        let (sa, sb) = (seed(&a).unwrap(), seed(&b).unwrap());
        assert_eq!(sa.len(), "rtv.rng_seed=".len() + 64);
        assert_ne!(sa, sb);
    }

    #[test]
    fn logs_do_not_show_the_seed() {
        let line = guest_cmdline(false, "x=1");
        let shown = redact_seed(&line);
        assert!(shown.contains("rtv.rng_seed=<redacted>") && shown.ends_with("x=1"));
        let seed = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("rtv.rng_seed="))
            .unwrap();
        assert!(!shown.contains(seed));
    }

    #[test]
    fn pvm_mode_parses() {
        assert_eq!("on".parse::<PvmMode>(), Ok(PvmMode::On));
        assert!("maybe".parse::<PvmMode>().is_err());
        assert!(PvmMode::On.enabled());
        assert!(!PvmMode::Off.enabled());
    }
}

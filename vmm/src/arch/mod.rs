//! x86_64 specifics: memory layout, boot protocols, vCPU state.

pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod regs;

//! x86-64: memory layout, boot protocols, MP table, vCPU register and CPUID setup.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;

//! The CPUID a vCPU reports: what KVM supports, plus per-vCPU topology and the hypervisor bit.

use kvm_bindings::CpuId;

/// Leaf 1 ECX bit 31: "running under a hypervisor". Without it a Linux guest does not look for
/// KVM, never uses kvm-clock and calibrates its TSC against the PIT, which under nested
/// emulation takes so long it looks like a hang.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Adjusts the supported CPUID for vCPU `id` of `count`.
pub fn for_vcpu(cpuid: &mut CpuId, id: u8, count: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                // EDX bit 28 (HTT) makes EBX[23:16] meaningful.
                e.edx |= 1 << 28;
            }
            // x2APIC topology: EDX is the x2APIC ID of this vCPU.
            0xb | 0x1f => e.edx = u32::from(id),
            // AMD extended APIC ID.
            0x8000_001e => e.eax = u32::from(id),
            _ => {}
        }
    }
}

//! Initial vCPU state for the two boot protocols: Linux 64-bit (long mode, identity-mapped
//! first GiB, `rsi` = zero page) and PVH (32-bit protected mode, paging off, `ebx` = start info).

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("KVM_{op} failed: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing boot {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("KVM accepted {set} of {wanted} boot MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { op, source }
}

/// How the vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit Linux boot protocol: long mode, `rsi` points at the zero page.
    Linux64,
    /// PVH: 32-bit protected mode without paging, `ebx` points at `hvm_start_info`.
    Pvh,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT descriptor from flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(present == 0),
    }
}

fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code = match mode {
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit flat code
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff), // data
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ]
}

/// Writes the boot GDT, IDT and (for Linux64) the identity page tables into guest memory.
/// Shared by all vCPUs; call once.
pub fn write_boot_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<(), RegsError> {
    let err = |what| move |source| RegsError::Memory { what, source };
    for (i, e) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + i as u64 * 8))
            .map_err(err("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(err("IDT"))?;
    if mode == EntryMode::Linux64 {
        mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
            .map_err(err("PML4"))?;
        mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
            .map_err(err("PDPT"))?;
        // 512 2 MiB pages: the first GiB, identity mapped, present | writable | huge.
        let pde: Vec<u8> = (0..512u64)
            .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
            .collect();
        mem.write_slice(&pde, GuestAddress(PDE_START))
            .map_err(err("page directory"))?;
    }
    Ok(())
}

/// Sets segment, control and paging registers for `mode`.
pub fn setup_sregs(vcpu: &VcpuFd, mode: EntryMode) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("GET_SREGS"))?;
    let gdt = boot_gdt(mode);
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    let tss = segment(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("SET_SREGS"))
}

/// Sets the general registers: entry point, stack and the boot-info pointer.
pub fn setup_regs(vcpu: &VcpuFd, mode: EntryMode, entry: u64) -> Result<(), RegsError> {
    let regs = match mode {
        EntryMode::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rbx: PVH_INFO_START,
            ..Default::default()
        },
    };
    vcpu.set_regs(&regs).map_err(kvm("SET_REGS"))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("SET_FPU"))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRBACK: u64 = 6;

/// Boot MSRs: syscall state cleared, fast strings on, write-back as the default memory type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRBACK),
    ];
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 delivers the legacy PIC's interrupts (ExtINT), LINT1 is NMI, as on a PC.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("GET_LAPIC"))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in value.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code.base, code.limit, code.selector), (0, 0xffff_ffff, 8));
        assert_eq!(
            (code.l, code.db, code.present, code.s, code.type_),
            (1, 0, 1, 1, 0xb)
        );
        let data = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((data.l, data.db, data.type_, data.g), (0, 1, 0x3, 1));
        let tss = segment(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((tss.s, tss.type_, tss.selector), (0, 0xb, 24));
        assert_eq!(segment(0, 0).unusable, 1);
    }
}

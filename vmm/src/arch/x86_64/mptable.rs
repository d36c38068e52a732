//! The Intel MultiProcessor Specification 1.4 table: without ACPI, this is how a Linux guest
//! (CONFIG_X86_MPPARSE) finds its CPUs, its IOAPIC and how legacy interrupts are wired.
//!
//! The table is assembled byte by byte, little-endian, as the spec lays it out.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_ADDR, EBDA_START, IOAPIC_ADDR, IRQ_MAX};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
// CPU signature/feature words as Firecracker reports them: family 6, with FPU and APIC.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;
const IRQ_TYPE_INT: u8 = 0;
const IRQ_TYPE_NMI: u8 = 1;
const IRQ_TYPE_EXTINT: u8 = 3;
const IRQ_FLAGS_CONFORMING: u16 = 0;
/// Linux matches an MP PCI interrupt entry's bus ID against the PCI bus number itself
/// (`IO_APIC_get_PCI_irq_vector()`), so PCI bus 0 is MP bus 0 and ISA comes after it, as
/// firmware lays it out.
const PCI_BUS_ID: u8 = 0;
const ISA_BUS_ID: u8 = 1;
/// PCI INTx lines: active low, level triggered.
const IRQ_FLAGS_PCI: u16 = 0x0f;

/// A PCI device's INTx line wired to an IOAPIC pin: `(device number on bus 0, interrupt pin
/// 1..=4 for INTA..INTD, IOAPIC pin)`.
pub type PciIntx = (u8, u8, u8);
const ALL_LOCAL_APICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit in the MP table's 1 KiB area")]
    TooManyCpus(u8),
    #[error("writing the MP table to guest memory at {EBDA_START:#x}: {0}")]
    Write(vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, &b| a.wrapping_add(b)))
}

/// The table for `num_cpus` vCPUs (APIC IDs 0..num_cpus), as it is written at `EBDA_START`,
/// with PCI bus 0 and the INTx lines `pci` (their IOAPIC pins are not ISA interrupts).
pub fn build(num_cpus: u8, pci: &[PciIntx]) -> Result<Vec<u8>, MpTableError> {
    let ioapic_id = num_cpus
        .checked_add(1)
        .ok_or(MpTableError::TooManyCpus(num_cpus))?;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        entries.extend([ENTRY_PROCESSOR, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend(CPU_STEPPING.to_le_bytes());
        entries.extend((CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, PCI_BUS_ID]);
    entries.extend(b"PCI   ");
    entries.extend([ENTRY_BUS, ISA_BUS_ID]);
    entries.extend(b"ISA   ");
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(IOAPIC_ADDR.to_le_bytes());
    count += 3;
    for irq in 0..=IRQ_MAX as u8 {
        if pci.iter().any(|&(_, _, pin)| pin == irq) {
            continue;
        }
        entries.extend([ENTRY_INTSRC, IRQ_TYPE_INT]);
        entries.extend(IRQ_FLAGS_CONFORMING.to_le_bytes());
        entries.extend([ISA_BUS_ID, irq, ioapic_id, irq]);
        count += 1;
    }
    for &(device, int_pin, ioapic_pin) in pci {
        // Source bus IRQ: device number in bits 2..7, INTA..INTD as 0..3.
        entries.extend([ENTRY_INTSRC, IRQ_TYPE_INT]);
        entries.extend(IRQ_FLAGS_PCI.to_le_bytes());
        entries.extend([
            PCI_BUS_ID,
            device << 2 | (int_pin - 1),
            ioapic_id,
            ioapic_pin,
        ]);
        count += 1;
    }
    for (irq_type, lint) in [(IRQ_TYPE_EXTINT, 0u8), (IRQ_TYPE_NMI, 1u8)] {
        entries.extend([ENTRY_LINTSRC, irq_type]);
        entries.extend(IRQ_FLAGS_CONFORMING.to_le_bytes());
        entries.extend([ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_len = HEADER_LEN + entries.len();
    if FLOATING_LEN + table_len > 1024 {
        return Err(MpTableError::TooManyCpus(num_cpus));
    }
    let table_addr = EBDA_START as u32 + FLOATING_LEN as u32;

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend(b"PCMP");
    header.extend((table_len as u16).to_le_bytes());
    header.extend([4, 0]); // spec revision 1.4, checksum filled below
    header.extend(b"DMAVISOR");
    header.extend(b"000000000000");
    header.extend(0u32.to_le_bytes()); // OEM table pointer
    header.extend(0u16.to_le_bytes()); // OEM table size
    header.extend(count.to_le_bytes());
    header.extend(APIC_ADDR.to_le_bytes());
    header.extend(0u32.to_le_bytes()); // extended table length + checksum + reserved
    let mut table = header;
    table.extend(entries);
    table[7] = checksum(&table);

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend(b"_MP_");
    floating.extend(table_addr.to_le_bytes());
    floating.extend([1, 4, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, rev 1.4, checksum, features
    floating[10] = checksum(&floating);

    floating.extend(table);
    Ok(floating)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8, pci: &[PciIntx]) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, pci)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MpTableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    #[test]
    fn checksums_and_cpu_entries() {
        for cpus in [1u8, 2, 32] {
            let t = build(cpus, &[]).unwrap();
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let table = &t[16..];
            assert_eq!(&table[0..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "config table checksum");
            let procs = table[44..].chunks(8).take(cpus as usize * 20 / 8).count();
            assert!(procs > 0);
            // Processor entries are 20 bytes each and come first; the first is the BSP.
            for cpu in 0..cpus as usize {
                let e = &table[44 + cpu * 20..];
                assert_eq!(e[0], ENTRY_PROCESSOR);
                assert_eq!(e[1] as usize, cpu);
                assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, cpu == 0);
            }
        }
    }

    #[test]
    fn too_many_cpus_is_an_error() {
        assert!(matches!(build(64, &[]), Err(MpTableError::TooManyCpus(64))));
    }

    #[test]
    fn a_pci_intx_line_takes_its_pin_from_the_isa_entries() {
        let t = build(1, &[(1, 1, 23)]).unwrap();
        let table = &t[16..];
        let entries = &table[44 + 20..];
        // 8-byte entries after the processor: buses, IOAPIC, interrupt sources, local sources.
        let intsrc: Vec<&[u8]> = entries.chunks(8).filter(|e| e[0] == ENTRY_INTSRC).collect();
        assert_eq!(
            intsrc.len(),
            IRQ_MAX as usize + 1,
            "23 ISA lines and one PCI line"
        );
        let pci: Vec<_> = intsrc.iter().filter(|e| e[4] == PCI_BUS_ID).collect();
        assert_eq!(pci.len(), 1);
        // Device 1, INTA, level and active low, on IOAPIC pin 23.
        assert_eq!(pci[0][5], 1 << 2);
        assert_eq!(pci[0][7], 23);
        assert_eq!(u16::from_le_bytes([pci[0][2], pci[0][3]]), IRQ_FLAGS_PCI);
        assert!(!intsrc.iter().any(|e| e[4] == ISA_BUS_ID && e[7] == 23));
        assert!(entries
            .chunks(8)
            .any(|e| e[0] == ENTRY_BUS && &e[2..8] == b"PCI   "));
    }
}

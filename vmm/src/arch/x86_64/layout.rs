//! Where everything lives in guest-physical memory. One place, so a change here is a change
//! everywhere.

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The boot GDT (4 entries) and the empty IDT after it.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by its memory map and module list.
pub const PVH_INFO_START: u64 = 0x6000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 1 GiB (PML4, PDPT, PD).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// The kernel command line and its maximum size (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The extended BIOS data area, where the MP table goes; RAM in the e820 map stops here.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of memory above the legacy hole; kernels load here.
pub const HIMEM_START: u64 = MIB;

/// The hole below 4 GiB for MMIO: the IOAPIC, the local APICs and virtio-mmio devices.
pub const MMIO_GAP_START: u64 = 3 * GIB;
pub const MMIO_GAP_END: u64 = 4 * GIB;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// The KVM TSS needs three pages of guest-physical space outside RAM.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// virtio-mmio devices: one 4 KiB page each from here, interrupts from `VIRTIO_IRQ_BASE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// The IOAPIC has 24 pins; virtio devices use pins 5..=23.
pub const IRQ_MAX: u32 = 23;

/// The legacy COM1 serial port and its interrupt.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;

/// Alignment of the DMA window's base: a pageblock, the unit of the guest's CMA area.
pub const DMA_WINDOW_ALIGN: u64 = 2 * MIB;

/// The guest-physical placement of RAM and the DMA window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    /// `(start, len)` of each RAM range, ascending.
    pub ram: Vec<(u64, u64)>,
    /// `(start, len)` of the DMA window, if any.
    pub dma_window: Option<(u64, u64)>,
}

impl GuestLayout {
    /// Lays out `ram_size` bytes of RAM around the MMIO gap and puts the DMA window right after
    /// the RAM below the gap when it fits there, else after the RAM above 4 GiB.
    pub fn new(ram_size: u64, window_size: u64) -> Self {
        let low = ram_size.min(MMIO_GAP_START);
        let mut ram = vec![(0, low)];
        if ram_size > low {
            ram.push((MMIO_GAP_END, ram_size - low));
        }
        let dma_window = (window_size > 0).then(|| {
            let low_base = align_up(low, DMA_WINDOW_ALIGN);
            let base = if ram.len() == 1 && low_base + window_size <= MMIO_GAP_START {
                low_base
            } else {
                let (start, len) = *ram.last().expect("RAM has at least one range");
                align_up((start + len).max(MMIO_GAP_END), DMA_WINDOW_ALIGN)
            };
            (base, window_size)
        });
        Self { ram, dma_window }
    }

    /// Every guest memory range, RAM and window, ascending.
    pub fn memory_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = self.ram.clone();
        v.extend(self.dma_window);
        v.sort_unstable();
        v
    }

    /// End of RAM below the MMIO gap: the highest address low-memory boot data may use.
    pub fn low_ram_end(&self) -> u64 {
        self.ram[0].0 + self.ram[0].1
    }

    /// The e820 RAM entries the guest is given: RAM minus the legacy hole, plus the window.
    pub fn e820_ram(&self) -> Vec<(u64, u64)> {
        let mut v = vec![(0, EBDA_START)];
        for &(start, len) in &self.ram {
            let begin = start.max(HIMEM_START);
            if start + len > begin {
                v.push((begin, start + len - begin));
            }
        }
        v.extend(self.dma_window);
        v.sort_unstable();
        v
    }
}

pub fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_gets_window_after_ram() {
        let l = GuestLayout::new(512 * MIB, 64 * MIB);
        assert_eq!(l.ram, vec![(0, 512 * MIB)]);
        assert_eq!(l.dma_window, Some((512 * MIB, 64 * MIB)));
        let e820 = l.e820_ram();
        assert_eq!(e820[0], (0, EBDA_START));
        assert_eq!(e820[1], (HIMEM_START, 511 * MIB));
        assert_eq!(e820[2], (512 * MIB, 64 * MIB));
    }

    #[test]
    fn large_guest_splits_around_gap_and_window_goes_high() {
        let l = GuestLayout::new(4 * GIB, 128 * MIB);
        assert_eq!(l.ram, vec![(0, 3 * GIB), (4 * GIB, GIB)]);
        assert_eq!(l.dma_window, Some((5 * GIB, 128 * MIB)));
        // Window that does not fit below the gap also goes above 4 GiB.
        let l = GuestLayout::new(3 * GIB - 64 * MIB, 128 * MIB);
        assert_eq!(l.dma_window, Some((4 * GIB, 128 * MIB)));
    }

    #[test]
    fn unaligned_ram_end_aligns_window_and_no_window() {
        let l = GuestLayout::new(100 * MIB + 4096, 2 * MIB);
        assert_eq!(l.dma_window, Some((102 * MIB, 2 * MIB)));
        assert_eq!(GuestLayout::new(64 * MIB, 0).dma_window, None);
        for r in GuestLayout::new(6 * GIB, 64 * GIB)
            .memory_ranges()
            .windows(2)
        {
            assert!(r[0].0 + r[0].1 <= r[1].0, "ranges overlap: {r:?}");
        }
    }
}

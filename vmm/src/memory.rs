//! Guest memory: RAM and the DMA window, mapped in the VMM and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::GuestLayout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ([{base:#x}, +{size:#x})): {source}")]
    Register {
        slot: u32,
        base: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// Maps every range of `layout` as anonymous, lazily populated memory.
pub fn create(layout: &GuestLayout) -> Result<GuestMemoryMmap, MemoryError> {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .memory_ranges()
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Map {
        size: ranges.iter().map(|r| r.1 as u64).sum(),
        source,
    })
}

/// Tells KVM about every region of `mem`, one slot each.
pub fn register(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let base = region.start_addr().raw_value();
        let size = region.len();
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("an mmap-backed region has a host address") as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: host,
        };
        // SAFETY: `host` is the start of a live mapping of `size` bytes owned by `mem`, which the
        // VM keeps alive (and never unmaps) for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Register {
            slot,
            base,
            size,
            source,
        })?;
    }
    Ok(())
}

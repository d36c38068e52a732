//! Guest memory: RAM and the DMA window, mapped in the VMM and registered with KVM.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::mmap::{FromRangesError, MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::GuestLayout;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        size: u64,
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest memory range [{start:#x}, +{len:#x}) overflows the address space")]
    Overflow { start: u64, len: u64 },
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ([{base:#x}, +{size:#x})): {source}")]
    Register {
        slot: u32,
        base: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// Guest memory ranges start at a 2 MiB boundary in the VMM's address space too, so guest huge
/// pages can be backed by host huge pages (THP needs matching alignment on both sides); ranges
/// of whole GiBs at a 1 GiB boundary, so that a region of 1 GiB huge pages can be mapped over
/// them (the DMA window) whole.
const HOST_ALIGN: usize = 2 << 20;
const HOST_ALIGN_1G: usize = 1 << 30;

/// Maps every range of `layout` as anonymous, lazily populated memory, 2 MiB aligned.
///
/// The mappings live as long as the process: a VMM's guest memory is never returned.
pub fn create(layout: &GuestLayout) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (start, len) in layout.memory_ranges() {
        let map_err = |source| MemoryError::Map { size: len, source };
        let host =
            map_aligned(len as usize).map_err(|e| map_err(FromRangesError::MmapRegion(e)))?;
        // SAFETY: `host` is a fresh private anonymous mapping of `len` bytes with exactly these
        // protection and flags, never unmapped. The one other user is the DMA window's owner
        // (devices::dma_memory), which re-backs pages of the window range in place with
        // `mmap(MAP_FIXED)`/`mremap(MREMAP_FIXED)`: the range stays mapped at the same address,
        // read-write except while a page moves (under the move gate, which every device access
        // through `GuestMemoryHandle` waits for).
        let mapping = unsafe {
            MmapRegionBuilder::new(len as usize)
                .with_raw_mmap_pointer(host)
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(MMAP_FLAGS)
                .build()
        }
        .map_err(|e| map_err(FromRangesError::MmapRegion(e)))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or(MemoryError::Overflow { start, len })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map {
        size: layout.memory_ranges().iter().map(|r| r.1).sum(),
        source: FromRangesError::Collection(e),
    })
}

const MMAP_FLAGS: i32 = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// An anonymous mapping of `len` bytes that starts on a `HOST_ALIGN` (or, for whole GiBs,
/// `HOST_ALIGN_1G`) boundary.
fn map_aligned(len: usize) -> Result<*mut u8, MmapRegionError> {
    let align = if len.is_multiple_of(HOST_ALIGN_1G) {
        HOST_ALIGN_1G
    } else {
        HOST_ALIGN
    };
    let total = len + align;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing; it aliases nothing.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            MMAP_FLAGS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(MmapRegionError::Mmap(std::io::Error::last_os_error()));
    }
    let base = raw as usize;
    let aligned = base.next_multiple_of(align);
    let head = aligned - base;
    let tail = total - head - len;
    // SAFETY: both trims lie inside the mapping made above and outside [aligned, aligned+len),
    // which is all that is used from here on.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + len) as *mut libc::c_void, tail);
        }
    }
    Ok(aligned as *mut u8)
}

/// Asks for transparent huge pages on guest memory: a guest touching memory for the first time
/// then costs one fault per 2 MiB rather than per 4 KiB, which matters most where faults are
/// expensive (nested virtualization). Where THP is off this is a no-op.
pub fn advise_huge_pages(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        // SAFETY: `host` and `len` describe a live mapping owned by `mem`; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents or validity.
        let rc = unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            tracing::debug!(
                "madvise(MADV_HUGEPAGE) on guest memory: {}",
                std::io::Error::last_os_error()
            );
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ranges_are_host_aligned_and_usable() {
        let layout = GuestLayout::new(64 << 20, 8 << 20);
        let mem = create(&layout).unwrap();
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .unwrap();
            assert_eq!(host as usize % HOST_ALIGN, 0);
        }
        use vm_memory::Bytes;
        let at = GuestAddress((64 << 20) + 4096);
        mem.write_obj(0xfeed_u64, at).unwrap();
        assert_eq!(mem.read_obj::<u64>(at).unwrap(), 0xfeed);
    }
}

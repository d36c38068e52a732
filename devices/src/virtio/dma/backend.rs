//! The host side of virtio-dma over the `cma` allocator: a MAP takes a host-contiguous piece
//! of the region and makes the guest range use it by remapping the window's host mapping onto
//! the region's pages (`mmap(MAP_FIXED)` of the region's fd). KVM follows the host mapping
//! through its MMU notifier, and the VMM's own view of guest memory is the same mapping, so
//! the guest, its devices and the VMM all see the new backing at once.
//!
//! Remapping works in whole backing pages: 4 KiB for a memfd region, 2 MiB for a 2 MiB hugetlb
//! region (the device's granule tells the driver). A 1 GiB hugetlb region cannot be remapped in
//! pieces; see docs/virtio-dma.md §8.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cma::{AllocError, AllocRequest, Allocation, Allocator, Policy, Region};

use super::core::{DmaBackend, MapError, MapOptions, Placement};

/// The DMA window as the VMM maps it: `len` bytes of guest-physical space from `base`, at
/// `host_addr` in the VMM, 2 MiB aligned.
#[derive(Clone, Copy, Debug)]
pub struct WindowMapping {
    pub base: u64,
    pub len: u64,
    pub host_addr: usize,
}

/// Why a region cannot back a window's mappings.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("a region with {0}-byte pages cannot be remapped into the window in pieces; use 2M huge pages or a memfd region")]
    PageTooLarge(usize),
    #[error("the window's host mapping at {0:#x} is not aligned to the region's {1}-byte pages")]
    Unaligned(usize, usize),
}

pub struct CmaBackend {
    allocator: Allocator,
    region: Arc<Region>,
    window: WindowMapping,
    page: usize,
}

/// Pages larger than this cannot be remapped piecewise at a useful granule.
const MAX_REMAP_PAGE: usize = 2 << 20;

impl CmaBackend {
    pub fn new(allocator: Allocator, window: WindowMapping) -> Result<Self, BackendError> {
        let region = allocator.region().clone();
        let page = region.page_size();
        if page > MAX_REMAP_PAGE {
            return Err(BackendError::PageTooLarge(page));
        }
        if !window.host_addr.is_multiple_of(page) {
            return Err(BackendError::Unaligned(window.host_addr, page));
        }
        Ok(Self {
            allocator,
            region,
            window,
            page,
        })
    }

    /// The smallest MAP the backend can serve: one backing page.
    pub fn granule(&self) -> usize {
        self.page
    }

    pub fn allocator(&self) -> &Allocator {
        &self.allocator
    }

    fn host_ptr(&self, gpa: u64) -> *mut libc::c_void {
        (self.window.host_addr + (gpa - self.window.base) as usize) as *mut libc::c_void
    }

    /// Points the window's `[gpa, gpa + len)` at the region's pages under `alloc`, one `mmap`
    /// per run of pages that are consecutive in the region's file.
    fn back_with(&self, gpa: u64, alloc: &Allocation) -> std::io::Result<()> {
        let file_offset = |off: usize| {
            self.region
                .file_offset(alloc.offset() + off)
                .ok_or_else(|| std::io::Error::other("allocation outside the region"))
        };
        let mut run_start = 0;
        while run_start < alloc.len() {
            let first = file_offset(run_start)?;
            let mut run_len = self.page;
            while run_start + run_len < alloc.len()
                && file_offset(run_start + run_len)? == first + run_len as u64
            {
                run_len += self.page;
            }
            let at = self.host_ptr(gpa + run_start as u64);
            // SAFETY: `at..at + run_len` is page aligned inside the window's own mapping, which
            // the VMM created for exactly this and never hands out as anything else; MAP_FIXED
            // only replaces those pages. The region fd outlives the mapping (the allocator
            // holds the region).
            let rc = unsafe {
                libc::mmap(
                    at,
                    run_len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    // The region's pages exist already: fill the page tables now rather than
                    // fault them in one by one when the guest first touches the buffer.
                    libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
                    self.region.fd(),
                    first as libc::off_t,
                )
            };
            if rc == libc::MAP_FAILED {
                return Err(std::io::Error::last_os_error());
            }
            run_start += run_len;
        }
        Ok(())
    }

    /// Never hand the guest a range that is not host-contiguous: the allocation must lie inside
    /// one of the region's extents, at the physical address that extent implies.
    fn check_contiguous(&self, alloc: &Allocation) -> Result<(), MapError> {
        let (start, end) = (alloc.offset(), alloc.offset() + alloc.len());
        let extent = self
            .region
            .extents()
            .get(alloc.extent())
            .filter(|e| e.offset <= start && end <= e.end());
        let phys_ok = match (extent.and_then(|e| e.phys), alloc.phys_addr()) {
            (Some(base), Some(phys)) => {
                phys == base + (start - extent.map_or(0, |e| e.offset)) as u64
            }
            (None, None) => true,
            _ => false,
        };
        if extent.is_none() || !phys_ok {
            tracing::error!(
                ?alloc,
                "virtio-dma: allocation is not inside one extent; refused"
            );
            return Err(MapError::Io(
                "allocation straddles host-contiguous extents".into(),
            ));
        }
        Ok(())
    }

    /// Gives the window's `[gpa, gpa + len)` fresh anonymous memory again.
    fn back_with_ram(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        // SAFETY: as in `back_with`: page-aligned pages of the window's own mapping.
        let rc = unsafe {
            libc::mmap(
                self.host_ptr(gpa),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if rc == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn map_error(e: AllocError) -> MapError {
    match e {
        AllocError::LargerThanExtent { .. } => MapError::TooBig,
        AllocError::NoRoom { .. } => MapError::NoMem,
        AllocError::AllCandidatesPinned { .. } => MapError::Busy,
        AllocError::DeadlinePassed { .. } | AllocError::PinWaitTimedOut { .. } => MapError::Timeout,
        other => MapError::Io(other.to_string()),
    }
}

/// The largest power of two that divides `len`, capped: a buffer is aligned to its own size up
/// to a pageblock, as the guest's CMA aligns it.
fn natural_align(len: u64) -> usize {
    let low = 1u64 << len.trailing_zeros().min(63);
    low.min(2 << 20) as usize
}

impl DmaBackend for CmaBackend {
    type Mapping = Allocation;

    fn map(
        &self,
        gpa: u64,
        len: u64,
        opts: MapOptions,
    ) -> Result<(Allocation, Placement), MapError> {
        if !len.is_multiple_of(self.page as u64) || !gpa.is_multiple_of(self.page as u64) {
            return Err(MapError::Io(format!(
                "MAP of {len:#x} at {gpa:#x} is not in whole {}-byte pages",
                self.page
            )));
        }
        let policy = if opts.failfast {
            Policy::FailFast
        } else {
            Policy::Retry {
                deadline: Instant::now() + opts.deadline.min(Duration::from_secs(10)),
            }
        };
        let request = AllocRequest::new(len as usize)
            .align(natural_align(len).max(self.page))
            .policy(policy);
        let alloc = self.allocator.alloc(request).map_err(map_error)?;
        self.check_contiguous(&alloc)?;
        if !opts.discard {
            // SAFETY: both ranges are `len` bytes of live mappings: the window's (inside it, as
            // the device checked) and the allocation's, which is ours alone until we return it.
            // They cannot overlap: the region is a separate mapping.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.host_ptr(gpa) as *const u8,
                    alloc.host_addr().as_ptr(),
                    len as usize,
                );
            }
        }
        if let Err(e) = self.back_with(gpa, &alloc) {
            // Put back whatever part was switched; the allocation is returned on drop.
            let _ = self.back_with_ram(gpa, len);
            return Err(MapError::Io(format!("remapping the window: {e}")));
        }
        let granule = self.allocator.config().granule as u64;
        let placement = Placement {
            host_addr: alloc.phys_addr().unwrap_or(alloc.offset() as u64),
            host_phys: alloc.phys_addr().is_some(),
            extent: alloc.extent() as u64,
            bytes_migrated: alloc.migrated_frames() as u64 * granule,
        };
        Ok((alloc, placement))
    }

    fn host_phys(&self) -> bool {
        self.region.extents().iter().any(|e| e.phys.is_some())
    }

    fn unmap(&self, gpa: u64, len: u64, mapping: Allocation, discard: bool) {
        if let Err(e) = self.back_with_ram(gpa, len) {
            // The range keeps the region's pages; leaking the allocation is the safe choice:
            // the guest may still use them.
            tracing::error!("virtio-dma: unmapping {len:#x} at {gpa:#x}: {e}; region pages leaked");
            std::mem::forget(mapping);
            return;
        }
        if !discard {
            // SAFETY: the window range is fresh anonymous memory of `len` bytes inside the
            // window's mapping; the allocation is still ours (dropped below) and is a separate
            // mapping, so the two cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    mapping.host_addr().as_ptr(),
                    self.host_ptr(gpa) as *mut u8,
                    len as usize,
                );
            }
        }
        drop(mapping);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cma::{AllocatorConfig, Backing, MemcpyMover};

    const MIB: u64 = 1 << 20;

    /// A window of anonymous memory, 2 MiB aligned, standing in for the VMM's.
    fn window(len: usize) -> WindowMapping {
        let raw = unsafe_map(len + (2 << 20));
        let host_addr = (raw as usize).next_multiple_of(2 << 20);
        WindowMapping {
            base: 0x4000_0000,
            len: len as u64,
            host_addr,
        }
    }

    fn unsafe_map(len: usize) -> *mut libc::c_void {
        // SAFETY: a fresh anonymous mapping; leaked for the test's lifetime.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p
    }

    fn backend(region_len: usize, window_len: usize) -> CmaBackend {
        let region = Arc::new(Region::reserve(region_len, Backing::Memfd).unwrap());
        let mover = Arc::new(MemcpyMover::new(region.clone()));
        let alloc = Allocator::new(region, AllocatorConfig::default(), mover).unwrap();
        CmaBackend::new(alloc, window(window_len)).unwrap()
    }

    fn byte(b: &CmaBackend, gpa: u64) -> *mut u8 {
        b.host_ptr(gpa) as *mut u8
    }

    const OPTS: MapOptions = MapOptions {
        failfast: true,
        discard: false,
        deadline: Duration::ZERO,
    };

    #[test]
    fn map_moves_contents_into_the_region_and_unmap_restores_ram() {
        let b = backend(8 << 20, 16 << 20);
        let gpa = b.window.base + 4 * MIB;
        // SAFETY: inside the test window.
        unsafe { byte(&b, gpa + 100).write(0xab) };
        let (alloc, placement) = b.map(gpa, MIB, OPTS).unwrap();
        assert!(
            !placement.host_phys,
            "memfd regions reveal no physical addresses"
        );
        assert_eq!(placement.host_addr, alloc.offset() as u64);
        // SAFETY: inside the test window and the allocation.
        unsafe {
            assert_eq!(byte(&b, gpa + 100).read(), 0xab, "contents preserved");
            // The window now *is* the region's memory: a write shows through both.
            byte(&b, gpa + 200).write(0x5a);
            assert_eq!(alloc.host_addr().as_ptr().add(200).read(), 0x5a);
        }
        b.unmap(gpa, MIB, alloc, false);
        // SAFETY: inside the test window.
        unsafe { assert_eq!(byte(&b, gpa + 200).read(), 0x5a, "contents kept by UNMAP") };
        let (alloc, _) = b.map(gpa, MIB, OPTS).unwrap();
        b.unmap(gpa, MIB, alloc, true);
        // SAFETY: inside the test window.
        unsafe {
            assert_eq!(
                byte(&b, gpa + 200).read(),
                0,
                "fresh RAM after a DISCARD UNMAP"
            )
        };
        assert_eq!(b.allocator().usage().allocated, 0);
    }

    #[test]
    fn discard_skips_the_copy_and_errors_map_to_statuses() {
        let b = backend(2 << 20, 16 << 20);
        let gpa = b.window.base;
        // SAFETY: inside the test window.
        unsafe { byte(&b, gpa).write(7) };
        let (a, _) = b
            .map(
                gpa,
                MIB,
                MapOptions {
                    discard: true,
                    ..OPTS
                },
            )
            .unwrap();
        // SAFETY: inside the test window.
        unsafe {
            assert_eq!(
                byte(&b, gpa).read(),
                0,
                "DISCARD: region pages as they were"
            )
        };
        assert_eq!(
            b.map(gpa + 2 * MIB, 4 * MIB, OPTS).unwrap_err(),
            MapError::TooBig
        );
        let (c, _) = b.map(gpa + 4 * MIB, MIB, OPTS).unwrap();
        assert_eq!(
            b.map(gpa + 8 * MIB, MIB, OPTS).unwrap_err(),
            MapError::NoMem
        );
        b.unmap(gpa, MIB, a, true);
        b.unmap(gpa + 4 * MIB, MIB, c, true);
    }

    #[test]
    fn natural_alignment_is_capped_at_a_pageblock() {
        assert_eq!(natural_align(4096), 4096);
        assert_eq!(natural_align(3 * 4096), 4096);
        assert_eq!(natural_align(64 << 10), 64 << 10);
        assert_eq!(natural_align(16 << 20), 2 << 20);
    }
}

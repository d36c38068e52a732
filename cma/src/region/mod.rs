//! The host contiguous region: N bytes of host memory with a chosen backing, and an
//! honest account of which parts of it are physically contiguous.
//!
//! Contiguity is physical and comes in [`Extent`]s. A 1 GiB huge page is one
//! extent. 2 MiB huge pages come back scattered, so after reserving them we read
//! their frame numbers, sort the pages by frame number and remap them in that order
//! (MAP_FIXED over our own mapping), so that physically adjacent pages are also
//! virtually adjacent and merge into larger extents. Where frame numbers are hidden
//! (not root), each huge page is its own extent with an unknown physical address.

mod backing;
mod cma_area;
mod pagemap;

use std::os::fd::RawFd;
use std::ptr::NonNull;

use tracing::{debug, info_span};

pub use pagemap::Extent;

use crate::error::RegionError;
use backing::{Mapping, HUGE_1G, HUGE_2M};
use pagemap::SMALL_PAGE;

/// Huge page size for a hugetlb region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePageSize {
    /// 1 GiB pages when the length is a multiple of 1 GiB and the host has enough
    /// free ones reserved; 2 MiB pages otherwise.
    Auto,
    Size2M,
    Size1G,
}

/// Where the region's memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backing {
    /// A hugetlbfs memfd.
    Hugetlb(HugePageSize),
    /// A buffer from `/dev/dma_heap/<name>` (a CMA or reserved-memory heap). An
    /// empty name picks the host's CMA/reserved heap, if it has one.
    DmaHeap { name: String },
    /// A plain memfd: contiguous in host virtual memory only. For tests and hosts
    /// without huge pages; labelled [`Contiguity::NotPhysical`].
    Memfd,
}

/// How much the region's [`Extent`]s can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Contiguity {
    /// Frame numbers were read from pagemap and every 4 KiB page checked.
    Verified,
    /// Frame numbers were read from the heap's CMA area (debugfs bitmap): exactly one run of the
    /// region's length was allocated from it by the region's allocation. pagemap cannot see a
    /// dma-buf mapping (`VM_PFNMAP`); see `cma_area.rs`.
    VerifiedCmaArea,
    /// Guaranteed by the backing (a huge page, a CMA heap buffer) but not checked:
    /// frame numbers are hidden from this process.
    Assumed,
    /// Not physically contiguous (plain memfd); the single extent is virtual only.
    NotPhysical,
}

/// A reserved, mapped host region.
pub struct Region {
    map: Mapping,
    backing: Backing,
    page_size: usize,
    /// File page shown at each region page, when the pages were reordered by frame
    /// number; empty when region offsets equal file offsets.
    file_pages: Vec<usize>,
    extents: Vec<Extent>,
    contiguity: Contiguity,
    /// The piece the region can be remapped into another mapping in (see [`Region::lend_unit`]).
    lend_unit: usize,
}

// SAFETY: the region owns its mapping; the raw pointer is only an address. Access to
// the bytes is coordinated by the allocator (frames have one owner at a time) and
// the `Mover`, so sharing the handle between threads is sound.
unsafe impl Send for Region {}
// SAFETY: see above; `&Region` exposes no interior mutability of its own.
unsafe impl Sync for Region {}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("backing", &self.backing)
            .field("len", &self.map.len)
            .field("page_size", &self.page_size)
            .field("contiguity", &self.contiguity)
            .field("extents", &self.extents.len())
            .finish()
    }
}

impl Region {
    /// Reserve and map `len` bytes with the given backing.
    pub fn reserve(len: usize, backing: Backing) -> Result<Region, RegionError> {
        let _span = info_span!("cma.region.reserve", len, ?backing).entered();
        match &backing {
            Backing::Hugetlb(size) => Self::hugetlb(len, *size),
            Backing::DmaHeap { name } if name.is_empty() => {
                Self::dma_heap(len, &backing::find_contiguous_heap()?)
            }
            Backing::DmaHeap { name } => Self::dma_heap(len, name),
            Backing::Memfd => Self::memfd(len),
        }
    }

    fn memfd(len: usize) -> Result<Region, RegionError> {
        check_len(len, SMALL_PAGE, "memfd")?;
        let fd = backing::memfd(len, None, "memfd")?;
        let ptr = backing::map(std::os::fd::AsRawFd::as_raw_fd(&fd), len, 0, None, "memfd")?;
        Ok(Region {
            map: Mapping { ptr, len, fd },
            backing: Backing::Memfd,
            page_size: SMALL_PAGE,
            file_pages: Vec::new(),
            extents: vec![Extent {
                offset: 0,
                len,
                phys: None,
            }],
            contiguity: Contiguity::NotPhysical,
            lend_unit: SMALL_PAGE,
        })
    }

    fn hugetlb(len: usize, size: HugePageSize) -> Result<Region, RegionError> {
        let ps = match size {
            HugePageSize::Size2M => HUGE_2M,
            HugePageSize::Size1G => HUGE_1G,
            HugePageSize::Auto => {
                if len >= HUGE_1G
                    && len & (HUGE_1G - 1) == 0
                    && backing::free_huge_pages(HUGE_1G) >= len / HUGE_1G
                {
                    HUGE_1G
                } else {
                    HUGE_2M
                }
            }
        };
        let name = if ps == HUGE_1G {
            "hugetlb-1G"
        } else {
            "hugetlb-2M"
        };
        check_len(len, ps, name)?;
        let (needed, free) = (len / ps, backing::free_huge_pages(ps));
        if free < needed {
            return Err(RegionError::HugePagesUnavailable {
                page_size: ps,
                needed,
                free,
                kib: ps / 1024,
            });
        }
        // 2 MiB pages come back scattered. When the host has spare ones, reserve up
        // to twice as many as needed, keep the pages that form the longest physical
        // runs and give the rest back. 1 GiB pages are too precious to over-reserve.
        let spare = if ps == HUGE_2M {
            (free - needed).min(needed)
        } else {
            0
        };
        let total = needed + spare;
        let fd = backing::memfd(total * ps, Some(ps), name)?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let ptr = backing::map(raw, total * ps, 0, None, name)?;
        let mut map = Mapping {
            ptr,
            len: total * ps,
            fd,
        };
        let mut file_pages = Vec::new();
        let (extents, contiguity) = match pagemap::phys_addrs(ptr as usize, ps, total) {
            Some(phys) => {
                let keep = longest_runs(&phys, ps, needed);
                let order = remap_in_order(&mut map, ps, &keep, total, name)?;
                let kept_phys: Vec<u64> = order.iter().map(|&i| phys[i]).collect();
                file_pages = order;
                (pagemap::merge_extents(ps, &kept_phys), Contiguity::Verified)
            }
            None => {
                // Frame numbers hidden: keep the first `needed` pages as they are.
                let keep: Vec<usize> = (0..needed).collect();
                remap_in_order(&mut map, ps, &keep, total, name)?;
                let extents = (0..needed)
                    .map(|i| Extent {
                        offset: i * ps,
                        len: ps,
                        phys: None,
                    })
                    .collect();
                (extents, Contiguity::Assumed)
            }
        };
        debug!(
            extents = extents.len(),
            ?contiguity,
            "hugetlb region reserved"
        );
        Ok(Region {
            map,
            backing: Backing::Hugetlb(size),
            page_size: ps,
            file_pages,
            extents,
            contiguity,
            // A huge page maps into another mapping only whole (hugetlbfs).
            lend_unit: ps,
        })
    }

    fn dma_heap(len: usize, name: &str) -> Result<Region, RegionError> {
        check_len(len, SMALL_PAGE, "dma-heap")?;
        let before = cma_area::CmaArea::read(&cma_area::CmaArea::dir(name));
        let fd = backing::dma_heap_alloc(name, len)?;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let ptr = backing::map(raw, len, 0, None, "dma-heap")?;
        let map = Mapping { ptr, len, fd };
        // The heap's buffer is one cma_alloc(): the run of the area's bitmap it set is the
        // region's frames. Without CMA debugfs, or with another allocation racing ours, the
        // placement stays unknown and is labelled so.
        let area_dir = cma_area::CmaArea::dir(name);
        let placed = before
            .zip(cma_area::CmaArea::read(&area_dir))
            .and_then(|(b, a)| b.new_run(&a))
            .filter(|run| run.len == len);
        let (phys, contiguity) = match placed {
            Some(run) => (Some(run.phys), Contiguity::VerifiedCmaArea),
            None => {
                tracing::info!(
                    heap = name,
                    "the dma-buf's frames are not known (no single new run in {}); contiguity assumed from the heap",
                    area_dir.display()
                );
                (None, Contiguity::Assumed)
            }
        };
        let extents = vec![Extent {
            offset: 0,
            len,
            phys,
        }];
        Ok(Region {
            map,
            backing: Backing::DmaHeap { name: name.into() },
            page_size: SMALL_PAGE,
            file_pages: Vec::new(),
            extents,
            contiguity,
            lend_unit: dma_buf_unit(len),
        })
    }

    /// Region length in bytes.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Always false: a region is never empty (zero lengths are rejected).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Host virtual address of the region's first byte.
    pub fn host_addr(&self) -> NonNull<u8> {
        // mmap never returns null on success.
        NonNull::new(self.map.ptr).unwrap_or(NonNull::dangling())
    }

    /// The backing's fd (memfd or dma-buf), to map the region's pieces from, at least
    /// [`Region::lend_unit`] bytes at a time. Its file offsets are not region offsets when huge
    /// pages were reordered by frame number: translate with [`Region::file_offset`].
    pub fn fd(&self) -> RawFd {
        self.map.raw_fd()
    }

    /// The smallest piece of the region that [`Region::fd`] maps into another mapping: 4 KiB
    /// for a memfd, 2 MiB for 2 MiB pages and for a dma-buf (see `dma_buf_unit`), 1 GiB for
    /// 1 GiB pages.
    pub fn lend_unit(&self) -> usize {
        self.lend_unit
    }

    /// File offset in [`Region::fd`] of the byte at region offset `offset`, or
    /// `None` past the end.
    pub fn file_offset(&self, offset: usize) -> Option<u64> {
        if offset >= self.len() {
            return None;
        }
        let page = offset / self.page_size;
        let file_page = self.file_pages.get(page).copied().unwrap_or(page);
        Some((file_page * self.page_size + offset % self.page_size) as u64)
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Backing page size (4 KiB, 2 MiB or 1 GiB).
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Whether the kernel can pin the region's pages, in its own mapping or mapped elsewhere, for
    /// I/O (`get_user_pages`: O_DIRECT, io_uring fixed buffers, vfio). Not for a dma-buf: the
    /// CMA heap maps it as `VM_PFNMAP` (`vmf_insert_pfn`), which GUP refuses, on the kernel's
    /// own heap as here.
    pub fn kernel_can_pin(&self) -> bool {
        !matches!(self.backing, Backing::DmaHeap { .. })
    }

    pub fn contiguity(&self) -> Contiguity {
        self.contiguity
    }

    /// Physically contiguous extents, ordered by offset, tiling the region.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Length of the largest extent: the largest allocation that can ever succeed.
    pub fn largest_extent(&self) -> usize {
        self.extents.iter().map(|e| e.len).max().unwrap_or(0)
    }

    /// Re-read pagemap and check every 4 KiB page of every extent is where the extent
    /// says. False when frame numbers are unknown.
    pub fn verify_extents(&self) -> bool {
        match (self.contiguity, &self.backing) {
            (Contiguity::Verified, _) => pagemap::verify(self.map.ptr as usize, &self.extents),
            (Contiguity::VerifiedCmaArea, Backing::DmaHeap { name }) => {
                cma_area::CmaArea::read(&cma_area::CmaArea::dir(name)).is_some_and(|area| {
                    self.extents.iter().all(|e| {
                        e.phys
                            .is_some_and(|phys| area.covers_allocated(phys, e.len))
                    })
                })
            }
            _ => false,
        }
    }
}

/// The page a dma-buf region is lent and moved in. A dma-buf maps at any 4 KiB page, but its
/// mapping is `VM_PFNMAP`, and the kernel never merges such VMAs: every piece remapped into the
/// window on its own is a VMA of its own. 2 MiB pieces keep a large window far under
/// `vm.max_map_count` (65530) and match the unit of a 2 MiB huge-page region.
fn dma_buf_unit(len: usize) -> usize {
    if len.is_multiple_of(HUGE_2M) {
        HUGE_2M
    } else {
        SMALL_PAGE
    }
}

/// Choose `needed` of the pages (given by physical address, indexed by file page)
/// so that they form the longest physical runs: whole runs, longest first, then a
/// prefix of the next. Returns file pages sorted by physical address.
fn longest_runs(phys: &[u64], ps: usize, needed: usize) -> Vec<usize> {
    let ps = ps as u64;
    let mut by_addr: Vec<usize> = (0..phys.len()).collect();
    by_addr.sort_by_key(|&i| phys[i]);
    let mut runs: Vec<Vec<usize>> = Vec::new();
    for i in by_addr {
        match runs.last_mut() {
            Some(r) if phys[*r.last().unwrap_or(&i)] + ps == phys[i] => r.push(i),
            _ => runs.push(vec![i]),
        }
    }
    runs.sort_by_key(|r| std::cmp::Reverse(r.len()));
    let mut keep = Vec::with_capacity(needed);
    for r in runs {
        let take = (needed - keep.len()).min(r.len());
        keep.extend_from_slice(&r[..take]);
        if keep.len() == needed {
            break;
        }
    }
    keep.sort_by_key(|&i| phys[i]);
    keep
}

/// Make region page `pos` show file page `keep[pos]`, unmap the rest of the
/// over-sized mapping and give unkept pages back to the host. Returns `keep`.
fn remap_in_order(
    map: &mut Mapping,
    ps: usize,
    keep: &[usize],
    total: usize,
    name: &'static str,
) -> Result<Vec<usize>, RegionError> {
    for (pos, &file_page) in keep.iter().enumerate() {
        if pos != file_page {
            // The pages already exist in the memfd, so this reuses them.
            let at = map.ptr.wrapping_add(pos * ps);
            backing::map(map.raw_fd(), ps, file_page * ps, Some(at), name)?;
        }
    }
    map.truncate(keep.len() * ps);
    let mut kept = vec![false; total];
    keep.iter().for_each(|&k| kept[k] = true);
    for (page, _) in kept.iter().enumerate().filter(|(_, k)| !**k) {
        backing::punch(map.raw_fd(), page * ps, ps, name)?;
    }
    Ok(keep.to_vec())
}

fn check_len(len: usize, page: usize, backing: &'static str) -> Result<(), RegionError> {
    let reason = if len == 0 {
        "zero length"
    } else if len & (page - 1) != 0 {
        // Page sizes are powers of two.
        "not a multiple of the backing page size"
    } else {
        return Ok(());
    };
    Err(RegionError::InvalidLength {
        len,
        backing,
        reason,
    })
}

#[cfg(test)]
impl Region {
    /// A memfd region that pretends to have the given physical extents, so that
    /// extent handling can be tested without hugetlb.
    pub(crate) fn fake_extents(extents: Vec<Extent>) -> Region {
        let len = extents.iter().map(|e| e.len).sum();
        let mut r = Region::memfd(len).expect("memfd");
        r.extents = extents;
        r.contiguity = Contiguity::Assumed;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_region_is_labelled_not_physical() {
        let r = Region::reserve(1 << 20, Backing::Memfd).unwrap();
        assert_eq!(r.contiguity(), Contiguity::NotPhysical);
        assert_eq!(
            r.extents(),
            &[Extent {
                offset: 0,
                len: 1 << 20,
                phys: None
            }]
        );
        assert!(!r.verify_extents());
        // The memory is really there and writable.
        // SAFETY: the region maps 1 MiB; we write its last byte and read it back.
        unsafe {
            *r.host_addr().as_ptr().add((1 << 20) - 1) = 7;
            assert_eq!(*r.host_addr().as_ptr().add((1 << 20) - 1), 7);
        }
    }

    #[test]
    fn longest_runs_keeps_whole_runs_longest_first() {
        let m = HUGE_2M as u64;
        // File pages 0..6 at frames: run A = {2,0} (2 pages), run B = {5,1,4} (3), C = {3}.
        let phys = [10 * m, 20 * m, 11 * m, 40 * m, 22 * m, 21 * m];
        assert_eq!(longest_runs(&phys, HUGE_2M, 3), vec![1, 5, 4]);
        assert_eq!(longest_runs(&phys, HUGE_2M, 4), vec![0, 1, 5, 4]);
        assert_eq!(longest_runs(&phys, HUGE_2M, 6), vec![0, 2, 1, 5, 4, 3]);
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(matches!(
            Region::reserve(0, Backing::Memfd),
            Err(RegionError::InvalidLength {
                reason: "zero length",
                ..
            })
        ));
        assert!(matches!(
            Region::reserve(4097, Backing::Memfd),
            Err(RegionError::InvalidLength { .. })
        ));
    }

    #[test]
    fn auto_dma_heap_without_heaps_names_the_directory() {
        if std::path::Path::new("/dev/dma_heap").exists() {
            return;
        }
        let err = Region::reserve(
            1 << 20,
            Backing::DmaHeap {
                name: String::new(),
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("/dev/dma_heap"), "{err}");
    }

    #[test]
    fn missing_dma_heap_is_a_clear_error() {
        if std::path::Path::new("/dev/dma_heap/reserved").exists() {
            return;
        }
        let err = Region::reserve(
            1 << 20,
            Backing::DmaHeap {
                name: "reserved".into(),
            },
        )
        .unwrap_err();
        assert!(matches!(err, RegionError::DmaHeapMissing { .. }));
        assert!(err.to_string().contains("/dev/dma_heap/reserved"), "{err}");
    }
}

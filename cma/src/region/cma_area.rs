//! Where a CMA dma-buf heap's buffer is in host physical memory, read from the CMA area's
//! debugfs files (`/sys/kernel/debug/cma/<area>/{base_pfn,count,order_per_bit,bitmap}`).
//!
//! pagemap cannot say: the kernel's CMA heap maps a buffer with `vmf_insert_pfn()` into a
//! `VM_PFNMAP` VMA (`drivers/dma-buf/heaps/cma_heap.c`), and the page walker behind
//! `/proc/self/pagemap` reports every `VM_PFNMAP` VMA as a hole (`walk_page_test()` in
//! `mm/pagewalk.c`). The heap allocates each buffer with one `cma_alloc()` of all its pages, which
//! sets one run of bits in the area's bitmap; the run that appears across the allocation is the
//! buffer's frames. Anything else (no debugfs, another allocation in the same area at the same
//! moment) leaves the placement unknown, and the region says so.

use std::path::{Path, PathBuf};

use super::pagemap::SMALL_PAGE;

const DEBUGFS_CMA: &str = "/sys/kernel/debug/cma";

/// A snapshot of one CMA area's allocation bitmap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CmaArea {
    pub base_pfn: u64,
    /// Pages in the area.
    pub count: u64,
    /// Each bitmap bit covers `1 << order_per_bit` pages.
    pub order_per_bit: u32,
    bits: Vec<u32>,
}

/// A run of pages that an allocation took from an area.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CmaRun {
    pub phys: u64,
    pub len: usize,
}

fn read_number(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl CmaArea {
    /// The debugfs directory of the area behind heap `name` (the heap is named after its area:
    /// `reserved` for the area from `cma=`).
    pub fn dir(name: &str) -> PathBuf {
        Path::new(DEBUGFS_CMA).join(name)
    }

    /// Reads the area's bitmap; `None` without debugfs or CMA debugfs (`CONFIG_CMA_DEBUGFS`).
    pub fn read(dir: &Path) -> Option<CmaArea> {
        let bitmap = std::fs::read_to_string(dir.join("bitmap")).ok()?;
        Self::parse(
            read_number(dir, "base_pfn")?,
            read_number(dir, "count")?,
            read_number(dir, "order_per_bit")? as u32,
            &bitmap,
        )
    }

    /// The bitmap file is the area's `unsigned long` bitmap printed as decimal `u32` words.
    fn parse(base_pfn: u64, count: u64, order_per_bit: u32, bitmap: &str) -> Option<CmaArea> {
        let bits = bitmap
            .split_ascii_whitespace()
            .map(|w| w.parse::<u32>().ok())
            .collect::<Option<Vec<u32>>>()?;
        Some(CmaArea {
            base_pfn,
            count,
            order_per_bit,
            bits,
        })
    }

    fn bit(&self, i: usize) -> bool {
        self.bits
            .get(i / 32)
            .is_some_and(|w| w & (1 << (i % 32)) != 0)
    }

    fn nbits(&self) -> usize {
        (self.count >> self.order_per_bit) as usize
    }

    /// The one run of bits set in `after` and clear in `self`, as host memory; `None` unless
    /// exactly one such run exists.
    pub fn new_run(&self, after: &CmaArea) -> Option<CmaRun> {
        if (self.base_pfn, self.count, self.order_per_bit)
            != (after.base_pfn, after.count, after.order_per_bit)
        {
            return None;
        }
        let mut run: Option<(usize, usize)> = None;
        let mut i = 0;
        let n = self.nbits();
        while i < n {
            if after.bit(i) && !self.bit(i) {
                let start = i;
                while i < n && after.bit(i) && !self.bit(i) {
                    i += 1;
                }
                if run.is_some() {
                    return None;
                }
                run = Some((start, i - start));
            } else {
                i += 1;
            }
        }
        let (start, bits) = run?;
        let page_shift = self.order_per_bit;
        Some(CmaRun {
            phys: (self.base_pfn + ((start as u64) << page_shift)) * SMALL_PAGE as u64,
            len: (bits << page_shift) * SMALL_PAGE,
        })
    }

    /// Whether every page of `[phys, phys + len)` lies in the area and is allocated.
    pub fn covers_allocated(&self, phys: u64, len: usize) -> bool {
        let page = SMALL_PAGE as u64;
        let first = phys / page;
        let last = (phys + len as u64).div_ceil(page);
        if first < self.base_pfn || last > self.base_pfn + self.count {
            return false;
        }
        let (b0, b1) = (
            ((first - self.base_pfn) >> self.order_per_bit) as usize,
            ((last - self.base_pfn - 1) >> self.order_per_bit) as usize,
        );
        (b0..=b1).all(|i| self.bit(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_new_run_is_found_and_placed() {
        // 96 pages at pfn 0x1000; bits 3..5 taken before; the allocation took bits 40..71.
        let before = CmaArea::parse(0x1000, 96, 0, "56 0 0").unwrap();
        let after = CmaArea::parse(0x1000, 96, 0, "56 4294967040 255").unwrap();
        let run = before.new_run(&after).unwrap();
        assert_eq!(run.phys, (0x1000 + 40) * 4096);
        assert_eq!(run.len, 32 * 4096);
        assert!(after.covers_allocated(run.phys, run.len));
        assert!(!before.covers_allocated(run.phys, run.len));
        assert!(!after.covers_allocated(run.phys, run.len + 4096));
        assert!(!after.covers_allocated(0x1000 * 4096 - 4096, 4096));
    }

    #[test]
    fn two_new_runs_or_none_place_nothing() {
        let before = CmaArea::parse(0, 64, 0, "0 0").unwrap();
        let two = CmaArea::parse(0, 64, 0, "3 12").unwrap();
        assert_eq!(before.new_run(&two), None);
        assert_eq!(before.new_run(&before), None);
        // A different area is never compared.
        let other = CmaArea::parse(64, 64, 0, "3 0").unwrap();
        assert_eq!(before.new_run(&other), None);
        assert_eq!(CmaArea::parse(0, 64, 0, "3 x"), None);
    }

    #[test]
    fn order_per_bit_scales_runs() {
        let before = CmaArea::parse(0x100, 64, 2, "0").unwrap();
        let after = CmaArea::parse(0x100, 64, 2, "6").unwrap();
        let run = before.new_run(&after).unwrap();
        assert_eq!(run.phys, (0x100 + 4) * 4096);
        assert_eq!(run.len, 8 * 4096);
    }
}

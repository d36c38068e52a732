//! The baseline: an allocator that works the way Linux `mm/cma.c` (v5.x) does, with
//! the same frame/occupant/pin model as the bench's scenarios.
//!
//! - one bitmap of CMA-allocated frames under one lock (`cma->lock`);
//! - `bitmap_find_next_zero_area_off`: a linear first-fit scan from the start;
//! - the range is then made free by `alloc_contig_range()`, under the global
//!   `cma_mutex`, migrating every occupant in it out of the area (memcpy to outside
//!   memory); a pinned page makes it fail with -EBUSY after the pages before it have
//!   already been migrated;
//! - on -EBUSY: clear the bits and "try again with a bit different memory target",
//!   `start = bitmap_no + mask + 1`;
//! - no cost model: the first bitmap-free range is taken whatever it contains.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use cma::{Backing, Region};

pub struct LinuxCma {
    frames: usize,
    granule: usize,
    /// `cma->lock` + `cma->bitmap`.
    bitmap: Mutex<Vec<u64>>,
    /// The global `cma_mutex` around `alloc_contig_range()`.
    cma_mutex: Mutex<()>,
    /// Occupant id per frame (0 = none): the buddy allocator's movable pages.
    pub occupant: Vec<AtomicU64>,
    pub pins: Vec<AtomicU32>,
    region: Arc<Region>,
    /// Non-CMA memory that migrated pages go to.
    outside: Region,
}

pub struct Chunk {
    pub start: usize,
    pub frames: usize,
    /// (frame, occupant) pairs migrated out, so the bench can put them back.
    pub displaced: Vec<(usize, u64)>,
}

impl LinuxCma {
    pub fn new(len: usize) -> Self {
        let frames = len / 4096;
        LinuxCma {
            frames,
            granule: 4096,
            bitmap: Mutex::new(vec![0; frames.div_ceil(64)]),
            cma_mutex: Mutex::new(()),
            occupant: (0..frames).map(|_| AtomicU64::new(0)).collect(),
            pins: (0..frames).map(|_| AtomicU32::new(0)).collect(),
            region: Arc::new(Region::reserve(len, Backing::Memfd).unwrap()),
            outside: Region::reserve(len, Backing::Memfd).unwrap(),
        }
    }

    fn bit(bm: &[u64], i: usize) -> bool {
        bm[i / 64] >> (i % 64) & 1 == 1
    }

    /// `bitmap_set` / `bitmap_clear`, a word at a time.
    fn set(bm: &mut [u64], start: usize, n: usize, on: bool) {
        let mut i = start;
        let end = start + n;
        while i < end {
            let (w, b) = (i / 64, i % 64);
            let k = (64 - b).min(end - i);
            let m = if k == 64 {
                u64::MAX
            } else {
                ((1u64 << k) - 1) << b
            };
            if on {
                bm[w] |= m
            } else {
                bm[w] &= !m
            }
            i += k;
        }
    }

    /// `find_next_bit` (`want` = true) / `find_next_zero_bit`, a word at a time.
    fn find_next(bm: &[u64], size: usize, from: usize, want: bool) -> usize {
        let mut i = from;
        while i < size {
            let (w, b) = (i / 64, i % 64);
            let word = if want { bm[w] } else { !bm[w] } >> b;
            if word != 0 {
                return (i + word.trailing_zeros() as usize).min(size);
            }
            i += 64 - b;
        }
        size
    }

    /// `bitmap_find_next_zero_area_off`: first aligned zero run of `n` bits at or
    /// after `start`, by linear scan.
    fn find_zero_area(
        bm: &[u64],
        size: usize,
        start: usize,
        n: usize,
        mask: usize,
    ) -> Option<usize> {
        let mut index = start;
        loop {
            index = Self::find_next(bm, size, index, false);
            index = (index + mask) & !mask;
            let end = index + n;
            if end > size {
                return None;
            }
            let i = Self::find_next(bm, end, index, true);
            if i < end {
                index = i + 1;
            } else {
                return Some(index);
            }
        }
    }

    /// `alloc_contig_range()`: migrate every occupant of the range out; -EBUSY at
    /// the first pinned frame (earlier pages stay migrated).
    fn alloc_contig_range(
        &self,
        start: usize,
        n: usize,
        displaced: &mut Vec<(usize, u64)>,
    ) -> bool {
        let g = self.granule;
        let base = self.region.host_addr().as_ptr();
        let out = self.outside.host_addr().as_ptr();
        for f in start..start + n {
            if self.pins[f].load(Ordering::Acquire) != 0 {
                return false;
            }
            let o = self.occupant[f].swap(0, Ordering::AcqRel);
            if o != 0 {
                // SAFETY: `f` indexes a frame of both equally sized mappings, which
                // live as long as `self`; the range is reserved in the bitmap.
                unsafe { std::ptr::copy_nonoverlapping(base.add(f * g), out.add(f * g), g) };
                displaced.push((f, o));
            }
        }
        true
    }

    /// `cma_alloc(count, align)`.
    pub fn alloc(&self, n: usize, align: usize) -> Option<Chunk> {
        let mask = align - 1;
        let mut start = 0;
        let mut displaced = Vec::new();
        loop {
            let bitmap_no = {
                let mut bm = self.bitmap.lock();
                let no = Self::find_zero_area(&bm, self.frames, start, n, mask)?;
                Self::set(&mut bm, no, n, true);
                no
            };
            let ok = {
                let _g = self.cma_mutex.lock();
                self.alloc_contig_range(bitmap_no, n, &mut displaced)
            };
            if ok {
                return Some(Chunk {
                    start: bitmap_no,
                    frames: n,
                    displaced,
                });
            }
            Self::set(&mut self.bitmap.lock(), bitmap_no, n, false);
            start = bitmap_no + mask + 1;
        }
    }

    /// `cma_release()`.
    pub fn free(&self, c: &Chunk) {
        Self::set(&mut self.bitmap.lock(), c.start, c.frames, false);
    }

    /// Mark frames allocated without migrating (building a fragmented layout).
    pub fn reserve_at(&self, start: usize, n: usize) {
        Self::set(&mut self.bitmap.lock(), start, n, true);
    }

    pub fn is_allocated(&self, f: usize) -> bool {
        Self::bit(&self.bitmap.lock(), f)
    }
}

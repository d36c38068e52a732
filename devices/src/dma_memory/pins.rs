//! Pin holders: who may hold guest DMA memory in place, and how the owner keeps their pins
//! attached to the guest pages they were taken on.
//!
//! - [`TransientPin`]: I/O in flight on one frame (`O_DIRECT` from a guest page, seed 001's
//!   failure mode). It holds the *frame*: the I/O reads it through the region's mapping, so if
//!   the page moves meanwhile (a MAP with DISCARD), the frame is orphaned and freed at unpin.
//! - [`LongTermPin`]: a holder that registers guest pages with the kernel for long (io_uring
//!   fixed buffers; the IOMMU mappings of VFIO), which pins the *host pages* behind them. Pages
//!   lent from the region are first moved out of it (`FOLL_LONGTERM` semantics, seed 003), pages
//!   of DMA mappings are pinned in place, pages in RAM stay there; every page of the range is
//!   then recorded as pinned, and nothing re-backs a pinned page until its last pin goes.

use std::sync::Arc;

use cma::{LongTermPin as AllocatorLongTermPin, PinGuard};

use super::window::Backing;
use super::{lock, DmaMemory, DmaMemoryError, Owner};

/// Who holds a long-term pin (for reports and logs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PinHolder {
    /// io_uring registered (fixed) buffers.
    IoUring,
    /// A VFIO device's IOMMU mapping of a DMA range.
    Iommu,
}

/// A transient pin on the frame behind one window page; dropping it unpins.
pub struct TransientPin {
    owner: Arc<Owner>,
    guard: Option<PinGuard>,
}

impl TransientPin {
    /// The pinned frame's bytes in the region's mapping: valid, and the frame not reused, while
    /// the pin lives. The guest may write them concurrently (as it may during real DMA).
    pub fn frame_bytes(&self) -> (*const u8, usize) {
        let f = self.guard.as_ref().map_or(0, PinGuard::frame);
        (
            self.owner.window.frame_ptr(f).cast_const(),
            self.owner.window.page,
        )
    }
}

impl Drop for TransientPin {
    fn drop(&mut self) {
        drop(self.guard.take());
        // A frame orphaned while this pin held it can be freed now.
        self.owner.reap();
    }
}

/// A long-term pinned guest range; dropping it unpins. Drop the kernel's pin (close the ring,
/// unmap the IOMMU range) first.
pub struct LongTermPin {
    owner: Arc<Owner>,
    first: usize,
    n: usize,
    guards: Vec<PinGuard>,
    buffers: Vec<HostBuffer>,
    holder: PinHolder,
    pub gpa: u64,
    pub len: u64,
    /// Pages that were lent from the region and moved out of it for the pin.
    pub moved_out: usize,
    /// Pages of DMA mappings, pinned on their frames.
    pub pinned_in_place: usize,
}

/// A run of the VMM's mapping of pinned guest pages that all live in one kind of memory
/// (anonymous RAM, or the region's file), as io_uring wants each registered buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostBuffer {
    pub addr: usize,
    pub len: usize,
}

impl LongTermPin {
    /// The host buffers to register with the kernel: valid while the pin lives.
    pub fn buffers(&self) -> &[HostBuffer] {
        &self.buffers
    }

    /// The buffers as `iovec`s, as io_uring's buffer registration takes them.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.buffers
            .iter()
            .map(|b| libc::iovec {
                iov_base: b.addr as *mut libc::c_void,
                iov_len: b.len,
            })
            .collect()
    }

    pub fn holder(&self) -> PinHolder {
        self.holder
    }
}

impl std::fmt::Debug for LongTermPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LongTermPin")
            .field("holder", &self.holder)
            .field("gpa", &self.gpa)
            .field("len", &self.len)
            .field("moved_out", &self.moved_out)
            .field("pinned_in_place", &self.pinned_in_place)
            .finish()
    }
}

impl Drop for LongTermPin {
    fn drop(&mut self) {
        {
            let mut pages = self.owner.window.lock();
            for s in &mut pages.table[self.first..self.first + self.n] {
                s.longterm_pins -= 1;
            }
        }
        self.guards.clear();
        self.owner
            .longterm_ranges
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl DmaMemory {
    /// Pins the frame behind window page `page` for I/O in flight. Refused while the page is in
    /// RAM, being moved, or its frame is being freed.
    pub fn pin_transient(&self, page: usize) -> Result<TransientPin, DmaMemoryError> {
        let o = &self.inner;
        let backing = o
            .window
            .lock()
            .table
            .get(page)
            .map(|s| s.backing)
            .ok_or(DmaMemoryError::NotOnFrame { page })?;
        let guard = match backing {
            Backing::Lent(f) => o.allocator.pin_occupant(f),
            Backing::Mapped(f) => o.allocator.pin(f),
            Backing::Ram => return Err(DmaMemoryError::NotOnFrame { page }),
        }
        .map_err(|source| DmaMemoryError::Pin { page, source })?;
        Ok(TransientPin {
            owner: o.clone(),
            guard: Some(guard),
        })
    }

    /// Pins `[gpa, gpa + len)` (rounded out to whole pages) long-term for `holder`: all pages or
    /// none. On failure the pages moved out so far are lent back, and nothing stays pinned.
    pub fn pin_longterm(
        &self,
        gpa: u64,
        len: u64,
        holder: PinHolder,
    ) -> Result<LongTermPin, DmaMemoryError> {
        let (first, n) = self.pages_of(gpa, len)?;
        let o = &self.inner;
        let _layout = lock(&o.layout);
        // A mapped page is pinned where it is; on a region the kernel cannot pin, the caller's
        // own pin (io_uring, vfio) would then fail. Refuse before taking anything.
        // The IOMMU (VFIO type1) maps a `VM_PFNMAP` range by PFN without pinning it; such a
        // region never moves anyway.
        if !o.window.region().kernel_can_pin() && holder != PinHolder::Iommu {
            let pages = o.window.lock();
            // On a region lent whole (a dma-buf is), lent pages stay in place too.
            if let Some(p) = (first..first + n)
                .find(|&p| o.window.fixed || matches!(pages.table[p].backing, Backing::Mapped(_)))
            {
                return Err(DmaMemoryError::NotPinnable { page: p });
            }
        }
        let mut pin = LongTermPin {
            owner: o.clone(),
            first,
            n: 0,
            guards: Vec::new(),
            buffers: Vec::new(),
            holder,
            gpa: o.window.page_gpa(first),
            len: (n * o.window.page) as u64,
            moved_out: 0,
            pinned_in_place: 0,
        };
        o.longterm_ranges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for p in first..first + n {
            let backing = o.window.lock().table[p].backing;
            let taken = match backing {
                // A region lent whole never moves: its pages are pinned where they are.
                Backing::Lent(f) if o.window.fixed => o
                    .allocator
                    .pin(f)
                    .map(|g| Some(AllocatorLongTermPin::Held(g))),
                Backing::Lent(f) | Backing::Mapped(f) => o.allocator.pin_longterm(f).map(Some),
                Backing::Ram => Ok(None),
            };
            match taken {
                Ok(Some(AllocatorLongTermPin::MovedOut(_))) => pin.moved_out += 1,
                Ok(Some(AllocatorLongTermPin::Held(g))) => {
                    pin.guards.push(g);
                    pin.pinned_in_place += 1;
                }
                Ok(None) => {}
                Err(source) => {
                    let moved_out = pin.moved_out;
                    // Unpins what was taken (the drop), then lends the moved-out pages back.
                    drop(pin);
                    if moved_out > 0 {
                        o.relend_locked(usize::MAX);
                    }
                    return Err(DmaMemoryError::Pin { page: p, source });
                }
            }
            o.window.lock().table[p].longterm_pins += 1;
            pin.n += 1;
        }
        // One buffer per run of pages in one kind of memory (RAM, or the region's file), as
        // io_uring wants each registered buffer.
        let pages = o.window.lock();
        let in_region = |p: usize| pages.table[p].backing.frame().is_some();
        let mut start = first;
        for p in first + 1..=first + n {
            if p == first + n || in_region(p) != in_region(start) {
                pin.buffers.push(HostBuffer {
                    addr: o.window.page_addr(start),
                    len: (p - start) * o.window.page,
                });
                start = p;
            }
        }
        drop(pages);
        tracing::debug!(
            ?holder,
            first,
            n,
            moved_out = pin.moved_out,
            in_place = pin.pinned_in_place,
            "long-term pin"
        );
        Ok(pin)
    }
}

//! Guest memory as devices see it: a handle that takes the move gate itself.
//!
//! The DMA memory owner ([`crate::dma_memory::DmaMemory`]) moves guest pages of the DMA window
//! behind the guest's back: it write-protects a page, copies it and remaps it. A VMM thread that
//! writes such a page mid-move dies of SIGSEGV, and one that writes it between the copy and the
//! remap loses its write. So no device thread may touch guest memory while a move runs, and no
//! move may start while a device thread touches guest memory.
//!
//! That rule is kept by construction here: a device never holds a [`GuestMemoryMmap`]. It holds
//! a [`GuestMemoryHandle`] (vm-memory's [`GuestAddressSpace`]), and the only way to reach guest
//! memory through it is [`GuestAddressSpace::memory`], which returns a [`GuestMemoryAccess`]:
//! a guard that keeps moves out while it lives and dereferences to the memory. Everything
//! borrowed from it (a descriptor chain, a `Reader`, a slice) borrows the guard, so the borrow
//! checker ends those borrows before the guard goes. vCPUs are the other writers; they are not
//! devices: KVM makes them fault (`EFAULT`) on a write-protected page and they wait in
//! [`MoveGate::wait_moves`].
//!
//! Never call into the DMA memory owner (MAP, pins, migration) while holding an access guard:
//! a move would wait for the guard, and the guard for the move.

use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex};

use parking_lot::lock_api::ArcRwLockReadGuard;
use parking_lot::{RawRwLock, RwLock};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};

/// Keeps writers out of guest pages while the DMA memory owner moves them, and tells vCPUs
/// whose write faulted whether a move was the cause.
#[derive(Default)]
pub struct MoveGate {
    state: Mutex<GateState>,
    moved: Condvar,
    /// Device threads hold it for reading around their accesses; a move holds it for writing.
    access: Arc<RwLock<()>>,
}

#[derive(Default)]
struct GateState {
    active: u32,
    epoch: u64,
}

/// A move in progress; dropping it ends the move and wakes waiting vCPUs.
pub(crate) struct MoveInProgress<'a> {
    gate: &'a MoveGate,
    _devices_out: parking_lot::RwLockWriteGuard<'a, ()>,
}

impl MoveGate {
    /// Starts a move: waits until no device thread holds guest memory, and keeps them out until
    /// the guard is dropped. Only the DMA memory owner moves pages.
    pub(crate) fn begin(&self) -> MoveInProgress<'_> {
        let devices_out = self.access.write();
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.active += 1;
        s.epoch += 1;
        MoveInProgress {
            gate: self,
            _devices_out: devices_out,
        }
    }

    /// For a vCPU whose `KVM_RUN` failed with `EFAULT`: waits while a move is in progress and
    /// says whether any move ran since `seen` (then the fault was a write to a page being moved
    /// and the vCPU re-enters the guest; otherwise the fault is real).
    pub fn wait_moves(&self, seen: &mut u64) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.active > 0 {
            s = self.moved.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        let moved = s.epoch != *seen;
        *seen = s.epoch;
        moved
    }
}

impl Drop for MoveInProgress<'_> {
    fn drop(&mut self) {
        let mut s = self.gate.state.lock().unwrap_or_else(|e| e.into_inner());
        s.active -= 1;
        s.epoch += 1;
        self.gate.moved.notify_all();
    }
}

/// Guest memory for devices: cheap to clone, and every access goes through the move gate.
#[derive(Clone)]
pub struct GuestMemoryHandle {
    mem: Arc<GuestMemoryMmap>,
    gate: Arc<MoveGate>,
}

impl GuestMemoryHandle {
    /// Takes over `mem`; from here on devices reach it only through the gate.
    pub fn new(mem: GuestMemoryMmap) -> Self {
        Self {
            mem: Arc::new(mem),
            gate: Arc::new(MoveGate::default()),
        }
    }

    /// The gate vCPUs wait on after a write fault.
    pub fn gate(&self) -> &Arc<MoveGate> {
        &self.gate
    }

    /// The VMM's address of `[base, base + len)` if that is exactly one region of guest memory:
    /// for the DMA memory owner, which re-backs that range under the gate itself. Nothing else
    /// gets guest memory around the gate.
    pub(crate) fn whole_region_host_addr(&self, base: u64, len: u64) -> Option<usize> {
        use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
        let region = self
            .mem
            .find_region(GuestAddress(base))
            .filter(|r| r.start_addr() == GuestAddress(base) && r.len() == len)?;
        region
            .get_host_address(MemoryRegionAddress(0))
            .ok()
            .map(|p| p as usize)
    }
}

impl GuestAddressSpace for GuestMemoryHandle {
    type M = GuestMemoryMmap;
    type T = GuestMemoryAccess;

    /// Waits for a move in progress to end, then keeps moves out until the guard is dropped.
    fn memory(&self) -> GuestMemoryAccess {
        GuestMemoryAccess {
            mem: self.mem.clone(),
            _no_moves: self.gate.access.read_arc(),
        }
    }
}

/// Guest memory, with no page moving while this lives. Hold it around accesses only.
pub struct GuestMemoryAccess {
    mem: Arc<GuestMemoryMmap>,
    _no_moves: ArcRwLockReadGuard<RawRwLock, ()>,
}

impl Clone for GuestMemoryAccess {
    fn clone(&self) -> Self {
        // A recursive read never waits for a queued move: this thread already keeps moves out,
        // so waiting for one would deadlock.
        let lock = ArcRwLockReadGuard::rwlock(&self._no_moves).clone();
        Self {
            mem: self.mem.clone(),
            _no_moves: lock.read_arc_recursive(),
        }
    }
}

impl Deref for GuestMemoryAccess {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    fn handle() -> GuestMemoryHandle {
        GuestMemoryHandle::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        )
    }

    #[test]
    fn a_move_waits_for_an_access_and_an_access_for_a_move() {
        let h = handle();
        let access = h.memory();
        let moved = Arc::new(AtomicBool::new(false));
        let mover = {
            let (h, moved) = (h.clone(), moved.clone());
            std::thread::spawn(move || {
                let _m = h.gate.begin();
                moved.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!moved.load(Ordering::SeqCst), "a move ran under an access");
        // A clone of a held access does not wait behind the queued move.
        let again = access.clone();
        again.write_obj(7u64, GuestAddress(0x100)).unwrap();
        drop((access, again));
        mover.join().unwrap();
        assert!(moved.load(Ordering::SeqCst));
        let mut seen = 0;
        assert!(h.gate().wait_moves(&mut seen), "one move ran");
        assert!(!h.gate().wait_moves(&mut seen), "and no other since");
        assert_eq!(h.memory().read_obj::<u64>(GuestAddress(0x100)).unwrap(), 7);
    }
}

//! [`MemcpyMover`]: the crate's own [`Mover`], for its tests and benchmarks (feature
//! `test-util`; the VMM brings its own mover, which also remaps guest memory).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::migrate::{Destination, FrameMove, MigrationPlan, MoveError, Mover, Occupant};
use crate::region::Region;

/// Copies frames with `memcpy` inside the region; occupants sent out of the region
/// are kept in a side store (standing in for ordinary host memory).
pub struct MemcpyMover {
    region: Arc<Region>,
    outside: Mutex<HashMap<Occupant, Box<[u8]>>>,
}

impl MemcpyMover {
    pub fn new(region: Arc<Region>) -> Self {
        MemcpyMover {
            region,
            outside: Mutex::new(HashMap::new()),
        }
    }

    /// The bytes of an occupant that was moved out of the region, if any.
    pub fn outside_copy(&self, occ: Occupant) -> Option<Box<[u8]>> {
        self.lock_outside().get(&occ).cloned()
    }

    /// Occupants currently held outside the region.
    pub fn outside_occupants(&self) -> Vec<Occupant> {
        self.lock_outside().keys().copied().collect()
    }

    /// Forget an occupant held outside (the owner freed its page).
    pub fn drop_outside(&self, occ: Occupant) -> bool {
        self.lock_outside().remove(&occ).is_some()
    }

    fn lock_outside(&self) -> std::sync::MutexGuard<'_, HashMap<Occupant, Box<[u8]>>> {
        // A panic while holding this lock cannot leave the map inconsistent (each
        // operation is a single insert/remove), so a poisoned lock is still usable.
        self.outside.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(
        &self,
        plan: &MigrationPlan,
        m: &FrameMove,
        i: usize,
        what: &str,
    ) -> Result<(), MoveError> {
        let frames = self.region.len() / plan.granule.max(1);
        let dst_bad = matches!(m.dst, Destination::Frame(d) if d >= frames);
        if plan.granule == 0 || m.src >= frames || dst_bad {
            return Err(MoveError {
                completed: i,
                total: plan.len(),
                frame: m.src,
                reason: format!("{what}: frame outside the {frames}-frame region"),
            });
        }
        Ok(())
    }
}

impl Mover for MemcpyMover {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError> {
        let g = plan.granule;
        let base = self.region.host_addr().as_ptr();
        for (i, m) in plan.moves.iter().enumerate() {
            self.check(plan, m, i, "memcpy mover")?;
            // SAFETY: `check` bounds both frames inside the region mapping, which
            // lives as long as `self.region`. The allocator froze both frames for
            // the duration of the plan, so no one else reads or writes them, and a
            // source is never its own destination (destinations are clean frames).
            let src = unsafe { std::slice::from_raw_parts(base.add(m.src * g), g) };
            match m.dst {
                Destination::Frame(d) => {
                    // SAFETY: as above; `d != m.src`, so the ranges do not overlap.
                    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), base.add(d * g), g) }
                }
                Destination::OutOfRegion => {
                    self.lock_outside().insert(m.occupant, src.into());
                }
            }
        }
        Ok(())
    }
}

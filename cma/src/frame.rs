//! Per-frame state word: the lock-free part of the frame state machine.
//!
//! Pins on movable occupants are taken and dropped far more often than ranges are
//! allocated (every guest I/O takes a transient pin), so they must not take the
//! allocator's map lock. Each frame therefore has one atomic `u64`:
//!
//! ```text
//!  63      62..58   57..56   55..40   39..20      19..0
//!  FROZEN  unused   kind     unused   long-term   transient
//! ```
//!
//! `kind` ([`FrameKind`]) is `Occupied` while a movable occupant lives on the frame
//! and `FreeOrAllocated` otherwise (which of the two is the free-run tree's
//! business, under the map lock). Only `Occupied` frames can be pinned lock-free; a pin on an
//! allocated frame takes the map lock (`pin_locked`), which keeps allocation and
//! release free of per-frame atomic read-modify-writes: claiming a clean range and
//! releasing it touch only the tree. Kind changes happen under the map lock.
//! `FROZEN` is set while an occupant is being migrated off (or onto) the frame.
//!
//! The race that matters, a pin arriving while the allocator decides to migrate
//! the frame, is decided by one compare-and-swap on this word, as Linux decides it
//! by freezing the page refcount: `try_freeze` succeeds only with zero pins, and
//! `try_pin` fails while frozen. Exactly one of them wins.
//!
//! The functions are generic over [`AtomicFrameWord`] so the same code runs under the shuttle
//! model checker in the tests below.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

pub(crate) const TRANSIENT_ONE: u64 = 1;
pub(crate) const LONGTERM_ONE: u64 = 1 << 20;
const COUNT_MASK: u64 = (1 << 20) - 1;
const PINS_MASK: u64 = (1 << 40) - 1;
const KIND_SHIFT: u32 = 56;
const KIND_MASK: u64 = 3 << KIND_SHIFT;
pub(crate) const FROZEN: u64 = 1 << 63;

/// What a frame is used for, as seen by lock-free pinners (the word's kind bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FrameKind {
    /// Free or allocated (the tree says which): no lock-free pins.
    FreeOrAllocated = 0,
    /// Holds a movable occupant.
    Occupied = 2,
}

/// Which pin counter a pin uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PinKind {
    /// Short-lived (I/O in flight). Blocks migration; allocators skip or wait.
    Transient,
    /// Long-lived (a backend or VFIO). Never allowed on a movable occupant inside
    /// the region: the occupant is moved out first (FOLL_LONGTERM semantics).
    LongTerm,
}

/// The atomic operations the state machine needs; implemented for std's
/// `AtomicU64` and, in tests, for shuttle's.
pub(crate) trait AtomicFrameWord {
    fn get(&self) -> u64;
    fn cas(&self, current: u64, new: u64) -> Result<u64, u64>;
}

impl AtomicFrameWord for AtomicU64 {
    fn get(&self) -> u64 {
        AtomicU64::load(self, Ordering::Acquire)
    }
    fn cas(&self, current: u64, new: u64) -> Result<u64, u64> {
        self.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire)
    }
}

pub(crate) fn kind_of(w: u64) -> FrameKind {
    match (w & KIND_MASK) >> KIND_SHIFT {
        0 => FrameKind::FreeOrAllocated,
        _ => FrameKind::Occupied,
    }
}

/// All pins on the frame (transient + long-term).
pub(crate) fn pins_of(w: u64) -> u32 {
    ((w & COUNT_MASK) + ((w >> 20) & COUNT_MASK)) as u32
}

pub(crate) fn longterm_of(w: u64) -> u32 {
    ((w >> 20) & COUNT_MASK) as u32
}

pub(crate) fn is_frozen(w: u64) -> bool {
    w & FROZEN != 0
}

fn with_kind(w: u64, kind: FrameKind) -> u64 {
    (w & !KIND_MASK) | ((kind as u64) << KIND_SHIFT)
}

/// Loop a compare-and-swap of `f(old)` until it sticks or `f` refuses.
fn update<W: AtomicFrameWord, E>(
    word: &W,
    mut f: impl FnMut(u64) -> Result<u64, E>,
) -> Result<u64, E> {
    let mut cur = word.get();
    loop {
        let new = f(cur)?;
        match word.cas(cur, new) {
            Ok(_) => return Ok(cur),
            Err(actual) => cur = actual,
        }
    }
}

/// Why a pin was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PinRefused {
    /// `try_pin` only: the frame holds no occupant (it is free or allocated); the
    /// caller may check the tree under the map lock and try `pin_locked`.
    NotOccupied,
    /// Being migrated.
    Frozen,
    /// The pin counter is full.
    Overflow,
}

/// Add one pin to an `Occupied` frame, lock-free. Returns the word before the pin.
pub(crate) fn try_pin<W: AtomicFrameWord>(word: &W, kind: PinKind) -> Result<u64, PinRefused> {
    add_pin(word, kind, true)
}

/// Add one pin to a frame the caller, holding the map lock, has checked is
/// allocated (its kind is `FreeOrAllocated`). Returns the word before the pin.
pub(crate) fn pin_locked<W: AtomicFrameWord>(word: &W, kind: PinKind) -> Result<u64, PinRefused> {
    add_pin(word, kind, false)
}

fn add_pin<W: AtomicFrameWord>(
    word: &W,
    kind: PinKind,
    need_occupant: bool,
) -> Result<u64, PinRefused> {
    update(word, |w| {
        if need_occupant && kind_of(w) == FrameKind::FreeOrAllocated {
            return Err(PinRefused::NotOccupied);
        }
        if is_frozen(w) {
            return Err(PinRefused::Frozen);
        }
        let (one, count) = match kind {
            PinKind::Transient => (TRANSIENT_ONE, w & COUNT_MASK),
            PinKind::LongTerm => (LONGTERM_ONE, (w >> 20) & COUNT_MASK),
        };
        if count == COUNT_MASK {
            return Err(PinRefused::Overflow);
        }
        Ok(w + one)
    })
}

/// Drop one pin taken by `try_pin`. Returns the word after the unpin.
pub(crate) fn unpin<W: AtomicFrameWord>(word: &W, kind: PinKind) -> u64 {
    let one = match kind {
        PinKind::Transient => TRANSIENT_ONE,
        PinKind::LongTerm => LONGTERM_ONE,
    };
    let old = update::<_, ()>(word, |w| Ok(w - one)).unwrap_or_default();
    old - one
}

/// Freeze an unpinned frame of the given kind for migration. Returns the word seen
/// on refusal so the caller can report the pins it found.
pub(crate) fn try_freeze<W: AtomicFrameWord>(word: &W, expect: FrameKind) -> Result<u64, u64> {
    update(word, |w| {
        if kind_of(w) != expect || is_frozen(w) || w & PINS_MASK != 0 {
            Err(w)
        } else {
            Ok(w | FROZEN)
        }
    })
}

/// Clear FROZEN and set the kind in one step (migration committed or rolled back).
pub(crate) fn thaw<W: AtomicFrameWord>(word: &W, kind: FrameKind) {
    let _ = update::<_, ()>(word, |w| Ok(with_kind(w & !FROZEN, kind)));
}

/// Freeze a `FreeOrAllocated` frame with a new kind: a migration destination that must not be
/// pinned before its contents arrive. Only called under the map lock on frames the
/// tree reports clean, so the frame cannot be pinned concurrently: lock-free pins
/// need an `Occupied` kind, and locked pins an allocated frame and the map lock.
pub(crate) fn freeze_as<W: AtomicFrameWord>(word: &W, kind: FrameKind) {
    let _ = update::<_, ()>(word, |w| Ok(with_kind(w, kind) | FROZEN));
}

/// Set the kind, keeping pins (an occupant placed on a clean frame).
pub(crate) fn set_kind<W: AtomicFrameWord>(word: &W, kind: FrameKind) {
    let _ = update::<_, ()>(word, |w| Ok(with_kind(w, kind)));
}

/// The lock-free state of every frame: one word per frame (the layout above), and
/// per pageblock a hint counting its frames that have at least one pin.
pub(crate) struct FrameWords {
    words: Box<[AtomicU64]>,
    /// Per-pageblock count of frames with at least one pin: a hint that lets a
    /// candidate skip the per-frame pin check for pin-free pageblocks. Updated after
    /// the word's pin count crosses zero, so it can lag (and briefly wrap); the
    /// frame word's compare-and-swap at freeze time is what decides.
    pub(crate) block_pins: Box<[AtomicU32]>,
    /// Frames per pageblock (a power of two).
    pub(crate) block_frames: usize,
}

impl FrameWords {
    /// `frames` words, all free and unpinned, in pageblocks of `block_frames`.
    pub(crate) fn new(frames: usize, block_frames: usize) -> Self {
        debug_assert!(block_frames.is_power_of_two());
        FrameWords {
            words: (0..frames).map(|_| AtomicU64::new(0)).collect(),
            block_pins: (0..frames.div_ceil(block_frames))
                .map(|_| AtomicU32::new(0))
                .collect(),
            block_frames,
        }
    }

    /// The pageblock holding frame `f`.
    #[inline]
    pub(crate) fn block_of(&self, f: usize) -> usize {
        // block_frames is a power of two (checked in `Allocator::new`): a shift, not
        // a divide.
        f >> self.block_frames.trailing_zeros()
    }

    /// First pinned (or frozen) frame in `[start, start+n)`. Pageblocks whose hint
    /// says "no pinned frame" are skipped without touching their frames; a frozen
    /// frame in such a block (an occupant in flight) is caught later by the freeze
    /// that claims the range.
    pub(crate) fn first_pinned(&self, start: usize, n: usize) -> Option<usize> {
        let end = start + n;
        let mut f = start;
        while f < end {
            let block_end = ((self.block_of(f) + 1) * self.block_frames).min(end);
            if self.block_pins[self.block_of(f)].load(Ordering::Acquire) == 0 {
                f = block_end;
                continue;
            }
            for g in f..block_end {
                let w = self.words[g].get();
                if is_frozen(w) || pins_of(w) > 0 {
                    return Some(g);
                }
            }
            f = block_end;
        }
        None
    }
}

impl std::ops::Index<usize> for FrameWords {
    type Output = AtomicU64;
    #[inline]
    fn index(&self, f: usize) -> &AtomicU64 {
        &self.words[f]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuttle::sync::atomic::{AtomicBool, AtomicU64 as SAtomicU64};
    use shuttle::sync::Arc;
    use shuttle::thread;

    impl AtomicFrameWord for SAtomicU64 {
        fn get(&self) -> u64 {
            SAtomicU64::load(self, Ordering::Acquire)
        }
        fn cas(&self, current: u64, new: u64) -> Result<u64, u64> {
            self.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
        }
    }

    #[test]
    fn pin_counts_and_kinds() {
        let w = AtomicU64::new(0);
        assert_eq!(
            try_pin(&w, PinKind::Transient),
            Err(PinRefused::NotOccupied)
        );
        set_kind(&w, FrameKind::Occupied);
        try_pin(&w, PinKind::Transient).unwrap();
        try_pin(&w, PinKind::LongTerm).unwrap();
        let v = AtomicFrameWord::get(&w);
        assert_eq!((pins_of(v), longterm_of(v)), (2, 1));
        assert!(try_freeze(&w, FrameKind::Occupied).is_err());
        unpin(&w, PinKind::Transient);
        assert_eq!(pins_of(unpin(&w, PinKind::LongTerm)), 0);
        try_freeze(&w, FrameKind::Occupied).unwrap();
        assert_eq!(try_pin(&w, PinKind::Transient), Err(PinRefused::Frozen));
        thaw(&w, FrameKind::FreeOrAllocated);
        // Free or allocated: only the locked path may pin it.
        assert_eq!(
            try_pin(&w, PinKind::Transient),
            Err(PinRefused::NotOccupied)
        );
        pin_locked(&w, PinKind::LongTerm).unwrap();
        assert_eq!(longterm_of(AtomicFrameWord::get(&w)), 1);
    }

    /// Model check: a migration (freeze) and a pin on the same occupied frame never
    /// both succeed, and a pin taken is never observed by a frozen migrator.
    #[test]
    fn shuttle_pin_vs_freeze_is_exclusive() {
        shuttle::check_random(
            || {
                let w = Arc::new(SAtomicU64::new(0));
                set_kind(&*w, FrameKind::Occupied);
                let pinned = Arc::new(AtomicBool::new(false));
                let migrating = Arc::new(AtomicBool::new(false));
                let (w2, p2, m2) = (w.clone(), pinned.clone(), migrating.clone());
                let pinner = thread::spawn(move || {
                    for _ in 0..2 {
                        if try_pin(&*w2, PinKind::Transient).is_ok() {
                            p2.store(true, Ordering::SeqCst);
                            assert!(!m2.load(Ordering::SeqCst), "pinned a migrating frame");
                            p2.store(false, Ordering::SeqCst);
                            unpin(&*w2, PinKind::Transient);
                        }
                    }
                });
                for _ in 0..2 {
                    if try_freeze(&*w, FrameKind::Occupied).is_ok() {
                        migrating.store(true, Ordering::SeqCst);
                        assert!(!pinned.load(Ordering::SeqCst), "migrating a pinned frame");
                        migrating.store(false, Ordering::SeqCst);
                        thaw(&*w, FrameKind::Occupied);
                    }
                }
                pinner.join().unwrap();
                assert_eq!(pins_of(AtomicFrameWord::get(&*w)), 0);
                assert!(!is_frozen(AtomicFrameWord::get(&*w)));
            },
            2000,
        );
    }

    /// Model check of the allocated-frame protocol: the owner pins its allocated
    /// frame under the map lock and then frees the allocation, an I/O thread drops
    /// the pin, and a claimer, under the map lock, takes the frame only when the
    /// tree says free and the word has no pins. However these interleave, the
    /// frame is never claimed while the pin is held.
    #[test]
    fn shuttle_release_with_pin_blocks_reclaim() {
        use shuttle::sync::Mutex;
        shuttle::check_random(
            || {
                let allocated = Arc::new(Mutex::new(true));
                let w = Arc::new(SAtomicU64::new(0));
                let held = Arc::new(AtomicBool::new(false));
                {
                    let g = allocated.lock().unwrap();
                    assert!(*g);
                    pin_locked(&*w, PinKind::Transient).unwrap();
                    held.store(true, Ordering::SeqCst);
                }
                let (w2, h2) = (w.clone(), held.clone());
                let io = thread::spawn(move || {
                    h2.store(false, Ordering::SeqCst);
                    unpin(&*w2, PinKind::Transient);
                });
                let a2 = allocated.clone();
                let owner = thread::spawn(move || *a2.lock().unwrap() = false);
                let mut claimed = false;
                for _ in 0..4 {
                    {
                        let mut g = allocated.lock().unwrap();
                        if !*g && pins_of(AtomicFrameWord::get(&*w)) == 0 {
                            assert!(!held.load(Ordering::SeqCst), "claimed a frame still pinned");
                            *g = true;
                            claimed = true;
                        }
                    }
                    if claimed {
                        break;
                    }
                    thread::yield_now();
                }
                io.join().unwrap();
                owner.join().unwrap();
                if !claimed {
                    assert!(!*allocated.lock().unwrap() && pins_of(AtomicFrameWord::get(&*w)) == 0);
                }
            },
            2000,
        );
    }
}

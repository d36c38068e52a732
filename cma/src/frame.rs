//! Per-frame state word: the lock-free part of the frame state machine.
//!
//! Pins on movable occupants are taken and dropped far more often than ranges are
//! allocated (every guest I/O takes a transient pin), so they must not take the
//! allocator's map lock. Each frame therefore has one atomic `u64`:
//!
//! ```text
//!  63      62..58   57..56   55..40      39..20      19..0
//!  FROZEN  unused   tag      revocable   long-term   transient
//! ```
//!
//! `tag` is OCCUPIED while a movable occupant lives on the frame and FREE otherwise
//! (free *or* allocated: which of the two is the free-run tree's business, under
//! the map lock). Only OCCUPIED frames can be pinned lock-free; a pin on an
//! allocated frame takes the map lock (`pin_locked`), which keeps allocation and
//! release free of per-frame atomic read-modify-writes: claiming a clean range and
//! releasing it touch only the tree. Tag changes happen under the map lock.
//! `FROZEN` is set while an occupant is being migrated off (or onto) the frame.
//!
//! The race that matters, a pin arriving while the allocator decides to migrate
//! the frame, is decided by one compare-and-swap on this word, as Linux decides it
//! by freezing the page refcount: `try_freeze` succeeds only with zero pins, and
//! `try_pin` fails while frozen. Exactly one of them wins.
//!
//! The functions are generic over [`Word`] so the same code runs under the shuttle
//! model checker in the tests below.

use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) const TRANSIENT_ONE: u64 = 1;
pub(crate) const LONGTERM_ONE: u64 = 1 << 20;
pub(crate) const REVOCABLE_ONE: u64 = 1 << 40;
const COUNT_MASK: u64 = (1 << 20) - 1;
const PINS_MASK: u64 = (1 << 40) - 1;
const TAG_SHIFT: u32 = 56;
const TAG_MASK: u64 = 3 << TAG_SHIFT;
pub(crate) const FROZEN: u64 = 1 << 63;

/// What a frame is used for, as seen by lock-free pinners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tag {
    /// Free or allocated: no lock-free pins.
    Free = 0,
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
pub(crate) trait Word {
    fn get(&self) -> u64;
    fn cas(&self, current: u64, new: u64) -> Result<u64, u64>;
}

impl Word for AtomicU64 {
    fn get(&self) -> u64 {
        AtomicU64::load(self, Ordering::Acquire)
    }
    fn cas(&self, current: u64, new: u64) -> Result<u64, u64> {
        self.compare_exchange_weak(current, new, Ordering::AcqRel, Ordering::Acquire)
    }
}

pub(crate) fn tag_of(w: u64) -> Tag {
    match (w & TAG_MASK) >> TAG_SHIFT {
        0 => Tag::Free,
        _ => Tag::Occupied,
    }
}

/// All pins on the frame (transient + long-term).
pub(crate) fn pins_of(w: u64) -> u32 {
    ((w & COUNT_MASK) + ((w >> 20) & COUNT_MASK)) as u32
}

pub(crate) fn longterm_of(w: u64) -> u32 {
    ((w >> 20) & COUNT_MASK) as u32
}

/// Pins that did not register a revoke callback.
pub(crate) fn unrevocable_of(w: u64) -> u32 {
    pins_of(w) - ((w >> 40) & 0xffff) as u32
}

pub(crate) fn is_frozen(w: u64) -> bool {
    w & FROZEN != 0
}

fn with_tag(w: u64, tag: Tag) -> u64 {
    (w & !TAG_MASK) | ((tag as u64) << TAG_SHIFT)
}

/// Loop a compare-and-swap of `f(old)` until it sticks or `f` refuses.
fn update<W: Word, E>(word: &W, mut f: impl FnMut(u64) -> Result<u64, E>) -> Result<u64, E> {
    let mut cur = word.get();
    loop {
        let new = f(cur)?;
        match word.cas(cur, new) {
            Ok(_) => return Ok(cur),
            Err(actual) => cur = actual,
        }
    }
}

/// Why `try_pin` refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PinRefused {
    Free,
    /// Only used by callers that refuse the locked path for non-occupants.
    NotOccupant,
    Frozen,
    Overflow,
}

/// Add one pin to an OCCUPIED frame, lock-free. Returns the word before the pin.
/// `Free` means "not an occupant": the caller may try `pin_locked`.
pub(crate) fn try_pin<W: Word>(
    word: &W,
    kind: PinKind,
    revocable: bool,
) -> Result<u64, PinRefused> {
    add_pin(word, kind, revocable, true)
}

/// Add one pin to a frame the caller, holding the map lock, has checked is
/// allocated (its tag is FREE). Returns the word before the pin.
pub(crate) fn pin_locked<W: Word>(
    word: &W,
    kind: PinKind,
    revocable: bool,
) -> Result<u64, PinRefused> {
    add_pin(word, kind, revocable, false)
}

fn add_pin<W: Word>(
    word: &W,
    kind: PinKind,
    revocable: bool,
    need_occupant: bool,
) -> Result<u64, PinRefused> {
    update(word, |w| {
        if need_occupant && tag_of(w) == Tag::Free {
            return Err(PinRefused::Free);
        }
        if is_frozen(w) {
            return Err(PinRefused::Frozen);
        }
        let (one, count) = match kind {
            PinKind::Transient => (TRANSIENT_ONE, w & COUNT_MASK),
            PinKind::LongTerm => (LONGTERM_ONE, (w >> 20) & COUNT_MASK),
        };
        if count == COUNT_MASK || (revocable && (w >> 40) & 0xffff == 0xffff) {
            return Err(PinRefused::Overflow);
        }
        Ok(w + one + if revocable { REVOCABLE_ONE } else { 0 })
    })
}

/// Drop one pin taken by `try_pin`. Returns the word after the unpin.
pub(crate) fn unpin<W: Word>(word: &W, kind: PinKind, revocable: bool) -> u64 {
    let one = match kind {
        PinKind::Transient => TRANSIENT_ONE,
        PinKind::LongTerm => LONGTERM_ONE,
    } + if revocable { REVOCABLE_ONE } else { 0 };
    let old = update::<_, ()>(word, |w| Ok(w - one)).unwrap_or_default();
    old - one
}

/// Freeze an unpinned frame with the given tag for migration. Returns the word seen
/// on refusal so the caller can report the pins it found.
pub(crate) fn try_freeze<W: Word>(word: &W, expect: Tag) -> Result<u64, u64> {
    update(word, |w| {
        if tag_of(w) != expect || is_frozen(w) || w & PINS_MASK != 0 {
            Err(w)
        } else {
            Ok(w | FROZEN)
        }
    })
}

/// Clear FROZEN and set the tag in one step (migration committed or rolled back).
pub(crate) fn thaw<W: Word>(word: &W, tag: Tag) {
    let _ = update::<_, ()>(word, |w| Ok(with_tag(w & !FROZEN, tag)));
}

/// Freeze a FREE frame with a new tag: a migration destination that must not be
/// pinned before its contents arrive. Only called under the map lock on frames the
/// tree reports clean, so the frame cannot be pinned concurrently: lock-free pins
/// need an OCCUPIED tag, and locked pins an allocated frame and the map lock.
pub(crate) fn freeze_as<W: Word>(word: &W, tag: Tag) {
    let _ = update::<_, ()>(word, |w| Ok(with_tag(w, tag) | FROZEN));
}

/// Set the tag, keeping pins (an occupant placed on a clean frame).
pub(crate) fn set_tag<W: Word>(word: &W, tag: Tag) {
    let _ = update::<_, ()>(word, |w| Ok(with_tag(w, tag)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuttle::sync::atomic::{AtomicBool, AtomicU64 as SAtomicU64};
    use shuttle::sync::Arc;
    use shuttle::thread;

    impl Word for SAtomicU64 {
        fn get(&self) -> u64 {
            SAtomicU64::load(self, Ordering::Acquire)
        }
        fn cas(&self, current: u64, new: u64) -> Result<u64, u64> {
            self.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
        }
    }

    #[test]
    fn pin_counts_and_tags() {
        let w = AtomicU64::new(0);
        assert_eq!(
            try_pin(&w, PinKind::Transient, false),
            Err(PinRefused::Free)
        );
        set_tag(&w, Tag::Occupied);
        try_pin(&w, PinKind::Transient, false).unwrap();
        try_pin(&w, PinKind::LongTerm, true).unwrap();
        let v = Word::get(&w);
        assert_eq!((pins_of(v), longterm_of(v), unrevocable_of(v)), (2, 1, 1));
        assert!(try_freeze(&w, Tag::Occupied).is_err());
        unpin(&w, PinKind::Transient, false);
        assert_eq!(pins_of(unpin(&w, PinKind::LongTerm, true)), 0);
        try_freeze(&w, Tag::Occupied).unwrap();
        assert_eq!(
            try_pin(&w, PinKind::Transient, false),
            Err(PinRefused::Frozen)
        );
        thaw(&w, Tag::Free);
        // Free or allocated: only the locked path may pin it.
        assert_eq!(
            try_pin(&w, PinKind::Transient, false),
            Err(PinRefused::Free)
        );
        pin_locked(&w, PinKind::LongTerm, false).unwrap();
        assert_eq!(longterm_of(Word::get(&w)), 1);
    }

    /// Model check: a migration (freeze) and a pin on the same occupied frame never
    /// both succeed, and a pin taken is never observed by a frozen migrator.
    #[test]
    fn shuttle_pin_vs_freeze_is_exclusive() {
        shuttle::check_random(
            || {
                let w = Arc::new(SAtomicU64::new(0));
                set_tag(&*w, Tag::Occupied);
                let pinned = Arc::new(AtomicBool::new(false));
                let migrating = Arc::new(AtomicBool::new(false));
                let (w2, p2, m2) = (w.clone(), pinned.clone(), migrating.clone());
                let pinner = thread::spawn(move || {
                    for _ in 0..2 {
                        if try_pin(&*w2, PinKind::Transient, false).is_ok() {
                            p2.store(true, Ordering::SeqCst);
                            assert!(!m2.load(Ordering::SeqCst), "pinned a migrating frame");
                            p2.store(false, Ordering::SeqCst);
                            unpin(&*w2, PinKind::Transient, false);
                        }
                    }
                });
                for _ in 0..2 {
                    if try_freeze(&*w, Tag::Occupied).is_ok() {
                        migrating.store(true, Ordering::SeqCst);
                        assert!(!pinned.load(Ordering::SeqCst), "migrating a pinned frame");
                        migrating.store(false, Ordering::SeqCst);
                        thaw(&*w, Tag::Occupied);
                    }
                }
                pinner.join().unwrap();
                assert_eq!(pins_of(Word::get(&*w)), 0);
                assert!(!is_frozen(Word::get(&*w)));
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
                    pin_locked(&*w, PinKind::Transient, false).unwrap();
                    held.store(true, Ordering::SeqCst);
                }
                let (w2, h2) = (w.clone(), held.clone());
                let io = thread::spawn(move || {
                    h2.store(false, Ordering::SeqCst);
                    unpin(&*w2, PinKind::Transient, false);
                });
                let a2 = allocated.clone();
                let owner = thread::spawn(move || *a2.lock().unwrap() = false);
                let mut claimed = false;
                for _ in 0..4 {
                    {
                        let mut g = allocated.lock().unwrap();
                        if !*g && pins_of(Word::get(&*w)) == 0 {
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
                    assert!(!*allocated.lock().unwrap() && pins_of(Word::get(&*w)) == 0);
                }
            },
            2000,
        );
    }
}

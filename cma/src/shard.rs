//! The calling thread's shard number: which small-block cache, stats shard and
//! home arena it uses. A leaf module: the allocator and the stats both read it.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

thread_local! {
    /// This thread's shard number: the CPU it ran on when it first asked, and again
    /// each time it found its shard or its home arena busy. Two threads that keep
    /// meeting on one shard are then (most likely) on two CPUs, so re-picking by CPU
    /// separates them, the way per-CPU lists separate CPUs in Linux, while the
    /// number stays a plain thread-local read on the fast path (no `getcpu` per
    /// request).
    static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

/// The CPU this thread runs on now (round-robin numbers where that is unknown).
fn current_cpu() -> usize {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
    let c = unsafe { libc::sched_getcpu() };
    if c >= 0 {
        c as usize
    } else {
        NEXT_SHARD.fetch_add(1, Ordering::Relaxed)
    }
}

/// The calling thread's shard number before masking (the caches, the stats and
/// the home arena all reduce it to their own count).
#[inline]
pub(crate) fn thread_shard() -> usize {
    SHARD.with(|c| {
        let v = c.get();
        if v != usize::MAX {
            return v;
        }
        let v = current_cpu();
        c.set(v);
        v
    })
}

/// The calling thread met another one on its shard or home arena: pick again by
/// the CPU it runs on now.
#[cold]
pub(crate) fn rehome() {
    SHARD.with(|c| c.set(current_cpu()));
}

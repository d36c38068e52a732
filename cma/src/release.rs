//! Deferred releases: how freeing stays non-blocking and allocation-free (seed 002).
//!
//! Allocated frames carry no per-frame atomic state, so a release is one update of
//! the free-run tree. It only tries the map lock: if the lock is busy, it pushes a node onto this lock-free
//! stack instead of waiting; the node was allocated together with the allocation,
//! so pushing allocates nothing. Every map-lock holder drains the stack before it
//! looks at the tree, so a freed range is visible to the very next allocation,
//! without the flush-the-workqueue dance of `cma_release_nowait()`.
//!
//! The stack is push-one / take-all (`swap(null)`), so there is no ABA problem: a
//! node is never popped individually while others may still push on top of it.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

/// A freed frame range waiting to be returned to the free-run tree.
pub(crate) struct ReleaseNode {
    pub(crate) start: usize,
    pub(crate) frames: usize,
    /// Extent index of the range (used when the node sits in a small-block cache).
    pub(crate) extent: usize,
    next: *mut ReleaseNode,
}

// SAFETY: a node is owned by exactly one party at a time (its allocation, then the
// queue, then the draining thread); `next` is only followed by the drainer that
// took the whole list, so moving or sharing a node between threads is sound.
unsafe impl Send for ReleaseNode {}
// SAFETY: `&ReleaseNode` exposes no interior mutability.
unsafe impl Sync for ReleaseNode {}

impl ReleaseNode {
    /// Reuse a node for another range.
    pub(crate) fn reset(&mut self, start: usize, frames: usize) {
        self.start = start;
        self.frames = frames;
        self.extent = 0;
        self.next = ptr::null_mut();
    }

    pub(crate) fn new(start: usize, frames: usize) -> Box<Self> {
        Box::new(ReleaseNode {
            start,
            frames,
            extent: 0,
            next: ptr::null_mut(),
        })
    }
}

/// The stack head: an atomic pointer. A trait so that the shuttle model checker can
/// run the same code with its own atomics (see the tests).
pub(crate) trait Head {
    fn get(&self) -> *mut ReleaseNode;
    fn cas(&self, current: *mut ReleaseNode, new: *mut ReleaseNode)
        -> Result<(), *mut ReleaseNode>;
    fn take(&self) -> *mut ReleaseNode;
}

impl Head for AtomicPtr<ReleaseNode> {
    fn get(&self) -> *mut ReleaseNode {
        self.load(Ordering::Relaxed)
    }
    fn cas(
        &self,
        current: *mut ReleaseNode,
        new: *mut ReleaseNode,
    ) -> Result<(), *mut ReleaseNode> {
        self.compare_exchange_weak(current, new, Ordering::Release, Ordering::Relaxed)
            .map(|_| ())
    }
    fn take(&self) -> *mut ReleaseNode {
        self.swap(ptr::null_mut(), Ordering::Acquire)
    }
}

pub(crate) struct ReleaseQueue<H: Head = AtomicPtr<ReleaseNode>> {
    head: H,
}

// SAFETY: the queue owns the nodes reachable from `head`; they are only accessed by
// the single thread that took them out with `drain`.
unsafe impl<H: Head + Send> Send for ReleaseQueue<H> {}
// SAFETY: all shared access goes through the atomic `head`.
unsafe impl<H: Head + Sync> Sync for ReleaseQueue<H> {}

impl ReleaseQueue {
    pub(crate) fn new() -> Self {
        ReleaseQueue {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }
}

impl<H: Head> ReleaseQueue<H> {
    /// Push without blocking or allocating.
    pub(crate) fn push(&self, node: Box<ReleaseNode>) {
        let node = Box::into_raw(node);
        let mut head = self.head.get();
        loop {
            // SAFETY: `node` came from Box::into_raw above and is not yet shared.
            unsafe { (*node).next = head };
            match self.head.cas(head, node) {
                Ok(()) => return,
                Err(h) => head = h,
            }
        }
    }

    /// True when nothing is queued (a cheap check before draining).
    pub(crate) fn is_empty(&self) -> bool {
        self.head.get().is_null()
    }

    /// Take every queued node (most recent first) and hand each range to `f`.
    /// Allocates nothing, so a releasing thread may drain too.
    pub(crate) fn drain(&self, mut f: impl FnMut(usize, usize)) {
        self.drain_nodes(|node| f(node.start, node.frames));
    }

    /// Take every queued node (most recent first) and hand each to `f`, which may
    /// keep it for reuse.
    pub(crate) fn drain_nodes(&self, mut f: impl FnMut(Box<ReleaseNode>)) {
        let mut p = self.head.take();
        while !p.is_null() {
            // SAFETY: every node on the stack came from Box::into_raw in `push`, and
            // the swap above made this thread the only one that can reach it.
            let node = unsafe { Box::from_raw(p) };
            p = node.next;
            f(node);
        }
    }
}

impl<H: Head> Drop for ReleaseQueue<H> {
    fn drop(&mut self) {
        self.drain(|_, _| {});
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    impl Head for shuttle::sync::atomic::AtomicPtr<ReleaseNode> {
        fn get(&self) -> *mut ReleaseNode {
            self.load(Ordering::Acquire)
        }
        fn cas(
            &self,
            current: *mut ReleaseNode,
            new: *mut ReleaseNode,
        ) -> Result<(), *mut ReleaseNode> {
            self.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire)
                .map(|_| ())
        }
        fn take(&self) -> *mut ReleaseNode {
            self.swap(ptr::null_mut(), Ordering::AcqRel)
        }
    }

    /// Model check: concurrent pushes racing with drains lose and duplicate nothing.
    #[test]
    fn shuttle_push_and_drain_lose_nothing() {
        use shuttle::sync::atomic::AtomicPtr as SAtomicPtr;
        shuttle::check_random(
            || {
                let q = Arc::new(ReleaseQueue {
                    head: SAtomicPtr::new(ptr::null_mut()),
                });
                let pushers: Vec<_> = (0..2)
                    .map(|t| {
                        let q = q.clone();
                        shuttle::thread::spawn(move || {
                            for i in 0..2 {
                                q.push(ReleaseNode::new(t * 10 + i, 1));
                            }
                        })
                    })
                    .collect();
                let mut seen = Vec::new();
                for _ in 0..2 {
                    q.drain(|s, _| seen.push(s));
                    shuttle::thread::yield_now();
                }
                pushers.into_iter().for_each(|p| p.join().unwrap());
                q.drain(|s, _| seen.push(s));
                seen.sort_unstable();
                assert_eq!(seen, vec![0, 1, 10, 11]);
                assert!(q.is_empty());
            },
            2000,
        );
    }

    #[test]
    fn concurrent_pushes_are_all_taken_once() {
        let q = Arc::new(ReleaseQueue::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..500 {
                        q.push(ReleaseNode::new(t * 1000 + i, 1));
                    }
                })
            })
            .collect();
        let mut seen = Vec::new();
        while seen.len() < 2000 {
            q.drain(|s, _| seen.push(s));
            if threads.iter().all(|t| t.is_finished()) {
                q.drain(|s, _| seen.push(s));
                break;
            }
        }
        threads.into_iter().for_each(|t| t.join().unwrap());
        q.drain(|s, _| seen.push(s));
        seen.sort_unstable();
        let want: Vec<usize> = (0..4)
            .flat_map(|t| (0..500).map(move |i| t * 1000 + i))
            .collect();
        assert_eq!(seen, want);
        assert!(q.is_empty());
    }
}

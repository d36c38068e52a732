//! The free-run tree: how the allocator finds contiguous free frames without a linear
//! bitmap scan (seed 002).
//!
//! Two bitmaps over frames, one bit per frame, 64 frames per leaf word:
//! - `alloc`: the frame is reserved for a DMA allocation (or being claimed for one);
//! - `occ`: the frame holds a movable occupant (or one is on its way in).
//!
//! Two "free" classes are derived from them: a frame is *clean* when neither bit is
//! set (can be handed out without migrating anything) and *available* when `alloc`
//! is clear (can be handed out after migrating its occupant). Above the leaf words
//! sits a complete binary tree whose nodes keep, for both classes, the free-run
//! length at the node's left edge (`pre`), right edge (`suf`) and the longest run
//! inside (`max`), plus the number of occupied frames below it. Finding the leftmost
//! run of `n` frames descends the tree skipping every subtree whose runs are too
//! short: O(log frames) in the common case instead of O(frames). Updating a range of
//! `n` frames touches `n / 64` leaves and their ancestors.
//!
//! The tree is plain data; the allocator keeps it under its map lock.

/// Which notion of "free" a query uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// Neither allocated nor occupied: usable without migration.
    Clean,
    /// Not allocated: usable after migrating occupants away.
    Avail,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Runs {
    pre: u32,
    suf: u32,
    max: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Node {
    clean: Runs,
    avail: Runs,
    occ: u32,
}

impl Node {
    fn runs(&self, class: Class) -> Runs {
        match class {
            Class::Clean => self.clean,
            Class::Avail => self.avail,
        }
    }
}

const WORD: usize = 64;

pub(crate) struct FreeTree {
    frames: usize,
    /// Leaves (a power of two); padding leaves and tail bits are marked allocated.
    leaves: usize,
    alloc: Vec<u64>,
    occ: Vec<u64>,
    /// 1-based heap layout: node 1 is the root, leaf `i` is node `leaves + i`.
    nodes: Vec<Node>,
}

fn leaf_runs(busy: u64) -> Runs {
    if busy == 0 {
        return Runs {
            pre: 64,
            suf: 64,
            max: 64,
        };
    }
    // Longest run of zeros: walk the free runs (at most 32 per word).
    let mut free = !busy;
    let mut max = 0;
    while free != 0 {
        let start = free.trailing_zeros();
        let len = (!(free >> start)).trailing_zeros();
        max = max.max(len);
        // Clear the run just measured (len < 64 here because busy != 0).
        free &= !(((1u64 << len) - 1) << start);
    }
    Runs {
        pre: busy.trailing_zeros(),
        suf: busy.leading_zeros(),
        max,
    }
}

fn combine(l: Runs, r: Runs, half: u32) -> Runs {
    Runs {
        pre: if l.pre == half { half + r.pre } else { l.pre },
        suf: if r.suf == half { half + l.suf } else { r.suf },
        max: l.max.max(r.max).max(l.suf + r.pre),
    }
}

impl FreeTree {
    /// A tree over `frames` frames, all clean.
    pub(crate) fn new(frames: usize) -> Self {
        let words = frames.div_ceil(WORD).max(1);
        let leaves = words.next_power_of_two();
        let mut alloc = vec![0u64; leaves];
        let occ = vec![0u64; leaves];
        // Frames past the end never become free.
        for (w, word) in alloc.iter_mut().enumerate() {
            let lo = w * WORD;
            if lo >= frames {
                *word = u64::MAX;
            } else if lo + WORD > frames {
                *word = u64::MAX << (frames - lo);
            }
        }
        let mut t = FreeTree {
            frames,
            leaves,
            alloc,
            occ,
            nodes: vec![Node::default(); 2 * leaves],
        };
        for w in 0..leaves {
            t.refresh_leaf(w);
        }
        for n in (1..leaves).rev() {
            let _ = t.refresh_inner(n);
        }
        t
    }

    fn refresh_leaf(&mut self, w: usize) {
        let a = self.alloc[w];
        let o = self.occ[w];
        self.nodes[self.leaves + w] = Node {
            clean: leaf_runs(a | o),
            avail: leaf_runs(a),
            occ: o.count_ones(),
        };
    }

    /// Recompute inner node `n` from its children; false when it did not change.
    fn refresh_inner(&mut self, n: usize) -> bool {
        // Frames covered by each child of node n.
        let depth = usize::BITS - 1 - n.leading_zeros();
        let leaves_below = self.leaves >> (depth + 1);
        let half = (leaves_below * WORD) as u32;
        let l = self.nodes[2 * n];
        let r = self.nodes[2 * n + 1];
        let new = Node {
            clean: combine(l.clean, r.clean, half),
            avail: combine(l.avail, r.avail, half),
            occ: l.occ + r.occ,
        };
        std::mem::replace(&mut self.nodes[n], new) != new
    }

    /// Refresh the ancestors of leaves `w0..=w1`, level by level, stopping early at
    /// the first level where nothing changed (nothing above it can change either).
    fn refresh_ancestors(&mut self, w0: usize, w1: usize) {
        let (mut l, mut r) = ((self.leaves + w0) / 2, (self.leaves + w1) / 2);
        while l >= 1 {
            let mut changed = false;
            for n in l..=r {
                changed |= self.refresh_inner(n);
            }
            if !changed {
                break;
            }
            l /= 2;
            r /= 2;
        }
    }

    fn update(&mut self, start: usize, len: usize, f: impl Fn(&mut FreeTree, usize, u64)) {
        if len == 0 {
            return;
        }
        let end = start + len;
        debug_assert!(end <= self.frames);
        let (w0, w1) = (start / WORD, (end - 1) / WORD);
        for w in w0..=w1 {
            let lo = (w * WORD).max(start) - w * WORD;
            let hi = ((w + 1) * WORD).min(end) - w * WORD;
            let mask = if hi - lo == WORD {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(self, w, mask);
            self.refresh_leaf(w);
        }
        self.refresh_ancestors(w0, w1);
    }

    /// Take up to `k` clean frames from the top of the region down (migration
    /// destinations), mark them occupied, and append them to `out`. One tree refresh
    /// for the whole batch instead of one per frame.
    pub(crate) fn take_top_clean(&mut self, k: usize, out: &mut Vec<usize>) {
        let Some(top) = self.last_clean(self.frames) else {
            return;
        };
        let (mut taken, mut w, w_hi) = (0, top / WORD, top / WORD);
        let mut w_lo = w_hi;
        while taken < k {
            let mut free = !(self.alloc[w] | self.occ[w]);
            while free != 0 && taken < k {
                let b = 63 - free.leading_zeros() as usize;
                free &= !(1u64 << b);
                self.occ[w] |= 1u64 << b;
                out.push(w * WORD + b);
                taken += 1;
            }
            self.refresh_leaf(w);
            w_lo = w;
            if w == 0 {
                break;
            }
            w -= 1;
        }
        self.refresh_ancestors(w_lo, w_hi);
    }

    /// Mark `[start, start+len)` as allocated (`true`) or not.
    pub(crate) fn set_alloc(&mut self, start: usize, len: usize, on: bool) {
        self.update(start, len, |t, w, m| {
            if on {
                t.alloc[w] |= m
            } else {
                t.alloc[w] &= !m
            }
        });
    }

    /// Mark `[start, start+len)` as occupied (`true`) or not.
    pub(crate) fn set_occ(&mut self, start: usize, len: usize, on: bool) {
        self.update(
            start,
            len,
            |t, w, m| {
                if on {
                    t.occ[w] |= m
                } else {
                    t.occ[w] &= !m
                }
            },
        );
    }

    pub(crate) fn is_alloc(&self, f: usize) -> bool {
        self.alloc[f / WORD] >> (f % WORD) & 1 == 1
    }

    pub(crate) fn is_occ(&self, f: usize) -> bool {
        self.occ[f / WORD] >> (f % WORD) & 1 == 1
    }

    /// Longest run of the class anywhere in the region.
    pub(crate) fn longest(&self, class: Class) -> usize {
        self.nodes[1].runs(class).max as usize
    }

    /// Number of occupied frames in the region.
    pub(crate) fn occupied_total(&self) -> usize {
        self.nodes[1].occ as usize
    }

    /// Number of allocated frames (linear in words; used for error reports only).
    pub(crate) fn allocated_total(&self) -> usize {
        let tail = self.leaves * WORD - self.frames;
        self.alloc
            .iter()
            .map(|w| w.count_ones() as usize)
            .sum::<usize>()
            - tail
    }

    /// Leftmost `p >= from` such that `[p, p+need)` is free in `class`.
    pub(crate) fn next_fit(&self, class: Class, from: usize, need: usize) -> Option<usize> {
        if need == 0 || from >= self.frames {
            return None;
        }
        let mut carry = 0usize;
        self.fit_in(class, 1, 0, self.leaves * WORD, from, need, &mut carry)
            .filter(|p| p + need <= self.frames)
    }

    #[allow(clippy::too_many_arguments)]
    fn fit_in(
        &self,
        class: Class,
        n: usize,
        lo: usize,
        hi: usize,
        from: usize,
        need: usize,
        carry: &mut usize,
    ) -> Option<usize> {
        if hi <= from {
            return None;
        }
        let r = self.nodes[n].runs(class);
        let len = hi - lo;
        if lo >= from {
            if *carry + r.pre as usize >= need {
                return Some(lo - *carry);
            }
            if (r.max as usize) < need {
                // No run fits inside; only the right edge can start a run that does.
                *carry = if r.pre as usize == len {
                    *carry + len
                } else {
                    r.suf as usize
                };
                return None;
            }
        }
        if n >= self.leaves {
            let w = n - self.leaves;
            let busy = match class {
                Class::Clean => self.alloc[w] | self.occ[w],
                Class::Avail => self.alloc[w],
            };
            for i in from.saturating_sub(lo)..WORD {
                if busy >> i & 1 == 0 {
                    *carry += 1;
                    if *carry >= need {
                        return Some(lo + i + 1 - *carry);
                    }
                } else {
                    *carry = 0;
                }
            }
            return None;
        }
        let mid = lo + len / 2;
        self.fit_in(class, 2 * n, lo, mid, from, need, carry)
            .or_else(|| self.fit_in(class, 2 * n + 1, mid, hi, from, need, carry))
    }

    /// Highest clean frame below `before`, for placing occupants and migration
    /// destinations at the far end from where DMA allocations are placed first.
    pub(crate) fn last_clean(&self, before: usize) -> Option<usize> {
        self.last_in(1, 0, self.leaves * WORD, before.min(self.frames))
    }

    fn last_in(&self, n: usize, lo: usize, hi: usize, before: usize) -> Option<usize> {
        if lo >= before || self.nodes[n].clean.max == 0 {
            return None;
        }
        if n >= self.leaves {
            let w = n - self.leaves;
            let mut free = !(self.alloc[w] | self.occ[w]);
            if before - lo < WORD {
                free &= (1u64 << (before - lo)) - 1;
            }
            return (free != 0).then(|| lo + 63 - free.leading_zeros() as usize);
        }
        let mid = lo + (hi - lo) / 2;
        self.last_in(2 * n + 1, mid, hi, before)
            .or_else(|| self.last_in(2 * n, lo, mid, before))
    }

    /// Call `f` on every occupied frame of `[start, end)` in order, a leaf word at a
    /// time (words without occupants cost one load), until `f` returns false.
    pub(crate) fn for_each_occ(&self, start: usize, end: usize, mut f: impl FnMut(usize) -> bool) {
        let mut w = start / WORD;
        while w * WORD < end {
            let lo = w * WORD;
            let mut m = self.occ[w];
            if start > lo {
                m &= u64::MAX << (start - lo);
            }
            if end < lo + WORD {
                m &= (1u64 << (end - lo)) - 1;
            }
            while m != 0 {
                let b = m.trailing_zeros() as usize;
                m &= m - 1;
                if !f(lo + b) {
                    return;
                }
            }
            w += 1;
        }
    }

    /// Occupied frames in `[start, end)`.
    pub(crate) fn occ_count(&self, start: usize, end: usize) -> usize {
        self.occ_in(1, 0, self.leaves * WORD, start, end)
    }

    fn occ_in(&self, n: usize, lo: usize, hi: usize, start: usize, end: usize) -> usize {
        if hi <= start || lo >= end {
            return 0;
        }
        if start <= lo && hi <= end {
            return self.nodes[n].occ as usize;
        }
        if n >= self.leaves {
            let w = n - self.leaves;
            let mut m = self.occ[w];
            if start > lo {
                m &= u64::MAX << (start - lo);
            }
            if end < hi {
                m &= (1u64 << (end - lo)) - 1;
            }
            return m.count_ones() as usize;
        }
        let mid = lo + (hi - lo) / 2;
        self.occ_in(2 * n, lo, mid, start, end) + self.occ_in(2 * n + 1, mid, hi, start, end)
    }
}

/// A free-run tree over one arena, `[base, base + frames)` of the region, spoken to
/// in region frame numbers. Every frame passed in must lie inside the arena (the
/// callers pick the arena from the frame); search starts and bounds outside it are
/// clamped, and results come back in region frame numbers.
pub(crate) struct ArenaTree {
    base: usize,
    t: FreeTree,
}

impl ArenaTree {
    pub(crate) fn new(base: usize, frames: usize) -> Self {
        ArenaTree {
            base,
            t: FreeTree::new(frames),
        }
    }

    #[inline]
    fn local(&self, f: usize) -> usize {
        debug_assert!(
            f >= self.base && f - self.base <= self.t.frames,
            "frame {f} outside arena"
        );
        f - self.base
    }

    pub(crate) fn take_top_clean(&mut self, k: usize, out: &mut Vec<usize>) {
        let from = out.len();
        self.t.take_top_clean(k, out);
        out[from..].iter_mut().for_each(|f| *f += self.base);
    }

    pub(crate) fn set_alloc(&mut self, start: usize, len: usize, on: bool) {
        let s = self.local(start);
        self.t.set_alloc(s, len, on)
    }

    pub(crate) fn set_occ(&mut self, start: usize, len: usize, on: bool) {
        let s = self.local(start);
        self.t.set_occ(s, len, on)
    }

    pub(crate) fn is_alloc(&self, f: usize) -> bool {
        self.t.is_alloc(self.local(f))
    }

    pub(crate) fn is_occ(&self, f: usize) -> bool {
        self.t.is_occ(self.local(f))
    }

    pub(crate) fn longest(&self, class: Class) -> usize {
        self.t.longest(class)
    }

    pub(crate) fn occupied_total(&self) -> usize {
        self.t.occupied_total()
    }

    pub(crate) fn allocated_total(&self) -> usize {
        self.t.allocated_total()
    }

    /// Leftmost `p >= from` in this arena with `[p, p+need)` free in `class`.
    pub(crate) fn next_fit(&self, class: Class, from: usize, need: usize) -> Option<usize> {
        let from = from.saturating_sub(self.base);
        if from >= self.t.frames {
            return None;
        }
        self.t.next_fit(class, from, need).map(|p| p + self.base)
    }

    /// Highest clean frame of this arena below `before`.
    pub(crate) fn last_clean(&self, before: usize) -> Option<usize> {
        let before = before.saturating_sub(self.base).min(self.t.frames);
        self.t.last_clean(before).map(|p| p + self.base)
    }

    pub(crate) fn for_each_occ(&self, start: usize, end: usize, mut f: impl FnMut(usize) -> bool) {
        let base = self.base;
        self.t
            .for_each_occ(self.local(start), self.local(end), |g| f(g + base))
    }

    pub(crate) fn occ_count(&self, start: usize, end: usize) -> usize {
        self.t.occ_count(self.local(start), self.local(end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: the obvious linear scan.
    fn naive_fit(busy: &[bool], from: usize, need: usize) -> Option<usize> {
        let mut run = 0;
        for (i, b) in busy.iter().enumerate().skip(from) {
            run = if *b { 0 } else { run + 1 };
            if run >= need {
                return Some(i + 1 - run);
            }
        }
        None
    }

    #[test]
    fn empty_tree_fits_whole_region_and_no_more() {
        let t = FreeTree::new(1000);
        assert_eq!(t.next_fit(Class::Clean, 0, 1000), Some(0));
        assert_eq!(t.next_fit(Class::Clean, 0, 1001), None);
        assert_eq!(t.next_fit(Class::Clean, 1, 1000), None);
        assert_eq!(t.longest(Class::Clean), 1000);
        assert_eq!(t.last_clean(1000), Some(999));
        assert_eq!(t.allocated_total(), 0);
    }

    #[test]
    fn occupied_frames_are_avail_but_not_clean() {
        let mut t = FreeTree::new(256);
        t.set_occ(100, 1, true);
        assert_eq!(t.next_fit(Class::Clean, 0, 128), Some(101));
        assert_eq!(t.next_fit(Class::Avail, 0, 256), Some(0));
        assert_eq!(t.occ_count(0, 256), 1);
        assert_eq!(t.occ_count(101, 256), 0);
        t.set_alloc(0, 10, true);
        assert_eq!(t.next_fit(Class::Avail, 0, 1), Some(10));
        assert_eq!(t.allocated_total(), 10);
        assert_eq!(t.last_clean(101), Some(99));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_linear_scan(
            frames in 1usize..700,
            ops in prop::collection::vec((0usize..700, 1usize..80, 0u8..4), 0..40),
            queries in prop::collection::vec((0usize..700, 1usize..200), 1..20),
        ) {
            let mut t = FreeTree::new(frames);
            let mut alloc = vec![false; frames];
            let mut occ = vec![false; frames];
            for (s, l, k) in ops {
                let s = s % frames;
                let l = l.min(frames - s);
                let (on, is_alloc) = (k & 1 == 1, k & 2 == 2);
                if is_alloc { t.set_alloc(s, l, on); } else { t.set_occ(s, l, on); }
                let v = if is_alloc { &mut alloc } else { &mut occ };
                v[s..s + l].iter_mut().for_each(|b| *b = on);
            }
            let clean: Vec<bool> = alloc.iter().zip(&occ).map(|(a, o)| *a || *o).collect();
            for (from, need) in queries {
                prop_assert_eq!(t.next_fit(Class::Clean, from, need), naive_fit(&clean, from, need));
                prop_assert_eq!(t.next_fit(Class::Avail, from, need), naive_fit(&alloc, from, need));
                let end = (from + need).min(frames);
                let from = from.min(end);
                prop_assert_eq!(t.occ_count(from, end), occ[from..end].iter().filter(|b| **b).count());
                let mut seen = Vec::new();
                t.for_each_occ(from, end, |f| { seen.push(f); true });
                let want: Vec<usize> = (from..end).filter(|f| occ[*f]).collect();
                prop_assert_eq!(seen, want);
                let last = clean[..end].iter().rposition(|b| !*b);
                prop_assert_eq!(t.last_clean(end), last);
            }
            prop_assert_eq!(t.allocated_total(), alloc.iter().filter(|b| **b).count());
            // Batched destinations: the k highest clean frames, then tree consistent.
            let want: Vec<usize> = (0..frames).rev().filter(|f| !clean[*f]).take(5).collect();
            let mut got = Vec::new();
            t.take_top_clean(5, &mut got);
            prop_assert_eq!(&got, &want);
            for f in want { occ[f] = true; }
            let clean: Vec<bool> = alloc.iter().zip(&occ).map(|(a, o)| *a || *o).collect();
            prop_assert_eq!(t.next_fit(Class::Clean, 0, 1), naive_fit(&clean, 0, 1));
            prop_assert_eq!(t.longest(Class::Clean), (1..=frames).rev().find(|n| naive_fit(&clean, 0, *n).is_some()).unwrap_or(0));
            prop_assert_eq!(t.occupied_total(), occ.iter().filter(|b| **b).count());
        }
    }
}

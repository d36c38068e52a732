//! Bench scenarios shared by both allocators: region layouts, the layout-restoring
//! wrappers, pin churn, and the measurement loop.

pub mod baseline;

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use cma::{
    AllocRequest, Allocation, Allocator, AllocatorConfig, Backing, Destination, FrameMove,
    MemcpyMover, MigrationPlan, MoveError, Mover, Occupant, Policy, Region,
};
use rand::{Rng, SeedableRng};

pub const GIB: usize = 1 << 30;
pub const FRAMES: usize = GIB / 4096;
const BLOCK: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Empty,
    Fragmented,
    PinChurn,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Empty => "empty",
            Scenario::Fragmented => "fragmented",
            Scenario::PinChurn => "pin-churn",
        }
    }
}

/// The layout both allocators start from (same seed, same frames).
pub struct Layout {
    /// Standing DMA allocations: (first frame, frames).
    pub standing: Vec<(usize, usize)>,
    /// Occupied frames.
    pub occupied: Vec<usize>,
}

/// Fragmented: what first-fit leaves behind after a long run. The lower 60% of the
/// region is packed with long-lived small DMA allocations (1..=16 frames) separated
/// by holes of 1..=8 frames, half of whose frames are lent to occupants. The upper
/// 40%: a third of its pageblocks hold one 64 KiB allocation at a random offset,
/// and 40% of its pageblocks are "busy", a quarter of their frames lent to
/// occupants. Pin churn: the upper-40% pattern over the whole region, but with
/// occupants spread over *every* pageblock (6% of frames), so that most larger
/// requests must migrate something while pins come and go.
pub fn layout(s: Scenario) -> Layout {
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2026);
    let mut l = Layout {
        standing: Vec::new(),
        occupied: Vec::new(),
    };
    if s == Scenario::Empty {
        return l;
    }
    let mut taken = vec![false; FRAMES];
    let mut f = 0;
    if s == Scenario::Fragmented {
        while f < FRAMES * 6 / 10 {
            let n = rng.gen_range(1..=16);
            l.standing.push((f, n));
            taken[f..f + n].iter_mut().for_each(|t| *t = true);
            f += n;
            let hole = rng.gen_range(1..=8);
            for (h, t) in taken.iter_mut().enumerate().skip(f).take(hole) {
                if rng.gen_bool(0.5) {
                    l.occupied.push(h);
                    *t = true;
                }
            }
            f += hole;
        }
        f = f.div_ceil(BLOCK) * BLOCK;
    }
    let first_block = f / BLOCK;
    for b in first_block..FRAMES / BLOCK {
        if rng.gen_bool(0.3) {
            let start = b * BLOCK + rng.gen_range(0..BLOCK / 16) * 16;
            l.standing.push((start, 16));
            taken[start..start + 16].iter_mut().for_each(|t| *t = true);
        }
    }
    for b in first_block..FRAMES / BLOCK {
        let (busy, density) = match s {
            Scenario::Fragmented => (rng.gen_bool(0.4), 0.25),
            _ => (true, 0.06),
        };
        if !busy {
            continue;
        }
        for (f, t) in taken.iter().enumerate().skip(b * BLOCK).take(BLOCK) {
            if !t && rng.gen_bool(density) {
                l.occupied.push(f);
            }
        }
    }
    l
}

/// What the bench measures: alloc + free of `frames`, aligned to the size (as the
/// DMA API aligns to the allocation order), capped at 2 MiB alignment. Returns the
/// bytes migrated.
pub trait BenchAlloc: Send + Sync {
    type Handle;
    fn alloc(&self, frames: usize) -> Option<(Self::Handle, usize)>;
    /// Free, and nothing else (timed).
    fn free(&self, h: Self::Handle);
    /// Put displaced occupants back, so that every iteration sees the same layout
    /// (untimed: it stands for the page cache refilling the area and is not the
    /// allocator's cost).
    fn restore(&self);
    /// One transient pin on a random occupied frame, held for `hold`. False if the
    /// frame picked was not occupied (or could not be pinned).
    fn pin_random(&self, rng: &mut rand::rngs::SmallRng, hold: Duration) -> bool;
}

thread_local! {
    /// The Retry deadline of this thread's requests (ours): set by the harness once
    /// per cell, outside the timed region, as a caller serving a batch would.
    pub static DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

pub fn align_for(frames: usize) -> usize {
    frames.next_power_of_two().min(BLOCK)
}

// ---- ours ----

thread_local! {
    static MOVED: RefCell<Vec<FrameMove>> = const { RefCell::new(Vec::new()) };
    /// Occupants whose home frame was allocated by another thread when we tried to
    /// put them back; retried after every free so that the layout does not drift.
    static PENDING: RefCell<Vec<FrameMove>> = const { RefCell::new(Vec::new()) };
    static PENDING_BASE: RefCell<Vec<(usize, u64)>> = const { RefCell::new(Vec::new()) };
    /// What the baseline's last free displaced, for `restore`.
    static BASE_DISPLACED: RefCell<Vec<(usize, u64)>> = const { RefCell::new(Vec::new()) };
}

/// The memcpy mover, remembering (per thread) what it moved so the bench can undo it.
pub struct RecordingMover(pub MemcpyMover);

impl Mover for RecordingMover {
    fn move_frames(&self, plan: &MigrationPlan) -> Result<(), MoveError> {
        self.0.move_frames(plan)?;
        MOVED.with(|m| m.borrow_mut().extend_from_slice(&plan.moves));
        Ok(())
    }
}

pub struct Ours {
    pub a: Allocator,
    mover: Arc<RecordingMover>,
    _standing: Vec<Allocation>,
}

impl Ours {
    pub fn new(s: Scenario) -> Self {
        let region = Arc::new(Region::reserve(GIB, Backing::Memfd).unwrap());
        let mover = Arc::new(RecordingMover(MemcpyMover::new(region.clone())));
        // CMA_BENCH_CPH: candidates per map-lock hold (experiments only).
        let mut config = AllocatorConfig::default();
        if let Some(c) = std::env::var("CMA_BENCH_CPH")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            config.candidates_per_hold = c;
        }
        let a = Allocator::new(region, config, mover.clone()).unwrap();
        let l = layout(s);
        // Standing allocations at chosen places: allocate every frame singly and keep
        // the ones inside standing ranges (the tree state is the same as if each
        // range were one allocation).
        let mut standing = Vec::new();
        if !l.standing.is_empty() {
            let mut keep = vec![false; FRAMES];
            for (st, n) in &l.standing {
                keep[*st..st + n].iter_mut().for_each(|k| *k = true);
            }
            let mut rest = Vec::new();
            while let Ok(x) = a.alloc(AllocRequest::new(4096)) {
                if keep[x.frames().start] {
                    standing.push(x);
                } else {
                    rest.push(x);
                }
            }
            drop(rest);
        }
        for (i, f) in l.occupied.iter().enumerate() {
            a.place_occupant_at(
                *f,
                Occupant {
                    owner: 1,
                    page: i as u64,
                },
            )
            .unwrap();
        }
        Ours {
            a,
            mover,
            _standing: standing,
        }
    }
}

impl BenchAlloc for Ours {
    type Handle = Allocation;

    fn alloc(&self, frames: usize) -> Option<(Allocation, usize)> {
        let deadline = DEADLINE
            .with(|d| d.get())
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
        let req = AllocRequest::new(frames * 4096)
            .align(align_for(frames) * 4096)
            .policy(Policy::Retry { deadline });
        let x = self.a.alloc(req).ok()?;
        let b = x.migrated_frames() * 4096;
        Some((x, b))
    }

    fn free(&self, h: Allocation) {
        drop(h);
    }

    fn restore(&self) {
        let mut moved = MOVED.with(|m| std::mem::take(&mut *m.borrow_mut()));
        let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
        if moved.is_empty() && pending.is_empty() {
            return;
        }
        // Undo each move: take the occupant off its destination, put it home.
        for mv in &moved {
            match mv.dst {
                Destination::Frame(d) => {
                    let _ = self.a.vacate(d, mv.occupant);
                }
                Destination::OutOfRegion => {
                    self.mover.0.drop_outside(mv.occupant);
                }
            }
        }
        moved.extend(pending);
        moved.retain(|mv| self.a.place_occupant_at(mv.src, mv.occupant).is_err());
        PENDING.with(|p| *p.borrow_mut() = moved);
    }

    fn pin_random(&self, rng: &mut rand::rngs::SmallRng, hold: Duration) -> bool {
        // Guest I/O pins occupied frames only: the lock-free path, as the baseline
        // checks its occupant word before pinning.
        match self.a.pin_occupant(rng.gen_range(0..FRAMES)) {
            Ok(_p) => {
                hold_pin(hold);
                true
            }
            Err(_) => false,
        }
    }
}

// ---- baseline ----

pub struct Base(pub baseline::LinuxCma);

impl Base {
    pub fn new(s: Scenario) -> Self {
        let b = baseline::LinuxCma::new(GIB);
        let l = layout(s);
        for (st, n) in &l.standing {
            b.reserve_at(*st, *n);
        }
        for (i, f) in l.occupied.iter().enumerate() {
            b.occupant[*f].store(i as u64 + 1, Ordering::Relaxed);
        }
        Base(b)
    }
}

impl BenchAlloc for Base {
    type Handle = baseline::Chunk;

    fn alloc(&self, frames: usize) -> Option<(baseline::Chunk, usize)> {
        let c = self.0.alloc(frames, align_for(frames))?;
        let b = c.displaced.len() * 4096;
        Some((c, b))
    }

    fn free(&self, h: baseline::Chunk) {
        self.0.free(&h);
        BASE_DISPLACED.with(|d| d.borrow_mut().extend(h.displaced));
    }

    fn restore(&self) {
        let mut back = BASE_DISPLACED.with(|d| std::mem::take(&mut *d.borrow_mut()));
        let pending = PENDING_BASE.with(|p| std::mem::take(&mut *p.borrow_mut()));
        if back.is_empty() && pending.is_empty() {
            return;
        }
        back.extend(pending);
        back.retain(|(f, o)| {
            let home_free = !self.0.is_allocated(*f);
            if home_free {
                self.0.occupant[*f].store(*o, Ordering::Relaxed);
            }
            !home_free
        });
        PENDING_BASE.with(|p| *p.borrow_mut() = back);
    }

    fn pin_random(&self, rng: &mut rand::rngs::SmallRng, hold: Duration) -> bool {
        let f = rng.gen_range(0..FRAMES);
        if self.0.occupant[f].load(Ordering::Acquire) == 0 {
            return false;
        }
        self.0.pins[f].fetch_add(1, Ordering::AcqRel);
        hold_pin(hold);
        self.0.pins[f].fetch_sub(1, Ordering::AcqRel);
        true
    }
}

/// A pinner doing I/O holds its pin without using the CPU: sleep.
fn hold_pin(d: Duration) {
    thread::sleep(d);
}

/// Per-cell results.
#[derive(Clone, Debug, Default)]
pub struct Cell {
    /// Successful alloc+free pairs.
    pub ops: u64,
    /// Requests that failed (the baseline has no retry; ours retries up to 1 s).
    pub fails: u64,
    pub median_ns: u64,
    pub p99_ns: u64,
    /// Sum over threads of successful pairs / time spent in alloc+free (failed
    /// attempts' time included).
    pub ops_per_sec: f64,
    /// Requests that migrated something.
    pub migrating: u64,
    /// p99 over migrating requests of latency / memcpy time of their bytes.
    pub p99_vs_memcpy: f64,
    /// Median over migrating requests of the same ratio.
    pub median_vs_memcpy: f64,
    /// Whether preemptions were counted in this cell (pin churn, >= 1 MiB).
    pub preemptions_counted: bool,
    /// Migrating requests during which the thread was preempted.
    pub migrating_preempted: u64,
    /// p99 of the ratio over migrating requests that were not preempted.
    pub p99_vs_memcpy_on_cpu: f64,
    /// Migrating requests not preempted but during which the thread slept.
    pub migrating_slept: u64,
    /// p99 of the ratio over migrating requests with no context switch at all.
    pub p99_vs_memcpy_no_switch: f64,
    pub mean_migrated_bytes: f64,
}

/// The pin churn: `pinners` threads, each repeatedly pinning one random occupied
/// frame for `hold` (uniform in 20..200 us) and then pausing for `pause` (uniform
/// in pause_us/10..pause_us), so that at most `pinners` transient pins are held at
/// a time (seed 001: short pins on random occupied frames).
#[derive(Clone, Copy, Debug)]
pub struct Churn {
    pub pinners: usize,
    pub pause_us: u64,
    /// Control experiment (CMA_BENCH_PIN_DRY=1): pinners sleep and wake as usual
    /// but take no pins, to tell CPU contention from pin effects.
    pub dry: bool,
}

impl Churn {
    pub fn from_env() -> Self {
        let get = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(d)
        };
        Churn {
            pinners: get("CMA_BENCH_PINNERS", 8) as usize,
            pause_us: get("CMA_BENCH_PIN_PAUSE_US", 1000),
            dry: get("CMA_BENCH_PIN_DRY", 0) != 0,
        }
    }
}

/// Run `threads` threads of alloc+free (+ untimed restore) for `dur`, with optional
/// pin churn. Each pair is timed from a clock read just before the alloc to one just
/// after the free: one clock read of overhead per pair, the same for both sides.
pub fn measure<A: BenchAlloc + 'static>(
    a: Arc<A>,
    frames: usize,
    threads: usize,
    churn: Option<Churn>,
    dur: Duration,
    memcpy: &MemcpyRef,
) -> Cell {
    let stop = Arc::new(AtomicBool::new(false));
    let pins_taken = Arc::new(AtomicU64::new(0));
    let churners: Vec<_> = (0..churn.map_or(0, |c| c.pinners))
        .map(|i| {
            let (a, stop, taken) = (a.clone(), stop.clone(), pins_taken.clone());
            let c = churn.unwrap();
            thread::spawn(move || {
                let mut rng = rand::rngs::SmallRng::seed_from_u64(5 + i as u64);
                while !stop.load(Ordering::Relaxed) {
                    let hold = Duration::from_micros(rng.gen_range(20..200));
                    let pinned = if c.dry {
                        // Control experiment: the same sleeps and wake-ups, no pins.
                        thread::sleep(hold);
                        true
                    } else {
                        a.pin_random(&mut rng, hold)
                    };
                    if pinned {
                        taken.fetch_add(1, Ordering::Relaxed);
                        if c.pause_us > 0 {
                            let p = rng.gen_range(c.pause_us / 10..=c.pause_us);
                            thread::sleep(Duration::from_micros(p));
                        }
                    }
                }
            })
        })
        .collect();
    let fails = Arc::new(AtomicU64::new(0));
    // Only where migration makes pairs microseconds long: the extra system calls
    // (outside the timed interval) would dominate the loop for sub-microsecond
    // pairs.
    let count_preemptions = churn.is_some() && frames >= 256;
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (a, fails) = (a.clone(), fails.clone());
            thread::spawn(move || {
                DEADLINE.with(|d| d.set(Some(Instant::now() + dur + Duration::from_secs(1))));
                let mut samples: Vec<Sample> = Vec::with_capacity(1 << 20);
                let mut busy = Duration::ZERO;
                let t_end = Instant::now() + dur;
                let mut iv = if count_preemptions {
                    switches()
                } else {
                    (0, 0)
                };
                let mut t = Instant::now();
                while t < t_end || samples.len() < 5 {
                    let r = a.alloc(frames);
                    let Some((h, bytes)) = r else {
                        fails.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        busy += now - t;
                        t = now;
                        continue;
                    };
                    a.free(h);
                    let lat = t.elapsed();
                    busy += lat;
                    // Read outside the timed interval: was this thread preempted
                    // (an involuntary context switch) during the pair? Voluntary
                    // switches (a parked lock, a Retry back-off) are not excluded
                    // anywhere: they are the allocator's own waiting.
                    let (preempted, slept) = if count_preemptions {
                        let now_iv = switches();
                        let p = (now_iv.0 != iv.0, now_iv.1 != iv.1);
                        iv = now_iv;
                        p
                    } else {
                        (false, false)
                    };
                    samples.push(Sample {
                        ns: lat.as_nanos() as u64,
                        bytes,
                        preempted,
                        slept,
                    });
                    a.restore();
                    if count_preemptions {
                        iv = switches();
                    }
                    t = Instant::now();
                }
                (samples, busy)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut ops_per_sec = 0.0;
    for w in workers {
        let (s, busy) = w.join().unwrap();
        ops_per_sec += s.len() as f64 / busy.as_secs_f64().max(1e-9);
        all.extend(s);
    }
    stop.store(true, Ordering::Relaxed);
    churners.into_iter().for_each(|c| c.join().unwrap());
    let mut lat: Vec<u64> = all.iter().map(|s| s.ns).collect();
    lat.sort_unstable();
    let pct = |v: &[u64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    // 0: every migrating pair; 1: not preempted; 2: no context switch at all.
    let ratios = |filter: u8| {
        let mut r: Vec<f64> = all
            .iter()
            .filter(|s| s.bytes > 0)
            .filter(|s| filter < 1 || !s.preempted)
            .filter(|s| filter < 2 || !s.slept)
            .map(|s| s.ns as f64 / memcpy.ns_for(s.bytes / 4096))
            .collect();
        r.sort_by(|x, y| x.total_cmp(y));
        r
    };
    let fpct = |v: &[f64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let (r_all, r_cpu, r_none) = (ratios(0), ratios(1), ratios(2));
    Cell {
        ops: all.len() as u64,
        fails: fails.load(Ordering::Relaxed),
        median_ns: pct(&lat, 0.5),
        p99_ns: pct(&lat, 0.99),
        ops_per_sec,
        migrating: r_all.len() as u64,
        p99_vs_memcpy: fpct(&r_all, 0.99),
        median_vs_memcpy: fpct(&r_all, 0.5),
        preemptions_counted: count_preemptions,
        migrating_preempted: (r_all.len() - r_cpu.len()) as u64,
        p99_vs_memcpy_on_cpu: fpct(&r_cpu, 0.99),
        migrating_slept: (r_cpu.len() - r_none.len()) as u64,
        p99_vs_memcpy_no_switch: fpct(&r_none, 0.99),
        mean_migrated_bytes: all.iter().map(|s| s.bytes as f64).sum::<f64>()
            / all.len().max(1) as f64,
    }
}

struct Sample {
    ns: u64,
    bytes: usize,
    /// An involuntary context switch happened during the pair.
    preempted: bool,
    /// A voluntary one did (the thread slept: a parked lock, a Retry back-off).
    slept: bool,
}

/// This thread's (involuntary, voluntary) context switches so far
/// (`getrusage(RUSAGE_THREAD)`).
fn switches() -> (i64, i64) {
    // SAFETY: `ru` is a plain-data struct that getrusage fills in; all-zero is a
    // valid value for it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD with a valid, writable rusage pointer.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    (ru.ru_nivcsw, ru.ru_nvcsw)
}

/// The memcpy reference, measured in the same run: the median time to copy `k`
/// 4 KiB pages from random pages of a 256 MiB buffer to random pages of another
/// (larger than the last-level cache, so cold-ish, like a migration's scattered
/// occupants), for k = 1, 2, 4, ... 4096. In between, linear interpolation.
pub struct MemcpyRef {
    pub table: Vec<(usize, f64)>,
}

impl MemcpyRef {
    pub fn measure() -> Self {
        let n = 256 << 20;
        let pages = n / 4096;
        let src = vec![1u8; n];
        // Both buffers populated up front (a zeroed Vec would fault on first write).
        let mut dst = vec![2u8; n];
        let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
        let mut table = Vec::new();
        let mut k = 1;
        while k <= 4096 {
            let reps = (8192 / k).clamp(9, 201);
            let mut t: Vec<f64> = (0..reps)
                .map(|_| {
                    let pick: Vec<(usize, usize)> = (0..k)
                        .map(|_| (rng.gen_range(0..pages), rng.gen_range(0..pages)))
                        .collect();
                    let t0 = Instant::now();
                    for (sp, dp) in &pick {
                        dst[dp * 4096..dp * 4096 + 4096]
                            .copy_from_slice(&src[sp * 4096..sp * 4096 + 4096]);
                    }
                    std::hint::black_box(&dst);
                    t0.elapsed().as_nanos() as f64
                })
                .collect();
            t.sort_by(|a, b| a.total_cmp(b));
            table.push((k, t[t.len() / 2]));
            k *= 2;
        }
        MemcpyRef { table }
    }

    /// Nanoseconds to copy `k` pages.
    pub fn ns_for(&self, k: usize) -> f64 {
        let k = k.max(1);
        let mut prev = self.table[0];
        if k <= prev.0 {
            return prev.1 * k as f64 / prev.0 as f64;
        }
        for &(kk, ns) in &self.table[1..] {
            if k <= kk {
                let f = (k - prev.0) as f64 / (kk - prev.0) as f64;
                return prev.1 + f * (ns - prev.1);
            }
            prev = (kk, ns);
        }
        prev.1 * k as f64 / prev.0 as f64
    }
}

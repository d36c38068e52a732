//! Seed 001 as a test: a 56 MiB region, loops of 56 x 1 MiB allocations then frees
//! of all of them, while background threads keep lending free frames to movable
//! occupants and take short transient pins on random occupied frames (the bh_lru
//! references of the original report). With `Retry` no loop may fail; the test
//! also runs the same loops with `FailFast` and prints how many calls failed.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cma::{AllocRequest, Occupant, Policy};
use common::*;
use rand::{Rng, SeedableRng};

const MIB: usize = 1 << 20;
/// Each phase runs for this long (at least `MIN_LOOPS` loops).
const PHASE: Duration = Duration::from_millis(1500);
const MIN_LOOPS: usize = 12;

struct Background {
    stop: Arc<AtomicBool>,
    handles: Vec<thread::JoinHandle<()>>,
    placed: Arc<Mutex<Vec<Occupant>>>,
    pins: Arc<AtomicU64>,
}

fn start_background(s: &Setup) -> Background {
    let stop = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(Mutex::new(Vec::new()));
    let pins = Arc::new(AtomicU64::new(0));
    let occupier = {
        let (a, stop, placed) = (s.alloc.clone(), stop.clone(), placed.clone());
        thread::spawn(move || {
            let mut page = 0;
            while !stop.load(Ordering::Relaxed) {
                // A burst of movable allocations, then a pause (page cache activity).
                for _ in 0..32 {
                    let o = Occupant { owner: 9, page };
                    if place(&a, o).is_none() {
                        break;
                    }
                    page += 1;
                    placed.lock().unwrap().push(o);
                }
                thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let pinner = {
        let (a, stop, pins) = (s.alloc.clone(), stop.clone(), pins.clone());
        thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
            let mut held: Vec<(Instant, cma::PinGuard)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // Up to 8 transient pins on occupied frames, each held 50..500 us.
                held.retain(|(until, _)| Instant::now() < *until);
                if held.len() < 8 {
                    let f = rng.gen_range(0..a.frames());
                    if let Ok(p) = a.pin_occupant(f) {
                        assert_eq!(p.pinned_as(), cma::PinnedAs::Occupied);
                        pins.fetch_add(1, Ordering::Relaxed);
                        let hold = Duration::from_micros(rng.gen_range(50..500));
                        held.push((Instant::now() + hold, p));
                    }
                }
                thread::sleep(Duration::from_micros(20));
            }
        })
    };
    Background {
        stop,
        handles: vec![occupier, pinner],
        placed,
        pins,
    }
}

/// Run loops for `PHASE`; returns (loops, failed loops, calls, failed calls).
fn run_loops(s: &Setup, policy: impl Fn() -> Policy) -> (usize, usize, usize, usize) {
    let (mut loops, mut failed_loops, mut calls, mut failed_calls) = (0, 0, 0, 0);
    let t = Instant::now();
    while loops < MIN_LOOPS || t.elapsed() < PHASE {
        let mut chunks = Vec::with_capacity(56);
        let mut loop_failed = false;
        for _ in 0..56 {
            calls += 1;
            match s
                .alloc
                .alloc(AllocRequest::new(MIB).align(MIB).policy(policy()))
            {
                Ok(c) => chunks.push(c),
                Err(_) => {
                    failed_calls += 1;
                    loop_failed = true;
                }
            }
        }
        loops += 1;
        failed_loops += loop_failed as usize;
        drop(chunks);
        // Let the background refill the region, as the page cache would.
        thread::sleep(Duration::from_millis(2));
    }
    (loops, failed_loops, calls, failed_calls)
}

#[test]
fn seed001_56_x_1mib_loops_never_fail_with_retry() {
    let s = setup(56 * MIB, 2 * MIB);
    let bg = start_background(&s);
    thread::sleep(Duration::from_millis(20));
    let t = Instant::now();
    let (loops, retry_loops, _, retry_calls) = run_loops(&s, || Policy::Retry {
        deadline: Instant::now() + Duration::from_secs(10),
    });
    let retry_time = t.elapsed();
    let (ff_loops_run, ff_loops, ff_total, ff_calls) = run_loops(&s, || Policy::FailFast);
    bg.stop.store(true, Ordering::Relaxed);
    bg.handles.into_iter().for_each(|h| h.join().unwrap());

    let st = s.alloc.stats();
    println!(
        "seed001: Retry: {loops} loops, {retry_loops} failed loops, {retry_calls} failed calls ({retry_time:?}). \
         FailFast: {ff_loops_run} loops, {ff_loops} failed loops, {ff_calls} of {ff_total} calls failed. \
         transient pins taken {}, pages migrated {}, retry sweeps {}, pin-skipped candidates {}",
        bg.pins.load(Ordering::Relaxed),
        st.pages_migrated,
        st.retries,
        st.candidates_pinned
    );
    assert_eq!(retry_loops, 0, "Retry must never fail a loop");
    assert!(
        st.pages_migrated > 0,
        "background occupants were never migrated: the test did not exercise migration"
    );
    assert!(bg.pins.load(Ordering::Relaxed) > 0);
    let placed = bg.placed.lock().unwrap().clone();
    check_no_occupant_lost(&s, &placed);
}

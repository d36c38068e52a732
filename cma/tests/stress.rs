//! Multi-thread stress: allocators, an occupier, transient and long-term pinners all
//! at once. Every allocation claims its frames in a shared ownership table (a double
//! hand-out fails the CAS), fills its memory with its own id and checks it before
//! freeing (a migration writing into allocated memory, or an overlap, breaks it).
//! At the end every occupant must be intact, in the region or moved out.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use cma::{AllocError, AllocRequest, LongTermPin, Occupant, PinnedAs, Policy};
use common::*;
use rand::{Rng, SeedableRng};

const FRAMES: usize = 2048; // 8 MiB
const RUN: Duration = Duration::from_millis(1500);

fn write_id(a: &cma::Allocation, id: u64) {
    let p = a.host_addr().as_ptr().cast::<u64>();
    for i in 0..a.len() / 8 {
        // SAFETY: the allocation owns `len` bytes at `host_addr` until it is dropped.
        unsafe { p.add(i).write_volatile(id ^ i as u64) };
    }
}

fn check_id(a: &cma::Allocation, id: u64) -> bool {
    let p = a.host_addr().as_ptr().cast::<u64>();
    // SAFETY: as in `write_id`.
    (0..a.len() / 8).all(|i| unsafe { p.add(i).read_volatile() } == id ^ i as u64)
}

#[test]
fn concurrent_alloc_free_pin_and_migrate() {
    stress(1);
}

/// The same on four arenas: the threads' home arenas differ, requests fall back to
/// the other arenas, and frees and pins reach the right arena's map.
#[test]
fn concurrent_alloc_free_pin_and_migrate_on_arenas() {
    stress(4);
}

fn stress(arenas: usize) {
    let s = setup_with(FRAMES * K4, 64 * K4, arenas);
    assert_eq!(s.alloc.arenas(), arenas);
    let owners: Arc<Vec<AtomicU64>> = Arc::new((0..FRAMES).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let placed = Arc::new(Mutex::new(Vec::<Occupant>::new()));
    let vacated = Arc::new(Mutex::new(Vec::<Occupant>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut hs = Vec::new();

    for t in 0..3u64 {
        let (a, owners, stop, ok) = (s.alloc.clone(), owners.clone(), stop.clone(), ok.clone());
        hs.push(thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(t);
            let mut id = (t + 1) << 40;
            let mut held = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                id += 1;
                let frames = rng.gen_range(1..=64usize);
                let align = 1usize << rng.gen_range(0..5);
                let policy = if rng.gen_bool(0.5) {
                    Policy::FailFast
                } else {
                    Policy::Retry {
                        deadline: Instant::now() + Duration::from_millis(50),
                    }
                };
                match a.alloc(
                    AllocRequest::new(frames * K4)
                        .align(align * K4)
                        .policy(policy),
                ) {
                    Ok(x) => {
                        assert_eq!(x.frames().start % align, 0);
                        for f in x.frames() {
                            let prev = owners[f].compare_exchange(
                                0,
                                id,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                            assert!(prev.is_ok(), "frame {f} handed out twice ({prev:?})");
                        }
                        write_id(&x, id);
                        ok.fetch_add(1, Ordering::Relaxed);
                        held.push((x, id));
                    }
                    Err(AllocError::NoRoom { .. } | AllocError::AllCandidatesPinned { .. }) => {}
                    Err(AllocError::DeadlinePassed { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
                if held.len() > 6 || (!held.is_empty() && rng.gen_bool(0.4)) {
                    let (x, id) = held.swap_remove(rng.gen_range(0..held.len()));
                    assert!(
                        check_id(&x, id),
                        "allocation {id:#x} at {:?} was overwritten",
                        x.frames()
                    );
                    for f in x.frames() {
                        owners[f].store(0, Ordering::Release);
                    }
                    drop(x);
                }
            }
            for (x, id) in held {
                assert!(check_id(&x, id));
                for f in x.frames() {
                    owners[f].store(0, Ordering::Release);
                }
            }
        }));
    }
    {
        let (a, stop, placed, vacated) = (
            s.alloc.clone(),
            stop.clone(),
            placed.clone(),
            vacated.clone(),
        );
        hs.push(thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(99);
            let mut page = 0;
            let mut mine: Vec<(usize, Occupant)> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..16 {
                    let o = Occupant { owner: 3, page };
                    page += 1;
                    match place(&a, o) {
                        Some(f) => {
                            placed.lock().unwrap().push(o);
                            mine.push((f, o));
                        }
                        None => break,
                    }
                }
                // Some pages are freed by their owner; a moved one is simply not found.
                for _ in 0..8 {
                    if mine.is_empty() {
                        break;
                    }
                    let (f, o) = mine.swap_remove(rng.gen_range(0..mine.len()));
                    if a.vacate(f, o).is_ok() {
                        vacated.lock().unwrap().push(o);
                    }
                }
                thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    {
        let (a, stop) = (s.alloc.clone(), stop.clone());
        hs.push(thread::spawn(move || {
            let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
            while !stop.load(Ordering::Relaxed) {
                let f = rng.gen_range(0..FRAMES);
                if rng.gen_bool(0.05) {
                    // Long-term pins: in place on DMA frames, move-out on occupants.
                    match a.pin_longterm(f) {
                        Ok(LongTermPin::Held(p)) => drop(p),
                        Ok(LongTermPin::MovedOut(_)) | Err(_) => {}
                    }
                } else if let Ok(p) = a.pin(f) {
                    if p.pinned_as() == PinnedAs::Occupied {
                        let info = a.frame_info(f).unwrap();
                        assert!(
                            matches!(info.state, cma::FrameState::Occupied(_)),
                            "pinned occupant moved: {info:?}"
                        );
                    }
                    thread::sleep(Duration::from_micros(rng.gen_range(10..100)));
                }
            }
        }));
    }
    thread::sleep(RUN);
    stop.store(true, Ordering::Relaxed);
    hs.into_iter().for_each(|h| h.join().unwrap());

    let st = s.alloc.stats();
    println!(
        "stress: {} allocations ({} clean), {} frees ({} deferred), {} pages migrated, {} pins, {} claim races, {} long-term move-outs",
        st.allocs, st.allocs_clean, st.frees, st.frees_deferred, st.pages_migrated, st.pins, st.claim_races, st.longterm_moved_out
    );
    assert_eq!(st.allocs, ok.load(Ordering::Relaxed));
    assert_eq!(st.frees, st.allocs);
    assert!(
        st.allocs > 100 && st.pages_migrated > 0,
        "stress did too little to mean anything"
    );
    let u = s.alloc.usage();
    assert_eq!(u.allocated, 0, "all allocations were freed");
    let vacated = vacated.lock().unwrap().clone();
    let expected: Vec<Occupant> = placed
        .lock()
        .unwrap()
        .iter()
        .filter(|o| !vacated.contains(o))
        .copied()
        .collect();
    check_no_occupant_lost(&s, &expected);
}

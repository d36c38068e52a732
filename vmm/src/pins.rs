//! Host-side pins on guest memory for the control API's test commands, backed by real kernel
//! pins and taken through the DMA memory owner's pin interface:
//!
//! - transient: a churn thread that picks random window pages, pins the page's frame with the
//!   owner, does an `O_DIRECT` write of part of it to the one file or block device that
//!   `--pin-target` allows (the kernel pins the page for the I/O), optionally holds on, and
//!   unpins;
//! - long-term: `io_uring` registered buffers over a guest range (a `FOLL_LONGTERM` kernel pin)
//!   after the owner pinned the range long-term (lent pages moved out of the region first, as
//!   Linux migrates pages out of CMA before a long-term pin; pages of DMA mappings in place).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::dma_memory::{DmaMemory, DmaMemoryError, LongTermPin, PinHolder};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("opening {path} for O_DIRECT writes: {source}{hint}")]
    Target {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("io_uring: {0}")]
    Uring(std::io::Error),
    #[error("starting the pin-churn thread: {0}")]
    Spawn(std::io::Error),
    #[error(transparent)]
    Memory(#[from] DmaMemoryError),
}

#[derive(Default)]
struct ChurnCounters {
    pins: AtomicU64,
    refused: AtomicU64,
    ios: AtomicU64,
    io_errors: AtomicU64,
    bytes: AtomicU64,
    pinned_ns: AtomicU64,
}

/// What the churn did so far.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnReport {
    pub running: bool,
    pub seconds: f64,
    pub pins: u64,
    /// Pins refused: the page was being moved, was in RAM, or its frame was being freed.
    pub refused: u64,
    pub ios: u64,
    pub io_errors: u64,
    pub bytes: u64,
    pub mean_pin_us: u64,
    /// Time with a pin held over time running.
    pub pinned_fraction: f64,
}

/// A running transient-pin churn.
pub struct PinChurn {
    stop: Arc<AtomicBool>,
    counters: Arc<ChurnCounters>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

/// Opens `path` for direct I/O, saying what to do when the filesystem cannot.
fn open_direct(path: &Path) -> Result<File, PinsError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(!path.starts_with("/dev"))
        .truncate(false)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .map_err(|source| {
            let hint = if source.raw_os_error() == Some(libc::EINVAL) {
                "; this filesystem does not support O_DIRECT (tmpfs before Linux 6.6 does not): give a block device, e.g. a loop device from `losetup -f --show FILE`"
            } else {
                ""
            };
            PinsError::Target {
                path: path.to_path_buf(),
                source,
                hint,
            }
        })
}

/// Small, fast, good enough to spread pins over the window.
fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// How the churn runs: each pin lasts one `io_bytes` O_DIRECT write plus `hold`, then the
/// thread sleeps `gap`.
#[derive(Clone, Copy, Debug)]
pub struct ChurnShape {
    pub io_bytes: usize,
    pub hold: Duration,
    pub gap: Duration,
}

impl PinChurn {
    /// Starts pinning random window pages, writing to `target`.
    pub fn start(memory: DmaMemory, target: &Path, shape: ChurnShape) -> Result<Self, PinsError> {
        let file = open_direct(target)?;
        let io_bytes = shape.io_bytes.clamp(4096, memory.granule()) & !4095;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ChurnCounters::default());
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            let shape = ChurnShape { io_bytes, ..shape };
            std::thread::Builder::new()
                .name("pin-churn".into())
                .spawn(move || churn(&memory, &file, shape, &stop, &counters))
                .map_err(PinsError::Spawn)?
        };
        Ok(Self {
            stop,
            counters,
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    pub fn report(&self) -> ChurnReport {
        let c = &self.counters;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let pinned = c.pinned_ns.load(Ordering::Relaxed);
        let pins = c.pins.load(Ordering::Relaxed);
        ChurnReport {
            running: !self.stop.load(Ordering::Relaxed),
            seconds: secs,
            pins,
            refused: c.refused.load(Ordering::Relaxed),
            ios: c.ios.load(Ordering::Relaxed),
            io_errors: c.io_errors.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            mean_pin_us: pinned / pins.max(1) / 1000,
            pinned_fraction: pinned as f64 / 1e9 / secs,
        }
    }

    pub fn stop(mut self) -> ChurnReport {
        self.halt();
        self.report()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for PinChurn {
    fn drop(&mut self) {
        self.halt();
    }
}

fn churn(memory: &DmaMemory, file: &File, shape: ChurnShape, stop: &AtomicBool, c: &ChurnCounters) {
    let pages = memory.page_count() as u64;
    let page = memory.granule();
    let io_bytes = shape.io_bytes;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let slots = (file_len / io_bytes as u64).max(1);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    while !stop.load(Ordering::Relaxed) {
        let p = (next(&mut x) % pages) as usize;
        let Ok(pin) = memory.pin_transient(p) else {
            c.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let t = Instant::now();
        c.pins.fetch_add(1, Ordering::Relaxed);
        // The I/O reads the frame through the region's own mapping: the kernel pins exactly
        // the frame the owner's pin holds, even if the guest page is re-backed meanwhile.
        let within = (next(&mut x) as usize % (page / io_bytes).max(1)) * io_bytes;
        let (frame, frame_len) = pin.frame_bytes();
        let at = (next(&mut x) % slots) * io_bytes as u64;
        debug_assert!(within + io_bytes <= frame_len);
        // SAFETY: `frame + within .. + io_bytes` lies inside the pinned frame of the region
        // mapping (`within + io_bytes <= page`), which stays mapped and is not reused while
        // `pin` lives; the write only reads it. O_DIRECT needs the 4 KiB alignment that the
        // frame, `within`, `io_bytes` and `at` have.
        let rc = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                frame.add(within).cast::<libc::c_void>(),
                io_bytes,
                at as libc::off_t,
            )
        };
        if rc < 0 {
            c.io_errors.fetch_add(1, Ordering::Relaxed);
        } else {
            c.ios.fetch_add(1, Ordering::Relaxed);
            c.bytes.fetch_add(rc as u64, Ordering::Relaxed);
        }
        if !shape.hold.is_zero() {
            std::thread::sleep(shape.hold);
        }
        drop(pin);
        c.pinned_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if !shape.gap.is_zero() {
            std::thread::sleep(shape.gap);
        }
    }
}

/// Guest pages registered as `io_uring` fixed buffers: the kernel holds them with
/// `FOLL_LONGTERM` pins until the ring is closed. The ring is declared first so that it is
/// closed (the kernel's pins dropped) before the owner's pin record goes.
pub struct UringPins {
    _ring: io_uring::IoUring,
    pub pin: LongTermPin,
}

impl UringPins {
    /// Pins `[gpa, gpa + len)` long-term and registers it with a new ring. All or nothing: on
    /// failure nothing stays pinned and pages moved out for the pin are lent back.
    pub fn take(memory: &DmaMemory, gpa: u64, len: u64) -> Result<Self, PinsError> {
        let pin = memory.pin_longterm(gpa, len, PinHolder::IoUring)?;
        match register(&pin) {
            Ok(ring) => Ok(Self { _ring: ring, pin }),
            Err(e) => {
                drop(pin);
                memory.relend();
                Err(e)
            }
        }
    }
}

fn register(pin: &LongTermPin) -> Result<io_uring::IoUring, PinsError> {
    let ring = io_uring::IoUring::new(1).map_err(PinsError::Uring)?;
    let iovecs = pin.iovecs();
    // SAFETY: the iovecs describe guest pages that `pin` keeps mapped and in place for as long
    // as it lives; `UringPins` drops the ring (and with it the kernel's pins) before the pin.
    unsafe { ring.submitter().register_buffers(&iovecs) }.map_err(PinsError::Uring)?;
    Ok(ring)
}

//! Host-side pins on guest memory, taken through the allocator's pin API and backed by real
//! kernel pins, for the control API:
//!
//! - transient: a churn thread that picks random window pages, pins the page's frame with
//!   the allocator, does an `O_DIRECT` write of part of it to a file or block device (the
//!   kernel pins the page for the I/O), optionally holds on, and unpins;
//! - long-term: `io_uring` registered buffers over a guest range (a `FOLL_LONGTERM` kernel
//!   pin). Lent pages are first moved out of the region, as Linux migrates pages out of CMA
//!   before a long-term pin; pages of DMA mappings are pinned in place.
//!
//! Moves and MAPs never hand out a frame that one of these pins holds.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cma::{LongTermPin, PinGuard};
use devices::virtio::dma::{CmaBackend, DmaCore, PageBacking};
use serde_json::{json, Value};

type Core = Arc<DmaCore<CmaBackend>>;

#[derive(Debug, thiserror::Error)]
pub enum PinsError {
    #[error("opening {path} for O_DIRECT writes: {source}{hint}")]
    Target {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{0:#x}..+{1:#x} is not inside the DMA window")]
    Range(u64, u64),
    #[error("io_uring: {0}")]
    Uring(std::io::Error),
    #[error("starting the pin-churn thread: {0}")]
    Spawn(std::io::Error),
    #[error("long-term pin of window page {page}: {reason}")]
    LongTerm { page: usize, reason: String },
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

impl PinChurn {
    /// Starts pinning random window pages: each pin lasts one `io_bytes` O_DIRECT write to
    /// `target` plus `hold`, then the thread sleeps `gap`.
    pub fn start(
        core: Core,
        target: &Path,
        io_bytes: usize,
        hold: Duration,
        gap: Duration,
    ) -> Result<Self, PinsError> {
        let file = open_direct(target)?;
        let io_bytes = io_bytes.clamp(4096, core.backend().granule()) & !4095;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(ChurnCounters::default());
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name("pin-churn".into())
                .spawn(move || churn(&core, &file, io_bytes, hold, gap, &stop, &counters))
                .map_err(PinsError::Spawn)?
        };
        Ok(Self {
            stop,
            counters,
            thread: Some(thread),
            started: Instant::now(),
        })
    }

    pub fn report(&self) -> Value {
        let c = &self.counters;
        let secs = self.started.elapsed().as_secs_f64().max(1e-9);
        let pinned = c.pinned_ns.load(Ordering::Relaxed);
        let pins = c.pins.load(Ordering::Relaxed);
        json!({
            "running": !self.stop.load(Ordering::Relaxed),
            "seconds": secs,
            "pins": pins,
            "refused": c.refused.load(Ordering::Relaxed),
            "ios": c.ios.load(Ordering::Relaxed),
            "io_errors": c.io_errors.load(Ordering::Relaxed),
            "bytes": c.bytes.load(Ordering::Relaxed),
            "mean_pin_us": pinned / pins.max(1) / 1000,
            "pinned_fraction": pinned as f64 / 1e9 / secs,
        })
    }

    pub fn stop(mut self) -> Value {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.report()
    }
}

impl Drop for PinChurn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn churn(
    core: &Core,
    file: &File,
    io_bytes: usize,
    hold: Duration,
    gap: Duration,
    stop: &AtomicBool,
    c: &ChurnCounters,
) {
    let backend = core.backend();
    let (lending, allocator) = (backend.lending(), backend.allocator());
    let pages = lending.page_count() as u64;
    let page = lending.page_size();
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let slots = (file_len / io_bytes as u64).max(1);
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ std::process::id() as u64;
    while !stop.load(Ordering::Relaxed) {
        let p = (next(&mut x) % pages) as usize;
        let pin: Option<PinGuard> = match lending.backing(p) {
            Some(PageBacking::Lent(f)) => allocator.pin_occupant(f).ok(),
            Some(PageBacking::Mapped(f)) => allocator.pin(f).ok(),
            _ => continue,
        };
        let Some(pin) = pin else {
            c.refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let t = Instant::now();
        c.pins.fetch_add(1, Ordering::Relaxed);
        // The I/O reads the frame through the region's own mapping: the kernel pins exactly
        // the frame the allocator pin holds, even if the guest page is re-backed meanwhile.
        let within = (next(&mut x) as usize % (page / io_bytes).max(1)) * io_bytes;
        let src = lending.frame_ptr(pin.frame()).wrapping_add(within);
        let at = (next(&mut x) % slots) * io_bytes as u64;
        // SAFETY: `src..src + io_bytes` lies inside the pinned frame of the region mapping
        // (`within + io_bytes <= page`); the write only reads it. O_DIRECT needs the 4 KiB
        // alignment that `src`, `io_bytes` and `at` have.
        let rc = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                src.cast::<libc::c_void>(),
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
        if !hold.is_zero() {
            std::thread::sleep(hold);
        }
        drop(pin);
        c.pinned_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        lending.reap(allocator);
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
}

/// Guest pages registered as `io_uring` fixed buffers: the kernel holds them with
/// `FOLL_LONGTERM` pins until the ring is closed.
pub struct LongTermPins {
    _ring: OwnedFd,
    _guards: Vec<PinGuard>,
    pub gpa: u64,
    pub len: u64,
    pub moved_out: usize,
    pub pinned_in_place: usize,
}

const IORING_REGISTER_BUFFERS: libc::c_uint = 0;

impl LongTermPins {
    pub fn take(core: &Core, gpa: u64, len: u64) -> Result<Self, PinsError> {
        let backend = core.backend();
        let (lending, allocator) = (backend.lending(), backend.allocator());
        let w = backend.window();
        let page = lending.page_size() as u64;
        let gpa = gpa & !(page - 1);
        let end = gpa.checked_add(len).map(|e| e.next_multiple_of(page));
        let Some(end) = end.filter(|&e| gpa >= w.base && e <= w.base + w.len && e > gpa) else {
            return Err(PinsError::Range(gpa, len));
        };
        let first = ((gpa - w.base) / page) as usize;
        let n = ((end - gpa) / page) as usize;
        let (mut moved_out, mut guards) = (0, Vec::new());
        {
            let _layout = lending.lock_layout();
            for p in first..first + n {
                let r = match lending.backing(p) {
                    Some(PageBacking::Lent(f) | PageBacking::Mapped(f)) => {
                        allocator.pin_longterm(f)
                    }
                    _ => continue,
                };
                match r {
                    Ok(LongTermPin::MovedOut(_)) => moved_out += 1,
                    Ok(LongTermPin::Held(g)) => guards.push(g),
                    Err(e) => {
                        return Err(PinsError::LongTerm {
                            page: p,
                            reason: e.to_string(),
                        })
                    }
                }
            }
        }
        // io_uring wants each registered buffer inside one kind of memory (anonymous, or one
        // file): one buffer per run of pages in RAM or in the region.
        let mut runs: Vec<libc::iovec> = Vec::new();
        let mut last_kind = None;
        for p in first..first + n {
            let kind = lending.backing(p).and_then(PageBacking::frame).is_some();
            match runs.last_mut() {
                Some(run) if last_kind == Some(kind) => run.iov_len += page as usize,
                _ => runs.push(libc::iovec {
                    iov_base: lending.page_ptr(p).cast(),
                    iov_len: page as usize,
                }),
            }
            last_kind = Some(kind);
        }
        let ring = uring_with_buffers(&runs)?;
        Ok(Self {
            _ring: ring,
            pinned_in_place: guards.len(),
            _guards: guards,
            gpa,
            len: end - gpa,
            moved_out,
        })
    }
}

/// An io_uring instance with `bufs` registered as fixed buffers.
fn uring_with_buffers(bufs: &[libc::iovec]) -> Result<OwnedFd, PinsError> {
    // struct io_uring_params is 120 bytes; zeroed asks for the defaults.
    let mut params = [0u64; 15];
    // SAFETY: io_uring_setup writes only into `params`, which is large enough.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(PinsError::Uring(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh file descriptor that nothing else owns.
    let ring = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: `bufs` are valid iovecs describing guest memory that the VMM maps for the VM's
    // lifetime; the kernel pins those pages until the ring is closed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_io_uring_register,
            ring.as_raw_fd(),
            IORING_REGISTER_BUFFERS,
            bufs.as_ptr(),
            bufs.len() as u32,
        )
    };
    if rc < 0 {
        return Err(PinsError::Uring(std::io::Error::last_os_error()));
    }
    Ok(ring)
}

//! The control API's server: a Unix socket (`--api-sock PATH`) served on its own worker, one
//! JSON request per connection. It holds a handle to guest DMA memory's owner and uses its
//! public interface only.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::Serialize;
use vmm_sys_util::epoll::EventSet;

use super::types::*;
use super::ApiError;
use crate::dma::{DmaPath, DmaSlot};
use crate::pins::{ChurnShape, PinChurn, UringPins};
use devices::dma_memory::IommuPolicy;

/// What the commands that exist for tests may do: nothing unless the VMM was started with
/// `--test-commands`; pin churn writes only to `--pin-target`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TestCommands {
    pub enabled: bool,
    pub pin_target: Option<PathBuf>,
}

/// The listening socket and what the commands started.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    dma: DmaSlot,
    tests: TestCommands,
    started: Instant,
    churn: Mutex<Option<PinChurn>>,
    longterm: Mutex<Vec<UringPins>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn reply<T: Serialize>(r: Result<T, String>) -> String {
    let json = match r {
        Ok(v) => serde_json::to_string(&v),
        Err(error) => serde_json::to_string(&ErrorReply { error }),
    };
    json.unwrap_or_else(|e| format!("{{\"error\":\"encoding the reply: {e}\"}}"))
}

impl ApiServer {
    pub fn bind(path: &Path, dma: DmaSlot, tests: TestCommands) -> Result<Self, ApiError> {
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            // A socket left behind by a VMM that is gone.
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            dma,
            tests,
            started: Instant::now(),
            churn: Mutex::new(None),
            longterm: Mutex::new(Vec::new()),
        })
    }

    fn serve(&self, stream: UnixStream) {
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let answer = match BufReader::new(&stream).take(64 * 1024).read_line(&mut line) {
            Ok(_) => self.answer(&line),
            Err(e) => reply::<()>(Err(format!("reading the request: {e}"))),
        };
        let mut stream = stream;
        let _ = writeln!(stream, "{answer}");
    }

    /// The reply to one request line, as JSON.
    pub fn answer(&self, line: &str) -> String {
        let request: Request = match serde_json::from_str(line.trim()) {
            Ok(r) => r,
            Err(e) => {
                let known = Request::NAMES.join(", ");
                return reply::<()>(Err(format!(
                    "not a valid request: {e}; send e.g. {{\"cmd\": \"stat\"}} (commands: {known}; arguments in docs/api.md)"
                )));
            }
        };
        if request == Request::Stat {
            return reply(Ok(self.stat()));
        }
        let cmd = request.name();
        if request.is_test_command() && !self.tests.enabled {
            return reply::<()>(Err(format!(
                "`{cmd}` is a test command: start dmavisor with --test-commands to use it"
            )));
        }
        let Some(dma) = self.dma.get() else {
            return reply::<()>(Err(format!("`{cmd}` needs the DMA path, which is not set up (no DMA window, or the region is still being reserved)")));
        };
        match request {
            Request::Stat => unreachable!("answered above"),
            Request::Mappings => reply(Ok(MappingsReply {
                pid: std::process::id(),
                mappings: dma
                    .memory
                    .mappings()
                    .into_iter()
                    .map(|m| MappingStat {
                        gpa: m.gpa,
                        len: m.len,
                        region_offset: m.region_offset,
                        host_addr: m.host_addr,
                        phys: m.phys,
                    })
                    .collect(),
            })),
            Request::PinChurn {
                io_kib,
                hold_us,
                gap_us,
            } => reply(self.pin_churn(dma, io_kib, hold_us, gap_us)),
            Request::PinChurnStop => reply(
                lock(&self.churn)
                    .take()
                    .map(PinChurn::stop)
                    .ok_or_else(|| "no pin churn is running".to_string()),
            ),
            Request::PinLongterm { gpa, len } => reply(self.pin_longterm(dma, gpa, len)),
            Request::UnpinLongterm => {
                let released = std::mem::take(&mut *lock(&self.longterm)).len() as u64;
                // Pages moved out for the pins may come back into the region now.
                let relent = dma.memory.relend() as u64;
                reply(Ok(UnpinLongtermReply { released, relent }))
            }
            Request::Migrate { frames } => reply(migrate(dma, frames)),
            Request::DmaStall { on } => reply(dma_stall(dma, on)),
        }
    }

    fn pin_churn(
        &self,
        dma: &DmaPath,
        io_kib: u64,
        hold_us: u64,
        gap_us: u64,
    ) -> Result<StartedReply, String> {
        let Some(target) = &self.tests.pin_target else {
            return Err("pin churn writes guest memory to a file or block device: start dmavisor with --pin-target PATH to name the one it may overwrite".into());
        };
        if !dma.memory.region().kernel_can_pin() {
            return Err("pin churn does O_DIRECT I/O from the region's frames, and this region is a dma-buf: its mapping is VM_PFNMAP, so the kernel cannot pin its pages for I/O (get_user_pages fails, as on the kernel's own CMA heap). Start dmavisor with --region backing=hugetlb (or memfd) to churn pins".into());
        }
        let mut churn = lock(&self.churn);
        if churn.is_some() {
            return Err("a pin churn is already running; send pin-churn-stop first".into());
        }
        let shape = ChurnShape {
            io_bytes: io_kib.saturating_mul(1024).min(1 << 30) as usize,
            hold: Duration::from_micros(hold_us),
            gap: Duration::from_micros(gap_us),
        };
        *churn =
            Some(PinChurn::start(dma.memory.clone(), target, shape).map_err(|e| e.to_string())?);
        Ok(StartedReply { started: true })
    }

    fn pin_longterm(&self, dma: &DmaPath, gpa: u64, len: u64) -> Result<PinLongtermReply, String> {
        let pins = UringPins::take(&dma.memory, gpa, len).map_err(|e| e.to_string())?;
        let r = PinLongtermReply {
            gpa: pins.pin.gpa,
            len: pins.pin.len,
            moved_out: pins.pin.moved_out as u64,
            pinned_in_place: pins.pin.pinned_in_place as u64,
        };
        lock(&self.longterm).push(pins);
        Ok(r)
    }

    fn stat(&self) -> StatReply {
        let mut v = StatReply {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            ..StatReply::default()
        };
        let Some(dma) = self.dma.get() else {
            return v;
        };
        let memory = &dma.memory;
        let region = memory.region();
        let st = memory.stats();
        let s = &st.allocator;
        v.region = Some(RegionStat {
            backing: format!("{:?}", region.backing()),
            requested: serde_json::to_value(dma.choice.requested)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            passed_over: dma.choice.passed_over.clone(),
            reserve_ms: dma.choice.reserve_ms,
            size: region.len() as u64,
            page_size: region.page_size() as u64,
            contiguity: format!("{:?}", region.contiguity()),
            largest_extent: region.largest_extent() as u64,
            extents: region
                .extents()
                .iter()
                .map(|e| ExtentStat {
                    offset: e.offset as u64,
                    len: e.len as u64,
                    phys: e.phys,
                })
                .collect(),
        });
        v.allocator = Some(AllocatorStat {
            frames: st.usage.frames as u64,
            allocated_frames: st.usage.allocated as u64,
            occupied_frames: st.usage.occupied as u64,
            granule: memory.allocator_config().granule as u64,
            allocs: s.allocs,
            allocs_clean: s.allocs_clean,
            fail_too_large: s.fail_too_large,
            fail_no_room: s.fail_no_room,
            fail_all_pinned: s.fail_all_pinned,
            fail_deadline: s.fail_deadline,
            retries: s.retries,
            pages_migrated: s.pages_migrated,
            bytes_migrated: s.bytes_migrated,
            frees: s.frees,
            alloc_latency_p50_ns: s.alloc_latency.quantile(0.5).as_nanos() as u64,
            alloc_latency_p99_ns: s.alloc_latency.quantile(0.99).as_nanos() as u64,
        });
        let l = st.lending;
        v.lending = Some(LendingStat {
            pages: l.pages,
            page_size: l.page_size,
            lent: l.lent,
            mapped: l.mapped,
            ram: l.ram,
            longterm_pinned: l.longterm_pinned,
            longterm_pinned_in_ram: l.longterm_pinned_in_ram,
            orphans: l.orphans,
            moves: l.moves,
            moves_out: l.moves_out,
            bytes_moved: l.bytes_moved,
            copy_us: l.copy_us,
            claimed_in_place: s.claimed_in_place,
            returned_in_place: s.returned_as_occupants,
        });
        let m = st.maps;
        let us = |ns: [u64; 3]| Percentiles::from(ns.map(|x| x / 1000));
        v.maps = Some(MapsStat {
            count: m.count,
            in_place: m.in_place,
            pin_waits: m.pin_waits,
            latency_us: us(m.latency_ns),
            moved_bytes: m.moved_bytes.into(),
            moving: MovingMaps {
                count: m.moving_count,
                latency_us: us(m.moving_latency_ns),
                moved_bytes: m.moving_bytes.into(),
                phases_us: MapPhasesStat {
                    claim: us(m.moving_claim_ns),
                    alloc: us(m.moving_alloc_ns),
                    remap: us(m.moving_remap_ns),
                    release: us(m.moving_release_ns),
                },
            },
        });
        v.pins = Some(PinsStat {
            churn: lock(&self.churn).as_ref().map(PinChurn::report),
            longterm_ranges: st.longterm_ranges,
            longterm_refusals: st.longterm_refusals,
            pins_taken: s.pins,
            pin_refusals: s.pin_refusals,
            longterm_moved_out: s.longterm_moved_out,
        });
        let io = dma.memory.iommu_stats();
        v.iommu = io.policy.map(|policy| IommuStat {
            policy: match policy {
                IommuPolicy::Mapped => "mapped".into(),
                IommuPolicy::All => "all".into(),
            },
            ranges: io.ranges,
            window_bytes: io.mapped_bytes,
            total_bytes: io.total_bytes,
            maps: io.maps,
            unmaps: io.unmaps,
            map_us_mean: io.map_ns / io.maps.max(1) / 1000,
            unmap_us_mean: io.unmap_ns / io.unmaps.max(1) / 1000,
            map_failures: io.map_failures,
        });
        let (dev, cfg) = (dma.device.stat(), dma.device.config());
        v.device = Some(DeviceStat {
            window_base: cfg.window_base,
            window_size: cfg.window_size,
            granule: u64::from(cfg.granule),
            mappings: dev.mappings,
            mapped_bytes: dev.mapped_bytes,
            maps_ok: dev.maps_ok,
            maps_failed: dev.maps_failed,
            maps_busy: dev.maps_busy,
            maps_timeout: dev.maps_timeout,
            unmaps: dev.unmaps,
            stalled: dma.device.stalled(),
        });
        v
    }

    #[cfg(test)]
    pub(super) fn accept_one(&self) -> bool {
        match self.listener.accept() {
            Ok((stream, _)) => {
                self.serve(stream);
                true
            }
            Err(_) => false,
        }
    }
}

fn dma_stall(dma: &DmaPath, on: u64) -> Result<DmaStallReply, String> {
    let on = match on {
        0 => false,
        1 => true,
        _ => {
            return Err(format!(
                "dma-stall on={on}: use on=1 (stall) or on=0 (answer again)"
            ))
        }
    };
    let was_stalled = dma.device.set_stalled(on);
    tracing::info!(was_stalled, stalled = on, "virtio-dma: dma-stall");
    Ok(DmaStallReply {
        stalled: on,
        was_stalled,
    })
}

fn migrate(dma: &DmaPath, frames: u64) -> Result<MigrateReply, String> {
    let t = Instant::now();
    let moved = dma
        .memory
        .migrate(frames as usize)
        .map_err(|e| format!("migrate: {e}"))?;
    let secs = t.elapsed().as_secs_f64();
    let bytes = moved * dma.memory.granule() as u64;
    let memcpy_secs = memcpy_seconds(bytes as usize);
    let mib_s = |s: f64| bytes as f64 / f64::from(1 << 20) / s.max(1e-9);
    Ok(MigrateReply {
        moved,
        bytes,
        seconds: secs,
        migrate_mib_s: mib_s(secs),
        memcpy_mib_s: mib_s(memcpy_secs),
    })
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        while let Ok((stream, _)) = self.listener.accept() {
            self.serve(stream);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!("watching the API socket: {e:?}");
        }
    }
}

/// How long plain `memcpy` takes for `bytes` between two fresh buffers (the baseline the
/// migration throughput is compared with, measured in the same run).
fn memcpy_seconds(bytes: usize) -> f64 {
    const CHUNK: usize = 64 << 20;
    let len = bytes.min(CHUNK);
    if len == 0 {
        return 0.0;
    }
    let src = vec![0x5au8; len];
    // Non-zero, so the pages are faulted in before the clock starts.
    let mut dst = vec![1u8; len];
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(len);
        dst[..n].copy_from_slice(&src[..n]);
        std::hint::black_box(&mut dst);
        left -= n;
    }
    t.elapsed().as_secs_f64()
}

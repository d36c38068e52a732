//! The control API: a Unix socket (`--api-sock PATH`) that answers one JSON request per
//! connection, and the `dmavisor stat` client that prints a readable summary.
//!
//! Request: `{"cmd": "stat"}` followed by a newline. Reply: one JSON object and a newline, or
//! `{"error": "..."}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use devices::virtio::dma::{CmaBackend, DmaCore};
use event_manager::{EventOps, Events, MutEventSubscriber};
use serde_json::{json, Value};
use vmm_sys_util::epoll::EventSet;

use crate::pins::{LongTermPins, PinChurn};

/// Where the API finds the DMA path once the region thread has built it.
pub type DmaSlot = Arc<OnceLock<Arc<DmaCore<CmaBackend>>>>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-sock {0}: another dmavisor is listening there; pick another path")]
    InUse(PathBuf),
    #[error("--api-sock {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the API at {path}: {source}; is `dmavisor run --api-sock {path}` running?"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the API at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// The listening socket, served from the VMM's event loop.
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    dma: DmaSlot,
    started: Instant,
    churn: Mutex<Option<PinChurn>>,
    longterm: Mutex<Vec<LongTermPins>>,
}

const COMMANDS: &str = "stat, pin-churn, pin-churn-stop, pin-longterm, unpin-longterm, migrate";

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn arg_u64(req: &Value, key: &str, default: Option<u64>) -> Result<u64, String> {
    match req.get(key) {
        Some(v) => v
            .as_u64()
            .ok_or_else(|| format!("\"{key}\" must be a non-negative integer, not {v}")),
        None => default.ok_or_else(|| format!("missing \"{key}\"")),
    }
}

impl ApiServer {
    pub fn bind(path: &Path, dma: DmaSlot) -> Result<Self, ApiError> {
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
        let reply = match BufReader::new(&stream).take(64 * 1024).read_line(&mut line) {
            Ok(_) => self.answer(&line),
            Err(e) => json!({ "error": format!("reading the request: {e}") }),
        };
        let mut stream = stream;
        let _ = writeln!(stream, "{reply}");
    }

    fn answer(&self, line: &str) -> Value {
        let request: Value = match serde_json::from_str(line.trim()) {
            Ok(v) => v,
            Err(e) => {
                return json!({ "error": format!("not a JSON request: {e}; send {{\"cmd\": \"stat\"}}") })
            }
        };
        let cmd = match request.get("cmd").and_then(Value::as_str) {
            Some("stat") => return self.stat(),
            Some(cmd) if COMMANDS.split(", ").any(|c| c == cmd) => cmd,
            Some(other) => {
                return json!({ "error": format!("unknown command `{other}`; known: {COMMANDS}") })
            }
            None => {
                return json!({ "error": "the request has no \"cmd\"; send {\"cmd\": \"stat\"}" })
            }
        };
        let Some(core) = self.dma.get().cloned() else {
            return json!({ "error": format!("`{cmd}` needs the DMA path, which is not set up (no DMA window, or the region is still being reserved)") });
        };
        self.command(cmd, &request, core)
            .unwrap_or_else(|e| json!({ "error": e }))
    }

    fn command(
        &self,
        cmd: &str,
        req: &Value,
        core: Arc<DmaCore<CmaBackend>>,
    ) -> Result<Value, String> {
        match cmd {
            "pin-churn" => {
                let mut churn = lock(&self.churn);
                if churn.is_some() {
                    return Err("a pin churn is already running; send pin-churn-stop first".into());
                }
                let target = req
                    .get("target")
                    .and_then(Value::as_str)
                    .ok_or("missing \"target\": a file or block device for O_DIRECT writes")?;
                let io = arg_u64(req, "io_kib", Some(64))? as usize * 1024;
                let hold = Duration::from_micros(arg_u64(req, "hold_us", Some(0))?);
                let gap = Duration::from_micros(arg_u64(req, "gap_us", Some(0))?);
                let c = PinChurn::start(core, Path::new(target), io, hold, gap)
                    .map_err(|e| e.to_string())?;
                *churn = Some(c);
                Ok(json!({ "started": true }))
            }
            "pin-churn-stop" => lock(&self.churn)
                .take()
                .map(PinChurn::stop)
                .ok_or_else(|| "no pin churn is running".to_string()),
            "pin-longterm" => {
                let gpa = arg_u64(req, "gpa", None)?;
                let len = arg_u64(req, "len", None)?;
                let pins = LongTermPins::take(&core, gpa, len).map_err(|e| e.to_string())?;
                let reply = json!({
                    "gpa": pins.gpa,
                    "len": pins.len,
                    "moved_out": pins.moved_out,
                    "pinned_in_place": pins.pinned_in_place,
                });
                lock(&self.longterm).push(pins);
                Ok(reply)
            }
            "unpin-longterm" => {
                let released = std::mem::take(&mut *lock(&self.longterm)).len();
                // Pages moved out for the pins may come back into the region now.
                let backend = core.backend();
                let relent = backend
                    .lending()
                    .lend_ram_pages(backend.allocator(), usize::MAX);
                Ok(json!({ "released": released, "relent": relent }))
            }
            "migrate" => {
                let frames = arg_u64(req, "frames", None)? as usize;
                let backend = core.backend();
                let t = Instant::now();
                let moved = backend
                    .lending()
                    .force_migrate(backend.allocator(), frames)
                    .map_err(|e| format!("migrate: {e}"))?;
                let secs = t.elapsed().as_secs_f64();
                let bytes = moved * backend.granule() as u64;
                let memcpy_secs = memcpy_seconds(bytes as usize);
                let mib_s = |s: f64| bytes as f64 / f64::from(1 << 20) / s.max(1e-9);
                Ok(json!({
                    "moved": moved,
                    "bytes": bytes,
                    "seconds": secs,
                    "migrate_mib_s": mib_s(secs),
                    "memcpy_mib_s": mib_s(memcpy_secs),
                }))
            }
            other => Err(format!("unknown command `{other}`")),
        }
    }

    fn stat(&self) -> Value {
        let mut v = json!({ "uptime_ms": self.started.elapsed().as_millis() as u64 });
        let Some(core) = self.dma.get() else {
            v["dma"] = json!(null);
            return v;
        };
        let allocator = core.backend().allocator();
        let region = allocator.region();
        let usage = allocator.usage();
        let s = allocator.stats();
        let extents: Vec<Value> = region
            .extents()
            .iter()
            .map(|e| json!({ "offset": e.offset, "len": e.len, "phys": e.phys }))
            .collect();
        let dev = core.stat();
        let cfg = core.config();
        v["region"] = json!({
            "backing": format!("{:?}", region.backing()),
            "size": region.len(),
            "page_size": region.page_size(),
            "contiguity": format!("{:?}", region.contiguity()),
            "largest_extent": region.largest_extent(),
            "extents": extents,
        });
        let granule = allocator.config().granule as u64;
        v["allocator"] = json!({
            "frames": usage.frames,
            "allocated_frames": usage.allocated,
            "occupied_frames": usage.occupied,
            "granule": granule,
            "allocs": s.allocs,
            "allocs_clean": s.allocs_clean,
            "fail_too_large": s.fail_too_large,
            "fail_no_room": s.fail_no_room,
            "fail_all_pinned": s.fail_all_pinned,
            "fail_deadline": s.fail_deadline,
            "retries": s.retries,
            "pages_migrated": s.pages_migrated,
            "bytes_migrated": s.bytes_migrated,
            "frees": s.frees,
            "alloc_latency_p50_ns": s.alloc_latency.quantile(0.5).as_nanos() as u64,
            "alloc_latency_p99_ns": s.alloc_latency.quantile(0.99).as_nanos() as u64,
        });
        let l = core.backend().lending().stats();
        v["lending"] = json!({
            "pages": l.pages,
            "page_size": l.page_size,
            "lent": l.lent,
            "mapped": l.mapped,
            "ram": l.ram,
            "orphans": l.orphans,
            "moves": l.moves,
            "moves_out": l.moves_out,
            "bytes_moved": l.bytes_moved,
            "copy_us": l.copy_us,
            "claimed_in_place": s.claimed_in_place,
            "returned_in_place": s.returned_as_occupants,
        });
        let m = core.backend().map_percentiles();
        v["maps"] = json!({
            "count": m.count,
            "in_place": m.in_place,
            "pin_waits": m.pin_waits,
            "latency_us": { "p50": m.latency_ns[0] / 1000, "p99": m.latency_ns[1] / 1000, "max": m.latency_ns[2] / 1000 },
            "moved_bytes": { "p50": m.moved_bytes[0], "p99": m.moved_bytes[1], "max": m.moved_bytes[2] },
            "moving": {
                "count": m.moving_count,
                "latency_us": { "p50": m.moving_latency_ns[0] / 1000, "p99": m.moving_latency_ns[1] / 1000, "max": m.moving_latency_ns[2] / 1000 },
                "moved_bytes": { "p50": m.moving_bytes[0], "p99": m.moving_bytes[1], "max": m.moving_bytes[2] },
            },
        });
        v["pins"] = json!({
            "churn": lock(&self.churn).as_ref().map(PinChurn::report),
            "longterm_ranges": lock(&self.longterm).len(),
            "pins_taken": s.pins,
            "pin_refusals": s.pin_refusals,
            "longterm_moved_out": s.longterm_moved_out,
        });
        v["device"] = json!({
            "window_base": cfg.window_base,
            "window_size": cfg.window_size,
            "granule": cfg.granule,
            "mappings": dev.mappings,
            "mapped_bytes": dev.mapped_bytes,
            "maps_ok": dev.maps_ok,
            "maps_failed": dev.maps_failed,
            "maps_busy": dev.maps_busy,
            "maps_timeout": dev.maps_timeout,
            "unmaps": dev.unmaps,
        });
        v
    }
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

/// Sends `{"cmd": cmd}` and returns the reply.
pub fn request(path: &Path, cmd: &str) -> Result<Value, ApiError> {
    send(path, &json!({ "cmd": cmd }))
}

/// Sends one request and returns the reply; an `{"error": ..}` reply is an error.
pub fn send(path: &Path, req: &Value) -> Result<Value, ApiError> {
    let protocol = |message: String| ApiError::Protocol {
        path: path.to_path_buf(),
        message,
    };
    let mut stream = UnixStream::connect(path).map_err(|source| ApiError::Connect {
        path: path.to_path_buf(),
        source,
    })?;
    // Long-term pins and forced migrations copy guest memory before they answer.
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(|e| protocol(e.to_string()))?;
    writeln!(stream, "{req}").map_err(|e| protocol(e.to_string()))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| protocol(e.to_string()))?;
    let v: Value =
        serde_json::from_str(&line).map_err(|e| protocol(format!("bad reply {line:?}: {e}")))?;
    if let Some(e) = v.get("error") {
        return Err(protocol(e.to_string()));
    }
    Ok(v)
}

fn mib(v: &Value) -> String {
    let b = v.as_u64().unwrap_or(0);
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

/// A readable summary of a `stat` reply.
pub fn summary(v: &Value) -> String {
    let mut out = format!("uptime: {} ms\n", v["uptime_ms"]);
    if v["region"].is_null() {
        out.push_str(
            "DMA path: not set up (no DMA window, or the region is still being reserved)\n",
        );
        return out;
    }
    let (r, a, d) = (&v["region"], &v["allocator"], &v["device"]);
    out += &format!(
        "region: {} {}, {} pages of {} bytes, contiguity {}, {} extent(s), largest {}\n",
        mib(&r["size"]),
        r["backing"].as_str().unwrap_or("?"),
        r["size"].as_u64().unwrap_or(0) / r["page_size"].as_u64().unwrap_or(1).max(1),
        r["page_size"],
        r["contiguity"].as_str().unwrap_or("?"),
        r["extents"].as_array().map_or(0, Vec::len),
        mib(&r["largest_extent"]),
    );
    out += &format!(
        "allocator: {} of {} frames allocated, {} occupied; {} allocations, {} frees; failures: {} too large, {} no room, {} pinned, {} deadline; {} migrated; alloc latency p50 {} ns, p99 {} ns\n",
        a["allocated_frames"], a["frames"], a["occupied_frames"], a["allocs"], a["frees"],
        a["fail_too_large"], a["fail_no_room"], a["fail_all_pinned"], a["fail_deadline"],
        mib(&a["bytes_migrated"]), a["alloc_latency_p50_ns"], a["alloc_latency_p99_ns"],
    );
    let l = &v["lending"];
    out += &format!(
        "lending: {} window pages: {} lent, {} mapped, {} in RAM, {} orphaned; {} moves ({} out of the region, {}); {} MAPs in place\n",
        l["pages"], l["lent"], l["mapped"], l["ram"], l["orphans"], l["moves"], l["moves_out"],
        mib(&l["bytes_moved"]), l["claimed_in_place"],
    );
    let p = &v["pins"];
    let churn = match &p["churn"] {
        Value::Null => "no pin churn".to_string(),
        c => format!(
            "pin churn: {} pins, {} I/Os, pinned {:.0}% of the time",
            c["pins"],
            c["ios"],
            c["pinned_fraction"].as_f64().unwrap_or(0.0) * 100.0
        ),
    };
    out += &format!(
        "pins: {} taken, {} refused; {} long-term range(s), {} page(s) moved out for them; {churn}\n",
        p["pins_taken"], p["pin_refusals"], p["longterm_ranges"], p["longterm_moved_out"],
    );
    let m = &v["maps"];
    out += &format!(
        "host MAP latency: p50 {} us, p99 {} us, max {} us over {} MAPs ({} in place); bytes moved per MAP p99 {}; {} MAP(s) waited for a pin on their own frames\n",
        m["latency_us"]["p50"], m["latency_us"]["p99"], m["latency_us"]["max"], m["count"],
        m["in_place"], mib(&m["moved_bytes"]["p99"]), m["pin_waits"],
    );
    out += &format!(
        "virtio-dma: window {:#x} + {}, granule {}; {} mapping(s), {}; MAP ok {}, failed {} (busy {}, timeout {}); UNMAP {}\n",
        d["window_base"].as_u64().unwrap_or(0), mib(&d["window_size"]), d["granule"],
        d["mappings"], mib(&d["mapped_bytes"]), d["maps_ok"], d["maps_failed"], d["maps_busy"],
        d["maps_timeout"], d["unmaps"],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("dmavisor-api-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn stat_without_dma_path_and_bad_requests() {
        let path = sock("a");
        let server = ApiServer::bind(&path, DmaSlot::default()).unwrap();
        let answer = server.answer("{\"cmd\":\"stat\"}");
        assert!(
            answer["region"].is_null() && answer["uptime_ms"].is_u64(),
            "{answer}"
        );
        assert!(summary(&answer).contains("not set up"));
        let e = server.answer("{\"cmd\":\"reboot\"}")["error"].to_string();
        assert!(e.contains("unknown command `reboot`"), "{e}");
        let e = server.answer("stat please")["error"].to_string();
        assert!(e.contains("not a JSON request"), "{e}");
        // The pin and migration commands need the DMA path, and say so.
        for cmd in ["pin-churn", "pin-longterm", "migrate", "unpin-longterm"] {
            let e = server.answer(&format!("{{\"cmd\":\"{cmd}\"}}"))["error"].to_string();
            assert!(e.contains("needs the DMA path"), "{cmd}: {e}");
        }
        assert_eq!(
            arg_u64(&json!({ "len": -1 }), "len", None).unwrap_err(),
            "\"len\" must be a non-negative integer, not -1"
        );
        assert_eq!(
            arg_u64(&json!({}), "gpa", None).unwrap_err(),
            "missing \"gpa\""
        );
        assert_eq!(arg_u64(&json!({}), "io_kib", Some(64)), Ok(64));
        // A second VMM on the same path is refused; the socket goes away with the server.
        assert!(matches!(
            ApiServer::bind(&path, DmaSlot::default()),
            Err(ApiError::InUse(_))
        ));
        drop(server);
        assert!(!path.exists());
    }

    #[test]
    fn client_round_trip_over_the_socket() {
        let path = sock("b");
        let server = ApiServer::bind(&path, DmaSlot::default()).unwrap();
        let client = {
            let path = path.clone();
            std::thread::spawn(move || request(&path, "stat"))
        };
        // Serve the one connection as the event loop would.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok((stream, _)) = server.listener.accept() {
                server.serve(stream);
                break;
            }
            assert!(Instant::now() < deadline, "the client never connected");
            std::thread::sleep(Duration::from_millis(10));
        }
        let v = client.join().unwrap().unwrap();
        assert!(v["uptime_ms"].is_u64());
        let e = request(&sock("nobody"), "stat").unwrap_err().to_string();
        assert!(e.contains("is `dmavisor run --api-sock"), "{e}");
    }
}

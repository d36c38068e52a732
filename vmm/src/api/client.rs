//! The control API's client side: `dmavisor api` and `dmavisor stat`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::types::{Request, StatReply};
use super::ApiError;

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
        return Err(protocol(
            e.as_str().map_or_else(|| e.to_string(), str::to_string),
        ));
    }
    Ok(v)
}

/// Asks for `stat`.
pub fn stat(path: &Path) -> Result<StatReply, ApiError> {
    let req = serde_json::to_value(Request::Stat).expect("a unit variant serializes");
    let v = send(path, &req)?;
    serde_json::from_value(v).map_err(|e| ApiError::Protocol {
        path: path.to_path_buf(),
        message: format!("the stat reply does not match this dmavisor's: {e}"),
    })
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / f64::from(1 << 20))
}

/// A readable summary of a `stat` reply.
pub fn summary(v: &StatReply) -> String {
    let mut out = format!("uptime: {} ms\n", v.uptime_ms);
    let (Some(r), Some(a), Some(l), Some(m), Some(p), Some(d)) = (
        &v.region,
        &v.allocator,
        &v.lending,
        &v.maps,
        &v.pins,
        &v.device,
    ) else {
        out.push_str(
            "DMA path: not set up (no DMA window, or the region is still being reserved)\n",
        );
        return out;
    };
    out += &format!(
        "region: {} {}, {} pages of {} bytes, contiguity {}, {} extent(s), largest {}\n",
        mib(r.size),
        r.backing,
        r.size / r.page_size.max(1),
        r.page_size,
        r.contiguity,
        r.extents.len(),
        mib(r.largest_extent),
    );
    out += &format!(
        "region backing: asked for {}, reserved in {} ms",
        r.requested, r.reserve_ms
    );
    for why in &r.passed_over {
        out += &format!("; passed over: {why}");
    }
    out.push('\n');
    out += &format!(
        "allocator: {} of {} frames allocated, {} occupied; {} allocations, {} frees; failures: {} too large, {} no room, {} pinned, {} deadline; {} migrated; alloc latency p50 {} ns, p99 {} ns\n",
        a.allocated_frames, a.frames, a.occupied_frames, a.allocs, a.frees,
        a.fail_too_large, a.fail_no_room, a.fail_all_pinned, a.fail_deadline,
        mib(a.bytes_migrated), a.alloc_latency_p50_ns, a.alloc_latency_p99_ns,
    );
    out += &format!(
        "lending: {} window pages: {} lent, {} mapped, {} in RAM, {} pinned long-term ({} of them in RAM), {} orphaned; {} moves ({} out of the region, {}); {} MAPs in place\n",
        l.pages, l.lent, l.mapped, l.ram, l.longterm_pinned, l.longterm_pinned_in_ram, l.orphans,
        l.moves, l.moves_out, mib(l.bytes_moved), l.claimed_in_place,
    );
    if let Some(io) = &v.iommu {
        out += &format!(
            "iommu: dma={}, {} window range(s) mapped ({}), {} mapped in all ({} pinned); {} maps, {} unmaps, mean {} us / {} us; {} refused\n",
            io.policy, io.ranges, mib(io.window_bytes), mib(io.total_bytes), mib(io.total_bytes),
            io.maps, io.unmaps, io.map_us_mean, io.unmap_us_mean, io.map_failures,
        );
    }
    let churn = match &p.churn {
        None => "no pin churn".to_string(),
        Some(c) => format!(
            "pin churn: {} pins, {} I/Os, pinned {:.0}% of the time",
            c.pins,
            c.ios,
            c.pinned_fraction * 100.0
        ),
    };
    out += &format!(
        "pins: {} taken, {} refused; {} long-term range(s), {} page(s) moved out for them; {churn}\n",
        p.pins_taken, p.pin_refusals, p.longterm_ranges, p.longterm_moved_out,
    );
    out += &format!(
        "host MAP latency: p50 {} us, p99 {} us, max {} us over {} MAPs ({} in place); bytes moved per MAP p99 {}; {} MAP(s) waited for a pin on their own frames\n",
        m.latency_us.p50, m.latency_us.p99, m.latency_us.max, m.count, m.in_place,
        mib(m.moved_bytes.p99), m.pin_waits,
    );
    out += &format!(
        "virtio-dma: window {:#x} + {}, granule {}; {} mapping(s), {}; MAP ok {}, failed {} (busy {}, timeout {}); UNMAP {}\n",
        d.window_base, mib(d.window_size), d.granule, d.mappings, mib(d.mapped_bytes),
        d.maps_ok, d.maps_failed, d.maps_busy, d.maps_timeout, d.unmaps,
    );
    if d.stalled {
        out += "virtio-dma: STALLED (dma-stall on=1): requests wait unanswered\n";
    }
    out
}

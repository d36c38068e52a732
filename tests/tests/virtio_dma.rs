//! The product's main path end to end: a guest program allocates buffers from the
//! `/dev/dma_heap/virtio-dma` heaps; the guest kernel runs its own `cma_alloc()` on the DMA
//! window and the virtio-dma driver asks dmavisor to MAP the range onto host-contiguous region
//! memory; buffers read back what was written; freeing sends UNMAP.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use integration_tests::{driven_script, run_shell, Boot, GuestRun};

const MIB: i64 = 1 << 20;

fn guest() -> &'static GuestRun {
    static RUN: OnceLock<GuestRun> = OnceLock::new();
    RUN.get_or_init(|| Boot::scenario("virtio-dma").run())
}

fn heap_result(g: &GuestRun, heap: &str, size: i64, count: i64) -> HashMap<String, String> {
    g.results()
        .into_iter()
        .find(|m| {
            m.get("heap").map(String::as_str) == Some(heap)
                && m.get("size") == Some(&size.to_string())
                && m.get("count") == Some(&count.to_string())
        })
        .unwrap_or_else(|| {
            panic!(
                "no result for {heap} {size}x{count}; console:\n{}",
                g.console
            )
        })
}

/// The device's counters and configuration as the guest driver reports them.
fn stats(g: &GuestRun) -> HashMap<String, i64> {
    let line = g
        .result("stats")
        .unwrap_or_else(|| panic!("no stats; console:\n{}", g.console));
    line.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| {
            let v = v
                .strip_prefix("0x")
                .map_or_else(|| v.parse().ok(), |h| i64::from_str_radix(h, 16).ok());
            v.map(|v| (k.to_string(), v))
        })
        .collect()
}

#[test]
fn heap_allocations_from_4k_to_16m_succeed_and_read_back() {
    let g = guest();
    assert_eq!(
        g.result("virtio_dma_heap").as_deref(),
        Some("present"),
        "console:\n{}",
        g.console
    );
    for heap in [
        "/dev/dma_heap/virtio-dma",
        "/dev/dma_heap/virtio-dma-failfast",
    ] {
        for size in [4096, 64 << 10, MIB, 16 * MIB] {
            let r = heap_result(g, heap, size, 8);
            assert_eq!(
                (r["ok"].as_str(), r["failed"].as_str()),
                ("8", "0"),
                "{heap} {size}: {r:?}"
            );
            assert_eq!(
                r["verify"], "ok",
                "{heap} {size}: zeroed and pattern read back"
            );
        }
    }
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
}

#[test]
fn window_exhaustion_is_a_clean_enomem() {
    let g = guest();
    let s = stats(g);
    // 1 MiB buffers share MAPped 2 MiB chunks, so the whole window holds them.
    let per_buffer = MIB;
    let r = heap_result(g, "/dev/dma_heap/virtio-dma", MIB, 80);
    let fit = s["window_size"] / per_buffer;
    assert_eq!(
        r["ok"],
        fit.to_string(),
        "every buffer that fits the window: {r:?}"
    );
    assert_eq!(r["failed"], (80 - fit).to_string());
    assert_eq!(r["errno"], "12", "ENOMEM");
}

#[test]
fn freeing_from_a_timer_callback_unmaps() {
    let g = guest();
    let before = g.number("timer_free_unmaps_before");
    assert_eq!(
        g.number("timer_free_unmaps_after"),
        before + 1,
        "console:\n{}",
        g.console
    );
}

#[test]
fn malformed_requests_get_their_status_and_others_keep_working() {
    let g = guest();
    let expect = [
        ("unknown_type", 1),
        ("map_bad_flags", 1),
        ("map_reserved_set", 1),
        ("map_outside_window", 2),
        ("map_past_window_end", 2),
        ("map_wrapping", 2),
        ("map_unaligned", 3),
        ("map_zero_len", 3),
        ("unmap_never_mapped", 9),
        ("unmap_bad_flags", 1),
        ("stat_with_args", 1),
        ("map_ok", 0),
        ("map_overlap", 8),
        ("unmap_wrong_len", 9),
        ("unmap_ok", 0),
        ("unmap_double", 9),
    ];
    for (case, status) in expect {
        let r = g
            .line_with("raw_case", case)
            .unwrap_or_else(|| panic!("no result for {case}; console:\n{}", g.console));
        assert_eq!(r["status"], status.to_string(), "{case}");
    }
    // The well-behaved workload right after the hostile one.
    let r = heap_result(g, "/dev/dma_heap/virtio-dma", MIB, 16);
    assert_eq!((r["ok"].as_str(), r["verify"].as_str()), ("16", "ok"));
    // Nothing left mapped but at most the one empty 2 MiB chunk the driver keeps for the next
    // small buffer, and the device's books agree with the driver's.
    let s = stats(g);
    assert!(s["mappings"] <= 1, "{s:?}");
    assert_eq!(s["mapped_bytes"], s["mappings"] * 2 * MIB, "{s:?}");
    assert_eq!(s["maps_ok"] - s["unmaps"], s["mappings"], "{s:?}");
    assert_eq!(g.number("buffers_left"), 0);
    assert_eq!(g.exit_code, Some(0), "the VMM survived it all");
}

#[test]
fn held_buffers_sit_at_distinct_host_contiguous_places() {
    let g = guest();
    // The first listing is of the four 2 MiB buffers held together (later ones list the
    // exhaustion test's buffers).
    let buffers: Vec<HashMap<String, String>> = g
        .results()
        .into_iter()
        .filter(|m| m.contains_key("host_addr"))
        .take(4)
        .collect();
    assert!(buffers.iter().all(|b| b["len"] == "2097152"), "{buffers:?}");
    assert_eq!(
        buffers.len(),
        4,
        "four held 2 MiB buffers listed; console:\n{}",
        g.console
    );
    assert_eq!(
        distinct_host_addrs(&buffers).len(),
        4,
        "distinct host placements: {buffers:?}"
    );
    for b in &buffers {
        if b["host"] == "phys" {
            // A host-physical address: the region's extents hold whole 2 MiB-aligned pages.
            assert_eq!(host_addr(b) % (2 << 20), 0, "{b:?}");
        }
    }
}

/// A listed buffer's host address (`host_addr=0x...` of the driver's debugfs `buffers`).
fn host_addr(b: &HashMap<String, String>) -> u64 {
    u64::from_str_radix(b["host_addr"].trim_start_matches("0x"), 16).unwrap()
}

/// The distinct host addresses of listed buffers, sorted.
fn distinct_host_addrs(buffers: &[HashMap<String, String>]) -> Vec<u64> {
    let mut addrs: Vec<u64> = buffers.iter().map(host_addr).collect();
    addrs.sort_unstable();
    addrs.dedup();
    addrs
}

#[test]
fn buffers_shorter_than_a_granule_are_mapped_at_their_own_size() {
    let g = guest();
    let r = heap_result(g, "/dev/dma_heap/virtio-dma", MIB, 6);
    assert_eq!(
        (r["ok"].as_str(), r["failed"].as_str(), r["verify"].as_str()),
        ("6", "0", "ok"),
        "{r:?}"
    );
    let s = stats(g);
    assert_eq!(s["granule"], 2 << 20, "a 2 MiB granule: {s:?}");
    // Each listed on a chunk of its own (not pooled), at distinct host places, two to a
    // granule at most.
    let own: Vec<HashMap<String, String>> = g
        .results()
        .into_iter()
        .filter(|m| m.contains_key("host_addr") && m["len"] == "1048576" && m["pooled"] == "0")
        .collect();
    assert_eq!(own.len(), 6, "console:\n{}", g.console);
    let addrs = distinct_host_addrs(&own);
    assert_eq!(addrs.len(), 6, "distinct host placements: {own:?}");
    assert!(addrs.iter().all(|a| a % MIB as u64 == 0), "{own:?}");
}

#[test]
fn larger_than_any_extent_is_toobig_on_the_host_and_enomem_in_the_guest() {
    // A 32M region behind a 64M window: its largest extent is at most 32M.
    let mut boot = Boot::scenario("virtio-dma-toobig");
    boot.extra = vec!["--region".into(), "size=32M".into()];
    let g = boot.run();
    let r = g
        .line_with("raw_case", "map_larger_than_extent")
        .unwrap_or_else(|| panic!("no TOOBIG case; console:\n{}", g.console));
    assert_eq!(r["status"], "4", "TOOBIG");
    let big = heap_result(&g, "/dev/dma_heap/virtio-dma", 48 * MIB, 1);
    assert_eq!(
        (big["ok"].as_str(), big["errno"].as_str()),
        ("0", "12"),
        "ENOMEM: {big:?}"
    );
    let small = heap_result(&g, "/dev/dma_heap/virtio-dma", MIB, 4);
    assert_eq!(small["ok"], "4", "smaller buffers still fine: {small:?}");
    assert_eq!(g.exit_code, Some(0));
}

/// The JSON reply of the last `api CMD` a driven script ran.
fn api_reply(g: &GuestRun, cmd: &str) -> serde_json::Value {
    api_replies(g, cmd)
        .pop()
        .unwrap_or_else(|| panic!("no `api {cmd}`; console:\n{}", g.console))
}

/// Every reply to `api {cmd}`, in order.
fn api_replies(g: &GuestRun, cmd: &str) -> Vec<serde_json::Value> {
    let prefix = format!("API {cmd} ");
    g.console
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(|line| {
            let json = line.split_once(" => ").map_or("", |(_, j)| j);
            serde_json::from_str(json).unwrap_or_else(|e| {
                panic!(
                    "`{line}` is not a JSON reply ({e}); console:\n{}",
                    g.console
                )
            })
        })
        .collect()
}

/// The guest's CMA area and the host's books are back where they started: the driver
/// returned every page (an idle chunk too, after idle_chunk_ms) and the host maps nothing.
fn assert_nothing_left(g: &GuestRun) {
    assert!(g.console.contains("VMM-RC=0"), "console:\n{}", g.console);
    for key in [
        "life_cma_free_start_kb",
        "life_cma_free_end_kb",
        "drained_ds",
        "end_stats",
    ] {
        println!("{key}={}", g.result(key).unwrap_or_default());
    }
    assert_eq!(
        g.number("life_cma_used_end"),
        g.number("life_cma_used_start"),
        "CMA pages in use (cma_alloc'd) before and after; console:\n{}",
        g.console
    );
    // The exact check is the one above (the CMA bitmap). CmaFree also counts movable pages of
    // other users that land in the area (tmpfs files, page tables; a suspend attempt syncs and
    // allocates too: -488 KiB seen once), so it only bounds a lost shared chunk (2048 KiB).
    let free_diff = g.number("life_cma_free_end_kb") - g.number("life_cma_free_start_kb");
    assert!(
        free_diff.abs() <= 1024,
        "CmaFree moved by {free_diff} KiB (movable pages may come and go; a shared chunk is 2048 KiB); console:\n{}",
        g.console
    );
    let end = stats_of(g, "end_stats");
    assert_eq!(end["chunks_live"], 0, "{end:?}");
    assert_eq!(end["withheld_pages"], 0, "{end:?}");
    assert_eq!(end["unmap_backlog"], 0, "{end:?}");
    assert_eq!(end["mappings"], 0, "the device's own count: {end:?}");
    let m = api_reply(g, "mappings");
    assert_eq!(
        m["mappings"].as_array().map(Vec::len),
        Some(0),
        "the host maps nothing: {m}"
    );
}

/// The result line with `key=value`: it got `ok` buffers, and every one read back its pattern.
fn assert_all_verified(g: &GuestRun, key: &str, value: &str, ok: &str, what: &str) {
    let r = g
        .line_with(key, value)
        .unwrap_or_else(|| panic!("no {key}={value}; console:\n{}", g.console));
    assert_eq!(
        (r["ok"].as_str(), r["verify"].as_str()),
        (ok, "ok"),
        "{what}: {r:?}"
    );
}

fn stats_of(g: &GuestRun, key: &str) -> HashMap<String, i64> {
    let line = g
        .result(key)
        .unwrap_or_else(|| panic!("no {key}; console:\n{}", g.console));
    line.split(',')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

#[test]
fn unbind_is_refused_with_buffers_live_and_10000_buffers_closed_at_once_leave_nothing() {
    let steps = "waitfor 'DMAVISOR-WAIT check'; api mappings; echo go >&3";
    let g = run_shell(
        &driven_script("virtio-dma-life", "64M", "size=64M", "", steps),
        Duration::from_secs(400),
    );
    // The heaps cannot be removed (Linux 6.12), so sysfs unbind is not offered at all.
    let u = g
        .line_with("unbind", "refused")
        .unwrap_or_else(|| panic!("unbind was not refused; console:\n{}", g.console));
    assert_eq!(u["still_bound"], "1", "{u:?}");
    assert_all_verified(
        &g,
        "many_heap",
        "/dev/dma_heap/virtio-dma",
        "4",
        "buffers held across the attempt",
    );
    let after = heap_result(&g, "/dev/dma_heap/virtio-dma", MIB, 2);
    assert_eq!(after["ok"], "2", "allocations after the attempt: {after:?}");
    let odd = g
        .results()
        .into_iter()
        .find(|r| r.get("size").map(String::as_str) == Some("3149824"))
        .unwrap_or_else(|| panic!("console:\n{}", g.console));
    assert_eq!(
        (odd["ok"].as_str(), odd["wrong_size"].as_str()),
        ("2", "0"),
        "exported at the length asked for (page-aligned), not whole granules: {odd:?}"
    );
    let many = g
        .results()
        .into_iter()
        .find(|r| r.get("count").map(String::as_str) == Some("10000"))
        .unwrap_or_else(|| panic!("console:\n{}", g.console));
    assert_eq!(
        (many["ok"].as_str(), many["verify"].as_str()),
        ("10000", "ok"),
        "{many:?}"
    );
    assert_nothing_left(&g);
}

#[test]
fn a_device_that_stops_answering_fails_allocations_in_time_and_loses_no_unmap() {
    let steps = "waitfor 'DMAVISOR-WAIT stall'; api dma-stall on=1; echo go >&3; \
                 waitfor 'DMAVISOR-WAIT unstall'; api dma-stall on=0; echo go >&3; \
                 waitfor 'DMAVISOR-WAIT check'; api mappings; echo go >&3";
    let g = run_shell(
        &driven_script("virtio-dma-stall", "384M", "size=384M", "", steps),
        Duration::from_secs(400),
    );
    assert!(g.console.contains("VMM-RC=0"), "console:\n{}", g.console);
    let stall = api_reply(&g, "dma-stall on=1");
    assert!(stall.get("error").is_none(), "{stall}");
    // The default deadline (1000 ms) plus the reply margin (1000 ms); failfast: the margin.
    for (key, lo, hi) in [("stalled", 1900, 6000), ("stalled_failfast", 900, 4000)] {
        let r = g
            .results()
            .into_iter()
            .find(|r| r.contains_key(key) && r.contains_key("many_heap"))
            .unwrap_or_else(|| panic!("no {key} result; console:\n{}", g.console));
        assert_eq!(
            (r["ok"].as_str(), r["errno"].as_str()),
            ("0", "110"),
            "ETIMEDOUT: {r:?}"
        );
        let ms: i64 = r["first_fail_ms"].parse().unwrap();
        assert!((lo..=hi).contains(&ms), "{key} failed after {ms} ms: {r:?}");
    }
    let k = g.line_with("killed_ended", "1").unwrap_or_else(|| {
        panic!(
            "a task waiting on the stalled device survived SIGKILL; console:\n{}",
            g.console
        )
    });
    assert!(k["killed_wait_ds"].parse::<i64>().unwrap() <= 10, "{k:?}");
    let holder = g
        .results()
        .into_iter()
        .find(|r| r.get("count").map(String::as_str) == Some("150"))
        .unwrap_or_else(|| panic!("console:\n{}", g.console));
    assert_eq!(
        (holder["ok"].as_str(), holder["verify"].as_str()),
        ("150", "ok")
    );
    // The UNMAPs that did not fit the ring waited for room instead of being dropped.
    let stalled = stats_of(&g, "stalled_stats");
    assert!(stalled["unmap_backlog_max"] >= 1, "{stalled:?}");
    // A suspend with requests unanswered is refused; the UNMAPs it held back go out after
    // (assert_nothing_left below).
    let s = g
        .line_with("stalled_suspend", "refused")
        .unwrap_or_else(|| panic!("a suspend was not refused; console:\n{}", g.console));
    assert!(s["stalled_suspend_stats"].contains(",suspends=0,"), "{s:?}");
    let end = stats_of(&g, "end_stats");
    assert!(end["abandoned"] >= 2, "{end:?}");
    // MAPs that found mapq full waited for room, and every one succeeded once the device
    // answered again (before, they failed at once with ENOSPC).
    let q = g
        .line_with("queued_maps_ok", "140")
        .unwrap_or_else(|| panic!("not every queued MAP succeeded; console:\n{}", g.console));
    assert_eq!(q["queued_maps_enospc"], "0", "{q:?}");
    assert!(end["ring_full_waits"] >= 1, "{end:?}");
    assert_nothing_left(&g);
}

#[test]
fn removed_by_its_transport_the_heaps_stay_and_buffers_stay_usable() {
    let g = Boot::scenario("virtio-dma-remove").run();
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
    assert!(
        g.result("heaps").is_some_and(|h| h.contains("virtio-dma,")),
        "the heaps outlive the device; console:\n{}",
        g.console
    );
    let removed = g
        .line_with("removed", "1")
        .unwrap_or_else(|| panic!("console:\n{}", g.console));
    assert_eq!(
        (removed["ok"].as_str(), removed["errno"].as_str()),
        ("0", "19"),
        "ENODEV without a device: {removed:?}"
    );
    assert_all_verified(
        &g,
        "many_heap",
        "/dev/dma_heap/virtio-dma",
        "4",
        "buffers held across the removal",
    );
    assert_eq!(g.result("rebound").as_deref(), Some("1"));
    assert_all_verified(&g, "after_rebind", "1", "2", "allocations after the rebind");
}

/// The kernel's own dma-buf heap selftest (tools/testing/selftests/dmabuf-heaps, built from the
/// guest's tree) passes on every heap of the guest, both virtio-dma heaps among them.
#[test]
fn the_kernels_dmabuf_heap_selftest_passes_on_both_virtio_dma_heaps() {
    let g = Boot::scenario("dmabuf-selftest").run();
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
    let r = g
        .results()
        .into_iter()
        .find(|r| r.contains_key("selftest_rc"))
        .unwrap_or_else(|| panic!("no selftest result; console:\n{}", g.console));
    let num = |k: &str| -> u64 {
        r.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {r:?}; console:\n{}", g.console))
    };
    assert_eq!(num("fail"), 0, "console:\n{}", g.console);
    assert_eq!(num("error"), 0, "{r:?}");
    assert_eq!(r["selftest_rc"], "0", "{r:?}");
    // Each heap's section ran its tests, and the virtio-dma heaps' passed.
    for heap in ["virtio-dma", "virtio-dma-failfast"] {
        let section: Vec<&str> = g
            .console
            .lines()
            .skip_while(|l| !l.contains(&format!("Testing heap: {heap}")))
            .skip(1)
            .take_while(|l| !l.contains("Testing heap:"))
            .filter(|l| l.contains("SELFTEST ok ") || l.contains("SELFTEST not ok "))
            .collect();
        assert!(
            !section.is_empty(),
            "{heap} was tested; console:\n{}",
            g.console
        );
        assert!(
            section.iter().all(|l| l.contains("SELFTEST ok ")),
            "{heap}: {section:?}"
        );
        println!("{heap}: {} selftest results, all ok", section.len());
    }
    println!("totals: {r:?}");
}

/// The guest ranges the host maps, per `api mappings`, sorted.
fn mapped_ranges(m: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = m["mappings"]
        .as_array()
        .unwrap_or_else(|| panic!("not a mappings reply: {m}"))
        .iter()
        .map(|x| (x["gpa"].as_u64().unwrap(), x["len"].as_u64().unwrap()))
        .collect();
    ranges.sort_unstable();
    ranges
}

/// System sleep with buffers live: the driver's freeze resets the device (the host ends every
/// mapping) and its restore MAPs every live chunk again, at the same guest addresses and with
/// the buffers' contents kept. Without freeze/restore the driver's queues are gone after the
/// resume and the host maps nothing.
#[test]
fn a_suspend_and_resume_keeps_live_buffers_mapped_with_their_contents() {
    let steps = "waitfor 'DMAVISOR-WAIT suspend'; api mappings; echo go >&3; \
                 waitfor 'DMAVISOR-WAIT resumed'; api mappings; echo go >&3; \
                 waitfor 'DMAVISOR-WAIT check'; api mappings; echo go >&3";
    let g = run_shell(
        &driven_script("virtio-dma-suspend", "64M", "size=64M", "", steps),
        Duration::from_secs(400),
    );
    assert_eq!(
        g.result("suspend").as_deref(),
        Some("ok"),
        "console:\n{}",
        g.console
    );
    let before = stats_of(&g, "before_suspend");
    let after = stats_of(&g, "after_suspend");
    println!("before: {before:?}\nafter: {after:?}");
    // 4 x 1 MiB on two shared 2 MiB chunks, 2 x 4 MiB on chunks of their own, and an empty
    // shared chunk kept for reuse.
    assert_eq!(
        (before["mappings"], before["idle_chunk"]),
        (5, 1),
        "{before:?}"
    );
    assert_eq!(after["suspends"], 1, "{after:?}");
    assert_eq!(
        (after["remaps"], after["remaps_failed"]),
        (4, 0),
        "every live chunk MAPped again: {after:?}"
    );
    assert_eq!(
        (after["mappings"], after["idle_chunk"]),
        (4, 0),
        "the device's own count; the empty chunk went back to CMA, not MAPped again: {after:?}"
    );
    assert_eq!(g.number("buffers_after"), g.number("buffers_before"));
    let replies = api_replies(&g, "mappings");
    assert_eq!(replies.len(), 3, "console:\n{}", g.console);
    let (b, a) = (mapped_ranges(&replies[0]), mapped_ranges(&replies[1]));
    assert_eq!((b.len(), a.len()), (5, 4), "before {b:?}, after {a:?}");
    assert!(
        a.iter().all(|r| b.contains(r)),
        "the host maps the live buffers' guest ranges again: before {b:?}, after {a:?}"
    );
    assert_all_verified(&g, "after_resume", "1", "2", "allocations after the resume");
    for size in ["1048576", "4194304"] {
        let held = g
            .results()
            .into_iter()
            .find(|r| {
                r.contains_key("many_heap") && r.get("size").map(String::as_str) == Some(size)
            })
            .unwrap_or_else(|| panic!("no holder of {size}; console:\n{}", g.console));
        assert_eq!(
            (held["failed"].as_str(), held["verify"].as_str()),
            ("0", "ok"),
            "contents written before the suspend read back after it: {held:?}"
        );
    }
    assert_nothing_left(&g);
}

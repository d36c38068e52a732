//! VFIO passthrough end to end: a real PCI device (QEMU's `edu` behind the sandbox host's
//! emulated Intel IOMMU, `resources/sandbox/run.sh --vfio edu`; on a host that runs guests
//! directly, the device `DMAVISOR_VFIO_DEVICE` names) is passed through to a guest, whose own
//! PCI core enumerates it and whose driver (resources/guest/driver/edu_dma.c) has it DMA between
//! dma-buf buffers that virtio-dma placed on the host region, through the host IOMMU.
//!
//! With `dma=mapped` the IOMMU maps exactly the ranges the guest MAPped: a DMA anywhere else,
//! and to a range after its UNMAP, is stopped by the host IOMMU and changes no guest byte.

use std::collections::HashMap;
use std::time::Duration;

use integration_tests::{
    driven_script_with, guest_initramfs, guest_kernel, run_shell_vfio, vfio_host, GuestRun,
};
use serde_json::Value;

fn host_or_skip(what: &str) -> Option<integration_tests::VfioHost> {
    match vfio_host() {
        Ok(h) => Some(h),
        Err(why) => {
            println!("{what}: not run: {why}");
            None
        }
    }
}

fn n(m: &HashMap<String, String>, key: &str) -> u64 {
    let v = m
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {m:?}"))
        .as_str();
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
}

/// The one result line with `key`, merged with nothing else.
fn result_with(g: &GuestRun, key: &str) -> HashMap<String, String> {
    let r: Vec<_> = g
        .results()
        .into_iter()
        .filter(|r| r.contains_key(key))
        .collect();
    assert_eq!(r.len(), 1, "one result with {key}; console:\n{}", g.console);
    r.into_iter().next().unwrap()
}

fn json_after(g: &GuestRun, prefix: &str) -> Value {
    let line = g
        .console
        .lines()
        .rev()
        .find_map(|l| l.split_once(prefix).map(|(_, j)| j.to_string()))
        .unwrap_or_else(|| panic!("no {prefix:?} line; console:\n{}", g.console));
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{prefix}: {e}: {line}"))
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("{v} is not a number"))
}

/// What every error case printed: `CASE name rc=N: last line of dmavisor's output`.
fn cases(g: &GuestRun) -> HashMap<String, (i32, String)> {
    g.console
        .lines()
        .filter_map(|l| l.strip_prefix("CASE "))
        .filter_map(|l| {
            let (head, msg) = l.split_once(": ")?;
            let (name, rc) = head.split_once(" rc=")?;
            Some((name.to_string(), (rc.parse().ok()?, msg.to_string())))
        })
        .collect()
}

fn case_script(cases: &[(&str, String)]) -> String {
    let k = guest_kernel();
    let i = guest_initramfs();
    let mut s = String::new();
    for (name, dev) in cases {
        s += &format!(
            "out=$(dmavisor run --kernel {} --initrd {} --memory size=256M --dma-window size=32M \
             --device {dev} --cmdline 'console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=info' 2>&1); \
             rc=$?; echo \"CASE {name} rc=$rc: $(echo \"$out\" | grep -m1 '^error:')\"; ",
            k.display(),
            i.display()
        );
    }
    s
}

#[test]
fn device_errors_say_what_is_wrong_and_how_to_fix_it() {
    let Some(h) = host_or_skip("VFIO error cases") else {
        return;
    };
    let (Some(non_viable), Some(other)) = (h.non_viable.clone(), h.other_driver.clone()) else {
        println!("VFIO error cases: not run: only the sandbox stages them");
        return;
    };
    let mut steps = case_script(&[
        ("missing", "vfio=/sys/bus/pci/devices/0000:00:1e.0".into()),
        ("other-driver", format!("vfio={other}")),
        ("not-viable", format!("vfio={non_viable}")),
    ]);
    // Busy: a first VM holds the device; a second asks for it.
    steps += &format!(
        "dmavisor run --kernel {k} --initrd {i} --memory size=256M --dma-window size=32M --device vfio={d} \
         --cmdline 'console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=echo-input' >/tmp/first.out 2>&1 </dev/null & first=$!; \
         n=0; until grep -q DMAVISOR-READY-FOR-INPUT /tmp/first.out || [ $n -gt 600 ]; do sleep 0.2; n=$((n+1)); done; \
         echo FIRST-PID=$first; ",
        k = guest_kernel().display(),
        i = guest_initramfs().display(),
        d = h.device
    );
    steps += &case_script(&[("busy", format!("vfio={}", h.device))]);
    steps += "kill $first; wait $first; ";
    let g = run_shell_vfio(&steps, Duration::from_secs(420), "edu");
    let c = cases(&g);
    let get = |name: &str| {
        c.get(name)
            .cloned()
            .unwrap_or_else(|| panic!("no case {name}; console:\n{}", g.console))
    };
    let (rc, msg) = get("missing");
    assert_eq!(rc, 1, "{msg}");
    assert!(
        msg.contains("no such PCI device") && msg.contains("ls /sys/bus/pci/devices"),
        "{msg}"
    );
    let (rc, msg) = get("other-driver");
    assert_eq!(rc, 1, "{msg}");
    assert!(
        msg.contains("bound to serial, not vfio-pci")
            && msg.contains("driver_override")
            && msg.contains("drivers_probe"),
        "the message says which driver and the echo that binds it: {msg}"
    );
    let (rc, msg) = get("not-viable");
    assert_eq!(rc, 1, "{msg}");
    assert!(
        msg.contains("not viable") && msg.contains("0000:01:02.0 (bound to serial)"),
        "the message names the other devices of the group: {msg}"
    );
    let first_pid = g
        .console
        .lines()
        .find_map(|l| l.strip_prefix("FIRST-PID="))
        .expect("the first VM started");
    let (rc, msg) = get("busy");
    assert_eq!(rc, 1, "{msg}");
    assert!(
        msg.contains("in use by another process") && msg.contains(&format!("pid {first_pid}")),
        "the message names the VM that holds the device: {msg}"
    );

    // No IOMMU: the same devices, the host booted without one.
    let g = run_shell_vfio(
        &case_script(&[("no-iommu", format!("vfio={}", h.device))]),
        Duration::from_secs(300),
        "noiommu",
    );
    let c = cases(&g);
    let (rc, msg) = c
        .get("no-iommu")
        .cloned()
        .unwrap_or_else(|| panic!("no case; console:\n{}", g.console));
    assert_eq!(rc, 1, "{msg}");
    assert!(
        msg.contains("no IOMMU") && msg.contains("intel_iommu=on"),
        "{msg}"
    );
}

/// Boots the `vfio` (or another) scenario with the device passed through on 2 MiB pages in the
/// sandbox's `edu` mode, with a control socket for `steps` (see `driven_script_with`); the VMM
/// must have exited 0.
fn run_with_device(
    scenario: &str,
    window: &str,
    device: &str,
    cmdline: &str,
    steps: &str,
    secs: u64,
) -> GuestRun {
    let g = run_shell_vfio(
        &driven_script_with(
            scenario,
            window,
            "backing=hugetlb",
            &format!("--device {device}"),
            cmdline,
            steps,
        ),
        Duration::from_secs(secs),
        "edu",
    );
    assert!(g.console.contains("VMM-RC=0"), "console:\n{}", g.console);
    g
}

/// The `vfio` scenario with the device (`device`: `vfio=PATH[,dma=...]`) behind a 64M window.
fn run_vfio_scenario(device: &str, cmdline: &str, steps: &str, secs: u64) -> GuestRun {
    run_with_device("vfio", "64M", device, cmdline, steps, secs)
}

/// The guest's view of the device and of its DMA, from the `vfio` scenario's result lines.
fn assert_enumerated_and_live(g: &GuestRun) {
    assert_enumerated_and_live_with(g, 1)
}

/// Same, with `msi` MSI vectors in use (0: the driver uses the INTx line).
fn assert_enumerated_and_live_with(g: &GuestRun, msi: u64) {
    let dev = g
        .results()
        .into_iter()
        .find(|r| r.get("vendor").map(String::as_str) == Some("0x1234"))
        .unwrap_or_else(|| {
            panic!(
                "the guest enumerated no edu device; console:\n{}",
                g.console
            )
        });
    assert_eq!(dev["device"], "0x11e8", "{dev:?}");
    assert_eq!(
        dev["driver"], "edu-dma",
        "the guest's driver bound: {dev:?}"
    );
    assert_eq!(n(&dev, "msi_irqs"), msi, "{dev:?}");
    let info = g
        .results()
        .into_iter()
        .find(|r| r.contains_key("edu_ident"))
        .expect("edu info");
    // The identification register (major.minor, 0xed) and liveness, read through the BAR.
    assert_eq!(n(&info, "edu_ident") & 0xff, 0xed, "{info:?}");
    assert_eq!(info["edu_live"], "ok", "{info:?}");
    assert_eq!(
        info["edu_msi_selftest"], "ok",
        "an interrupt raised through the BAR arrived: {info:?}"
    );
}

fn assert_round_trips(g: &GuestRun, min: u64) -> HashMap<String, String> {
    let rt = result_with(g, "edu_roundtrips");
    println!(
        "round trips: {} ({} bytes) in {} ms; mismatches {}, timeouts {}, errors {}",
        rt["edu_roundtrips"],
        rt["edu_bytes"],
        rt["edu_ms"],
        rt["edu_mismatches"],
        rt["edu_timeouts"],
        rt["edu_errors"]
    );
    assert!(n(&rt, "edu_roundtrips") >= min, "{rt:?}");
    assert_eq!(
        n(&rt, "edu_roundtrips"),
        n(&rt, "edu_cases") * n(&rt, "edu_passes"),
        "{rt:?}"
    );
    for k in [
        "edu_mismatches",
        "edu_timeouts",
        "edu_errors",
        "edu_bad_bytes",
        "edu_bus_wrong",
        "edu_skipped",
    ] {
        assert_eq!(n(&rt, k), 0, "{k}: {rt:?}\nconsole:\n{}", g.console);
    }
    // Every size the device supports: 1 byte up to its 4 KiB buffer (less the odd offsets).
    assert!(n(&rt, "edu_max_len") >= 4095, "{rt:?}");
    rt
}

#[test]
fn the_device_dmas_only_into_mapped_buffers_byte_for_byte() {
    let Some(h) = host_or_skip("VFIO DMA") else {
        return;
    };
    // dma=mapped on 2 MiB pages, with host pin churn and forced migrations on the rest of the
    // window while the device copies between virtio-dma buffers, under memory-heavy load.
    let steps = "api pin-churn io_kib=64 hold_us=200; waitfor 'DMAVISOR-WAIT vfio-roundtrip'; \
                 echo \"STAT-BEFORE $(dmavisor stat --api-sock $sock --json)\"; echo go >&3; \
                 for i in 1 2 3 4 5 6; do api migrate frames=4; sleep 1; done; \
                 waitfor edu_roundtrips; echo \"STAT-AFTER $(dmavisor stat --api-sock $sock --json)\"; \
                 waitfor vfio_done";
    let g = run_vfio_scenario(
        &format!("vfio={}", h.device),
        "dmavisor.vfio_wait=1 dmavisor.iterations=3 dmavisor.load=auto",
        steps,
        600,
    );
    assert_enumerated_and_live(&g);
    assert_round_trips(&g, 90);
    // The rest of the window kept moving while the device was attached.
    let migrations: Vec<&str> = g
        .console
        .lines()
        .filter(|l| l.starts_with("API migrate "))
        .collect();
    assert_eq!(migrations.len(), 6, "console:\n{}", g.console);
    let moved: u64 = migrations
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l.split_once(" => ").unwrap().1).ok())
        .filter_map(|v| v["moved"].as_u64())
        .sum();
    assert!(
        moved > 0,
        "forced migrations moved lent pages: {migrations:?}"
    );
    let before = json_after(&g, "STAT-BEFORE ");
    assert_eq!(before["iommu"]["policy"], "mapped", "{before}");
    let after = json_after(&g, "STAT-AFTER ");
    let io = &after["iommu"];
    assert!(u(&io["maps"]) >= 1, "{after}");
    assert_eq!(io["map_failures"], 0, "{after}");
    // Only MAPped ranges are DMA-able: what the IOMMU maps is what the device has mapped.
    assert_eq!(
        u(&io["total_bytes"]),
        u(&io["window_bytes"]),
        "no guest RAM in the IOMMU: {after}"
    );
    assert!(
        u(&io["total_bytes"]) <= u(&after["device"]["mapped_bytes"]),
        "{after}"
    );
    assert!(
        u(&after["lending"]["lent"]) > 0,
        "lending stays on: {after}"
    );
    assert!(
        u(&after["pins"]["churn"]["pins"]) > 0,
        "pin churn ran: {after}"
    );

    // A DMA to guest RAM that no MAP covers is stopped by the host IOMMU: not one byte moved.
    let blocked = result_with(&g, "edu_blocked_changed");
    assert_eq!(n(&blocked, "edu_blocked_changed"), 0, "{blocked:?}");
    assert_eq!(n(&blocked, "edu_blocked_now_src"), 0, "{blocked:?}");
    // The control: the same raw DMA into a mapped buffer lands whole; after the buffer's UNMAP
    // (which takes it out of the IOMMU first), the same address is blocked.
    let mapped = result_with(&g, "edu_mapped_changed");
    assert_eq!(
        n(&mapped, "edu_mapped_now_src"),
        n(&blocked, "edu_raw_len"),
        "{mapped:?}"
    );
    let after_unmap = result_with(&g, "edu_after_unmap_changed");
    assert_eq!(
        n(&after_unmap, "edu_after_unmap_changed"),
        0,
        "{after_unmap:?}"
    );
    assert!(
        n(&after_unmap, "edu_unmaps_after") > n(&after_unmap, "edu_unmaps_before"),
        "the buffer was UNMAPped before the DMA: {after_unmap:?}"
    );
    // The host IOMMU reported both blocked writes (the sandbox kernel's DMAR log).
    if integration_tests::mode() == integration_tests::Mode::Sandbox {
        for addr in [
            &blocked["edu_blocked_phys"],
            &after_unmap["edu_after_unmap_phys"],
        ] {
            let a = u64::from_str_radix(addr.trim_start_matches("0x"), 16).unwrap();
            assert!(
                g.console.contains(&format!("fault addr {a:#x}")),
                "a DMAR fault at {a:#x}; console:\n{}",
                g.console
            );
        }
    }
}

#[test]
fn seed001_with_the_device_attached_has_no_failed_loops_and_lending_stays_on() {
    let Some(h) = host_or_skip("seed 001 with a VFIO device") else {
        return;
    };
    let steps = "api pin-churn io_kib=64 hold_us=200; waitfor 'DMAVISOR-WAIT loaded'; echo go >&3; \
                 waitfor 'DMAVISOR-WAIT done'; echo \"STAT-DONE $(dmavisor stat --api-sock $sock --json)\"; echo go >&3";
    let g = run_with_device(
        "seed001",
        "56M",
        &format!("vfio={},dma=mapped", h.device),
        "dmavisor.seconds=15",
        steps,
        420,
    );
    let ours = &integration_tests::seed001_virtio_dma_run(&g);
    assert_eq!(n(ours, "failed_loops"), 0, "{ours:?}");
    let stat = json_after(&g, "STAT-DONE ");
    let io = &stat["iommu"];
    assert_eq!(io["policy"], "mapped", "{stat}");
    assert!(u(&io["maps"]) > 0, "every MAP went into the IOMMU: {stat}");
    assert_eq!(io["map_failures"], 0, "{stat}");
    assert_eq!(u(&io["total_bytes"]), u(&io["window_bytes"]), "{stat}");
    // Lending stays on: the window's pages are on region frames, and every MAP claimed its
    // pages' own frames in place and gave them back at UNMAP.
    assert!(u(&stat["lending"]["lent"]) > 0, "lending stays on: {stat}");
    assert!(u(&stat["lending"]["claimed_in_place"]) > 0, "{stat}");
    assert!(u(&stat["lending"]["returned_in_place"]) > 0, "{stat}");
    assert!(
        u(&stat["pins"]["churn"]["pins"]) > 0,
        "pin churn ran: {stat}"
    );
}

#[test]
fn dma_all_maps_all_guest_memory_and_nothing_moves() {
    let Some(h) = host_or_skip("VFIO dma=all") else {
        return;
    };
    let steps = "waitfor 'DMAVISOR-WAIT vfio-roundtrip'; api migrate frames=2; \
                 echo \"STAT-ALL $(dmavisor stat --api-sock $sock --json)\"; echo go >&3; waitfor vfio_done";
    let g = run_vfio_scenario(
        &format!("vfio={},dma=all", h.device),
        "dmavisor.vfio_wait=1 dmavisor.vfio_steps=pci,info,roundtrip,blocked",
        steps,
        420,
    );
    assert_enumerated_and_live(&g);
    assert_round_trips(&g, 30);
    let stat = json_after(&g, "STAT-ALL ");
    let io = &stat["iommu"];
    assert_eq!(io["policy"], "all", "{stat}");
    // 256M of RAM and the 64M window: everything, pinned.
    assert_eq!(u(&io["total_bytes"]), (256 + 64) << 20, "{stat}");
    assert_eq!(u(&stat["lending"]["moves"]), 0, "nothing moves: {stat}");
    let migrate = g
        .console
        .lines()
        .find(|l| l.starts_with("API migrate "))
        .expect("migrate asked");
    assert!(
        migrate.contains("dma=all"),
        "forced migration is refused with the reason: {migrate}"
    );
    assert!(
        g.console.contains("lending is off"),
        "the log says lending is off and why"
    );
    // The contrast with dma=mapped: here the device reaches any guest page.
    let blocked = result_with(&g, "edu_blocked_changed");
    assert!(
        n(&blocked, "edu_blocked_now_src") > 0,
        "with dma=all a DMA to ordinary guest RAM lands: {blocked:?}"
    );
}

#[test]
fn intx_carries_the_interrupts_of_a_guest_driver_without_msi() {
    let Some(h) = host_or_skip("VFIO INTx") else {
        return;
    };
    // The guest's driver takes the legacy line (edu_dma.intx=1): the MP table routes the
    // device's INTA to an IOAPIC pin, VFIO signals it, KVM resamples it at the guest's EOI.
    let steps = "waitfor vfio_done";
    let g = run_vfio_scenario(
        &format!("vfio={}", h.device),
        "edu_dma.intx=1 dmavisor.vfio_steps=pci,info,roundtrip",
        steps,
        420,
    );
    assert!(g.console.contains("INTx IRQ"), "console:\n{}", g.console);
    assert_enumerated_and_live_with(&g, 0);
    let rt = assert_round_trips(&g, 30);
    let info = g
        .results()
        .into_iter()
        .rfind(|r| r.contains_key("edu_interrupts"))
        .expect("edu info after the round trips");
    // One interrupt per transfer (two per round trip) and the self-test's, none lost.
    assert!(
        n(&info, "edu_interrupts") > 2 * n(&rt, "edu_roundtrips"),
        "{info:?}"
    );
}

#[test]
fn an_importer_with_4k_dma_segments_takes_virtio_dma_buffers() {
    let Some(h) = host_or_skip("VFIO small DMA segments") else {
        return;
    };
    // edu_dma.max_seg_kib=4: the device takes DMA segments of at most 4 KiB, and its driver
    // refuses a dma-buf mapping with a longer one. virtio-dma exports one sg entry per page,
    // as the kernel's CMA heap does, so a 4 MiB buffer maps as 1024 segments.
    let steps = "waitfor vfio_done";
    let g = run_vfio_scenario(
        &format!("vfio={}", h.device),
        "edu_dma.max_seg_kib=4 dmavisor.vfio_steps=pci,info,roundtrip,after-unmap",
        steps,
        420,
    );
    assert_round_trips(&g, 30);
    let mapped = result_with(&g, "edu_big_segments");
    assert_eq!(n(&mapped, "edu_big_size"), 4 << 20, "{mapped:?}");
    assert_eq!(n(&mapped, "edu_big_segments"), 1024, "{mapped:?}");
    assert!(n(&mapped, "edu_mapped_now_src") > 0, "{mapped:?}");
}

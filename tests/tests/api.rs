//! The control API: a running VMM answers `dmavisor stat` with its region, allocator and
//! virtio-dma state, while the guest holds buffers.

use std::time::Duration;

use integration_tests::{guest_initramfs, guest_kernel, run_shell};

/// A shell script that starts dmavisor with its control API and a guest holding three 4 MiB
/// virtio-dma buffers, waits until the guest holds them, then runs `then` (with `$vmm`, `$sock`
/// and `$out` set), and finally prints dmavisor's output.
fn while_guest_holds_buffers(then: &str) -> String {
    format!(
        "out=/tmp/dmavisor-api-test.out; sock=/tmp/dmavisor-api-test.sock; rm -f $out $sock; \
         dmavisor run --api-sock $sock --kernel {k} --initrd {i} \
           --cmdline 'console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=api-probe' >$out 2>&1 & \
         vmm=$!; n=0; until grep -q holding= $out || [ $n -gt 1200 ]; do sleep 0.1; n=$((n+1)); done; \
         {then}; cat $out",
        k = guest_kernel().display(),
        i = guest_initramfs().display(),
    )
}

#[test]
fn stat_reports_the_buffers_a_guest_holds() {
    let script = while_guest_holds_buffers(
        "dmavisor stat --api-sock $sock; echo \"STAT-JSON $(dmavisor stat --api-sock $sock --json)\"; \
         wait $vmm; echo \"VMM-RC=$?\"",
    );
    let g = run_shell(&script, Duration::from_secs(150));
    assert!(g.console.contains("holding=3"), "console:\n{}", g.console);
    let json_line = g
        .console
        .lines()
        .find_map(|l| l.split_once("STAT-JSON ").map(|(_, j)| j.to_string()))
        .unwrap_or_else(|| panic!("no stat reply; console:\n{}", g.console));
    let v: serde_json::Value = serde_json::from_str(&json_line).expect("stat --json is JSON");
    let mib = 1u64 << 20;
    assert_eq!(v["device"]["mappings"], 3, "{v}");
    assert_eq!(v["device"]["mapped_bytes"], 12 * mib, "{v}");
    assert_eq!(v["region"]["size"], 64 * mib, "{v}");
    let granule = v["allocator"]["granule"].as_u64().expect("granule");
    assert_eq!(
        v["allocator"]["allocated_frames"],
        12 * mib / granule,
        "{v}"
    );
    // The rest of the region is lent to the window's other pages.
    assert_eq!(
        v["lending"]["lent"].as_u64().unwrap() * granule,
        64 * mib - 12 * mib,
        "{v}"
    );
    assert!(
        g.console.contains("virtio-dma: window 0x20000000"),
        "summary:\n{}",
        g.console
    );
    assert!(
        g.console.contains("3 mapping(s), 12.0 MiB"),
        "summary:\n{}",
        g.console
    );
    assert!(g.console.contains("VMM-RC=0"), "console:\n{}", g.console);
}

#[test]
fn sigterm_stops_the_vmm_cleanly() {
    let script = while_guest_holds_buffers(
        "kill -TERM $vmm; wait $vmm; echo \"VMM-RC=$?\"; \
         if [ -e $sock ]; then echo SOCKET-LEFT; else echo SOCKET-REMOVED; fi",
    );
    let g = run_shell(&script, Duration::from_secs(150));
    assert!(g.console.contains("holding=3"), "console:\n{}", g.console);
    assert!(
        g.console.contains("VMM-RC=143"),
        "128 + SIGTERM; console:\n{}",
        g.console
    );
    assert!(
        g.console.contains("SOCKET-REMOVED"),
        "console:\n{}",
        g.console
    );
}

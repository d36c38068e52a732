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

fn kv(line: &str) -> HashMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
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

//! Device requirements of docs/virtio-dma.md that need a guest with the real driver (the others
//! are unit tests in devices/src/virtio/dma/requirements.rs; the spec's §11 lists them all):
//! host-physical addresses reach the guest only when the host enables `VIRTIO_DMA_F_HOST_PHYS`
//! and knows them. The guest holds three 4 MiB buffers (`api-probe`) and lists where the host
//! says they are (the driver's debugfs `buffers`: `host=phys` when the MAP response had
//! `VIRTIO_DMA_RESP_HOST_PHYS`, `host=region-offset` otherwise).

use std::collections::HashMap;

use integration_tests::{Boot, GuestRun};

const MIB: u64 = 1 << 20;

fn held_buffers(region: Option<&str>) -> (GuestRun, Vec<HashMap<String, String>>) {
    let mut boot = Boot::scenario("api-probe");
    if let Some(r) = region {
        boot.extra = vec!["--region".into(), r.into()];
    }
    let g = boot.run();
    let buffers: Vec<_> = g
        .results()
        .into_iter()
        .filter(|m| m.contains_key("host_addr"))
        .collect();
    assert_eq!(
        buffers.len(),
        3,
        "three held buffers listed; console:\n{}",
        g.console
    );
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
    (g, buffers)
}

fn host_addr(b: &HashMap<String, String>) -> u64 {
    u64::from_str_radix(b["host_addr"].trim_start_matches("0x"), 16).unwrap()
}

/// Offsets in the 64 MiB region, not host-physical addresses.
fn assert_region_offsets(buffers: &[HashMap<String, String>]) {
    for b in buffers {
        assert_eq!(b["host"], "region-offset", "{b:?}");
        assert!(
            host_addr(b) + 4 * MIB <= 64 * MIB,
            "an offset in the region: {b:?}"
        );
    }
}

#[test]
fn guest_sees_no_host_physical_address_without_host_phys() {
    // The default: whatever the region knows, the guest learns only offsets.
    let (_, buffers) = held_buffers(None);
    assert_region_offsets(&buffers);
}

#[test]
fn host_phys_on_is_not_offered_for_a_region_of_unknown_addresses() {
    // A memfd region is not physically contiguous and its frames are not known: asking for
    // host-phys changes nothing.
    let (_, buffers) = held_buffers(Some("backing=memfd,host-phys=on"));
    assert_region_offsets(&buffers);
}

#[test]
fn host_phys_on_gives_the_guest_host_physical_addresses_of_a_known_region() {
    // 2 MiB huge pages, whose frames the VMM reads from pagemap (as root).
    let (g, buffers) = held_buffers(Some("backing=hugetlb,host-phys=on"));
    let mut addrs = Vec::new();
    for b in &buffers {
        assert_eq!(b["host"], "phys", "{b:?}; console:\n{}", g.console);
        let a = host_addr(b);
        // Each buffer is a whole 4 MiB chunk on 2 MiB huge pages.
        assert_eq!(a % (2 * MIB), 0, "{b:?}");
        assert!(a >= 64 * MIB, "not a region offset: {b:?}");
        addrs.push(a);
    }
    addrs.sort_unstable();
    addrs.dedup();
    assert_eq!(addrs.len(), 3, "distinct places: {buffers:?}");
}

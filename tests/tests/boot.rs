//! Boots real Linux guests under dmavisor and checks what the guest itself reported.

use std::sync::OnceLock;

use integration_tests::{root, Boot, GuestRun};

const KIB: i64 = 1024;
const MIB: i64 = 1024 * KIB;

/// One guest, booted with non-default settings (from a TOML config file plus a flag), that
/// the `info` tests share: 2 vCPUs, 384M of RAM, a 48M DMA window.
fn info_guest() -> &'static GuestRun {
    static RUN: OnceLock<GuestRun> = OnceLock::new();
    RUN.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("dmavisor-boot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("vm.toml");
        let boot = Boot::scenario("info");
        std::fs::write(
            &config,
            format!(
                "kernel = {:?}\ninitrd = {:?}\ncmdline = \"console=ttyS0 reboot=k panic=-1 quiet dmavisor.scenario=info\"\n\
                 [memory]\nsize = \"384M\"\n[dma_window]\nsize = \"48M\"\n",
                integration_tests::guest_kernel(),
                integration_tests::guest_initramfs(),
            ),
        )
        .unwrap();
        let args = vec![
            "run".to_string(),
            "--config".to_string(),
            config.display().to_string(),
            "--cpus".to_string(),
            "2".to_string(),
        ];
        let run = integration_tests::run_dmavisor(&args, boot.timeout);
        let _ = std::fs::remove_dir_all(&dir);
        run
    })
}

#[test]
fn guest_sees_every_vcpu() {
    let g = info_guest();
    assert_eq!(g.number("cpus"), 2, "console:\n{}", g.console);
    assert_eq!(g.result("online").as_deref(), Some("0-1"));
}

#[test]
fn guest_memory_is_the_size_asked_plus_the_window() {
    let g = info_guest();
    // e820 RAM: everything asked for except the legacy hole [0x9fc00, 1M), plus the window.
    let legacy_hole = MIB - 0x9fc00;
    assert_eq!(
        g.number("e820_usable_bytes"),
        384 * MIB - legacy_hole + 48 * MIB,
        "console:\n{}",
        g.console
    );
    let total_kb = g.number("mem_total_kb");
    assert!(
        total_kb > (384 + 48 - 40) * 1024 && total_kb <= (384 + 48) * 1024,
        "MemTotal {total_kb} kB is not about 432M minus the kernel image"
    );
}

#[test]
fn guest_cma_area_is_exactly_the_dma_window() {
    let g = info_guest();
    assert_eq!(
        g.number("cma_total_kb"),
        48 * 1024,
        "console:\n{}",
        g.console
    );
    assert_eq!(g.number("cma_pages"), 48 * MIB / 4096);
    // The window sits right after RAM (384M, 2M aligned): pfn 384M / 4K.
    assert_eq!(g.number("cma_base_pfn"), 384 * MIB / 4096);
}

#[test]
fn guest_reboot_ends_vmm_with_status_zero() {
    let g = info_guest();
    assert!(
        g.console.contains("DMAVISOR-DONE scenario=info"),
        "console:\n{}",
        g.console
    );
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
}

#[test]
fn guest_gets_entropy_from_the_virtio_rng_device() {
    // The virtio-mmio path end to end: probe from the command line, queue notify through an
    // ioeventfd, the event loop fills the buffer, the irqfd tells the guest.
    let g = info_guest();
    assert_eq!(
        g.result("rng").as_deref(),
        Some("virtio_rng.0"),
        "console:\n{}",
        g.console
    );
    assert_eq!(g.number("rng_bytes"), 1024);
    assert!(
        g.number("rng_distinct") > 200,
        "1024 random bytes take most of the 256 values"
    );
}

#[test]
fn guest_finds_the_virtio_dma_device_with_a_window() {
    let g = info_guest();
    let ids = g.result("virtio_ids").unwrap_or_default();
    assert!(
        ids.contains("0x0004") && ids.contains("0x003c"),
        "virtio IDs {ids:?}; console:\n{}",
        g.console
    );
}

#[test]
fn guest_allocates_and_frees_through_its_own_cma() {
    let g = Boot::scenario("cma-alloc").run();
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
    assert_eq!(
        g.result("debugfs_alloc").as_deref(),
        Some("ok"),
        "console:\n{}",
        g.console
    );
    let pages = g.number("pages");
    let before = g.number("cma_free_before_kb");
    assert_eq!(before, 64 * 1024, "the whole window is free at first");
    assert_eq!(
        g.number("cma_free_during_kb"),
        before - pages * 4,
        "cma_alloc took exactly the pages asked"
    );
    assert_eq!(g.number("cma_used_pages"), pages);
    // CmaFree lags behind frees parked on per-CPU lists; the area's own count does not.
    assert_eq!(
        g.number("cma_used_after_pages"),
        0,
        "cma_release gave everything back"
    );
    // The standard dma-buf heap over the same area: zeroed buffers, pattern reads back.
    let heap = g
        .line_with("heap", "/dev/dma_heap/reserved")
        .unwrap_or_else(|| panic!("no heap result; console:\n{}", g.console));
    assert_eq!(heap["ok"], "8");
    assert_eq!(heap["failed"], "0");
    assert_eq!(heap["verify"], "ok");
}

#[test]
fn guest_kernel_panic_ends_vmm_with_status_three() {
    let g = Boot::scenario("panic").run();
    assert!(
        g.console.contains("Kernel panic - not syncing"),
        "console:\n{}",
        g.console
    );
    assert!(
        g.console.contains("the guest kernel panicked"),
        "console:\n{}",
        g.console
    );
    assert_eq!(g.exit_code, Some(3), "console:\n{}", g.console);
}

#[test]
fn console_input_reaches_the_guest() {
    let boot = Boot::scenario("echo-input");
    let input = integration_tests::ConsoleInput {
        after: "DMAVISOR-READY-FOR-INPUT",
        text: "hello-from-the-host-stdin\n",
    };
    let g = integration_tests::run_dmavisor_with_input(&boot.args(), Some(input), boot.timeout);
    assert_eq!(
        g.result("input").as_deref(),
        Some("hello-from-the-host-stdin"),
        "console:\n{}",
        g.console
    );
    assert_eq!(g.exit_code, Some(0));
}

#[test]
fn elf_vmlinux_boots_through_pvh() {
    let vmlinux = root().join("target/guest/linux/vmlinux");
    assert!(
        vmlinux.exists(),
        "{} is not built: resources/build-guest.sh builds it with the bzImage",
        vmlinux.display()
    );
    let mut boot = Boot::scenario("info");
    boot.kernel = vmlinux;
    let g = boot.run();
    assert_eq!(g.exit_code, Some(0), "console:\n{}", g.console);
    assert_eq!(
        g.number("cma_total_kb"),
        64 * 1024,
        "console:\n{}",
        g.console
    );
}

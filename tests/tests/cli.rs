//! Mistakes on the command line get a message that says what was wrong and how to fix it.
//! These run the binary on the host: every check here happens before KVM is touched, except
//! the last, which checks what this host's KVM itself gets.

use std::process::{Command, Output};

use integration_tests::{dmavisor_bin, guest_kernel};

fn dmavisor(args: &[&str]) -> Output {
    Command::new(dmavisor_bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running dmavisor")
}

fn fails_saying(args: &[&str], needles: &[&str]) {
    let out = dmavisor(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "dmavisor {args:?} succeeded");
    for n in needles {
        assert!(
            stderr.contains(n),
            "dmavisor {args:?}: expected {n:?} in:\n{stderr}"
        );
    }
}

#[test]
fn missing_kernel_file() {
    fails_saying(
        &["run", "--kernel", "/nonexistent/bzImage"],
        &["/nonexistent/bzImage", "does not exist", "build-guest.sh"],
    );
}

#[test]
fn no_kernel_at_all() {
    fails_saying(&["run"], &["no guest kernel", "--kernel PATH"]);
}

#[test]
fn bad_size_strings() {
    let k = guest_kernel();
    let k = k.to_str().unwrap();
    fails_saying(
        &["run", "--kernel", k, "--memory", "size=12Q"],
        &["--memory", "\"12Q\"", "512M"],
    );
    fails_saying(
        &["run", "--kernel", k, "--memory", "sise=1G"],
        &["unknown key `sise`", "size=SIZE"],
    );
    fails_saying(
        &["run", "--kernel", k, "--dma-window", "size=lots"],
        &["--dma-window", "\"lots\""],
    );
    fails_saying(
        &["run", "--kernel", k, "--memory", "size=1M"],
        &["too small", "32M"],
    );
}

#[test]
fn window_larger_than_allowed_or_misaligned() {
    let k = guest_kernel();
    let k = k.to_str().unwrap();
    fails_saying(
        &["run", "--kernel", k, "--dma-window", "size=128G"],
        &["larger than allowed", "64G"],
    );
    fails_saying(
        &["run", "--kernel", k, "--dma-window", "size=3M"],
        &["multiple of 2M", "try 4M"],
    );
}

#[test]
fn bad_region_option() {
    let k = guest_kernel();
    let k = k.to_str().unwrap();
    fails_saying(
        &["run", "--kernel", k, "--region", "backing=gold"],
        &["`gold`", "auto, dma-heap, hugetlb-1g, hugetlb, memfd"],
    );
    fails_saying(
        &["run", "--kernel", k, "--region", "backing=hugetlb-1g"],
        &["hugetlb-1g", "whole GiBs", "--dma-window size=1G"],
    );
    fails_saying(
        &["run", "--kernel", k, "--region", "size=3M"],
        &["--region size=3M", "multiple of 2M"],
    );
    fails_saying(
        &["run", "--kernel", k, "--region", "colour=red"],
        &["colour=red", "size=SIZE,backing="],
    );
}

#[test]
fn bad_cpu_count_and_config_file() {
    let k = guest_kernel();
    let k = k.to_str().unwrap();
    fails_saying(
        &["run", "--kernel", k, "--cpus", "0"],
        &["--cpus 0", "between 1 and"],
    );
    fails_saying(
        &["run", "--kernel", k, "--cpus", "many"],
        &["--cpus", "many"],
    );
    fails_saying(
        &["run", "--config", "/nonexistent/vm.toml"],
        &["/nonexistent/vm.toml", "cannot read"],
    );
    let bad = std::env::temp_dir().join(format!("dmavisor-cli-{}.json", std::process::id()));
    std::fs::write(&bad, r#"{"kernel": "/k", "cpu": 2}"#).unwrap();
    fails_saying(
        &["run", "--config", bad.to_str().unwrap()],
        &["not valid JSON", "cpu"],
    );
    let _ = std::fs::remove_file(&bad);
}

#[test]
fn kvm_that_cannot_run_the_guest_is_named() {
    let k = guest_kernel();
    // No KVM at all, on any host: point dmavisor at a device that does not exist.
    let out = std::process::Command::new(integration_tests::dmavisor_bin())
        .args(["run", "--kernel", k.to_str().unwrap()])
        .env("DMAVISOR_KVM", "/nonexistent/kvm")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
    assert!(
        stderr.contains("/nonexistent/kvm does not exist")
            && stderr.contains("resources/sandbox/run.sh"),
        "names the device and the sandbox path:\n{stderr}"
    );
    // This host's own KVM: PVM (as on the build machines) is refused, naming PVM; a KVM that
    // can run guests is checked by the boot tests, which run here directly then.
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        let out = dmavisor(&["run", "--kernel", k.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "stderr:\n{stderr}");
        assert!(
            stderr.contains("PVM") && stderr.contains("resources/sandbox/run.sh"),
            "says PVM plainly:\n{stderr}"
        );
    }
}

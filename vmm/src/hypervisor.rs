//! Opening KVM, and telling the user plainly when this host's KVM cannot run our guests.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// Where the README explains running dmavisor inside the sandbox host.
pub const SANDBOX_HINT: &str = "run it inside the sandbox host instead: resources/sandbox/run.sh -- dmavisor run --kernel ... (README: \"Hosts without hardware virtualization\")";

#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{0} does not exist: this host has no KVM. Load kvm-intel or kvm-amd on a CPU with VT-x/AMD-V, or {SANDBOX_HINT}")]
    Missing(String),
    #[error("cannot open /dev/kvm: permission denied; run dmavisor as root or add your user to the `kvm` group")]
    PermissionDenied,
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("this host's /dev/kvm is PVM (the kvm_pvm module on a CPU without vmx/svm): it runs only PVM-enlightened guest kernels, and a stock Linux guest hangs when it enters long mode; {SANDBOX_HINT}. Set DMAVISOR_ALLOW_PVM=1 to try anyway.")]
    Pvm,
    #[error("/dev/kvm is missing a capability dmavisor needs: {0:?}")]
    MissingCapability(Cap),
}

/// True when the host's KVM is the paravirtual PVM flavour rather than hardware KVM.
pub fn host_kvm_is_pvm() -> bool {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return true;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_hw_virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    !has_hw_virt
}

/// The KVM device: `/dev/kvm`, or `DMAVISOR_KVM` where set (a KVM device node elsewhere, e.g.
/// in a container; tests point it at a missing path to check the message).
fn kvm_path() -> String {
    std::env::var("DMAVISOR_KVM").unwrap_or_else(|_| "/dev/kvm".into())
}

/// Opens KVM and checks that it can run a stock Linux guest with the capabilities we use.
pub fn open() -> Result<Kvm, HypervisorError> {
    let path = kvm_path();
    if !Path::new(&path).exists() {
        return Err(HypervisorError::Missing(path));
    }
    let cpath =
        std::ffi::CString::new(path.clone()).map_err(|_| HypervisorError::Missing(path.clone()))?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::EACCES | libc::EPERM => HypervisorError::PermissionDenied,
        libc::ENOENT | libc::ENODEV | libc::ENXIO => HypervisorError::Missing(path.clone()),
        _ => HypervisorError::Open(e),
    })?;
    if host_kvm_is_pvm() && std::env::var_os("DMAVISOR_ALLOW_PVM").is_none() {
        return Err(HypervisorError::Pvm);
    }
    for cap in [
        Cap::Irqchip,
        Cap::Irqfd,
        Cap::Ioeventfd,
        Cap::Pit2,
        Cap::UserMemory,
    ] {
        if !kvm.check_extension(cap) {
            return Err(HypervisorError::MissingCapability(cap));
        }
    }
    Ok(kvm)
}

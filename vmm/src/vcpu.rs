//! vCPUs: each runs on its own thread, dispatching port and MMIO exits to the buses and
//! reporting how the guest ended through the VM's exit signal.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::guest_memory::MoveGate;
use devices::Bus;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::boot::BootEntry;
use crate::arch::x86_64::{cpuid, regs};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042 or a KVM reset event): a reboot, our "power off".
    Reset,
    /// The guest's CPU shut down (triple fault).
    TripleFault { vcpu: u8 },
    /// KVM could not run the vCPU.
    VcpuError { vcpu: u8, message: String },
    /// The VMM was asked to stop (SIGTERM, SIGINT or SIGHUP).
    Signal(i32),
}

/// How vCPUs and devices tell the VMM's main thread that the VM is over. The first reason
/// given wins; a bare write to the eventfd (the i8042's) means `Reset`.
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    pub fn signal(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.get_or_insert(reason);
        if let Err(e) = self.evt.write(1) {
            tracing::error!("signalling VM exit: {e}");
        }
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub fn take_reason(&self) -> ExitReason {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        r.take().unwrap_or(ExitReason::Reset)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("creating vCPU {id}: {source}")]
    Create { id: u8, source: kvm_ioctls::Error },
    #[error("KVM_SET_CPUID2 on vCPU {id}: {source}")]
    Cpuid { id: u8, source: kvm_ioctls::Error },
    #[error("setting up vCPU {id} registers: {source}")]
    Regs { id: u8, source: regs::RegsError },
    #[error("starting the thread of vCPU {id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
}

/// A configured vCPU, ready to run.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` of `count` and sets its CPUID, MSRs, registers and local APIC.
    pub fn new(
        vm: &VmFd,
        supported_cpuid: &CpuId,
        id: u8,
        count: u8,
        boot: BootEntry,
    ) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let mut cpuid = supported_cpuid.clone();
        cpuid::for_vcpu(&mut cpuid, id, count);
        fd.set_cpuid2(&cpuid)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        let r = |source| VcpuError::Regs { id, source };
        regs::setup_msrs(&fd).map_err(r)?;
        regs::setup_regs(&fd, boot.mode, boot.entry).map_err(r)?;
        regs::setup_sregs(&fd, boot.mode).map_err(r)?;
        regs::setup_fpu(&fd).map_err(r)?;
        regs::setup_lint(&fd).map_err(r)?;
        Ok(Self { id, fd })
    }

    /// Runs the vCPU on its own thread until the guest stops it. `gate` tells it when a write
    /// fault came from a guest page the VMM is moving (it then waits and re-enters).
    pub fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
        gate: Arc<MoveGate>,
    ) -> Result<JoinHandle<()>, VcpuError> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(&pio, &mmio, &exit, &gate))
            .map_err(|source| VcpuError::Spawn { id, source })
    }

    /// What is known when the guest triple-faults (KVM_EXIT_SHUTDOWN): the last exception KVM
    /// recorded (SVM re-initialises the VMCB on shutdown, so the registers are the reset state
    /// and not worth printing) and how recently this vCPU re-entered after a write to a page the
    /// VMM was moving: the facts that tell a page changed under the guest from a guest bug.
    fn report_triple_fault(&self, move_retries: u64, last_retry: Option<std::time::Instant>) {
        let id = self.id;
        let since = last_retry.map_or("never".to_string(), |t| {
            format!("{} ms ago", t.elapsed().as_millis())
        });
        let exception = match self.fd.get_vcpu_events() {
            Ok(e) if e.exception.has_error_code != 0 => format!(
                "vector {} error code {:#x}",
                e.exception.nr, e.exception.error_code
            ),
            Ok(e) => format!("vector {}", e.exception.nr),
            Err(e) => format!("unknown ({e})"),
        };
        tracing::error!(
            "vcpu{id} triple fault: last exception {exception}; re-entries after a write to a \
             page being moved: {move_retries}, the last {since}"
        );
    }

    fn run(mut self, pio: &Bus, mmio: &Bus, exit: &ExitSignal, gate: &MoveGate) {
        let id = self.id;
        let mut moves_seen = 0;
        // Re-entries after a write hit a page being moved: how many, and the last one.
        let mut move_retries = 0u64;
        let mut last_retry: Option<std::time::Instant> = None;
        loop {
            match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        // Nothing there: an open bus reads as all ones.
                        data.fill(0xff);
                    }
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        tracing::debug!("vcpu{id}: MMIO read at {addr:#x} hits no device");
                        data.fill(0);
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        tracing::debug!("vcpu{id}: MMIO write at {addr:#x} hits no device");
                    }
                }
                Ok(VcpuExit::Shutdown) => {
                    self.report_triple_fault(move_retries, last_retry);
                    exit.signal(ExitReason::TripleFault { vcpu: id });
                    return;
                }
                Ok(VcpuExit::SystemEvent(kind, _)) => {
                    tracing::info!("vcpu{id}: system event {kind}");
                    exit.signal(ExitReason::Reset);
                    return;
                }
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel irqchip HLT is handled by KVM; seeing it means the
                    // guest halted with interrupts off for good.
                    exit.signal(ExitReason::VcpuError {
                        vcpu: id,
                        message: "guest halted with no way to wake up".into(),
                    });
                    return;
                }
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    exit.signal(ExitReason::VcpuError {
                        vcpu: id,
                        message: format!(
                            "KVM entry failed: hardware reason {reason:#x} on host cpu {cpu}"
                        ),
                    });
                    return;
                }
                Ok(VcpuExit::InternalError) => {
                    exit.signal(ExitReason::VcpuError {
                        vcpu: id,
                        message: "KVM internal error (emulation failure)".into(),
                    });
                    return;
                }
                Ok(other) => {
                    exit.signal(ExitReason::VcpuError {
                        vcpu: id,
                        message: format!("unexpected vCPU exit {other:?}"),
                    });
                    return;
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                // A write to a window page while the VMM moves it (the page is read-only
                // for the copy): wait for the move, then retry the instruction.
                Err(e) if e.errno() == libc::EFAULT && gate.wait_moves(&mut moves_seen) => {
                    move_retries += 1;
                    last_retry = Some(std::time::Instant::now());
                }
                Err(e) => {
                    exit.signal(ExitReason::VcpuError {
                        vcpu: id,
                        message: format!("KVM_RUN: {e}"),
                    });
                    return;
                }
            }
        }
    }
}

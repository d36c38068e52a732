//! Assembling a VM from its configuration and running it until the guest stops.

use std::io::{self, Read, Stdout};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use devices::legacy::{I8042Reset, PanicWatch, SerialConsole, I8042_BASE, I8042_LEN};
use devices::virtio::rng::Rng;
use devices::virtio::MmioTransport;
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use linux_loader::loader::Cmdline;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiServer, TestCommands};
use crate::arch::x86_64::layout::{
    GuestLayout, CMDLINE_MAX_SIZE, COM1_IRQ, COM1_PORT, KVM_TSS_ADDRESS,
};
use crate::arch::x86_64::{boot, mptable, regs};
use crate::config::{ByteSize, VmConfig};
use crate::devices::{DeviceError, DeviceManager};
use crate::dma::{self, DmaError, DmaSlot};
use crate::hypervisor::{self, HypervisorError};
use crate::memory::{self, MemoryError};
use crate::vcpu::{ExitReason, ExitSignal, Vcpu, VcpuError};
use devices::guest_memory::GuestMemoryHandle;
use devices::worker::Worker;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error("KVM_{op}: {source}")]
    Kvm {
        op: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Dma(#[from] DmaError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("creating an eventfd: {0}")]
    EventFd(io::Error),
    #[error(transparent)]
    Vfio(#[from] crate::vfio::VfioError),
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// How the VM ended, as the process reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmOutcome {
    pub reason: ExitReason,
    /// The guest kernel printed a panic before it stopped.
    pub guest_panicked: bool,
}

impl VmOutcome {
    /// The process exit status: 0 for a clean guest reboot/power-off, 3 for a guest kernel
    /// panic, 4 for a triple fault, 5 for a vCPU that KVM could not run, 128 + N when stopped
    /// by signal N. (1 is a VMM error and 2 a command-line usage error.)
    pub fn exit_code(&self) -> i32 {
        match (&self.reason, self.guest_panicked) {
            (ExitReason::Signal(n), _) => 128 + n,
            (_, true) => 3,
            (ExitReason::Reset, false) => 0,
            (ExitReason::TripleFault { .. }, false) => 4,
            (ExitReason::VcpuError { .. }, false) => 5,
        }
    }
}

type Console = SerialConsole<PanicWatch<Stdout>>;
type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A VM, built and ready to start.
pub struct Vm {
    _kvm: Kvm,
    vm: Arc<VmFd>,
    // Passed-through devices: their VFIO files and IOMMU domain live as long as the VM.
    _passthrough: Option<crate::vfio::Passthrough>,
    // Keeps the guest mappings alive: KVM's memory slots point into them.
    _mem: GuestMemoryMmap,
    vcpus: Vec<Vcpu>,
    devices: DeviceManager,
    events: EventManager<Subscriber>,
    console: Arc<Mutex<Console>>,
    exit: Arc<ExitSignal>,
    panicked: Arc<AtomicBool>,
    dma: DmaSlot,
    guest: GuestMemoryHandle,
    stop_signals: Option<StopSignals>,
}

impl Vm {
    pub fn build(config: &VmConfig) -> Result<Self, VmError> {
        let started = std::time::Instant::now();
        // Stop signals become an orderly exit (terminal restored, API socket removed). They are
        // blocked before any other thread exists, so only the signalfd sees them.
        let stop_signals = StopSignals::new()
            .inspect_err(|e| tracing::warn!("stop signals will end dmavisor abruptly: {e}"))
            .ok();
        let kvm = hypervisor::open()?;
        tracing::debug!(elapsed = ?started.elapsed(), "KVM opened");
        let vm = Arc::new(kvm.create_vm().map_err(kvm_err("CREATE_VM"))?);
        tracing::debug!(elapsed = ?started.elapsed(), "VM created");
        vm.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).map_err(kvm_err("CREATE_PIT2"))?;
        tracing::debug!(elapsed = ?started.elapsed(), "irqchip and PIT created");

        let layout = GuestLayout::new(config.memory.size.0, config.dma_window.size.0);
        let mem = memory::create(&layout)?;
        memory::advise_huge_pages(&mem);
        memory::register(&vm, &mem)?;
        tracing::info!(?layout, elapsed = ?started.elapsed(), "guest memory mapped");

        let mut cmdline =
            Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| VmError::Cmdline(e.to_string()))?;
        cmdline
            .insert_str(config.base_cmdline())
            .map_err(|e| VmError::Cmdline(format!("{:?}: {e}", config.base_cmdline())))?;
        if let Some((base, size)) = layout.dma_window {
            // The guest's CMA area is exactly the window.
            let cma = format!("cma={}@{base:#x}", ByteSize(size));
            cmdline
                .insert_str(&cma)
                .map_err(|e| VmError::Cmdline(format!("{cma}: {e}")))?;
        }

        let exit = Arc::new(ExitSignal::new().map_err(VmError::EventFd)?);
        let panicked = Arc::new(AtomicBool::new(false));
        let mut devices = DeviceManager::new();
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        let console = Arc::new(Mutex::new(SerialConsole::new(
            serial_irq.try_clone().map_err(VmError::EventFd)?,
            PanicWatch::new(io::stdout(), panicked.clone()),
        )));
        devices.add_pio(
            &vm,
            console.clone(),
            COM1_PORT,
            8,
            Some((&serial_irq, COM1_IRQ)),
        )?;
        let reset = exit.eventfd().try_clone().map_err(VmError::EventFd)?;
        devices.add_pio(
            &vm,
            Arc::new(Mutex::new(I8042Reset::new(reset))),
            I8042_BASE,
            I8042_LEN,
            None,
        )?;

        let events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
        // Devices get guest memory only through the move gate.
        let guest = GuestMemoryHandle::new(mem.clone());
        let rng = Rng::new().map_err(VmError::EventFd)?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::EventFd)?;
        let transport = MmioTransport::new(rng, guest.clone(), irq).map_err(VmError::EventFd)?;
        devices.add_virtio_mmio(&vm, &mut cmdline, transport)?;
        // A PCI bus the guest finds through config mechanism #1, with passed-through devices.
        let router = Arc::new(crate::irq::GsiRouter::new(vm.clone()));
        let mut pci = devices::pci::PciBus::new();
        let passthrough = crate::vfio::Passthrough::attach(
            &vm,
            &router,
            &mut devices,
            &mut pci,
            &config.devices,
            &mem,
            layout.dma_window,
        )?;
        devices.add_pio(
            &vm,
            Arc::new(Mutex::new(pci)),
            devices::pci::PCI_CONFIG_IO_BASE,
            devices::pci::PCI_CONFIG_IO_LEN,
            None,
        )?;
        let dma_slot = match layout.dma_window {
            Some(window) => dma::attach_device(
                &vm,
                &mut devices,
                &mut cmdline,
                &guest,
                window,
                config.region.clone(),
                passthrough.as_ref().map(|p| p.attachment()),
            )?,
            None => DmaSlot::default(),
        };

        let entry = boot::load(
            &mem,
            &layout,
            &config.kernel,
            config.initrd.as_deref(),
            &cmdline,
        )?;
        tracing::info!(?entry, cmdline = ?cmdline.as_cstring().ok(), elapsed = ?started.elapsed(), "kernel loaded");
        let intx = passthrough.as_ref().map_or(&[][..], |p| &p.intx[..]);
        mptable::setup(&mem, config.cpus, intx)?;
        regs::write_boot_tables(&mem, entry.mode)?;

        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let vcpus = (0..config.cpus)
            .map(|id| Vcpu::new(&vm, &supported, id, config.cpus, entry))
            .collect::<Result<Vec<_>, _>>()?;
        tracing::info!(elapsed = ?started.elapsed(), "VM built");

        Ok(Self {
            _kvm: kvm,
            vm,
            _passthrough: passthrough,
            _mem: mem,
            vcpus,
            devices,
            events,
            console,
            exit,
            panicked,
            dma: dma_slot,
            guest,
            stop_signals,
        })
    }

    /// Starts the vCPUs and serves the console until the guest stops. The control API on
    /// `api_sock` is served on its own worker, so no command can stall the console, signals
    /// or the exit.
    pub fn run(
        self,
        api_sock: Option<&std::path::Path>,
        test_commands: TestCommands,
    ) -> Result<VmOutcome, VmError> {
        let _vm = self.vm;
        let pio = Arc::new(self.devices.pio);
        let mmio = Arc::new(self.devices.mmio);
        let mut manager = self.events;
        let _api = match api_sock {
            Some(path) => {
                let server = ApiServer::bind(path, self.dma.clone(), test_commands)?;
                Some(Worker::spawn("api", server).map_err(VmError::EventFd)?)
            }
            None => None,
        };
        let stop = Arc::new(Mutex::new(ExitWatcher {
            evt: self.exit.eventfd().try_clone().map_err(VmError::EventFd)?,
            fired: false,
        }));
        manager.add_subscriber(stop.clone());
        if let Some(signals) = self.stop_signals {
            manager.add_subscriber(Arc::new(Mutex::new(signals.with_exit(self.exit.clone()))));
        }
        let _raw = RawTerminal::enter();
        manager.add_subscriber(Arc::new(Mutex::new(StdinToConsole {
            console: self.console.clone(),
        })));

        for vcpu in self.vcpus {
            vcpu.start(
                pio.clone(),
                mmio.clone(),
                self.exit.clone(),
                self.guest.gate().clone(),
            )?;
        }
        while !stop.lock().unwrap_or_else(|e| e.into_inner()).fired {
            manager
                .run()
                .map_err(|e| VmError::EventLoop(format!("{e:?}")))?;
        }
        let outcome = VmOutcome {
            reason: self.exit.take_reason(),
            guest_panicked: self.panicked.load(Ordering::SeqCst),
        };
        tracing::info!(?outcome, "VM stopped");
        Ok(outcome)
    }
}

/// SIGTERM, SIGINT and SIGHUP, read from a signalfd in the event loop.
struct StopSignals {
    fd: std::fs::File,
    exit: Option<Arc<ExitSignal>>,
}

const STOP_SIGNALS: [i32; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

impl StopSignals {
    fn new() -> io::Result<Self> {
        // SAFETY: an all-zero sigset_t is a valid value to hand to sigemptyset.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame; the calls only write into it and
        // change this thread's mask, which threads spawned later inherit.
        let fd = unsafe {
            libc::sigemptyset(&mut set);
            for sig in STOP_SIGNALS {
                libc::sigaddset(&mut set, sig);
            }
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(Self { fd, exit: None })
    }

    fn with_exit(mut self, exit: Arc<ExitSignal>) -> Self {
        self.exit = Some(exit);
        self
    }
}

impl MutEventSubscriber for StopSignals {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        if let Ok(n) = (&self.fd).read(&mut info) {
            if n == info.len() {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
                tracing::info!("stopping on signal {signo}");
                if let Some(exit) = &self.exit {
                    exit.signal(ExitReason::Signal(signo));
                }
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            tracing::error!("watching stop signals: {e:?}");
        }
    }
}

struct ExitWatcher {
    evt: EventFd,
    fired: bool,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.fired = true;
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("watching the VM exit eventfd: {e:?}");
        }
    }
}

/// Forwards the VMM's standard input to the guest console. A closed or non-pollable stdin
/// (CI, `</dev/null`) simply means no input.
struct StdinToConsole {
    console: Arc<Mutex<Console>>,
}

impl MutEventSubscriber for StdinToConsole {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        let n = if events.event_set().contains(EventSet::IN) {
            io::stdin().lock().read(&mut buf).unwrap_or(0)
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop watching, the guest keeps running without input.
            let _ = ops.remove(events);
            return;
        }
        let mut console = self.console.lock().unwrap_or_else(|e| e.into_inner());
        if console.queue_input(&buf[..n]) < n {
            tracing::warn!("guest console input buffer full; input dropped");
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let stdin = io::stdin();
        if let Err(e) = ops.add(Events::new(&stdin, EventSet::IN)) {
            tracing::debug!(
                "stdin (fd {}) cannot be polled ({e:?}); the guest console has no input",
                stdin.as_raw_fd()
            );
        }
    }
}

/// Puts a terminal stdin in raw mode so keystrokes reach the guest, and restores it on drop.
struct RawTerminal(bool);

impl RawTerminal {
    fn enter() -> Self {
        use vmm_sys_util::terminal::Terminal;
        let stdin = io::stdin();
        Self(stdin.is_terminal_raw() && stdin.lock().set_raw_mode().is_ok())
    }
}

trait IsTerminalRaw {
    fn is_terminal_raw(&self) -> bool;
}

impl IsTerminalRaw for io::Stdin {
    fn is_terminal_raw(&self) -> bool {
        std::io::IsTerminal::is_terminal(self)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use vmm_sys_util::terminal::Terminal;
        if self.0 {
            let _ = io::stdin().lock().set_canon_mode();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_tell_outcomes_apart() {
        let code = |reason, guest_panicked| {
            VmOutcome {
                reason,
                guest_panicked,
            }
            .exit_code()
        };
        assert_eq!(code(ExitReason::Reset, false), 0);
        assert_eq!(code(ExitReason::Reset, true), 3);
        assert_eq!(code(ExitReason::TripleFault { vcpu: 0 }, false), 4);
        let err = ExitReason::VcpuError {
            vcpu: 1,
            message: "x".into(),
        };
        assert_eq!(code(err, false), 5);
        assert_eq!(code(ExitReason::Signal(libc::SIGTERM), false), 143);
    }
}

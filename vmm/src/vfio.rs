//! PCI passthrough with VFIO: a host PCI device bound to `vfio-pci`, on the guest's PCI bus.
//!
//! - Config space is the device's own (read and written through VFIO, which already
//!   virtualizes the parts a user must not touch), except the BARs, which this module places
//!   like firmware does and emulates (sizing included), the expansion ROM (hidden), and MSI-X
//!   (hidden from the capability list: the guest uses MSI).
//! - BARs that VFIO lets us mmap become KVM memory slots at their guest address, so the guest
//!   reaches the device's registers without exits; the rest are trapped and forwarded.
//! - MSI: the guest's writes to the MSI capability go to VFIO (which keeps them virtual) and
//!   become a KVM MSI route on a GSI of the device's own, fed by an irqfd that VFIO signals.
//! - DMA: the devices share one VFIO container (the host IOMMU domain). With `dma=mapped` the
//!   DMA memory owner maps exactly the guest's MAPped ranges into it; with `dma=all` all guest
//!   memory is mapped here at start (see devices::dma_memory::IommuPolicy).
//!
//! Every way opening a device can fail is checked first against sysfs, so the error says what
//! to do: no such device, no IOMMU, not bound to vfio-pci, a group that is not viable, a group
//! another process holds.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devices::dma_memory::{Iommu, IommuAttachment, IommuPolicy};
use devices::pci::{merge_dword, PciBus, PciDevice};
use devices::BusDevice;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioOps};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::mptable::PciIntx;
use crate::config::{DeviceConfig, DmaPolicy};
use crate::devices::DeviceManager;
use crate::irq::{GsiRouter, MsiMessage};

/// Guest-physical space for BARs: above the virtio-mmio devices, below the IOAPIC.
const BAR_MMIO_START: u64 = 0xe000_0000;
const BAR_MMIO_END: u64 = 0xfc00_0000;
/// Port space for I/O BARs.
const BAR_IO_START: u64 = 0xc000;
const BAR_IO_END: u64 = 0x1_0000;
/// KVM memory slots for BARs start here (guest RAM uses the first few).
const BAR_SLOT_BASE: u32 = 64;

/// VFIO's region index of a PCI device's config space.
const CONFIG_REGION: u32 = 7;

#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    #[error("--device vfio={0}: no such PCI device; list them with `ls /sys/bus/pci/devices` and pass one as vfio=/sys/bus/pci/devices/DDDD:BB:DD.F")]
    NoDevice(PathBuf),
    #[error("--device vfio={0}: the device has no IOMMU group, so the host has no IOMMU enabled for it; boot the host with `intel_iommu=on` (Intel VT-d) or `amd_iommu=on` (AMD-Vi) and check `ls /sys/kernel/iommu_groups`")]
    NoIommu(PathBuf),
    #[error("--device vfio={path}: the device is bound to {driver}, not vfio-pci; bind it with `echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind` (if bound), `echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override` and `echo {bdf} > /sys/bus/pci/drivers_probe` (or `echo {ids} > /sys/bus/pci/drivers/vfio-pci/new_id`)")]
    NotBound {
        path: PathBuf,
        bdf: String,
        driver: String,
        ids: String,
    },
    #[error("--device vfio={path}: its IOMMU group {group} is not viable: every device in a group must be bound to vfio-pci (or to no driver) before any is passed through, and these are not: {others}; bind them to vfio-pci too, or move the device to a slot of its own")]
    NotViable {
        path: PathBuf,
        group: u32,
        others: String,
    },
    #[error("--device vfio={path}: its IOMMU group {group} (/dev/vfio/{group}) is in use by another process ({holders}); a device can be in one VM at a time: stop that VM first")]
    Busy {
        path: PathBuf,
        group: u32,
        holders: String,
    },
    #[error("VFIO is not available on this host ({0}); load it with `modprobe vfio-pci`")]
    NoVfio(std::io::Error),
    #[error("--device vfio={path}: {source}")]
    Open {
        path: PathBuf,
        source: vfio_ioctls::VfioError,
    },
    #[error(
        "--device vfio={path}: BAR {bar} of {size:#x} bytes does not fit in the guest's PCI space"
    )]
    BarSpace { path: PathBuf, bar: u32, size: u64 },
    #[error("wiring the device's interrupt: {0}")]
    Irq(kvm_ioctls::Error),
    #[error("placing the device: {0}")]
    Bus(String),
    #[error("mapping guest RAM in the IOMMU (dma=all): {0}")]
    MapAll(std::io::Error),
    #[error("creating an eventfd for the device's interrupt: {0}")]
    EventFd(std::io::Error),
}

/// The passed-through devices of a VM and the IOMMU domain they share; dropping it closes
/// the devices and the container.
pub struct Passthrough {
    _container: Arc<VfioContainer>,
    policy: IommuPolicy,
    iommu: Arc<VfioIommu>,
    _devices: Vec<Arc<Mutex<VfioPci>>>,
    /// The devices' INTx lines, for the MP table.
    pub intx: Vec<PciIntx>,
}

/// The container as the DMA memory owner's IOMMU.
pub struct VfioIommu {
    container: Arc<VfioContainer>,
    mapped: AtomicU64,
}

impl Iommu for VfioIommu {
    fn map(&self, iova: u64, host_addr: usize, len: usize) -> std::io::Result<()> {
        // SAFETY: `host_addr..+len` is guest memory (RAM or the DMA window) that stays mapped for
        // the VM's life; the VMM reaches it only through raw pointers, volatile accesses and
        // system calls (vm-memory's volatile slices, copies under the move gate), never through
        // Rust references, so concurrent device DMA breaks no aliasing rule. The DMA memory
        // owner keeps the pages in place until `unmap`.
        unsafe { self.container.vfio_dma_map(iova, len, host_addr as *mut u8) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.mapped.fetch_add(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn unmap(&self, iova: u64, len: usize) -> std::io::Result<()> {
        self.container
            .vfio_dma_unmap(iova, len)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        self.mapped.fetch_sub(len as u64, Ordering::Relaxed);
        Ok(())
    }

    fn mapped_bytes(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }
}

impl Passthrough {
    /// Opens every configured device, puts it on `pci`, and (with `dma=all`) maps all guest
    /// RAM but the window in the IOMMU; the window follows once its owner exists.
    pub fn attach(
        vm: &Arc<VmFd>,
        router: &Arc<GsiRouter>,
        devices: &mut DeviceManager,
        pci: &mut PciBus,
        configs: &[DeviceConfig],
        mem: &GuestMemoryMmap,
        window: Option<(u64, u64)>,
    ) -> Result<Option<Self>, VfioError> {
        if configs.is_empty() {
            return Ok(None);
        }
        let mut groups = Vec::new();
        for c in configs {
            groups.push(precheck(&c.vfio)?);
        }
        let policy = if configs.iter().any(|c| c.dma == DmaPolicy::All) {
            IommuPolicy::All
        } else {
            IommuPolicy::Mapped
        };
        // KVM's VFIO device tells KVM about the groups (for non-coherent DMA hosts).
        let kvm_vfio = {
            let mut d = kvm_create_device {
                type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
                fd: 0,
                flags: 0,
            };
            match vm.create_device(&mut d) {
                Ok(fd) => Some(Arc::new(VfioDeviceFd::new_from_kvm(fd))),
                Err(e) => {
                    tracing::warn!("KVM's VFIO device is not available ({e}); going on without it");
                    None
                }
            }
        };
        let container = Arc::new(VfioContainer::new(kvm_vfio).map_err(|e| match e {
            vfio_ioctls::VfioError::OpenContainer(io) => VfioError::NoVfio(io),
            source => VfioError::Open {
                path: "/dev/vfio/vfio".into(),
                source,
            },
        })?);
        tracing::info!(
            "VFIO: legacy container/group interface (type1v2 IOMMU); iommufd device cdevs are not used"
        );
        let mut next_mmio = BAR_MMIO_START;
        let mut next_io = BAR_IO_START;
        let mut next_slot = BAR_SLOT_BASE;
        let mut attached = Vec::new();
        let mut intx = Vec::new();
        for (c, group) in configs.iter().zip(groups) {
            let dev = VfioDevice::new(&c.vfio, container.clone() as Arc<dyn VfioOps>, false)
                .map_err(|source| match source {
                    vfio_ioctls::VfioError::OpenGroup(ref io, _)
                        if io.raw_os_error() == Some(libc::EBUSY) =>
                    {
                        VfioError::Busy {
                            path: c.vfio.clone(),
                            group,
                            holders: group_holders(group),
                        }
                    }
                    vfio_ioctls::VfioError::GroupViable => VfioError::NotViable {
                        path: c.vfio.clone(),
                        group,
                        others: "(the kernel says so; see /sys/kernel/iommu_groups)".into(),
                    },
                    source => VfioError::Open {
                        path: c.vfio.clone(),
                        source,
                    },
                })?;
            let dev = Arc::new(dev);
            let mut pci_dev = VfioPci::new(c.vfio.clone(), dev.clone(), router.clone())?;
            pci_dev.place_bars(&mut next_mmio, &mut next_io)?;
            pci_dev.map_bars(vm, devices, &mut next_slot)?;
            vm.register_irqfd(&pci_dev.msi_evt, pci_dev.gsi)
                .map_err(VfioError::Irq)?;
            let pci_dev = Arc::new(Mutex::new(pci_dev));
            let slot = pci
                .add(pci_dev.clone())
                .map_err(|e| VfioError::Bus(e.to_string()))?;
            {
                let mut d = pci_dev.lock().unwrap_or_else(|e| e.into_inner());
                match (d.intx_pin(), devices.take_pci_irq()) {
                    (Some(pin), Some(ioapic_pin)) => {
                        d.setup_intx(vm, ioapic_pin)?;
                        intx.push((slot, pin, ioapic_pin as u8));
                    }
                    (Some(_), None) => tracing::warn!(
                        device = %c.vfio.display(),
                        "no IOAPIC pin left for the device's INTx line; it has MSI only"
                    ),
                    (None, _) => {}
                }
                tracing::info!(
                    device = %c.vfio.display(),
                    guest = format_args!("00:{slot:02x}.0"),
                    id = d.ids(),
                    msi_gsi = d.gsi,
                    intx = ?intx.last().filter(|l| l.0 == slot).map(|l| l.2),
                    bars = ?d.bars.iter().filter(|b| b.size > 0).map(|b| (b.index, format!("{:#x}+{:#x}", b.addr, b.size), b.mapped)).collect::<Vec<_>>(),
                    dma = ?c.dma,
                    "VFIO device passed through"
                );
            }
            attached.push(pci_dev);
        }
        let iommu = Arc::new(VfioIommu {
            container: container.clone(),
            mapped: AtomicU64::new(0),
        });
        if policy == IommuPolicy::All {
            let t = std::time::Instant::now();
            let mut bytes = 0u64;
            for r in mem.iter() {
                let start = r.start_addr().0;
                if window.is_some_and(|(base, _)| base == start) {
                    continue; // the window's owner maps it once it is lent whole
                }
                iommu
                    .map(start, r.as_ptr() as usize, r.len() as usize)
                    .map_err(VfioError::MapAll)?;
                bytes += r.len();
            }
            tracing::warn!(
                bytes,
                ms = t.elapsed().as_millis() as u64,
                "dma=all: guest RAM mapped (and pinned) in the IOMMU; lending is off: the window is lent whole and never moves, since a move would leave the IOMMU pointing at the old pages"
            );
        } else if window.is_none() {
            tracing::warn!("dma=mapped without a DMA window: the device can DMA nowhere; give the guest --dma-window size=SIZE");
        } else {
            tracing::info!("dma=mapped: the IOMMU maps exactly the ranges the guest MAPs through virtio-dma; the rest of guest memory stays movable");
        }
        Ok(Some(Self {
            _container: container,
            policy,
            iommu,
            _devices: attached,
            intx,
        }))
    }

    /// The IOMMU for the DMA window's owner.
    pub fn attachment(&self) -> IommuAttachment {
        IommuAttachment {
            iommu: self.iommu.clone(),
            policy: self.policy,
        }
    }
}

fn read_link_name(p: &Path) -> Option<String> {
    std::fs::read_link(p)
        .ok()
        .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Checks `path` in sysfs before VFIO is touched; returns its IOMMU group.
fn precheck(path: &Path) -> Result<u32, VfioError> {
    if !path.join("config").exists() {
        return Err(VfioError::NoDevice(path.to_path_buf()));
    }
    let group: u32 = read_link_name(&path.join("iommu_group"))
        .and_then(|g| g.parse().ok())
        .ok_or_else(|| VfioError::NoIommu(path.to_path_buf()))?;
    let bdf = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let driver = read_link_name(&path.join("driver"));
    if driver.as_deref() != Some("vfio-pci") {
        let vendor = read_trim(&path.join("vendor"));
        let device = read_trim(&path.join("device"));
        return Err(VfioError::NotBound {
            path: path.to_path_buf(),
            bdf,
            driver: driver.unwrap_or_else(|| "no driver".into()),
            ids: format!(
                "{} {}",
                vendor.trim_start_matches("0x"),
                device.trim_start_matches("0x")
            ),
        });
    }
    // Every other device of the group: bound to vfio-pci, or to nothing.
    let members = path.join("iommu_group/devices");
    let mut others = Vec::new();
    if let Ok(entries) = std::fs::read_dir(&members) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == bdf {
                continue;
            }
            match read_link_name(&e.path().join("driver")) {
                None => {}
                Some(d) if d == "vfio-pci" || d == "pcieport" => {}
                Some(d) => others.push(format!("{name} (bound to {d})")),
            }
        }
    }
    if !others.is_empty() {
        others.sort();
        return Err(VfioError::NotViable {
            path: path.to_path_buf(),
            group,
            others: others.join(", "),
        });
    }
    // The group file is exclusive: a second opener gets EBUSY.
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/dev/vfio/{group}"))
    {
        Ok(_) => Ok(group),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(VfioError::Busy {
            path: path.to_path_buf(),
            group,
            holders: group_holders(group),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(VfioError::NoVfio(e)),
        Err(_) => Ok(group), // VFIO itself will say what is wrong
    }
}

/// Processes that hold `/dev/vfio/GROUP` open, as "PID (COMM)".
fn group_holders(group: u32) -> String {
    let target = PathBuf::from(format!("/dev/vfio/{group}"));
    let mut holders = Vec::new();
    let me = std::process::id().to_string();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let pid = p.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                continue;
            }
            let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
                continue;
            };
            if fds
                .flatten()
                .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == target))
            {
                holders.push(format!("pid {pid} ({})", read_trim(&p.path().join("comm"))));
            }
        }
    }
    if holders.is_empty() {
        "a process this one cannot see".into()
    } else {
        holders.join(", ")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BarKind {
    None,
    Io,
    Mem32,
    Mem64,
    /// The high dword of the 64-bit BAR before it.
    Upper,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    index: u32,
    kind: BarKind,
    /// Type bits the register keeps (I/O, 64-bit, prefetchable).
    flags: u32,
    size: u64,
    /// The guest address this module placed it at.
    addr: u64,
    /// The register as the guest last wrote it (sizing writes all ones).
    raw: u32,
    /// Mapped into the guest as a KVM slot (else trapped).
    mapped: bool,
}

/// A BAR register holding `raw`, as the guest reads it: the address bits a BAR of `size` bytes
/// leaves writable (all ones written: the size mask), and its type bits. For the upper half of
/// a 64-bit BAR, `size` is the whole BAR's.
fn bar_register(kind: BarKind, flags: u32, size: u64, raw: u32) -> u32 {
    match kind {
        BarKind::None => 0,
        BarKind::Upper => raw & !((size - 1) >> 32) as u32,
        _ => {
            let mask = !(size as u32).wrapping_sub(1);
            let type_mask = if kind == BarKind::Io { 0x3 } else { 0xf };
            (raw & mask & !type_mask) | flags
        }
    }
}

/// One passed-through PCI function.
pub struct VfioPci {
    path: PathBuf,
    dev: Arc<VfioDevice>,
    bars: [Bar; 6],
    msi: Option<MsiCap>,
    /// Hides MSI-X from the guest's capability walk: the config byte that points at the MSI-X
    /// capability (0x34, or the previous capability's next pointer) and the value read instead
    /// (MSI-X's own next pointer). Found once at start.
    msix_skip: Option<(usize, u8)>,
    router: Arc<GsiRouter>,
    gsi: u32,
    msi_evt: EventFd,
    msi_enabled: bool,
    /// The legacy INTx line, when the device has one and an IOAPIC pin was free.
    intx: Option<Intx>,
}

/// A level-triggered INTx line: VFIO signals `trigger` and masks the line; KVM raises the
/// IOAPIC pin, and at the guest's EOI signals `resample`, on which VFIO unmasks it.
struct Intx {
    trigger: EventFd,
    resample: EventFd,
    enabled: bool,
    /// The interrupt line register (0x3c): the IOAPIC pin, as firmware writes it; the guest
    /// may overwrite it (it is only a note for drivers).
    line: u8,
}

const INTX: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;

/// The MSI capability, emulated: VFIO keeps the enable bit clear until MSI is enabled through
/// its own interface, so the guest's view (control, address, data) lives here, and VFIO's
/// trigger follows the enable bit the guest wrote.
#[derive(Clone, Copy, Debug)]
struct MsiCap {
    offset: usize,
    is64: bool,
    /// The capability's dwords as the guest sees them (header+control, address, [address
    /// high,] data, [mask, pending]).
    regs: [u32; 6],
}

impl MsiCap {
    fn len(&self) -> usize {
        let masking = self.regs[0] >> 16 & 0x100 != 0;
        match (self.is64, masking) {
            (false, false) => 12,
            (true, false) => 16,
            (false, true) => 20,
            (true, true) => 24,
        }
    }

    fn covers(&self, reg: usize) -> bool {
        reg * 4 >= self.offset && reg * 4 < self.offset + self.len()
    }

    fn write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let i = reg - self.offset / 4;
        let old = self.regs[i];
        let mut new = merge_dword(old, offset, data);
        if i == 0 {
            // Only enable (bit 0) and multiple message enable (bits 4-6) of the control word are
            // writable; the header and the capability bits stay.
            let writable = 0x0071 << 16;
            new = (old & !writable) | (new & writable);
        }
        self.regs[i] = new;
    }

    fn enabled(&self) -> bool {
        self.regs[0] >> 16 & 1 != 0
    }

    fn message(&self) -> MsiMessage {
        let lo = u64::from(self.regs[1]);
        let (hi, data) = if self.is64 {
            (u64::from(self.regs[2]), self.regs[3] & 0xffff)
        } else {
            (0, self.regs[2] & 0xffff)
        };
        MsiMessage {
            address: hi << 32 | lo,
            data,
        }
    }
}

impl VfioPci {
    fn new(path: PathBuf, dev: Arc<VfioDevice>, router: Arc<GsiRouter>) -> Result<Self, VfioError> {
        let gsi = router.allocate();
        let msi_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VfioError::EventFd)?;
        let mut d = Self {
            path,
            dev,
            bars: [Bar {
                index: 0,
                kind: BarKind::None,
                flags: 0,
                size: 0,
                addr: 0,
                raw: 0,
                mapped: false,
            }; 6],
            msi: None,
            msix_skip: None,
            router,
            gsi,
            msi_evt,
            msi_enabled: false,
            intx: None,
        };
        d.find_capabilities();
        d.read_bars();
        Ok(d)
    }

    fn cfg_read(&self, offset: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev
            .region_read(CONFIG_REGION, &mut b[..len], offset as u64);
        u32::from_le_bytes(b)
    }

    fn ids(&self) -> String {
        let id = self.cfg_read(0, 4);
        format!("{:04x}:{:04x}", id & 0xffff, id >> 16)
    }

    fn find_capabilities(&mut self) {
        let status = self.cfg_read(0x06, 2);
        if status & 0x10 == 0 {
            return;
        }
        let mut ptr = self.cfg_read(0x34, 1) as usize & 0xfc;
        // Where the pointer to the capability at `ptr` lives.
        let mut pointer_at = 0x34;
        let mut seen = 0;
        while ptr >= 0x40 && seen < 48 {
            let header = self.cfg_read(ptr, 2);
            match header & 0xff {
                0x05 => {
                    let ctrl = self.cfg_read(ptr + 2, 2);
                    let mut cap = MsiCap {
                        offset: ptr,
                        is64: ctrl & 0x80 != 0,
                        regs: [0; 6],
                    };
                    cap.regs[0] = self.cfg_read(ptr, 4) & !(0x0071 << 16);
                    for i in 1..cap.len() / 4 {
                        cap.regs[i] = self.cfg_read(ptr + 4 * i, 4);
                    }
                    self.msi = Some(cap);
                }
                0x11 => self.msix_skip = Some((pointer_at, (header >> 8) as u8)),
                _ => {}
            }
            pointer_at = ptr + 1;
            ptr = (header >> 8) as usize & 0xfc;
            seen += 1;
        }
    }

    fn read_bars(&mut self) {
        let mut i = 0u32;
        while i < 6 {
            let reg = self.cfg_read(0x10 + 4 * i as usize, 4);
            let size = self.dev.get_region_size(i);
            let mut bar = Bar {
                index: i,
                size,
                ..self.bars[i as usize]
            };
            if size == 0 {
                i += 1;
                continue;
            }
            if reg & 1 == 1 {
                bar.kind = BarKind::Io;
                bar.flags = 1;
            } else if (reg >> 1) & 3 == 2 {
                bar.kind = BarKind::Mem64;
                bar.flags = reg & 0xf;
                if i < 5 {
                    self.bars[i as usize + 1].kind = BarKind::Upper;
                    self.bars[i as usize + 1].index = i + 1;
                }
            } else {
                bar.kind = BarKind::Mem32;
                bar.flags = reg & 0xf;
            }
            self.bars[i as usize] = bar;
            i += if bar.kind == BarKind::Mem64 { 2 } else { 1 };
        }
    }

    /// Places the BARs as firmware would: naturally aligned, in the guest's PCI space.
    fn place_bars(&mut self, next_mmio: &mut u64, next_io: &mut u64) -> Result<(), VfioError> {
        for b in self.bars.iter_mut() {
            let (next, end, min) = match b.kind {
                BarKind::Io => (&mut *next_io, BAR_IO_END, 4),
                BarKind::Mem32 | BarKind::Mem64 => (&mut *next_mmio, BAR_MMIO_END, 4096),
                _ => continue,
            };
            let align = b.size.max(min).next_power_of_two();
            let addr = next.div_ceil(align) * align;
            if addr + b.size > end {
                return Err(VfioError::BarSpace {
                    path: self.path.clone(),
                    bar: b.index,
                    size: b.size,
                });
            }
            b.addr = addr;
            b.raw = addr as u32;
            *next = addr + b.size.max(min);
        }
        for i in 0..5 {
            if self.bars[i].kind == BarKind::Mem64 {
                self.bars[i + 1].raw = (self.bars[i].addr >> 32) as u32;
            }
        }
        Ok(())
    }

    /// mmap-able memory BARs become KVM slots; every BAR is also on the VMM's bus, which
    /// serves the accesses KVM does not (I/O BARs, BARs VFIO does not let us mmap).
    fn map_bars(
        &mut self,
        vm: &VmFd,
        devices: &mut DeviceManager,
        next_slot: &mut u32,
    ) -> Result<(), VfioError> {
        for i in 0..6 {
            let b = self.bars[i];
            let trap = Arc::new(Mutex::new(BarTrap {
                dev: self.dev.clone(),
                index: b.index,
            }));
            match b.kind {
                BarKind::Io => {
                    devices
                        .pio
                        .insert(trap, b.addr, b.size)
                        .map_err(|e| VfioError::Bus(e.to_string()))?;
                }
                BarKind::Mem32 | BarKind::Mem64 => {
                    devices
                        .mmio
                        .insert(trap, b.addr, b.size)
                        .map_err(|e| VfioError::Bus(e.to_string()))?;
                    let mmappable = self.dev.get_region_flags(b.index)
                        & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP
                        != 0;
                    if mmappable && b.size.is_multiple_of(4096) {
                        match self.map_bar(vm, b, *next_slot) {
                            Ok(()) => {
                                self.bars[i].mapped = true;
                                *next_slot += 1;
                            }
                            Err(e) => tracing::warn!(
                                bar = b.index,
                                "BAR not mapped into the guest ({e}); its accesses are trapped"
                            ),
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn map_bar(&self, vm: &VmFd, b: Bar, slot: u32) -> std::io::Result<()> {
        let offset = self.dev.get_region_offset(b.index);
        // SAFETY: a new shared mapping of the device fd's BAR region at the offset VFIO gave;
        // nothing else uses the address range it returns. It is never unmapped: KVM's slot
        // points into it for the VM's life.
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                b.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.dev.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if host == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: b.addr,
            memory_size: b.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is the BAR mapping made above, which lives as long as the
        // process; the guest range is in the PCI hole, outside guest RAM and every other slot.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn bar_read(&self, reg: usize) -> u32 {
        self.bar_value(reg, self.bars[reg - 4].raw)
    }

    /// BAR register `reg` as read back when it holds `raw`: the address bits the BAR's size
    /// leaves writable, and its type bits.
    fn bar_value(&self, reg: usize, raw: u32) -> u32 {
        let b = &self.bars[reg - 4];
        let size = if b.kind == BarKind::Upper {
            self.bars[reg - 5].size
        } else {
            b.size
        };
        bar_register(b.kind, b.flags, size, raw)
    }

    fn bar_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        let i = reg - 4;
        let raw = merge_dword(self.bars[i].raw, offset, data);
        self.bars[i].raw = raw;
        // After sizing (all ones), the guest writes back the address it read: anything else
        // moves the BAR, which this VMM does not follow (the guest gets valid placements).
        let placed = match self.bars[i].kind {
            BarKind::Upper => (self.bars[i - 1].addr >> 32) as u32,
            BarKind::None => return,
            _ => self.bars[i].addr as u32,
        };
        if raw != u32::MAX && self.bar_value(reg, raw) != self.bar_value(reg, placed) {
            tracing::warn!(
                device = %self.path.display(),
                bar = self.bars[i].index,
                wrote = format_args!("{raw:#x}"),
                placed = format_args!("{placed:#x}"),
                "the guest moved a BAR; the device stays where it was placed"
            );
        }
    }

    /// The device's interrupt pin (1..=4 for INTA..INTD), if VFIO offers its INTx.
    fn intx_pin(&self) -> Option<u8> {
        let pin = self.cfg_read(0x3d, 1) as u8;
        let offered = self.dev.get_irq_info(INTX).is_some_and(|i| i.count > 0);
        (1..=4).contains(&pin).then_some(pin).filter(|_| offered)
    }

    /// Wires the INTx line to IOAPIC pin `gsi` (level, with KVM's resample irqfd) and turns it
    /// on; MSI takes over when the guest enables it.
    fn setup_intx(&mut self, vm: &VmFd, gsi: u32) -> Result<(), VfioError> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(VfioError::EventFd);
        let intx = Intx {
            trigger: evt()?,
            resample: evt()?,
            enabled: false,
            line: gsi as u8,
        };
        vm.register_irqfd_with_resample(&intx.trigger, &intx.resample, gsi)
            .map_err(VfioError::Irq)?;
        self.intx = Some(intx);
        self.set_intx(true);
        Ok(())
    }

    fn set_intx(&mut self, on: bool) {
        let Some(intx) = self.intx.as_mut() else {
            return;
        };
        if on == intx.enabled {
            return;
        }
        let done = if on {
            self.dev
                .enable_irq(INTX, vec![&intx.trigger])
                .and_then(|()| self.dev.set_irq_resample_fd(INTX, vec![&intx.resample]))
        } else {
            self.dev.disable_irq(INTX)
        };
        match done {
            Ok(()) => intx.enabled = on,
            Err(e) => tracing::error!("VFIO INTx {}: {e}", if on { "enable" } else { "disable" }),
        }
    }

    /// After a guest write into the MSI capability: point the GSI at the message and turn
    /// VFIO's MSI trigger on or off to match the enable bit (INTx is off while MSI is on).
    fn update_msi(&mut self) {
        let Some(cap) = self.msi else { return };
        if cap.enabled() {
            if cap.regs[0] >> 16 & 0x70 != 0 {
                tracing::warn!(
                    "the guest enabled several MSI vectors; only the first is delivered"
                );
            }
            let msg = cap.message();
            if let Err(e) = self.router.set_msi(self.gsi, msg) {
                tracing::error!("routing the device's MSI: {e}");
                return;
            }
            if !self.msi_enabled {
                self.set_intx(false);
                match self.dev.enable_msi(vec![&self.msi_evt]) {
                    Ok(()) => self.msi_enabled = true,
                    Err(e) => tracing::error!("VFIO MSI enable: {e}"),
                }
                tracing::debug!(gsi = self.gsi, ?msg, "MSI enabled");
            }
        } else if self.msi_enabled {
            if let Err(e) = self.dev.disable_msi() {
                tracing::warn!("VFIO MSI disable: {e}");
            }
            let _ = self.router.clear(self.gsi);
            self.msi_enabled = false;
            self.set_intx(true);
        }
    }

    /// Skips the MSI-X capability in the dword that holds the pointer to it.
    fn hide_msix(&self, reg: usize, value: u32) -> u32 {
        match self.msix_skip {
            Some((at, next)) if at / 4 == reg => {
                let shift = (at % 4) * 8;
                (value & !(0xff << shift)) | u32::from(next) << shift
            }
            _ => value,
        }
    }
}

impl PciDevice for VfioPci {
    fn config_read(&mut self, reg: usize) -> u32 {
        match reg {
            4..=9 => self.bar_read(reg),
            // No expansion ROM for the guest.
            12 => 0,
            // Interrupt pin 0 when INTx is not wired (no free IOAPIC pin, or VFIO offers none).
            15 => match &self.intx {
                None => self.cfg_read(0x3c, 4) & !0xffff,
                Some(intx) => (self.cfg_read(0x3c, 4) & !0xff) | u32::from(intx.line),
            },
            _ if self.msi.is_some_and(|c| c.covers(reg)) => {
                let cap = self.msi.expect("checked");
                let v = cap.regs[reg - cap.offset / 4];
                self.hide_msix(reg, v)
            }
            _ if reg < 64 => {
                let v = self.cfg_read(reg * 4, 4);
                self.hide_msix(reg, v)
            }
            _ => self.cfg_read(reg * 4, 4),
        }
    }

    fn config_write(&mut self, reg: usize, offset: usize, data: &[u8]) {
        match reg {
            4..=9 => self.bar_write(reg, offset, data),
            12 => {}
            15 if offset == 0 => {
                if let Some(intx) = self.intx.as_mut() {
                    intx.line = data[0];
                }
            }
            _ if self.msi.is_some_and(|c| c.covers(reg)) => {
                if let Some(cap) = self.msi.as_mut() {
                    cap.write(reg, offset, data);
                }
                self.update_msi();
            }
            _ => {
                let at = reg * 4 + offset;
                self.dev.region_write(CONFIG_REGION, data, at as u64);
            }
        }
    }
}

/// Forwards trapped accesses to one BAR to VFIO.
struct BarTrap {
    dev: Arc<VfioDevice>,
    index: u32,
}

impl BusDevice for BarTrap {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.dev.region_read(self.index, data, offset);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.dev.region_write(self.index, data, offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_size_like_hardware() {
        // A 1 MiB 32-bit memory BAR: all ones reads back the size mask with the type bits.
        assert_eq!(
            bar_register(BarKind::Mem32, 0, 1 << 20, u32::MAX),
            0xfff0_0000
        );
        assert_eq!(
            bar_register(BarKind::Mem32, 0x8, 1 << 20, 0xe000_0000),
            0xe000_0008
        );
        // The low bits of an address written are not kept.
        assert_eq!(
            bar_register(BarKind::Mem32, 0, 1 << 20, 0xe001_2345),
            0xe000_0000
        );
        // A 64-bit BAR of 8 GiB: the upper half keeps only the bits above its size.
        assert_eq!(
            bar_register(BarKind::Upper, 0, 8 << 30, u32::MAX),
            0xffff_fffe
        );
        // A 256-byte I/O BAR.
        assert_eq!(bar_register(BarKind::Io, 1, 256, u32::MAX), 0xffff_ff01);
        assert_eq!(bar_register(BarKind::None, 0, 0, u32::MAX), 0);
    }

    #[test]
    fn msi_capability_keeps_read_only_bits_and_reports_the_message() {
        // A 64-bit MSI capability at 0x40 without masking: ID 5, next 0, control 0x80.
        let mut cap = MsiCap {
            offset: 0x40,
            is64: true,
            regs: [0x0080_0005, 0, 0, 0, 0, 0],
        };
        assert_eq!(cap.len(), 16);
        assert!(cap.covers(0x40 / 4) && cap.covers(0x4c / 4) && !cap.covers(0x50 / 4));
        cap.write(0x44 / 4, 0, &0xfee0_1000u32.to_le_bytes());
        cap.write(0x48 / 4, 0, &0u32.to_le_bytes());
        cap.write(0x4c / 4, 0, &0x4025u16.to_le_bytes());
        assert!(!cap.enabled());
        // A guest writing the whole control word: only enable and MME stick.
        cap.write(0x40 / 4, 2, &0xffffu16.to_le_bytes());
        assert!(cap.enabled());
        assert_eq!(cap.regs[0], 0x00f1_0005);
        assert_eq!(
            cap.message(),
            MsiMessage {
                address: 0xfee0_1000,
                data: 0x4025
            }
        );
        cap.write(0x40 / 4, 2, &0x0080u16.to_le_bytes());
        assert!(!cap.enabled());
    }
}

//! The guest's DMA path on the host: the contiguous region, the allocator over it and the
//! virtio-dma device that serves the guest's MAP/UNMAP requests from it.

use std::sync::Arc;

use cma::{Backing, HugePageSize, Region};
use devices::dma_memory::{DmaMemory, DmaMemoryError, IommuAttachment};
use devices::guest_memory::GuestMemoryHandle;
use devices::virtio::dma::{Config, Dma, RequestHandler};
use devices::virtio::MmioTransport;
use kvm_ioctls::VmFd;
use linux_loader::loader::Cmdline;
use vmm_sys_util::eventfd::EventFd;

/// The guest's DMA path once the region thread has built it: the owner of its DMA memory and
/// the virtio-dma device's request handler (for its counters).
#[derive(Clone)]
pub struct DmaPath {
    pub memory: DmaMemory,
    pub device: Arc<RequestHandler<DmaMemory>>,
    pub choice: Arc<RegionChoice>,
}

/// How the region's backing was chosen, for `dmavisor stat`.
#[derive(Clone, Debug, Default)]
pub struct RegionChoice {
    /// The backing asked for (`auto`, `dma-heap`, ...).
    pub requested: RegionBacking,
    /// With `auto`: why each better backing was not taken.
    pub passed_over: Vec<String>,
    /// How long reserving (and populating) the region took, for the backing taken.
    pub reserve_ms: u64,
}

/// Where the control API finds the DMA path once the region thread has built it.
pub type DmaSlot = Arc<std::sync::OnceLock<DmaPath>>;
use crate::config::{ByteSize, RegionBacking, RegionConfig};
use crate::devices::{DeviceError, DeviceManager};

/// Most mappings a guest may hold at once.
const MAX_MAPPINGS: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    #[error("reserving the {size} host region ({backing:?}): {source}")]
    Region {
        size: ByteSize,
        backing: RegionBacking,
        source: cma::RegionError,
    },
    #[error("the region cannot back the window: {0}")]
    Memory(#[from] DmaMemoryError),
    #[error("--region backing={flag} needs {need} free {label} huge pages for {size}, the host has {free}; reserve them with `echo {need} > /sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages` (1G pages: or `hugepagesz=1G hugepages={need}` on the host's command line) or use backing=auto")]
    HugePages {
        flag: &'static str,
        label: &'static str,
        kib: u64,
        size: ByteSize,
        need: u64,
        free: u64,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("creating the device: {0}")]
    Io(std::io::Error),
}

/// Reserves the region as configured. `auto` takes the first that works of: the host's CMA
/// dma-buf heap (contiguous at any size), 1 GiB huge pages (contiguous up to 1 GiB; lent to the
/// window whole, so only for a window of whole GiBs), 2 MiB huge pages, a memfd (not physically contiguous), and logs
/// why each better one was not taken.
fn reserve_region(
    config: &RegionConfig,
    window_size: u64,
) -> Result<(Region, RegionChoice), DmaError> {
    let size = config.size.unwrap_or(ByteSize(window_size));
    let reserve = |backing: RegionBacking| {
        let b = match backing {
            // 2 MiB pages: a 1 GiB page cannot be remapped into the window in pieces.
            RegionBacking::Hugetlb => Backing::Hugetlb(HugePageSize::Size2M),
            RegionBacking::Hugetlb1G => Backing::Hugetlb(HugePageSize::Size1G),
            // The host's CMA (or reserved-memory) heap, whatever its name.
            RegionBacking::DmaHeap => Backing::DmaHeap {
                name: String::new(),
            },
            RegionBacking::Memfd | RegionBacking::Auto => Backing::Memfd,
        };
        let t = std::time::Instant::now();
        Region::reserve(size.0 as usize, b)
            .map(|r| (r, t.elapsed().as_millis() as u64))
            .map_err(|source| DmaError::Region {
                size,
                backing,
                source,
            })
    };
    let mut choice = RegionChoice {
        requested: config.backing,
        ..RegionChoice::default()
    };
    let region = match config.backing {
        RegionBacking::Auto => {
            let passed_over = &mut choice.passed_over;
            let mut picked = None;
            for backing in [
                RegionBacking::DmaHeap,
                RegionBacking::Hugetlb1G,
                RegionBacking::Hugetlb,
            ] {
                match reserve(backing) {
                    Ok(r) => {
                        picked = Some(r);
                        break;
                    }
                    Err(e) => passed_over.push(e.to_string()),
                }
            }
            let (region, ms) = match picked {
                Some(r) => r,
                None => reserve(RegionBacking::Memfd)?,
            };
            choice.reserve_ms = ms;
            for why in passed_over.iter() {
                tracing::warn!("backing=auto passed over: {why}");
            }
            tracing::info!(
                backing = ?region.backing(),
                "backing=auto picked {} (order: host CMA heap, 1G huge pages, 2M huge pages, memfd)",
                backing_label(region.backing())
            );
            region
        }
        b => {
            let (region, ms) = reserve(b)?;
            choice.reserve_ms = ms;
            region
        }
    };
    tracing::info!(
        size = %size,
        backing = ?region.backing(),
        contiguity = ?region.contiguity(),
        extents = region.extents().len(),
        largest_extent = region.largest_extent(),
        reserve_ms = choice.reserve_ms,
        "host region reserved"
    );
    Ok((region, choice))
}

/// What a backing is, in words for the log and `dmavisor stat`.
pub fn backing_label(b: &Backing) -> &'static str {
    match b {
        Backing::DmaHeap { .. } => "the host's CMA heap",
        Backing::Hugetlb(HugePageSize::Size1G) => "1G huge pages",
        Backing::Hugetlb(_) => "2M huge pages",
        Backing::Memfd => "a memfd (not physically contiguous)",
    }
}

/// Creates the virtio-dma device for the window `(base, size)` and attaches it. The region is
/// reserved on its own thread while the guest boots (populating it is the slowest part of
/// starting a VM); the device waits for it only if the guest's driver asks first.
pub fn attach_device(
    vm: &VmFd,
    devices: &mut DeviceManager,
    cmdline: &mut Cmdline,
    guest: &GuestMemoryHandle,
    window: (u64, u64),
    region_config: RegionConfig,
    iommu: Option<IommuAttachment>,
) -> Result<DmaSlot, DmaError> {
    precheck(&region_config, window.1)?;
    let offer_host_phys = region_config.host_phys;
    let owner_guest = guest.clone();
    let slot = DmaSlot::default();
    let published = slot.clone();
    let build = std::thread::Builder::new()
        .name("region".into())
        .spawn(move || {
            lower_priority();
            let path = build_path(&region_config, &owner_guest, window, iommu)
                .map_err(|e| e.to_string())?;
            // The control API reads the DMA path from here once it exists.
            let _ = published.set(path.clone());
            Ok(path.device)
        })
        .map_err(DmaError::Io)?;
    let device = Dma::deferred(build, offer_host_phys);
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(DmaError::Io)?;
    let transport = MmioTransport::new(device, guest.clone(), irq).map_err(DmaError::Io)?;
    let (mmio, gsi) = devices.add_virtio_mmio(vm, cmdline, transport)?;
    tracing::info!(mmio = format_args!("{mmio:#x}"), gsi, "virtio-dma attached");
    Ok(slot)
}

/// The region thread populates memory while the guest boots; it must not take CPU time from
/// the vCPUs, so it runs only when a CPU would otherwise idle.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only the calling thread's scheduling policy; `param` is a valid struct.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!(
            "SCHED_IDLE for the region thread: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Catches at start-up what would otherwise fail on the region thread: asking for huge pages
/// the host does not have.
fn precheck(config: &RegionConfig, window_size: u64) -> Result<(), DmaError> {
    let (flag, label, page) = match config.backing {
        RegionBacking::Hugetlb => ("hugetlb", "2M", 2u64 << 20),
        RegionBacking::Hugetlb1G => ("hugetlb-1g", "1G", 1 << 30),
        _ => return Ok(()),
    };
    let size = config.size.unwrap_or(ByteSize(window_size));
    let need = size.0.div_ceil(page);
    let kib = page / 1024;
    let free: u64 = std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{kib}kB/free_hugepages"
    ))
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0);
    if free < need {
        return Err(DmaError::HugePages {
            flag,
            label,
            kib,
            size,
            need,
            free,
        });
    }
    Ok(())
}

fn build_path(
    config: &RegionConfig,
    guest: &GuestMemoryHandle,
    (base, len): (u64, u64),
    iommu: Option<IommuAttachment>,
) -> Result<DmaPath, DmaError> {
    let (region, choice) = reserve_region(config, len)?;
    let largest_extent = region.largest_extent() as u64;
    let region_size = region.len() as u64;
    let memory = DmaMemory::with_iommu(region, guest, base, len, iommu)?;
    let config = Config {
        window_base: base,
        window_size: len,
        granule: memory.granule() as u32,
        max_mappings: MAX_MAPPINGS,
        max_map_len: largest_extent,
        region_size,
    };
    tracing::info!(?config, "virtio-dma ready");
    let device = Arc::new(RequestHandler::new(config, memory.clone()));
    Ok(DmaPath {
        memory,
        device,
        choice: Arc::new(choice),
    })
}

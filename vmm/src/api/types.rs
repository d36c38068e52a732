//! The control API's wire types: one request per connection, one reply. `docs/api.md`
//! documents every command and reply key; a test keeps the two in step.

use serde::{Deserialize, Serialize};

pub use crate::pins::ChurnReport;

/// A request: `{"cmd": "NAME", ...arguments}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// The memory manager's state.
    Stat,
    /// The live DMA mappings and where their frames are.
    Mappings,
    /// Test command: starts transient host pins with O_DIRECT writes to `--pin-target`.
    PinChurn {
        /// Bytes per I/O, in KiB (4 KiB to one region page).
        #[serde(default = "default_io_kib")]
        io_kib: u64,
        /// Extra time each pin is held after its I/O.
        #[serde(default)]
        hold_us: u64,
        /// Pause between pins.
        #[serde(default)]
        gap_us: u64,
    },
    /// Test command: stops the pin churn and reports it.
    PinChurnStop,
    /// Test command: long-term pins on a window range, registered as io_uring fixed buffers.
    PinLongterm { gpa: u64, len: u64 },
    /// Test command: drops every long-term pin and lends the freed pages back.
    UnpinLongterm,
    /// Test command: forces migrations of `frames` region frames.
    Migrate { frames: u64 },
    /// Test command: `on=1` makes the virtio-dma device stop answering requests (they wait on
    /// their queues), `on=0` makes it answer them.
    DmaStall { on: u64 },
}

fn default_io_kib() -> u64 {
    64
}

impl Request {
    /// Every command name, in the order the docs list them.
    pub const NAMES: [&'static str; 8] = [
        "stat",
        "mappings",
        "pin-churn",
        "pin-churn-stop",
        "pin-longterm",
        "unpin-longterm",
        "migrate",
        "dma-stall",
    ];

    /// The command's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Stat => Self::NAMES[0],
            Request::Mappings => Self::NAMES[1],
            Request::PinChurn { .. } => Self::NAMES[2],
            Request::PinChurnStop => Self::NAMES[3],
            Request::PinLongterm { .. } => Self::NAMES[4],
            Request::UnpinLongterm => Self::NAMES[5],
            Request::Migrate { .. } => Self::NAMES[6],
            Request::DmaStall { .. } => Self::NAMES[7],
        }
    }

    /// Whether the command exists for tests (off unless the VMM runs with `--test-commands`).
    pub fn is_test_command(&self) -> bool {
        !matches!(self, Request::Stat | Request::Mappings)
    }
}

/// A failed request: what was wrong and how to fix it. It changed nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// `stat`: the memory manager as it is now. The DMA parts are null until the region is
/// reserved (or when the VM has no DMA window).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatReply {
    pub uptime_ms: u64,
    pub region: Option<RegionStat>,
    pub allocator: Option<AllocatorStat>,
    pub lending: Option<LendingStat>,
    pub maps: Option<MapsStat>,
    pub pins: Option<PinsStat>,
    pub device: Option<DeviceStat>,
    /// The IOMMU of passed-through devices; null without one.
    #[serde(default)]
    pub iommu: Option<IommuStat>,
}

/// What the IOMMU maps for passed-through devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IommuStat {
    /// `mapped` or `all`.
    pub policy: String,
    /// Window ranges mapped now (with `all`: the window, once) and their bytes.
    pub ranges: u64,
    pub window_bytes: u64,
    /// Every byte mapped in the IOMMU now, guest RAM included (with `all`): what it pins.
    pub total_bytes: u64,
    pub maps: u64,
    pub unmaps: u64,
    /// Mean time of one IOMMU map and unmap, in microseconds.
    pub map_us_mean: u64,
    pub unmap_us_mean: u64,
    pub map_failures: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentStat {
    pub offset: u64,
    pub len: u64,
    pub phys: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStat {
    pub backing: String,
    /// The backing asked for (`auto`, `dma-heap`, `hugetlb`, `memfd`).
    pub requested: String,
    /// With `auto`: why each better backing was not taken.
    pub passed_over: Vec<String>,
    /// How long reserving and populating the region took (the backing taken).
    pub reserve_ms: u64,
    pub size: u64,
    pub page_size: u64,
    /// `Verified` where frame numbers were readable from pagemap.
    pub contiguity: String,
    pub largest_extent: u64,
    pub extents: Vec<ExtentStat>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorStat {
    pub frames: u64,
    pub allocated_frames: u64,
    pub occupied_frames: u64,
    pub granule: u64,
    pub allocs: u64,
    pub allocs_clean: u64,
    pub fail_too_large: u64,
    pub fail_no_room: u64,
    pub fail_all_pinned: u64,
    pub fail_deadline: u64,
    pub retries: u64,
    pub pages_migrated: u64,
    pub bytes_migrated: u64,
    pub frees: u64,
    pub alloc_latency_p50_ns: u64,
    pub alloc_latency_p99_ns: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LendingStat {
    pub pages: u64,
    pub page_size: u64,
    pub lent: u64,
    pub mapped: u64,
    pub ram: u64,
    pub longterm_pinned: u64,
    pub longterm_pinned_in_ram: u64,
    pub orphans: u64,
    pub moves: u64,
    pub moves_out: u64,
    pub bytes_moved: u64,
    pub copy_us: u64,
    pub claimed_in_place: u64,
    pub returned_in_place: u64,
}

/// p50, p99 and maximum.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

impl From<[u64; 3]> for Percentiles {
    fn from([p50, p99, max]: [u64; 3]) -> Self {
        Self { p50, p99, max }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MovingMaps {
    pub count: u64,
    pub latency_us: Percentiles,
    pub moved_bytes: Percentiles,
    /// Where their time went, per phase (µs): `claim` (the layout lock and the in-place try,
    /// with any wait for a pin on the range's own frames), `alloc` (finding frames elsewhere and
    /// migrating the pages lent there), `remap` (the window onto the new frames, with the copy
    /// of the range without DISCARD), `release` (freeing the frames the range had).
    pub phases_us: MapPhasesStat,
}

/// Percentiles of each phase of the moving MAPs (µs).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapPhasesStat {
    pub claim: Percentiles,
    pub alloc: Percentiles,
    pub remap: Percentiles,
    pub release: Percentiles,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapsStat {
    pub count: u64,
    pub in_place: u64,
    pub pin_waits: u64,
    pub latency_us: Percentiles,
    pub moved_bytes: Percentiles,
    pub moving: MovingMaps,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PinsStat {
    pub churn: Option<ChurnReport>,
    pub longterm_ranges: u64,
    /// MAPs refused (BUSY) because a page of their range was pinned long-term.
    pub longterm_refusals: u64,
    pub pins_taken: u64,
    pub pin_refusals: u64,
    pub longterm_moved_out: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStat {
    pub window_base: u64,
    pub window_size: u64,
    pub granule: u64,
    pub mappings: u64,
    pub mapped_bytes: u64,
    pub maps_ok: u64,
    pub maps_failed: u64,
    pub maps_busy: u64,
    pub maps_timeout: u64,
    pub unmaps: u64,
    /// The device is stalled by `dma-stall` and answers nothing.
    #[serde(default)]
    pub stalled: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartedReply {
    pub started: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinLongtermReply {
    /// The range pinned, rounded out to whole pages.
    pub gpa: u64,
    pub len: u64,
    pub moved_out: u64,
    pub pinned_in_place: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpinLongtermReply {
    pub released: u64,
    pub relent: u64,
}

/// The reply to `dma-stall`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DmaStallReply {
    /// Whether the device is stalled now.
    pub stalled: bool,
    /// Whether it was before this request.
    pub was_stalled: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateReply {
    pub moved: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub migrate_mib_s: f64,
    /// Plain memcpy of the same bytes in the VMM, measured right after: the baseline.
    pub memcpy_mib_s: f64,
}

/// The reply to `mappings`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingsReply {
    /// The VMM's process id: its `/proc/PID/pagemap` shows the frames at `host_addr`.
    pub pid: u32,
    pub mappings: Vec<MappingStat>,
}

/// One live DMA mapping.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingStat {
    pub gpa: u64,
    pub len: u64,
    pub region_offset: u64,
    pub host_addr: u64,
    pub phys: Option<u64>,
}

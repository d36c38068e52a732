//! The VM's configuration: one struct, filled from command-line flags or from a TOML/JSON file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// Guest RAM below this is too small for any Linux guest to boot.
pub const MIN_MEMORY: u64 = 32 * MIB;
/// Guest RAM above this is refused: the layout keeps all guest memory below 1 TiB.
pub const MAX_MEMORY: u64 = 256 * GIB;
/// The DMA window's size and base are multiples of this: the guest's CMA area must be
/// aligned to a pageblock (2 MiB on x86-64).
pub const DMA_WINDOW_ALIGN: u64 = 2 * MIB;
/// The largest DMA window a guest may have.
pub const MAX_DMA_WINDOW: u64 = 64 * GIB;
/// vCPUs the MP table and the guest kernel (CONFIG_NR_CPUS) are built for.
pub const MAX_CPUS: u8 = 32;

/// A size in bytes, written as a number with an optional K, M or G suffix (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct ByteSize(pub u64);

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid size {input:?}: {reason}; write a number of bytes with an optional K, M or G suffix, e.g. 512M or 2G")]
pub struct SizeError {
    input: String,
    reason: &'static str,
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, SizeError> {
        let err = |reason| SizeError {
            input: s.to_string(),
            reason,
        };
        let t = s.trim();
        let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
            Some((i, _)) => t.split_at(i),
            None => (t, ""),
        };
        if digits.is_empty() {
            return Err(err("it does not start with a number"));
        }
        let n: u64 = digits.parse().map_err(|_| err("the number is too large"))?;
        let mult = match unit.trim().to_ascii_uppercase().as_str() {
            "" | "B" => 1,
            "K" | "KB" | "KIB" => KIB,
            "M" | "MB" | "MIB" => MIB,
            "G" | "GB" | "GIB" => GIB,
            _ => return Err(err("unknown suffix")),
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| err("the size overflows 64 bits"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match b {
            0 => write!(f, "0"),
            _ if b.is_multiple_of(GIB) => write!(f, "{}G", b / GIB),
            _ if b.is_multiple_of(MIB) => write!(f, "{}M", b / MIB),
            _ if b.is_multiple_of(KIB) => write!(f, "{}K", b / KIB),
            _ => write!(f, "{b}"),
        }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// Guest RAM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    /// Bytes of guest RAM, not counting the DMA window.
    pub size: ByteSize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            size: ByteSize(512 * MIB),
        }
    }
}

/// The guest-physical range the guest kernel uses as its CMA area.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DmaWindowConfig {
    /// Bytes in the window; 0 disables it.
    pub size: ByteSize,
}

impl Default for DmaWindowConfig {
    fn default() -> Self {
        Self {
            size: ByteSize(64 * MIB),
        }
    }
}

/// Where the host contiguous region comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RegionBacking {
    /// The first that works of: the host's CMA heap, 1 GiB pages, 2 MiB pages, a memfd (logged).
    #[default]
    Auto,
    /// 2 MiB huge pages (hugetlbfs memfd); an error if the host has none free.
    Hugetlb,
    /// 1 GiB huge pages (hugetlbfs memfd), lent to the window in 2 MiB pieces through a udmabuf;
    /// the size must be a multiple of 1 GiB.
    #[serde(rename = "hugetlb-1g")]
    Hugetlb1G,
    /// A buffer from the host's CMA or reserved dma-buf heap (`/dev/dma_heap`).
    DmaHeap,
    /// Plain memory: contiguous to the guest, not physically on the host (labelled so).
    Memfd,
}

impl FromStr for RegionBacking {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "hugetlb" => Ok(Self::Hugetlb),
            "hugetlb-1g" => Ok(Self::Hugetlb1G),
            "dma-heap" => Ok(Self::DmaHeap),
            "memfd" => Ok(Self::Memfd),
            _ => Err(format!(
                "unknown region backing `{s}`; use one of auto, dma-heap, hugetlb-1g, hugetlb, memfd"
            )),
        }
    }
}

/// The host contiguous region behind the guest's DMA mappings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// Bytes of host memory; default: the DMA window's size.
    #[serde(default)]
    pub size: Option<ByteSize>,
    #[serde(default)]
    pub backing: RegionBacking,
    /// Offer the guest host-physical addresses of its mappings (virtio-dma's
    /// `VIRTIO_DMA_F_HOST_PHYS`, when the region knows them); off by default: it tells the
    /// guest where its memory is on the host (docs/virtio-dma.md, Security Considerations).
    #[serde(default)]
    pub host_phys: bool,
}

/// Which guest memory a passed-through device may DMA to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DmaPolicy {
    /// Exactly the ranges the guest MAPped through virtio-dma, while they are mapped; the rest
    /// of guest memory stays movable and lendable.
    #[default]
    Mapped,
    /// All guest memory, pinned for the VM's life (as QEMU and Cloud Hypervisor do); lending
    /// is off.
    All,
}

impl FromStr for DmaPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mapped" => Ok(Self::Mapped),
            "all" => Ok(Self::All),
            _ => Err(format!("unknown DMA policy `{s}`; use dma=mapped (only the ranges the guest MAPs) or dma=all (all guest memory)")),
        }
    }
}

/// A host PCI device passed through to the guest with VFIO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The device in sysfs, e.g. /sys/bus/pci/devices/0000:00:04.0, bound to vfio-pci.
    pub vfio: PathBuf,
    #[serde(default)]
    pub dma: DmaPolicy,
}

impl FromStr for DeviceConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let usage =
            "the accepted form is --device vfio=/sys/bus/pci/devices/DDDD:BB:DD.F[,dma=mapped|all]";
        let mut vfio = None;
        let mut dma = DmaPolicy::default();
        for part in s.split(',') {
            match part.split_once('=') {
                Some(("vfio", v)) if !v.is_empty() => {
                    // A bare address is the sysfs device of that address.
                    vfio = Some(if v.starts_with('/') {
                        PathBuf::from(v)
                    } else {
                        Path::new("/sys/bus/pci/devices").join(v)
                    })
                }
                Some(("dma", v)) => dma = v.parse()?,
                _ => return Err(format!("`{part}` in --device {s}: {usage}")),
            }
        }
        let vfio = vfio.ok_or_else(|| format!("--device {s} names no device: {usage}"))?;
        Ok(Self { vfio, dma })
    }
}

/// Everything needed to start a VM. `dmavisor run` flags and `--config FILE` both produce it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The guest kernel: a bzImage or an ELF vmlinux.
    pub kernel: PathBuf,
    /// An initramfs for the guest.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line; the VMM appends its own device and CMA parameters.
    #[serde(default)]
    pub cmdline: Option<String>,
    #[serde(default)]
    pub memory: MemoryConfig,
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    #[serde(default)]
    pub dma_window: DmaWindowConfig,
    #[serde(default)]
    pub region: RegionConfig,
    /// Host PCI devices passed through (`[[device]]` in a file, `--device` on the command line).
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
}

fn default_cpus() -> u8 {
    1
}

/// The command line a guest gets when none is given: serial console (quiet: every console byte
/// is a VM exit), reboot through the i8042 (the VMM exits on it) and reboot at once on panic
/// (so a panic ends the VMM too).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// A configuration mistake, with what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid {format}: {message}")]
    Parse {
        path: PathBuf,
        format: &'static str,
        message: String,
    },
    #[error("config file {0} must end in .toml or .json")]
    UnknownFormat(PathBuf),
    #[error("kernel image {0} does not exist; build the guest with resources/build-guest.sh or pass --kernel PATH")]
    KernelMissing(PathBuf),
    #[error("initrd {0} does not exist; pass an existing file with --initrd PATH")]
    InitrdMissing(PathBuf),
    #[error("--memory size={0} is too small: a Linux guest needs at least {min}", min = ByteSize(MIN_MEMORY))]
    MemoryTooSmall(ByteSize),
    #[error("--memory size={0} is too large: at most {max} is supported", max = ByteSize(MAX_MEMORY))]
    MemoryTooLarge(ByteSize),
    #[error("--memory size={0} is not a multiple of 4K (the guest page size)")]
    MemoryUnaligned(ByteSize),
    #[error("--cpus {0}: need between 1 and {MAX_CPUS} vCPUs")]
    Cpus(u8),
    #[error("--dma-window size={0} is larger than allowed: at most {max}", max = ByteSize(MAX_DMA_WINDOW))]
    WindowTooLarge(ByteSize),
    #[error("--dma-window size={0} is not a multiple of 2M (the guest's CMA pageblock); try {1}")]
    WindowUnaligned(ByteSize, ByteSize),
    #[error("--region size={0} must be a non-zero multiple of 2M, at most {max}", max = ByteSize(MAX_DMA_WINDOW))]
    RegionSize(ByteSize),
    #[error("--region backing=hugetlb-1g lends 1 GiB pages to the window whole: the window ({window}) and the region ({region}) must be whole GiBs, e.g. --dma-window size=1G --region size=1G,backing=hugetlb-1g")]
    NotWholeGib { window: ByteSize, region: ByteSize },
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn with_kernel(kernel: PathBuf) -> Self {
        Self {
            kernel,
            initrd: None,
            cmdline: None,
            memory: MemoryConfig::default(),
            cpus: default_cpus(),
            dma_window: DmaWindowConfig::default(),
            region: RegionConfig::default(),
            devices: Vec::new(),
        }
    }

    /// Reads a configuration file; the format follows the extension.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        let parse_err = |format, message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            format,
            message,
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => toml::from_str(&text).map_err(|e| parse_err("TOML", e.to_string())),
            Some("json") => {
                serde_json::from_str(&text).map_err(|e| parse_err("JSON", e.to_string()))
            }
            _ => Err(ConfigError::UnknownFormat(path.to_path_buf())),
        }
    }

    /// Checks everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        let mem = self.memory.size;
        if mem.0 < MIN_MEMORY {
            return Err(ConfigError::MemoryTooSmall(mem));
        }
        if mem.0 > MAX_MEMORY {
            return Err(ConfigError::MemoryTooLarge(mem));
        }
        if !mem.0.is_multiple_of(4 * KIB) {
            return Err(ConfigError::MemoryUnaligned(mem));
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError::Cpus(self.cpus));
        }
        let win = self.dma_window.size;
        if win.0 > MAX_DMA_WINDOW {
            return Err(ConfigError::WindowTooLarge(win));
        }
        if !win.0.is_multiple_of(DMA_WINDOW_ALIGN) {
            let up = ByteSize(win.0.div_ceil(DMA_WINDOW_ALIGN) * DMA_WINDOW_ALIGN);
            return Err(ConfigError::WindowUnaligned(win, up));
        }
        if let Some(size) = self.region.size {
            if size.0 == 0 || size.0 > MAX_DMA_WINDOW || !size.0.is_multiple_of(DMA_WINDOW_ALIGN) {
                return Err(ConfigError::RegionSize(size));
            }
        }
        // 1 GiB pages are lent to the window whole: both must be whole GiBs.
        if self.region.backing == RegionBacking::Hugetlb1G {
            let region = self.region.size.unwrap_or(win);
            if !win.0.is_multiple_of(GIB) || !region.0.is_multiple_of(GIB) || win.0 == 0 {
                return Err(ConfigError::NotWholeGib {
                    window: win,
                    region,
                });
            }
        }
        Ok(())
    }

    /// The command line the guest boots with, before the VMM adds device parameters.
    pub fn base_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!("512M".parse::<ByteSize>().unwrap(), ByteSize(512 * MIB));
        assert_eq!("2g".parse::<ByteSize>().unwrap(), ByteSize(2 * GIB));
        assert_eq!("64K".parse::<ByteSize>().unwrap(), ByteSize(64 * KIB));
        assert_eq!("4096".parse::<ByteSize>().unwrap(), ByteSize(4096));
        assert_eq!("1GiB".parse::<ByteSize>().unwrap(), ByteSize(GIB));
    }

    #[test]
    fn bad_sizes_say_why() {
        let e = "12Q".parse::<ByteSize>().unwrap_err().to_string();
        assert!(
            e.contains("\"12Q\"") && e.contains("unknown suffix") && e.contains("512M"),
            "{e}"
        );
        let e = "M".parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains("does not start with a number"), "{e}");
        let e = "99999999999G".parse::<ByteSize>().unwrap_err().to_string();
        assert!(e.contains("overflows"), "{e}");
        assert!("-1M".parse::<ByteSize>().is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["512M", "2G", "64K", "4097"] {
            assert_eq!(s.parse::<ByteSize>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn toml_and_json_give_the_same_struct() {
        let dir = std::env::temp_dir().join(format!("dmavisor-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("vm.toml");
        std::fs::write(
            &t,
            "kernel = \"/k\"\ncpus = 2\n[memory]\nsize = \"1G\"\n[dma_window]\nsize = 134217728\n",
        )
        .unwrap();
        let j = dir.join("vm.json");
        std::fs::write(
            &j,
            r#"{"kernel":"/k","cpus":2,"memory":{"size":"1G"},"dma_window":{"size":"128M"}}"#,
        )
        .unwrap();
        let a = VmConfig::from_file(&t).unwrap();
        let b = VmConfig::from_file(&j).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.memory.size, ByteSize(GIB));
        assert_eq!(a.dma_window.size, ByteSize(128 * MIB));
        std::fs::write(&j, r#"{"kernel":"/k","memroy":{"size":"1G"}}"#).unwrap();
        let e = VmConfig::from_file(&j).unwrap_err().to_string();
        assert!(e.contains("memroy"), "unknown keys are named: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn devices_parse_and_name_mistakes() {
        let d: DeviceConfig = "vfio=/sys/bus/pci/devices/0000:00:04.0".parse().unwrap();
        assert_eq!(d.vfio, PathBuf::from("/sys/bus/pci/devices/0000:00:04.0"));
        assert_eq!(d.dma, DmaPolicy::Mapped);
        let d: DeviceConfig = "vfio=0000:00:04.0,dma=all".parse().unwrap();
        assert_eq!(d.vfio, PathBuf::from("/sys/bus/pci/devices/0000:00:04.0"));
        assert_eq!(d.dma, DmaPolicy::All);
        let e = "vfio=/x,dma=some".parse::<DeviceConfig>().unwrap_err();
        assert!(e.contains("dma=mapped") && e.contains("`some`"), "{e}");
        let e = "dma=all".parse::<DeviceConfig>().unwrap_err();
        assert!(e.contains("names no device"), "{e}");
        let e = "pci=1".parse::<DeviceConfig>().unwrap_err();
        assert!(e.contains("`pci=1`") && e.contains("--device vfio="), "{e}");
        let t: VmConfig = toml::from_str(
            "kernel = \"/k\"\n[[device]]\nvfio = \"/sys/bus/pci/devices/0000:00:04.0\"\ndma = \"all\"\n",
        )
        .unwrap();
        assert_eq!(t.devices.len(), 1);
        assert_eq!(t.devices[0].dma, DmaPolicy::All);
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = VmConfig::with_kernel("/nonexistent/bzImage".into());
        assert!(matches!(c.validate(), Err(ConfigError::KernelMissing(_))));
        c.kernel = std::env::current_exe().unwrap();
        c.validate().unwrap();
        c.dma_window.size = ByteSize(MAX_DMA_WINDOW + DMA_WINDOW_ALIGN);
        assert!(matches!(c.validate(), Err(ConfigError::WindowTooLarge(_))));
        c.dma_window.size = ByteSize(3 * MIB);
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("try 4M"), "{e}");
        c.dma_window.size = ByteSize(0);
        c.validate().unwrap();
        c.cpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Cpus(0))));
        c.cpus = 1;
        c.memory.size = ByteSize(MIB);
        assert!(matches!(c.validate(), Err(ConfigError::MemoryTooSmall(_))));
    }
}

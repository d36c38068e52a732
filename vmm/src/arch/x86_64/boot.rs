//! Loading the guest kernel, initrd and command line, and describing memory to the kernel:
//! a bzImage or an ELF vmlinux without PVH note boots through the Linux 64-bit protocol
//! (zero page); an ELF vmlinux with a PVH note boots through PVH (`hvm_start_info`).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{self, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::regs::EntryMode;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// Highest initrd address for kernels that do not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// The 64-bit entry point of a bzImage's protected-mode code is 0x200 past its load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel image {path}: {source}")]
    OpenKernel {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel image {path} is neither a bzImage nor an ELF vmlinux: {source}")]
    LoadKernel { path: String, source: loader::Error },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd {
        path: String,
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest RAM between the kernel's end ({kernel_end:#x}) and {limit:#x}; give the guest more --memory")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is invalid or longer than {CMDLINE_MAX_SIZE} bytes: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("writing {what} to guest memory: {source}")]
    Memory {
        what: &'static str,
        source: vm_memory::GuestMemoryError,
    },
    #[error("too many e820 entries: {0}")]
    TooManyE820(usize),
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub entry: u64,
}

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::Memory { what, source }
}

/// Loads everything the kernel needs to start and returns its entry point.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &GuestLayout,
    kernel_path: &Path,
    initrd_path: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let path = kernel_path.display().to_string();
    let mut kernel = File::open(kernel_path).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let is_elf = {
        let mut magic = [0u8; 4];
        let n = kernel.read(&mut magic).unwrap_or(0);
        kernel
            .seek(SeekFrom::Start(0))
            .map_err(|source| BootError::OpenKernel {
                path: path.clone(),
                source,
            })?;
        n == 4 && &magic == b"\x7fELF"
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let loaded = if is_elf {
        Elf::load(mem, None, &mut kernel, himem)
    } else {
        BzImage::load(mem, None, &mut kernel, himem)
    }
    .map_err(|source| BootError::LoadKernel { path, source })?;

    let entry = match (is_elf, loaded.pvh_boot_cap) {
        (true, PvhBootCapability::PvhEntryPresent(addr)) => BootEntry {
            mode: EntryMode::Pvh,
            entry: addr.raw_value(),
        },
        (true, _) => BootEntry {
            mode: EntryMode::Linux64,
            entry: loaded.kernel_load.raw_value(),
        },
        (false, _) => BootEntry {
            mode: EntryMode::Linux64,
            entry: loaded.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
    };

    loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| match e {
        loader::Error::InvalidCommandLine => {
            BootError::Cmdline(linux_loader::cmdline::Error::InvalidAscii)
        }
        _ => BootError::Memory {
            what: "command line",
            source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(CMDLINE_START)),
        },
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes()
        .len() as u32;

    let initrd_max = loaded
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let initrd = match initrd_path {
        Some(p) => Some(load_initrd(
            mem,
            p,
            loaded.kernel_end,
            layout.low_ram_end().min(initrd_max + 1),
        )?),
        None => None,
    };

    let e820 = layout.e820_ram();
    match entry.mode {
        EntryMode::Linux64 => {
            write_zero_page(mem, loaded.setup_header, &e820, cmdline_len, initrd)?
        }
        EntryMode::Pvh => write_pvh_start_info(mem, &e820, initrd)?,
    }
    Ok(entry)
}

/// Loads the initrd as high as allowed, page aligned; returns `(address, size)`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.display().to_string(),
        source,
    })?;
    let size = data.len() as u64;
    let too_large = BootError::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(BootError::InitrdTooLarge {
            size,
            kernel_end,
            limit,
        });
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(mem_err("initrd"))?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<loader::bootparam::setup_header>,
    e820: &[(u64, u64)],
    cmdline_len: u32,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len + 1;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::TooManyE820(e820.len()));
    }
    for (slot, &(addr, size)) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: E820_RAM,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err("zero page"))
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let info_size = std::mem::size_of::<hvm_start_info>() as u64;
    let memmap_addr = PVH_INFO_START + info_size;
    let memmap_size = (e820.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let modlist_addr = memmap_addr + memmap_size;
    if modlist_addr + std::mem::size_of::<hvm_modlist_entry>() as u64 > ZERO_PAGE_START {
        return Err(BootError::TooManyE820(e820.len()));
    }
    for (i, &(addr, size)) in e820.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr,
            size,
            type_: E820_RAM,
            reserved: 0,
        };
        let at = memmap_addr + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(mem_err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: memmap_addr,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(modlist_addr))
            .map_err(mem_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = modlist_addr;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(mem_err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_file(rel: &str) -> Option<std::path::PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
        p.exists().then_some(p)
    }

    fn load_with(kernel: &Path) -> (GuestMemoryMmap, BootEntry) {
        let layout = GuestLayout::new(256 << 20, 0);
        let mem = crate::memory::create(&layout).unwrap();
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).unwrap();
        cmdline.insert_str("console=ttyS0").unwrap();
        let entry = load(&mem, &layout, kernel, None, &cmdline).unwrap();
        (mem, entry)
    }

    #[test]
    fn bzimage_boots_linux64_with_zero_page() {
        let Some(k) = guest_file("target/guest/kernel") else {
            eprintln!("skipped: target/guest/kernel not built (resources/build-guest.sh)");
            return;
        };
        let (mem, entry) = load_with(&k);
        assert_eq!(entry.mode, EntryMode::Linux64);
        assert_eq!(entry.entry, HIMEM_START + BZIMAGE_64BIT_ENTRY_OFFSET);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!(params.e820_entries, 2);
    }

    #[test]
    fn elf_vmlinux_with_pvh_note_boots_pvh() {
        let Some(k) = guest_file("target/guest/linux/vmlinux") else {
            eprintln!("skipped: target/guest/linux/vmlinux not built (resources/build-guest.sh)");
            return;
        };
        let (mem, entry) = load_with(&k);
        assert_eq!(entry.mode, EntryMode::Pvh);
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.memmap_entries, 2);
    }

    #[test]
    fn garbage_kernel_is_a_clear_error() {
        let p = std::env::temp_dir().join(format!("dmavisor-notakernel-{}", std::process::id()));
        std::fs::write(&p, vec![0x42u8; 8192]).unwrap();
        let layout = GuestLayout::new(64 << 20, 0);
        let mem = crate::memory::create(&layout).unwrap();
        let cmdline = Cmdline::new(CMDLINE_MAX_SIZE).unwrap();
        let e = load(&mem, &layout, &p, None, &cmdline)
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither a bzImage nor an ELF"), "{e}");
        std::fs::remove_file(&p).unwrap();
    }
}

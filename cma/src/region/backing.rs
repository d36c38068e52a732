//! The system calls behind each backing: memfd (plain or hugetlb), dma-heap buffers,
//! and the mappings over them.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::RegionError;

pub(crate) const HUGE_2M: usize = 2 << 20;
pub(crate) const HUGE_1G: usize = 1 << 30;
const MFD_HUGE_SHIFT: u32 = 26;

fn syscall_err(op: &'static str, backing: &'static str, len: usize) -> RegionError {
    RegionError::Syscall {
        op,
        backing,
        len,
        source: io::Error::last_os_error(),
    }
}

/// A memfd of `len` bytes; `huge` selects hugetlbfs pages of that size.
pub(crate) fn memfd(
    len: usize,
    huge: Option<usize>,
    backing: &'static str,
) -> Result<OwnedFd, RegionError> {
    let name: &CStr = c"dmavisor-cma";
    let mut flags = libc::MFD_CLOEXEC;
    if let Some(ps) = huge {
        flags |= libc::MFD_HUGETLB | ((ps.trailing_zeros()) << MFD_HUGE_SHIFT);
    }
    // SAFETY: `name` is a valid NUL-terminated string; the call has no memory effects.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags) };
    if fd < 0 {
        return Err(syscall_err("memfd_create", backing, len));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscall on an fd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
        return Err(syscall_err("ftruncate", backing, len));
    }
    Ok(fd)
}

/// Map `len` bytes of `fd` at `file_off`, shared and populated. With `at`, replace
/// the mapping at that address (MAP_FIXED), which must lie inside a mapping we own.
pub(crate) fn map(
    fd: RawFd,
    len: usize,
    file_off: usize,
    at: Option<*mut u8>,
    backing: &'static str,
) -> Result<*mut u8, RegionError> {
    let mut flags = libc::MAP_SHARED | libc::MAP_POPULATE;
    let addr = match at {
        Some(p) => {
            flags |= libc::MAP_FIXED;
            p.cast()
        }
        None => std::ptr::null_mut(),
    };
    // SAFETY: a shared mapping of a file we hold open. With MAP_FIXED the callers pass
    // an address range inside a mapping that the region owns exclusively, so no other
    // Rust object is aliased or invalidated by the replacement.
    let p = unsafe {
        libc::mmap(
            addr,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            file_off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(syscall_err("mmap", backing, len));
    }
    Ok(p.cast())
}

/// Give `len` bytes at `file_off` of a hugetlbfs memfd back to the host's pool.
pub(crate) fn punch(
    fd: RawFd,
    file_off: usize,
    len: usize,
    backing: &'static str,
) -> Result<(), RegionError> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: plain syscall on an fd we own; the range is no longer mapped by us.
    if unsafe { libc::fallocate(fd, mode, file_off as libc::off_t, len as libc::off_t) } != 0 {
        return Err(syscall_err("fallocate(PUNCH_HOLE)", backing, len));
    }
    Ok(())
}

/// Free huge pages of `page_size` the host has reserved.
pub(crate) fn free_huge_pages(page_size: usize) -> usize {
    let path = format!(
        "/sys/kernel/mm/hugepages/hugepages-{}kB/free_hugepages",
        page_size / 1024
    );
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `struct dma_heap_allocation_data` from `<linux/dma-heap.h>`.
#[repr(C)]
#[derive(Default)]
struct DmaHeapAllocationData {
    len: u64,
    fd: u32,
    fd_flags: u32,
    heap_flags: u64,
}

/// `DMA_HEAP_IOCTL_ALLOC = _IOWR('H', 0x0, struct dma_heap_allocation_data)`.
const DMA_HEAP_IOCTL_ALLOC: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<DmaHeapAllocationData>() as libc::c_ulong) << 16)
    | ((b'H' as libc::c_ulong) << 8);

/// The heap to use when none is named: a CMA heap (`linux,cma`, `reserved`, or any
/// name containing "cma"), since those hand out physically contiguous buffers. The
/// `system` heap does not, so it is never picked.
pub(crate) fn find_contiguous_heap() -> Result<String, RegionError> {
    let dir = PathBuf::from("/dev/dma_heap");
    let entries = std::fs::read_dir(&dir).map_err(|source| RegionError::DmaHeapMissing {
        path: dir.clone(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n == "reserved" || n.contains("cma"))
        .collect();
    names.sort();
    names.pop().ok_or_else(|| RegionError::DmaHeapMissing {
        path: dir.join("<cma or reserved heap>"),
        source: io::Error::from(io::ErrorKind::NotFound),
    })
}

/// Allocate a dma-buf of `len` bytes from `/dev/dma_heap/<name>`; returns its fd.
pub(crate) fn dma_heap_alloc(name: &str, len: usize) -> Result<OwnedFd, RegionError> {
    let path = PathBuf::from("/dev/dma_heap").join(name);
    let heap = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(&path)
        .map_err(|source| RegionError::DmaHeapMissing {
            path: path.clone(),
            source,
        })?;
    let mut data = DmaHeapAllocationData {
        len: len as u64,
        fd_flags: (libc::O_RDWR | libc::O_CLOEXEC) as u32,
        ..Default::default()
    };
    // SAFETY: DMA_HEAP_IOCTL_ALLOC reads and writes exactly one
    // `dma_heap_allocation_data`, which `data` is (repr(C), same layout as the uapi).
    let rc = unsafe { libc::ioctl(heap.as_raw_fd(), DMA_HEAP_IOCTL_ALLOC as _, &mut data) };
    if rc != 0 {
        return Err(syscall_err("DMA_HEAP_IOCTL_ALLOC", "dma-heap", len));
    }
    // SAFETY: on success the kernel returned a new dma-buf fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(data.fd as RawFd) })
}

/// Unmap on drop.
pub(crate) struct Mapping {
    pub(crate) ptr: *mut u8,
    pub(crate) len: usize,
    pub(crate) fd: OwnedFd,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping this object created and owns; the
        // region that hands out pointers into it is being dropped with it.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl Mapping {
    pub(crate) fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Unmap everything past the first `len` bytes.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len < self.len {
            // SAFETY: the tail `ptr+len..ptr+self.len` belongs to this mapping, and
            // no pointer into it has been handed out (the region is still being
            // built); afterwards `self.len` no longer covers it.
            unsafe { libc::munmap(self.ptr.add(len).cast(), self.len - len) };
            self.len = len;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dma_heap_ioctl_number_matches_uapi() {
        // _IOWR('H', 0, 24 bytes) as computed by the kernel headers.
        assert_eq!(DMA_HEAP_IOCTL_ALLOC, 0xc018_4800);
    }

    #[test]
    fn missing_dma_heap_names_the_path() {
        if std::path::Path::new("/dev/dma_heap/no-such-heap").exists() {
            return;
        }
        let err = dma_heap_alloc("no-such-heap", 1 << 20).unwrap_err();
        assert!(
            err.to_string().contains("/dev/dma_heap/no-such-heap"),
            "{err}"
        );
    }
}

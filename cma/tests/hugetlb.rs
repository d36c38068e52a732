//! Physical contiguity on real hugetlb regions. The test sets the huge page counts
//! itself (and restores them); it skips, saying why, only where that is impossible
//! (not root, no hugetlb support, or the kernel could not find the memory).

mod common;

use std::sync::Arc;

use cma::{
    AllocError, AllocRequest, Allocator, AllocatorConfig, Backing, Contiguity, HugePageSize,
    MemcpyMover, Region,
};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

fn sysfs(kib: usize, file: &str) -> String {
    format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB/{file}")
}

fn read_count(kib: usize, file: &str) -> Option<usize> {
    std::fs::read_to_string(sysfs(kib, file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Make sure `extra` more pages of `kib` are free; returns the count to restore.
fn reserve_pages(kib: usize, extra: usize) -> Result<usize, String> {
    let total = read_count(kib, "nr_hugepages")
        .ok_or_else(|| format!("no {}", sysfs(kib, "nr_hugepages")))?;
    let free = read_count(kib, "free_hugepages").unwrap_or(0);
    if free >= extra {
        return Ok(total);
    }
    let want = total + extra - free;
    std::fs::write(sysfs(kib, "nr_hugepages"), want.to_string())
        .map_err(|e| format!("cannot write {}: {e}", sysfs(kib, "nr_hugepages")))?;
    let got = read_count(kib, "free_hugepages").unwrap_or(0);
    if got < extra {
        let _ = std::fs::write(sysfs(kib, "nr_hugepages"), total.to_string());
        return Err(format!(
            "kernel granted only {got} free {kib} kB pages, need {extra}"
        ));
    }
    Ok(total)
}

/// Puts the huge page count back on drop, so that a failing assertion does not
/// leave the host with pages reserved.
struct Restore {
    kib: usize,
    total: usize,
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(sysfs(self.kib, "nr_hugepages"), self.total.to_string());
    }
}

/// A `File` view of the region's fd, never closed (wrapped in ManuallyDrop).
fn borrowed_file(fd: std::os::fd::RawFd) -> std::fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: the fd stays open while the region lives; the caller never drops the
    // returned File, so the region's fd is not closed twice.
    unsafe { std::fs::File::from_raw_fd(fd) }
}

fn check_region(r: &Region, page: usize) {
    assert_eq!(r.page_size(), page);
    assert_eq!(
        r.contiguity(),
        Contiguity::Verified,
        "running as root, pagemap must give frame numbers"
    );
    assert!(
        r.verify_extents(),
        "every 4 KiB page of every extent must be where the extent says"
    );
    let ext = r.extents();
    assert_eq!(ext.iter().map(|e| e.len).sum::<usize>(), r.len());
    for w in ext.windows(2) {
        assert_eq!(w[0].end(), w[1].offset, "extents tile the region");
        let p0 = w[0].phys.unwrap() + w[0].len as u64;
        // Sorted by frame number and maximal: the next extent starts higher, not adjacent.
        assert!(
            w[1].phys.unwrap() > p0,
            "extents are ordered by physical address and maximal"
        );
    }
}

#[test]
fn hugetlb_regions_report_and_respect_physical_extents() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the hugetlb test sets huge page counts and reads frame numbers: run it as root (CI does)"
    );
    // 2 MiB pages, ordered by frame number into extents.
    // 64 free pages for a 32-page region: the region may over-reserve, keep the
    // longest physical runs and give the rest back.
    match reserve_pages(2048, 64) {
        Err(why) => println!("SKIP 2 MiB part: {why}"),
        Ok(total) => {
            let _restore = Restore { kib: 2048, total };
            let free_before = read_count(2048, "free_hugepages").unwrap();
            let r = Region::reserve(64 * MIB, Backing::Hugetlb(HugePageSize::Size2M))
                .expect("2 MiB hugetlb region");
            assert_eq!(
                read_count(2048, "free_hugepages").unwrap(),
                free_before - 32,
                "spare pages must be given back"
            );
            check_region(&r, 2 * MIB);
            let runs: Vec<usize> = r.extents().iter().map(|e| e.len / (2 * MIB)).collect();
            println!(
                "2 MiB hugetlb: 32 pages form {} extents, runs of pages {runs:?}",
                runs.len()
            );
            // File offsets follow the reordering: the byte at region offset x is at
            // file_offset(x) in the memfd.
            for (i, e) in r.extents().iter().enumerate() {
                let off = e.offset + 4096 * i;
                // SAFETY: `off` is inside the 64 MiB mapping, which nothing else uses.
                unsafe {
                    r.host_addr()
                        .as_ptr()
                        .add(off)
                        .cast::<u64>()
                        .write_volatile(0xC0FFEE00 + i as u64)
                };
                let mut b = [0u8; 8];
                let file = std::mem::ManuallyDrop::new(borrowed_file(r.fd()));
                std::os::unix::fs::FileExt::read_exact_at(
                    &*file,
                    &mut b,
                    r.file_offset(off).unwrap(),
                )
                .unwrap();
                assert_eq!(
                    u64::from_ne_bytes(b),
                    0xC0FFEE00 + i as u64,
                    "file_offset of extent {i}"
                );
            }
            assert_eq!(r.file_offset(r.len()), None);
            let r = Arc::new(r);
            let largest = r.largest_extent();
            let a = Allocator::new(
                r.clone(),
                AllocatorConfig::default(),
                Arc::new(MemcpyMover::new(r.clone())),
            )
            .unwrap();
            let e = a.alloc(AllocRequest::new(largest + 4096)).unwrap_err();
            assert_eq!(
                e,
                AllocError::LargerThanExtent {
                    requested: largest + 4096,
                    largest_extent: largest
                }
            );
            // Fill the region with 1 MiB chunks: each lies in one extent, and its
            // physical address is what pagemap says for its first byte.
            let mut live = Vec::new();
            while let Ok(x) = a.alloc(AllocRequest::new(MIB).align(MIB)) {
                let ext = r.extents()[x.extent()];
                assert!(x.offset() >= ext.offset && x.offset() + x.len() <= ext.end());
                let phys = x.phys_addr().unwrap();
                assert_eq!(phys % MIB as u64, 0);
                assert_eq!(phys, ext.phys.unwrap() + (x.offset() - ext.offset) as u64);
                live.push(x);
            }
            assert_eq!(live.len(), 64);
            drop(live);
            let big = a.alloc(AllocRequest::new(largest)).unwrap();
            assert_eq!(big.len(), largest);
            drop((big, a));
            drop(r);
        }
    }
    // 1 GiB page: one extent of 1 GiB, chosen automatically.
    match reserve_pages(1024 * 1024, 1) {
        Err(why) => println!("SKIP 1 GiB part: {why}"),
        Ok(total) => {
            let _restore = Restore {
                kib: 1024 * 1024,
                total,
            };
            let r = Region::reserve(GIB, Backing::Hugetlb(HugePageSize::Auto))
                .expect("1 GiB hugetlb region");
            check_region(&r, GIB);
            assert_eq!(r.extents().len(), 1);
            assert_eq!(
                r.extents()[0].phys.unwrap() % GIB as u64,
                0,
                "a 1 GiB page is 1 GiB aligned"
            );
            println!(
                "1 GiB hugetlb: one extent at phys {:#x}",
                r.extents()[0].phys.unwrap()
            );
            drop(r);
        }
    }
}

//! Physical frame numbers from `/proc/self/pagemap`, and the contiguous extents they
//! form. Frame numbers are only visible to a privileged process (CAP_SYS_ADMIN);
//! others read zeros, which we report as "unknown", never as contiguous.

use std::fs::File;
use std::os::unix::fs::FileExt;

const PAGEMAP: &str = "/proc/self/pagemap";
const ENTRY: u64 = 8;
const PRESENT: u64 = 1 << 63;
const PFN_MASK: u64 = (1 << 55) - 1;
pub(crate) const SMALL_PAGE: usize = 4096;

/// A physically contiguous piece of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Byte offset of the extent inside the region.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
    /// Host physical address of the extent's first byte, when known.
    pub phys: Option<u64>,
}

impl Extent {
    pub fn end(&self) -> usize {
        self.offset + self.len
    }
}

/// Physical addresses of `count` pages of `page_size` bytes starting at `addr`, read
/// one pagemap entry per page. `None` when pagemap cannot be read or hides frame
/// numbers (unprivileged) or a page is not present.
pub(crate) fn phys_addrs(addr: usize, page_size: usize, count: usize) -> Option<Vec<u64>> {
    let f = File::open(PAGEMAP).ok()?;
    let mut out = Vec::with_capacity(count);
    let stride = page_size / SMALL_PAGE;
    if stride == 1 {
        // One bulk read for 4 KiB pages.
        let mut buf = vec![0u8; count * ENTRY as usize];
        f.read_exact_at(&mut buf, (addr / SMALL_PAGE) as u64 * ENTRY)
            .ok()?;
        for c in buf.chunks_exact(ENTRY as usize) {
            out.push(decode(u64::from_le_bytes(c.try_into().ok()?))?);
        }
    } else {
        let mut b = [0u8; ENTRY as usize];
        for i in 0..count {
            let page = (addr + i * page_size) / SMALL_PAGE;
            f.read_exact_at(&mut b, page as u64 * ENTRY).ok()?;
            out.push(decode(u64::from_le_bytes(b))?);
        }
    }
    Some(out)
}

fn decode(entry: u64) -> Option<u64> {
    let pfn = entry & PFN_MASK;
    (entry & PRESENT != 0 && pfn != 0).then_some(pfn * SMALL_PAGE as u64)
}

/// Merge pages (each physically contiguous in itself) whose physical addresses
/// follow each other into extents.
pub(crate) fn merge_extents(page_size: usize, phys: &[u64]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (i, &p) in phys.iter().enumerate() {
        match out.last_mut() {
            Some(e) if e.phys.map(|b| b + e.len as u64) == Some(p) => e.len += page_size,
            _ => out.push(Extent {
                offset: i * page_size,
                len: page_size,
                phys: Some(p),
            }),
        }
    }
    out
}

/// Check that every 4 KiB page of every extent is where the extent says it is.
pub(crate) fn verify(base: usize, extents: &[Extent]) -> bool {
    extents.iter().all(|e| {
        let Some(p0) = e.phys else { return false };
        match phys_addrs(base + e.offset, SMALL_PAGE, e.len / SMALL_PAGE) {
            Some(v) => v
                .iter()
                .enumerate()
                .all(|(i, &p)| p == p0 + (i * SMALL_PAGE) as u64),
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_adjacent_pages_only() {
        let ps = 2 << 20;
        let e = merge_extents(
            ps,
            &[
                0x4000_0000,
                0x4020_0000,
                0x9000_0000,
                0x9020_0000,
                0x9040_0000,
            ],
        );
        assert_eq!(e.len(), 2);
        assert_eq!((e[0].offset, e[0].len), (0, 2 * ps));
        assert_eq!(
            (e[1].offset, e[1].len, e[1].phys),
            (2 * ps, 3 * ps, Some(0x9000_0000))
        );
    }

    #[test]
    fn decode_rejects_absent_and_hidden_frames() {
        assert_eq!(decode(0), None);
        assert_eq!(
            decode(PRESENT),
            None,
            "pfn 0 is what unprivileged readers see"
        );
        assert_eq!(decode(PRESENT | 5), Some(5 * 4096));
    }
}

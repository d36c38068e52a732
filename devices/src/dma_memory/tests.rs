use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cma::{Backing as RegionBacking, Region};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

use super::*;
use crate::guest_memory::GuestMemoryHandle;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const BASE: u64 = 0x4000_0000;

/// Guest memory with a window of `window_len` at `BASE`, every window page filled with its own
/// pattern, and a memfd region of `region_len` lent to it.
fn memory(region_len: usize, window_len: u64) -> (DmaMemory, GuestMemoryHandle) {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MIB as usize),
        (GuestAddress(BASE), window_len as usize),
    ])
    .unwrap();
    let guest = GuestMemoryHandle::new(mem);
    for p in 0..window_len / PAGE {
        guest
            .memory()
            .write_obj(pattern(p), GuestAddress(BASE + p * PAGE))
            .unwrap();
    }
    let region = Region::reserve(region_len, RegionBacking::Memfd).unwrap();
    let dma = DmaMemory::new(region, &guest, BASE, window_len).unwrap();
    assert_eq!(
        dma.stats().lending.lent as usize,
        region_len / PAGE as usize
    );
    (dma, guest)
}

fn pattern(page: u64) -> u64 {
    page * 0x9e37_79b9 + 1
}

fn intact(guest: &GuestMemoryHandle, page: u64) -> bool {
    guest
        .memory()
        .read_obj::<u64>(GuestAddress(BASE + page * PAGE))
        .unwrap()
        == pattern(page)
}

fn all_intact(guest: &GuestMemoryHandle, pages: u64) -> bool {
    (0..pages).all(|p| intact(guest, p))
}

const FAILFAST: MapOptions = MapOptions {
    failfast: true,
    discard: false,
    deadline: Duration::ZERO,
};

#[test]
fn lent_pages_map_in_place_and_unmap_keeps_them() {
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    assert!(all_intact(&guest, 4096), "lending kept every byte");
    let gpa = BASE + 4 * MIB;
    let placement = dma.map(gpa, MIB, FAILFAST).unwrap();
    assert!(
        !placement.host_phys,
        "memfd regions reveal no physical addresses"
    );
    assert_eq!(
        placement.host_addr,
        4 * MIB,
        "the pages' own frames, claimed in place"
    );
    assert_eq!(placement.bytes_migrated, 0);
    // The window *is* the region's memory: a write through guest memory lands in the frame.
    guest
        .memory()
        .write_obj(0x5au8, GuestAddress(gpa + 200))
        .unwrap();
    let frame = (4 * MIB / PAGE) as usize;
    let pin = dma.pin_transient(frame).unwrap();
    // SAFETY: byte 200 of the pinned frame, which lives while the pin does.
    assert_eq!(unsafe { pin.frame_bytes().0.add(200).read() }, 0x5a);
    drop(pin);
    dma.unmap(gpa, MIB).unwrap();
    assert_eq!(dma.unmap(gpa, MIB), Err(MapError::NotMapped), "only once");
    let r: u8 = guest.memory().read_obj(GuestAddress(gpa + 200)).unwrap();
    assert_eq!(r, 0x5a, "contents kept by UNMAP");
    let s = dma.stats();
    assert_eq!(
        (
            s.usage.allocated,
            s.lending.lent,
            s.allocator.pages_migrated
        ),
        (0, 2048, 0)
    );
}

#[test]
fn a_map_outside_the_region_moves_lent_pages_out_and_loses_nothing() {
    // Overcommitted: 8 MiB of region for a 16 MiB window.
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    let gpa = BASE + 12 * MIB;
    let placement = dma.map(gpa, MIB, FAILFAST).unwrap();
    assert_eq!(
        placement.bytes_migrated,
        2 * MIB,
        "256 lent pages left + the range's own bytes"
    );
    assert!(all_intact(&guest, 4096), "every page kept its bytes");
    let st = dma.stats().lending;
    assert_eq!((st.moves, st.moves_out, st.mapped), (256, 256, 256));
    dma.unmap(gpa, MIB).unwrap();
    // The range is lent now, on the frames it had: the next MAP is in place.
    assert_eq!(dma.map(gpa, MIB, FAILFAST).unwrap().bytes_migrated, 0);
    dma.unmap(gpa, MIB).unwrap();
    assert!(all_intact(&guest, 4096));
}

#[test]
fn a_transient_pin_fails_fast_keeps_its_frame_with_discard_and_is_freed_when_unpinned() {
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    let gpa = BASE + 2 * MIB;
    let pinned_page = (2 * MIB / PAGE) as usize + 3;
    let pin = dma.pin_transient(pinned_page).unwrap();
    assert_eq!(dma.map(gpa, MIB, FAILFAST).unwrap_err(), MapError::Busy);
    assert!(all_intact(&guest, 4096), "a failed MAP changes nothing");
    let discard = MapOptions {
        discard: true,
        ..FAILFAST
    };
    let placement = dma.map(gpa, MIB, discard).unwrap();
    let pinned_at = pinned_page as u64 * PAGE;
    assert!(
        !(placement.host_addr..placement.host_addr + MIB).contains(&pinned_at),
        "never hand out a pinned frame"
    );
    assert_eq!(dma.stats().lending.orphans, 1);
    drop(pin);
    assert_eq!(dma.stats().lending.orphans, 0, "freed when unpinned");
    dma.unmap(gpa, MIB).unwrap();
}

#[test]
fn without_failfast_a_short_pin_on_the_range_is_waited_out_in_place() {
    let (dma, _guest) = memory(8 << 20, 16 * MIB);
    let pin = dma.pin_transient(100).unwrap();
    let opts = MapOptions {
        failfast: false,
        discard: true,
        deadline: Duration::from_secs(5),
    };
    // 8 MiB: worth waiting up to about 4 ms for the pin rather than moving 8 MiB. The pin is
    // dropped as soon as the MAP is seen waiting for it (not after a fixed sleep, which a
    // loaded machine can stretch past the budget).
    let map = {
        let dma = dma.clone();
        std::thread::spawn(move || dma.map(BASE, 8 * MIB, opts))
    };
    let t = Instant::now();
    while dma.stats().maps.pin_waits == 0 && t.elapsed() < Duration::from_secs(5) {
        std::thread::yield_now();
    }
    assert_eq!(dma.stats().maps.pin_waits, 1, "the MAP never waited");
    drop(pin);
    let placement = map.join().unwrap().unwrap();
    assert_eq!(
        placement.host_addr, 0,
        "the range's own frames, after the pin went"
    );
    assert_eq!(placement.bytes_migrated, 0);
    dma.unmap(BASE, 8 * MIB).unwrap();
}

#[test]
fn a_device_thread_writing_through_its_handle_never_meets_a_page_mid_move() {
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    let stop = Arc::new(AtomicBool::new(false));
    // A device thread writing one word of a window page as fast as it can, through the only
    // guest memory a device has. Around the gate it would write a write-protected page
    // mid-move and die of SIGSEGV, or write the old frame after the copy and lose the write.
    let at = GuestAddress(BASE + 5 * PAGE + 8);
    let writer = {
        let (guest, stop) = (guest.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                guest.memory().write_obj(i, at).unwrap();
            }
            i
        })
    };
    let mut moved = 0;
    for _ in 0..10 {
        // The whole region: every lent page moves out, and back in.
        moved += dma.migrate(2048).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let last = writer.join().unwrap();
    assert_eq!(moved, 10 * 2 * 2048);
    assert!(last > 0);
    assert_eq!(
        guest.memory().read_obj::<u64>(at).unwrap(),
        last,
        "no write lost"
    );
    assert!((0..4096).filter(|&p| p != 5).all(|p| intact(&guest, p)));
}

#[test]
fn errors_map_to_statuses() {
    let (dma, _guest) = memory(2 << 20, 16 * MIB);
    assert_eq!(
        dma.map(BASE + 2 * MIB, 4 * MIB, FAILFAST).unwrap_err(),
        MapError::TooBig
    );
    dma.map(BASE + 4 * MIB, 2 * MIB, FAILFAST).unwrap();
    assert_eq!(
        dma.map(BASE + 8 * MIB, MIB, FAILFAST).unwrap_err(),
        MapError::NoMem
    );
    dma.unmap(BASE + 4 * MIB, 2 * MIB).unwrap();
    assert!(matches!(
        dma.map(BASE + 1, PAGE, FAILFAST).unwrap_err(),
        MapError::Io(_)
    ));
    assert!(matches!(
        dma.map(BASE - PAGE, PAGE, FAILFAST).unwrap_err(),
        MapError::Io(_)
    ));
}

/// Writes the pinned buffers to a file through io_uring's fixed-buffer write: the kernel reads
/// the host pages it pinned at registration, whatever the VMM's mapping points at now.
fn write_fixed(pin: &LongTermPin) -> Vec<u8> {
    use io_uring::{opcode, types, IoUring};
    use std::os::fd::AsRawFd;
    let mut ring = IoUring::new(4).unwrap();
    let iovecs = pin.iovecs();
    // SAFETY: the iovecs describe guest pages that the long-term pin keeps in place and mapped
    // for as long as it lives, which outlasts the ring (dropped at the end of this function).
    unsafe { ring.submitter().register_buffers(&iovecs).unwrap() };
    let path = std::env::temp_dir().join(format!("dmavisor-fixed-{}", std::process::id()));
    let file = std::fs::File::create(&path).unwrap();
    let mut offset = 0u64;
    for (i, b) in pin.buffers().iter().enumerate() {
        let write = opcode::WriteFixed::new(
            types::Fd(file.as_raw_fd()),
            b.addr as *const u8,
            b.len as u32,
            i as u16,
        )
        .offset(offset)
        .build();
        // SAFETY: the buffer is registered above and lives while the ring does.
        unsafe { ring.submission().push(&write).unwrap() };
        ring.submit_and_wait(1).unwrap();
        let done = ring.completion().next().unwrap();
        assert_eq!(done.result(), b.len as i32, "io_uring write of buffer {i}");
        offset += b.len as u64;
    }
    drop(ring);
    let bytes = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_file(&path);
    bytes
}

#[test]
fn a_long_term_pin_in_ordinary_memory_stays_attached_to_its_guest_page() {
    // The bug this guards: a page moved out of the region for a long-term pin was recorded
    // nowhere, so lending RAM pages back (unpin of another range, forced migration) or a MAP
    // re-backed it while io_uring still held the old host page.
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    let gpa = BASE + 5 * PAGE;
    let pin = dma.pin_longterm(gpa, 2 * PAGE, PinHolder::IoUring).unwrap();
    assert_eq!((pin.moved_out, pin.pinned_in_place), (2, 0));
    let state = dma.page_state(5).unwrap();
    assert_eq!((state.backing, state.longterm_pins), (Backing::Ram, 1));
    // Everything that lends or moves pages runs now.
    dma.relend();
    assert_eq!(
        dma.page_state(5).unwrap().backing,
        Backing::Ram,
        "a pinned page in RAM is not lent back"
    );
    dma.migrate(2048).unwrap();
    assert_eq!(dma.map(BASE, MIB, FAILFAST).unwrap_err(), MapError::Busy);
    let patient = MapOptions {
        failfast: false,
        deadline: Duration::from_secs(5),
        ..FAILFAST
    };
    let t = Instant::now();
    assert_eq!(
        dma.map(BASE, MIB, patient).unwrap_err(),
        MapError::Busy,
        "FAILFAST or not"
    );
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "a long-term pin is not waited for"
    );
    assert_eq!(dma.stats().longterm_refusals, 2);
    assert_eq!(dma.page_state(5).unwrap().backing, Backing::Ram);
    // The guest writes its page; the kernel's pinned page must be that page.
    guest
        .memory()
        .write_obj(0xfeed_f00d_u64, GuestAddress(gpa))
        .unwrap();
    let written = write_fixed(&pin);
    assert_eq!(
        u64::from_ne_bytes(written[..8].try_into().unwrap()),
        0xfeed_f00d
    );
    assert_eq!(
        u64::from_ne_bytes(
            written[PAGE as usize..PAGE as usize + 8]
                .try_into()
                .unwrap()
        ),
        pattern(6)
    );
    drop(pin);
    assert_eq!(dma.stats().lending.longterm_pinned, 0);
    dma.map(BASE, MIB, FAILFAST).unwrap();
    assert!(
        matches!(dma.page_state(5).unwrap().backing, Backing::Mapped(_)),
        "unpinned, it maps"
    );
    assert_eq!(
        guest.memory().read_obj::<u64>(GuestAddress(gpa)).unwrap(),
        0xfeed_f00d
    );
}

#[test]
fn a_long_term_pin_on_a_mapping_survives_its_unmap_in_place() {
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    dma.map(BASE, MIB, FAILFAST).unwrap();
    let pin = dma.pin_longterm(BASE, MIB, PinHolder::Iommu).unwrap();
    assert_eq!((pin.moved_out, pin.pinned_in_place), (0, 256));
    dma.unmap(BASE, MIB).unwrap();
    assert_eq!(
        dma.page_state(3).unwrap().backing,
        Backing::Lent(3),
        "unmapped in place"
    );
    dma.migrate(2048).unwrap_err();
    assert_eq!(
        dma.page_state(3).unwrap().backing,
        Backing::Lent(3),
        "a pinned frame never moves"
    );
    guest
        .memory()
        .write_obj(7u64, GuestAddress(BASE + 3 * PAGE))
        .unwrap();
    let written = write_fixed(&pin);
    assert_eq!(
        u64::from_ne_bytes(written[3 * PAGE as usize..][..8].try_into().unwrap()),
        7
    );
    drop(pin);
    dma.migrate(2048).unwrap();
}

#[test]
fn a_failed_long_term_pin_changes_nothing() {
    let (dma, guest) = memory(8 << 20, 16 * MIB);
    let before = dma.stats().lending;
    // Page 10 is busy with I/O: a long-term pin of pages 8..12 cannot move it out.
    let io = dma.pin_transient(10).unwrap();
    let e = dma
        .pin_longterm(BASE + 8 * PAGE, 4 * PAGE, PinHolder::IoUring)
        .unwrap_err();
    assert!(e.to_string().contains("window page 10"), "{e}");
    let after = dma.stats();
    assert_eq!(after.lending.longterm_pinned, 0);
    assert_eq!(after.longterm_ranges, 0);
    assert_eq!(
        (after.lending.lent, after.lending.ram),
        (before.lent, before.ram),
        "moved-out pages were lent back"
    );
    drop(io);
    assert!(all_intact(&guest, 4096));
    assert!(matches!(
        dma.pin_longterm(BASE + 16 * MIB, PAGE, PinHolder::IoUring),
        Err(DmaMemoryError::OutOfWindow { .. })
    ));
}

/// An IOMMU that records what is mapped, and can be told to refuse.
#[derive(Default)]
struct FakeIommu {
    maps: std::sync::Mutex<Vec<(u64, usize, usize)>>,
    refuse_map: AtomicBool,
    refuse_unmap: AtomicBool,
}

impl Iommu for FakeIommu {
    fn map(&self, iova: u64, host_addr: usize, len: usize) -> std::io::Result<()> {
        if self.refuse_map.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.maps.lock().unwrap().push((iova, host_addr, len));
        Ok(())
    }
    fn unmap(&self, iova: u64, len: usize) -> std::io::Result<()> {
        if self.refuse_unmap.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        let mut m = self.maps.lock().unwrap();
        let i = m
            .iter()
            .position(|&(a, _, l)| a == iova && l == len)
            .expect("unmap of exactly a mapped range");
        m.remove(i);
        Ok(())
    }
    fn mapped_bytes(&self) -> u64 {
        self.maps.lock().unwrap().iter().map(|m| m.2 as u64).sum()
    }
}

fn memory_with_iommu(
    region_len: usize,
    window_len: u64,
    policy: IommuPolicy,
) -> (DmaMemory, GuestMemoryHandle, Arc<FakeIommu>) {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), MIB as usize),
        (GuestAddress(BASE), window_len as usize),
    ])
    .unwrap();
    let guest = GuestMemoryHandle::new(mem);
    let region = Region::reserve(region_len, RegionBacking::Memfd).unwrap();
    let iommu = Arc::new(FakeIommu::default());
    let dma = DmaMemory::with_iommu(
        region,
        &guest,
        BASE,
        window_len,
        Some(IommuAttachment {
            iommu: iommu.clone(),
            policy,
        }),
    )
    .unwrap();
    (dma, guest, iommu)
}

#[test]
fn mapped_policy_maps_exactly_the_mapped_ranges_and_pins_them() {
    let (dma, _guest, iommu) = memory_with_iommu(8 << 20, 16 * MIB, IommuPolicy::Mapped);
    assert!(
        iommu.maps.lock().unwrap().is_empty(),
        "nothing DMA-able at start"
    );
    let gpa = BASE + 2 * MIB;
    dma.map(gpa, MIB, FAILFAST).unwrap();
    let host = dma.mappings()[0].host_addr as usize;
    assert_eq!(*iommu.maps.lock().unwrap(), vec![(gpa, host, MIB as usize)]);
    let page = dma.inner.window.page_of(gpa);
    let state = dma.page_state(page).unwrap();
    assert!(state.pinned(), "an IOMMU-mapped page is pinned long-term");
    assert!(dma.iommu_maps_page(page));
    assert!(!dma.iommu_maps_page(page + (MIB / PAGE) as usize));
    let s = dma.iommu_stats();
    assert_eq!((s.ranges, s.mapped_bytes, s.maps), (1, MIB, 1));
    // Forced migration of every frame is refused with the reason: a mapping's frames hold.
    let e = dma.migrate(2048).unwrap_err().to_string();
    assert!(e.contains("mapped in the IOMMU"), "{e}");
    // The rest of the window still moves: migrating the free frames works.
    dma.migrate(64).unwrap();
    assert_eq!(iommu.maps.lock().unwrap().len(), 1, "the mapping stayed");
    // UNMAP takes it out of the IOMMU, then the pin goes.
    dma.unmap(gpa, MIB).unwrap();
    assert!(iommu.maps.lock().unwrap().is_empty());
    assert!(!dma.page_state(page).unwrap().pinned());
    assert_eq!(dma.iommu_stats().unmaps, 1);
}

#[test]
fn an_iommu_that_refuses_leaves_no_trace() {
    let (dma, _guest, iommu) = memory_with_iommu(8 << 20, 16 * MIB, IommuPolicy::Mapped);
    let gpa = BASE + 4 * MIB;
    iommu.refuse_map.store(true, Ordering::SeqCst);
    let e = dma.map(gpa, MIB, FAILFAST).unwrap_err();
    assert!(e.to_string().contains("IOMMU map"), "{e}");
    assert!(dma.mappings().is_empty(), "a refused MAP changed nothing");
    let page = dma.inner.window.page_of(gpa);
    assert!(!dma.page_state(page).unwrap().pinned());
    assert_eq!(dma.iommu_stats().map_failures, 1);
    iommu.refuse_map.store(false, Ordering::SeqCst);
    dma.map(gpa, MIB, FAILFAST).unwrap();
    // An UNMAP the IOMMU refuses keeps the mapping whole: DMA may still reach it.
    iommu.refuse_unmap.store(true, Ordering::SeqCst);
    assert!(dma.unmap(gpa, MIB).is_err());
    assert_eq!(dma.mappings().len(), 1);
    assert!(dma.page_state(page).unwrap().pinned());
    iommu.refuse_unmap.store(false, Ordering::SeqCst);
    dma.unmap(gpa, MIB).unwrap();
    assert!(dma.mappings().is_empty());
}

#[test]
fn all_policy_maps_the_window_once_and_never_moves_it() {
    let (dma, _guest, iommu) = memory_with_iommu(8 << 20, 16 * MIB, IommuPolicy::All);
    let maps = iommu.maps.lock().unwrap().clone();
    assert_eq!(maps.len(), 1);
    assert_eq!((maps[0].0, maps[0].2), (BASE, 16 * MIB as usize));
    let e = dma.migrate(1).unwrap_err().to_string();
    assert!(e.contains("dma=all"), "{e}");
    // MAPs are in place and add no IOMMU mapping: all of it is mapped already.
    dma.map(BASE, 2 * MIB, FAILFAST).unwrap();
    assert_eq!(iommu.maps.lock().unwrap().len(), 1);
    dma.unmap(BASE, 2 * MIB).unwrap();
    assert_eq!(iommu.maps.lock().unwrap().len(), 1);
}

#[test]
fn maps_inside_one_page_share_it_and_the_last_gives_it_back() {
    // A window lent whole (here because of dma=all) has 2 MiB pages on any region.
    let (dma, guest, _iommu) = memory_with_iommu(8 << 20, 8 * MIB, IommuPolicy::All);
    assert_eq!(dma.granule() as u64, 2 * MIB);
    let page_base = BASE + 2 * MIB;
    guest
        .memory()
        .write_obj(0xabcd_u64, GuestAddress(page_base + 1536 * 1024))
        .unwrap();
    let a = dma.map(page_base + MIB, 512 << 10, FAILFAST).unwrap();
    assert_eq!(a.region_offset, 3 * MIB, "page 1's frame, 1 MiB in");
    let b = dma.map(page_base + 4096, 8192, FAILFAST).unwrap();
    assert_eq!(b.region_offset, 2 * MIB + 4096);
    assert_eq!(dma.mappings().len(), 1, "one page mapped for both");
    let page = dma.inner.window.page_of(page_base);
    assert!(matches!(
        dma.page_state(page).unwrap().backing,
        Backing::Mapped(_)
    ));
    // Overlaps, ranges across pages, and odd units are refused and change nothing.
    assert!(dma.map(page_base + MIB + 4096, 4096, FAILFAST).is_err());
    assert!(dma.map(page_base, 2 * MIB, FAILFAST).is_err());
    assert!(dma.map(page_base - 4096, 8192, FAILFAST).is_err());
    assert!(dma.map(page_base + 512, 4096, FAILFAST).is_err());
    // The page ends with its last MAP, not as a whole nor by a range it does not hold.
    assert_eq!(dma.unmap(page_base, 2 * MIB), Err(MapError::NotMapped));
    assert_eq!(dma.unmap(page_base + MIB, 4096), Err(MapError::NotMapped));
    dma.unmap(page_base + MIB, 512 << 10).unwrap();
    assert_eq!(
        dma.mappings().len(),
        1,
        "the other MAP still holds the page"
    );
    dma.unmap(page_base + 4096, 8192).unwrap();
    assert!(dma.mappings().is_empty());
    assert!(matches!(
        dma.page_state(page).unwrap().backing,
        Backing::Lent(_)
    ));
    // The guest's bytes elsewhere in the page were never touched.
    let kept: u64 = guest
        .memory()
        .read_obj(GuestAddress(page_base + 1536 * 1024))
        .unwrap();
    assert_eq!(kept, 0xabcd);
    // A whole-page MAP works again.
    dma.map(page_base, 2 * MIB, FAILFAST).unwrap();
}

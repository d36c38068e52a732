//! The normative device requirements of docs/virtio-dma.md that a test can check, end to end:
//! a test driver sets the device up through its MMIO registers, puts requests on its queues in
//! guest memory and reads the answers from the used rings, as a guest driver would. Each test
//! is named after the requirement it checks; the spec lists them ("Conformance tests").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE as ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER as DRIVER,
    VIRTIO_CONFIG_S_DRIVER_OK as DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK as FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET as NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::protocol::*;
use super::{Dma, RequestHandler};
use crate::bus::BusDevice;
use crate::dma_memory::{DmaMapper, MapError, MapOptions, Placement};
use crate::guest_memory::GuestMemoryHandle;
use crate::virtio::{MmioTransport, VIRTIO_F_VERSION_1};

const MIB: u64 = 1 << 20;
const BASE: u64 = 0x4000_0000;
const PHYS_BASE: u64 = 0x2_0000_0000;
const QUEUE_SIZE: u16 = 16;
const ALL: u64 = VIRTIO_F_VERSION_1 | F_HOST_PHYS | F_DEADLINE | F_DISCARD | F_SUB_GRANULE;
const GRANULE: u64 = 64 << 10;

const CONFIG: Config = Config {
    window_base: BASE,
    window_size: 64 * MIB,
    granule: GRANULE as u32,
    max_mappings: 8,
    max_map_len: 16 * MIB,
    region_size: 64 * MIB,
};

/// What the device asked of guest DMA memory.
#[derive(Default)]
struct Record {
    /// Whether the "region" knows its host-physical addresses.
    phys: bool,
    next: AtomicU64,
    maps: Mutex<Vec<(u64, u64)>>,
    unmaps: Mutex<Vec<(u64, u64)>>,
    /// While true, MAP waits in the placement.
    hold: (Mutex<bool>, Condvar),
}

impl Record {
    fn set_hold(&self, on: bool) {
        *self.hold.0.lock().unwrap() = on;
        self.hold.1.notify_all();
    }
    fn maps(&self) -> Vec<(u64, u64)> {
        self.maps.lock().unwrap().clone()
    }
    fn unmaps(&self) -> Vec<(u64, u64)> {
        let mut u = self.unmaps.lock().unwrap().clone();
        u.sort_unstable();
        u
    }
}

struct Recorder(Arc<Record>);

impl DmaMapper for Recorder {
    fn map(&self, gpa: u64, len: u64, _o: MapOptions) -> Result<Placement, MapError> {
        let mut held = self.0.hold.0.lock().unwrap();
        while *held {
            held = self.0.hold.1.wait(held).unwrap();
        }
        drop(held);
        let at = self.0.next.fetch_add(len, Ordering::SeqCst);
        self.0.maps.lock().unwrap().push((gpa, len));
        Ok(Placement {
            host_addr: if self.0.phys { PHYS_BASE + at } else { at },
            host_phys: self.0.phys,
            region_offset: at,
            extent: 0,
            bytes_migrated: 0,
        })
    }
    fn unmap(&self, gpa: u64, len: u64) -> Result<(), MapError> {
        self.0.unmaps.lock().unwrap().push((gpa, len));
        Ok(())
    }
    fn host_phys(&self) -> bool {
        self.0.phys
    }
}

/// A minimal virtio-mmio driver for the device, with split queues in guest memory.
struct TestDriver {
    t: MmioTransport<Dma<Recorder>>,
    mem: GuestMemoryHandle,
    record: Arc<Record>,
    /// Per queue: requests made available, answers seen.
    avail: [u16; 2],
    used: [u16; 2],
}

fn queue_base(q: usize) -> u64 {
    0x1_0000 * (q as u64 + 1)
}

impl TestDriver {
    /// The device over a recording mapper; `offer_host_phys` is the host's `host-phys` option,
    /// `phys` whether the region knows its physical addresses.
    fn new(offer_host_phys: bool, phys: bool) -> Self {
        let record = Arc::new(Record {
            phys,
            ..Record::default()
        });
        let mapper = Recorder(record.clone());
        let build = std::thread::spawn(move || Ok(Arc::new(RequestHandler::new(CONFIG, mapper))));
        let mem = GuestMemoryHandle::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap(),
        );
        let dma = Dma::deferred(build, offer_host_phys);
        let t = MmioTransport::new(dma, mem.clone(), EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .unwrap();
        Self {
            t,
            mem,
            record,
            avail: [0; 2],
            used: [0; 2],
        }
    }

    fn read(&mut self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn write(&mut self, off: u32, v: u32) {
        self.t.write(u64::from(off), &v.to_le_bytes());
    }

    fn device_features(&mut self) -> u64 {
        self.write(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Steps 1-5 of driver initialization; whether the device accepted `features`.
    fn negotiate(&mut self, features: u64) -> bool {
        self.write(reg::VIRTIO_MMIO_STATUS, 0);
        self.write(reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE);
        self.write(reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(reg::VIRTIO_MMIO_STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        self.read(reg::VIRTIO_MMIO_STATUS) & FEATURES_OK != 0
    }

    /// Full initialization, acking those of `wanted` that the device offers (as a driver
    /// does): both queues set up, DRIVER_OK.
    fn start(&mut self, wanted: u64) {
        let features = wanted & self.device_features();
        assert!(self.negotiate(features), "features {features:#x} refused");
        let m = self.mem.memory();
        for q in 0..2 {
            // Zeroed rings: avail and used indexes start at 0.
            m.write_slice(&[0u8; 0x3000], GuestAddress(queue_base(q)))
                .unwrap();
        }
        drop(m);
        for q in 0..2u32 {
            let base = queue_base(q as usize) as u32;
            self.write(reg::VIRTIO_MMIO_QUEUE_SEL, q);
            self.write(reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_SIZE));
            self.write(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, base);
            self.write(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
            self.write(reg::VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000);
            self.write(reg::VIRTIO_MMIO_QUEUE_READY, 1);
        }
        self.avail = [0; 2];
        self.used = [0; 2];
        let s = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
        self.write(reg::VIRTIO_MMIO_STATUS, s);
        assert_eq!(self.read(reg::VIRTIO_MMIO_STATUS), s, "the device is live");
    }

    fn reset(&mut self) {
        self.write(reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(self.read(reg::VIRTIO_MMIO_STATUS), 0);
    }

    fn handler(&self) -> &Arc<RequestHandler<Recorder>> {
        self.t.device().handler().unwrap()
    }

    /// Makes a request available on queue `q`: `readable` bytes in one device-readable
    /// descriptor, then one device-writable descriptor of `writable` bytes (none if 0).
    fn submit(&mut self, q: usize, readable: &[u8], writable: u32) {
        let slot = self.avail[q] % (QUEUE_SIZE / 2);
        let (head, buf) = (
            slot * 2,
            0x10_0000 + q as u64 * 0x1_0000 + u64::from(slot) * 0x100,
        );
        let reply = buf + 0x80;
        let m = self.mem.memory();
        m.write_slice(readable, GuestAddress(buf)).unwrap();
        m.write_slice(&[0xa5; 0x80], GuestAddress(reply)).unwrap();
        let desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            let at = queue_base(q) + 16 * u64::from(i);
            m.write_slice(&d, GuestAddress(at)).unwrap();
        };
        let (next, write) = (
            virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16,
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
        );
        if writable > 0 {
            desc(head, buf, readable.len() as u32, next, head + 1);
            desc(head + 1, reply, writable, write, 0);
        } else {
            desc(head, buf, readable.len() as u32, 0, 0);
        }
        let avail = queue_base(q) + 0x1000;
        let i = self.avail[q];
        m.write_obj(
            head.to_le(),
            GuestAddress(avail + 4 + 2 * u64::from(i % QUEUE_SIZE)),
        )
        .unwrap();
        std::sync::atomic::fence(Ordering::SeqCst);
        m.write_obj(i.wrapping_add(1).to_le(), GuestAddress(avail + 2))
            .unwrap();
        drop(m);
        self.avail[q] = i.wrapping_add(1);
        self.write(reg::VIRTIO_MMIO_QUEUE_NOTIFY, q as u32);
    }

    /// The next answer on queue `q` within `timeout`: bytes written, and the reply buffer.
    fn answer(&mut self, q: usize, timeout: Duration) -> Option<(u32, Vec<u8>)> {
        let used = queue_base(q) + 0x2000;
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.mem.memory();
            let idx = u16::from_le(m.read_obj::<u16>(GuestAddress(used + 2)).unwrap());
            if idx != self.used[q] {
                let elem = used + 4 + 8 * u64::from(self.used[q] % QUEUE_SIZE);
                let id = u32::from_le(m.read_obj::<u32>(GuestAddress(elem)).unwrap());
                let len = u32::from_le(m.read_obj::<u32>(GuestAddress(elem + 4)).unwrap());
                let slot = id as u64 / 2;
                let reply = 0x10_0000 + q as u64 * 0x1_0000 + slot * 0x100 + 0x80;
                let mut b = vec![0u8; 0x80];
                m.read_slice(&mut b, GuestAddress(reply)).unwrap();
                self.used[q] = self.used[q].wrapping_add(1);
                return Some((len, b));
            }
            if Instant::now() > deadline {
                return None;
            }
            drop(m);
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// One request and its answer (room for a STAT reply): bytes written and the response.
    fn request(&mut self, q: usize, header: [u8; REQ_SIZE]) -> (u32, Response) {
        self.submit(q, &header, (RESP_SIZE + STAT_SIZE) as u32);
        let (len, b) = self
            .answer(q, Duration::from_secs(5))
            .expect("the device answered");
        (len, Response::decode(b[..RESP_SIZE].try_into().unwrap()))
    }

    fn status(&mut self, q: usize, kind: u32, flags: u32, gpa: u64, len: u64, dl: u32) -> u32 {
        let q = if kind == REQ_MAP { q } else { CTRLQ };
        self.request(q, Request::encode(kind, flags, gpa, len, dl))
            .1
            .status
    }

    fn map(&mut self, gpa: u64, len: u64) -> u32 {
        self.status(MAPQ, REQ_MAP, 0, gpa, len, 0)
    }

    fn unmap(&mut self, gpa: u64, len: u64) -> u32 {
        self.status(CTRLQ, REQ_UNMAP, 0, gpa, len, 0)
    }

    fn stat(&mut self) -> Stat {
        self.submit(CTRLQ, &Request::encode(REQ_STAT, 0, 0, 0, 0), 88);
        let (len, b) = self.answer(CTRLQ, Duration::from_secs(5)).unwrap();
        assert_eq!(len as usize, RESP_SIZE + STAT_SIZE);
        let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let at = RESP_SIZE;
        Stat {
            mappings: word(at),
            mapped_bytes: word(at + 8),
            maps_ok: word(at + 16),
            maps_failed: word(at + 24),
            maps_busy: word(at + 32),
            maps_timeout: word(at + 40),
            unmaps: word(at + 48),
            bytes_migrated: word(at + 56),
        }
    }
}

const OK: u32 = Status::Ok as u32;
const INVAL: u32 = Status::Inval as u32;

#[test]
fn device_id_is_60_which_virtio_mmio_and_virtio_pci_accept() {
    let mut d = TestDriver::new(false, false);
    assert_eq!(d.read(reg::VIRTIO_MMIO_DEVICE_ID), 60);
    // Modern virtio-pci: PCI device ID 0x1040 + virtio ID, which Linux accepts up to 0x107f.
    assert!((0x1040..=0x107f).contains(&(0x1040 + VIRTIO_ID_DMA)));
}

#[test]
fn device_offers_version_1_and_refuses_a_driver_without_it() {
    let mut d = TestDriver::new(false, false);
    let offered = d.device_features();
    assert_eq!(
        offered,
        VIRTIO_F_VERSION_1 | F_DEADLINE | F_DISCARD | F_SUB_GRANULE
    );
    assert!(
        !d.negotiate(F_DEADLINE | F_DISCARD),
        "legacy driver refused"
    );
    assert!(
        !d.negotiate(VIRTIO_F_VERSION_1 | F_HOST_PHYS),
        "a feature that was not offered is refused"
    );
    assert!(d.negotiate(VIRTIO_F_VERSION_1), "VERSION_1 alone is enough");
}

#[test]
fn device_offers_host_phys_only_when_the_host_allows_it_and_knows_addresses() {
    for (allow, known) in [(false, false), (false, true), (true, false), (true, true)] {
        let offered = TestDriver::new(allow, known).device_features() & F_HOST_PHYS != 0;
        assert_eq!(offered, allow && known, "host-phys={allow}, known={known}");
    }
}

#[test]
fn config_space_is_the_documented_layout_and_read_only() {
    let mut d = TestDriver::new(false, false);
    let read = |d: &mut TestDriver| {
        let mut b = [0u8; CONFIG_SIZE];
        for (i, chunk) in b.chunks_mut(4).enumerate() {
            d.t.read(0x100 + 4 * i as u64, chunk);
        }
        b
    };
    let before = read(&mut d);
    assert_eq!(before, CONFIG.encode());
    assert_eq!(
        before[16..20],
        (GRANULE as u32).to_le_bytes(),
        "granule at 16"
    );
    d.t.write(0x100, &[0xff; 4]);
    d.t.write(0x110, &[0; 4]);
    assert_eq!(read(&mut d), before, "writes change nothing");
}

#[test]
fn discard_or_deadline_without_their_features_is_inval_and_changes_nothing() {
    let mut d = TestDriver::new(true, true);
    d.start(VIRTIO_F_VERSION_1);
    assert_eq!(d.status(MAPQ, REQ_MAP, MAP_DISCARD, BASE, MIB, 0), INVAL);
    assert_eq!(d.status(MAPQ, REQ_MAP, 0, BASE, MIB, 100), INVAL);
    assert!(d.record.maps().is_empty(), "nothing placed");
    assert_eq!(d.map(BASE, MIB), OK);
    assert_eq!(d.status(CTRLQ, REQ_UNMAP, MAP_DISCARD, BASE, MIB, 0), INVAL);
    assert!(d.record.unmaps().is_empty(), "still mapped");
    assert_eq!(d.stat().mappings, 1);
    // The same driver with the features.
    d.reset();
    d.start(ALL);
    assert_eq!(d.status(MAPQ, REQ_MAP, MAP_DISCARD, BASE, MIB, 100), OK);
    assert_eq!(d.status(CTRLQ, REQ_UNMAP, MAP_DISCARD, BASE, MIB, 0), OK);
}

#[test]
fn a_range_shorter_than_a_granule_needs_sub_granule_and_lies_inside_one_granule() {
    const UNALIGNED: u32 = Status::Unaligned as u32;
    const EXISTS: u32 = Status::Exists as u32;
    let mut d = TestDriver::new(false, false);
    d.start(VIRTIO_F_VERSION_1);
    assert_eq!(d.map(BASE, 4096), UNALIGNED, "without the feature");
    assert!(d.record.maps().is_empty());
    d.reset();
    d.start(ALL);
    assert_eq!(d.map(BASE, 4096), OK);
    assert_eq!(d.map(BASE + 8192, 8192), OK);
    assert_eq!(
        d.map(BASE + GRANULE - 4096, 8192),
        UNALIGNED,
        "crosses a granule"
    );
    assert_eq!(
        d.map(BASE + GRANULE + 512, 4096),
        UNALIGNED,
        "not whole 4 KiB units"
    );
    assert_eq!(
        d.map(BASE + GRANULE, 6144),
        UNALIGNED,
        "not whole 4 KiB units"
    );
    assert_eq!(
        d.map(BASE + 4096, 8192),
        EXISTS,
        "overlaps the one at 8 KiB"
    );
    assert_eq!(d.map(BASE, GRANULE), EXISTS, "the whole granule overlaps");
    assert_eq!(
        d.record.maps(),
        vec![(BASE, 4096), (BASE + 8192, 8192)],
        "only the valid MAPs reached the host"
    );
    assert_eq!(d.unmap(BASE, 8192), Status::NoEnt as u32, "not a mapping");
    assert_eq!(d.unmap(BASE, 4096), OK);
    assert_eq!(d.unmap(BASE + 8192, 8192), OK);
    assert_eq!(d.stat().mappings, 0);
}

#[test]
fn map_names_a_host_physical_address_only_with_host_phys_negotiated() {
    let mut d = TestDriver::new(true, true);
    d.start(ALL & !F_HOST_PHYS);
    let (_, r) = d.request(MAPQ, Request::encode(REQ_MAP, 0, BASE, MIB, 0));
    assert_eq!(
        (r.status, r.flags, r.host_addr),
        (OK, 0, 0),
        "region offset"
    );
    let (_, r) = d.request(MAPQ, Request::encode(REQ_MAP, 0, BASE + MIB, MIB, 0));
    assert_eq!((r.status, r.flags, r.host_addr), (OK, 0, MIB));
    d.reset();
    d.start(ALL);
    let (_, r) = d.request(MAPQ, Request::encode(REQ_MAP, 0, BASE, MIB, 0));
    assert_eq!(
        (r.status, r.flags, r.host_addr),
        (OK, RESP_HOST_PHYS, PHYS_BASE + 2 * MIB)
    );
}

#[test]
fn every_request_is_answered_with_the_bytes_written() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    let map = Request::encode(REQ_MAP, 0, BASE, MIB, 0);
    d.submit(MAPQ, &map, RESP_SIZE as u32);
    assert_eq!(d.answer(MAPQ, Duration::from_secs(5)).unwrap().0, 24);
    d.submit(CTRLQ, &Request::encode(REQ_STAT, 0, 0, 0, 0), 88);
    assert_eq!(d.answer(CTRLQ, Duration::from_secs(5)).unwrap().0, 88);
    // Malformed: a short header is INVAL, with the response written.
    d.submit(MAPQ, &map[..16], RESP_SIZE as u32);
    let (len, b) = d.answer(MAPQ, Duration::from_secs(5)).unwrap();
    assert_eq!((len, b[0]), (24, INVAL as u8));
    // No room for a response: answered with 0 bytes, nothing carried out, nothing written.
    let other = Request::encode(REQ_MAP, 0, BASE + 4 * MIB, MIB, 0);
    d.submit(MAPQ, &other, 16);
    let (len, b) = d.answer(MAPQ, Duration::from_secs(5)).unwrap();
    assert_eq!(len, 0);
    assert!(b.iter().all(|&x| x == 0xa5), "reply space untouched");
    d.submit(MAPQ, &other, 0);
    assert_eq!(d.answer(MAPQ, Duration::from_secs(5)).unwrap().0, 0);
    assert_eq!(
        d.record.maps(),
        vec![(BASE, MIB)],
        "only the first MAP placed"
    );
}

#[test]
fn reset_unmaps_every_mapping_the_driver_made() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    assert_eq!(d.map(BASE, MIB), OK);
    assert_eq!(d.map(BASE + 4 * MIB, 2 * MIB), OK);
    assert_eq!(d.map(BASE + 8 * MIB, MIB), OK);
    assert_eq!(d.unmap(BASE + 8 * MIB, MIB), OK);
    d.reset();
    assert_eq!(
        d.record.unmaps(),
        vec![
            (BASE, MIB),
            (BASE + 4 * MIB, 2 * MIB),
            (BASE + 8 * MIB, MIB)
        ],
        "the UNMAPped one once, the others by the reset"
    );
    d.start(ALL);
    let s = d.stat();
    assert_eq!((s.mappings, s.mapped_bytes), (0, 0));
    assert_eq!(d.unmap(BASE, MIB), Status::NoEnt as u32, "gone");
    assert_eq!(d.map(BASE, MIB), OK, "the range can be mapped again");
}

#[test]
fn a_stalled_device_answers_what_waited_when_the_stall_ends() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    d.handler().set_stalled(true);
    d.submit(MAPQ, &Request::encode(REQ_MAP, 0, BASE, MIB, 0), 24);
    d.submit(CTRLQ, &Request::encode(REQ_STAT, 0, 0, 0, 0), 88);
    assert!(d.answer(MAPQ, Duration::from_millis(200)).is_none());
    assert!(d.answer(CTRLQ, Duration::from_millis(10)).is_none());
    assert!(d.record.maps().is_empty(), "nothing carried out");
    d.handler().set_stalled(false);
    assert_eq!(d.answer(MAPQ, Duration::from_secs(5)).unwrap().0, 24);
    assert_eq!(d.answer(CTRLQ, Duration::from_secs(5)).unwrap().0, 88);
    assert_eq!(d.record.maps(), vec![(BASE, MIB)]);
}

#[test]
fn reset_drops_the_requests_a_stalled_device_held() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    assert_eq!(d.map(BASE, MIB), OK);
    d.handler().set_stalled(true);
    d.submit(MAPQ, &Request::encode(REQ_MAP, 0, BASE + MIB, MIB, 0), 24);
    d.reset();
    assert_eq!(d.record.unmaps(), vec![(BASE, MIB)]);
    d.start(ALL);
    d.handler().set_stalled(false);
    // The new queues start empty: the held MAP is gone, not carried out.
    assert!(d.answer(MAPQ, Duration::from_millis(200)).is_none());
    assert_eq!(d.record.maps(), vec![(BASE, MIB)]);
    assert_eq!(d.map(BASE + MIB, MIB), OK);
}

#[test]
fn ctrlq_is_served_while_a_map_waits_on_mapq() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    assert_eq!(d.map(BASE + 8 * MIB, MIB), OK);
    d.record.set_hold(true);
    d.submit(MAPQ, &Request::encode(REQ_MAP, 0, BASE, 2 * MIB, 0), 24);
    assert!(
        d.answer(MAPQ, Duration::from_millis(50)).is_none(),
        "the MAP waits"
    );
    // UNMAP of the range being mapped: not a mapping yet.
    assert_eq!(d.unmap(BASE, 2 * MIB), Status::NoEnt as u32);
    assert_eq!(d.unmap(BASE + 8 * MIB, MIB), OK);
    assert_eq!(d.stat().mappings, 0);
    d.record.set_hold(false);
    let (_, b) = d.answer(MAPQ, Duration::from_secs(5)).unwrap();
    assert_eq!(b[0], OK as u8);
    assert_eq!(d.stat().mappings, 1);
}

#[test]
fn device_enforces_max_mappings_and_max_map_len() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    let too_long = CONFIG.max_map_len + GRANULE;
    assert_eq!(d.map(BASE, too_long), Status::TooBig as u32);
    for i in 0..u64::from(CONFIG.max_mappings) {
        assert_eq!(d.map(BASE + i * MIB, MIB), OK);
    }
    assert_eq!(d.map(BASE + 32 * MIB, MIB), Status::NoMem as u32);
    assert_eq!(d.stat().mappings, u64::from(CONFIG.max_mappings));
    assert_eq!(d.record.maps().len(), CONFIG.max_mappings as usize);
}

#[test]
fn device_never_sets_needs_reset_for_a_malformed_request() {
    let mut d = TestDriver::new(false, false);
    d.start(ALL);
    for h in [
        Request::encode(0, 0, 0, 0, 0),
        Request::encode(REQ_MAP, 1 << 9, BASE, MIB, 0),
        Request::encode(REQ_UNMAP, 0, BASE, MIB, 7),
        Request::encode(REQ_STAT, 1, 0, 0, 0),
    ] {
        assert_eq!(d.request(MAPQ, h).1.status, INVAL);
    }
    assert_eq!(d.read(reg::VIRTIO_MMIO_STATUS) & NEEDS_RESET, 0);
    assert_eq!(d.map(BASE, MIB), OK, "and goes on serving");
}

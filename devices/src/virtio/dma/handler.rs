//! What the device does with a decoded request: checks it against the window and the live
//! mappings, asks the DMA memory owner ([`DmaMapper`]) for host memory, and keeps the
//! guest-visible mapping table and counters.
//!
//! Lock discipline: the table sits behind one mutex, held only for checks and updates, never
//! while the owner places memory (which may wait up to a MAP's deadline). A MAP
//! reserves its guest range as *pending* first, so a concurrent MAP sees the overlap and an
//! UNMAP of a range still being mapped gets NOENT. UNMAP never waits on a MAP.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::protocol::{
    Config, Request, Response, Stat, Status, F_HOST_PHYS, F_SUB_GRANULE, RESP_HOST_PHYS,
    SUB_GRANULE_UNIT,
};
use crate::dma_memory::{DmaMapper, MapError, MapOptions};

impl MapError {
    fn status(&self) -> Status {
        match self {
            MapError::TooBig => Status::TooBig,
            MapError::NoMem => Status::NoMem,
            MapError::Busy => Status::Busy,
            MapError::Timeout => Status::Timeout,
            MapError::NotMapped => Status::NoEnt,
            MapError::Io(_) => Status::IoErr,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A guest range in the table: being placed, or mapped.
#[derive(Clone, Copy)]
enum Entry {
    Pending { len: u64 },
    Mapped { len: u64 },
}

impl Entry {
    fn len(&self) -> u64 {
        match self {
            Entry::Pending { len } | Entry::Mapped { len } => *len,
        }
    }
}

/// The guest-visible mapping table and the device's counters.
struct MappingTable {
    entries: BTreeMap<u64, Entry>,
    stat: Stat,
}

/// The host's test switch that makes the device stop answering (`dma-stall` in the control
/// API): while it is on, the queue workers leave every request on its queue; turning it off
/// wakes them, and they answer what waited.
#[derive(Default)]
struct Stall {
    on: AtomicBool,
    /// Clones of the queues' notification eventfds, to wake the workers when the stall ends.
    kicks: Mutex<Vec<EventFd>>,
}

/// The device's request logic, shared by the queue workers.
pub struct RequestHandler<M: DmaMapper> {
    config: Config,
    memory: M,
    table: Mutex<MappingTable>,
    stall: Stall,
}

impl<M: DmaMapper> RequestHandler<M> {
    pub fn new(config: Config, memory: M) -> Self {
        Self {
            config,
            memory,
            table: Mutex::new(MappingTable {
                entries: BTreeMap::new(),
                stat: Stat::default(),
            }),
            stall: Stall::default(),
        }
    }

    /// Whether the device is stalled: its workers leave requests on their queues.
    pub fn stalled(&self) -> bool {
        self.stall.on.load(Ordering::Acquire)
    }

    /// Stalls the device, or ends the stall and wakes the queue workers so they answer the
    /// requests that waited. Returns whether it was stalled before.
    pub fn set_stalled(&self, on: bool) -> bool {
        let was = self.stall.on.swap(on, Ordering::AcqRel);
        if was && !on {
            for kick in lock(&self.stall.kicks).iter() {
                if let Err(e) = kick.write(1) {
                    tracing::warn!("virtio-dma: waking a queue after a stall: {e}");
                }
            }
        }
        was
    }

    /// The queues' notification eventfds of the running device (none after a reset), for
    /// [`Self::set_stalled`] to wake.
    pub(super) fn set_kicks(&self, kicks: Vec<EventFd>) {
        *lock(&self.stall.kicks) = kicks;
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn memory(&self) -> &M {
        &self.memory
    }

    fn table(&self) -> std::sync::MutexGuard<'_, MappingTable> {
        lock(&self.table)
    }

    pub fn stat(&self) -> Stat {
        self.table().stat
    }

    /// Range and alignment checks shared by MAP and UNMAP: whole granules, or with
    /// `VIRTIO_DMA_F_SUB_GRANULE` whole 4 KiB units inside one granule.
    fn check_range(&self, gpa: u64, len: u64, features: u64) -> Result<(), Status> {
        let end = gpa.checked_add(len).ok_or(Status::Range)?;
        let (base, size) = (self.config.window_base, self.config.window_size);
        if gpa < base || end > base + size {
            return Err(Status::Range);
        }
        let g = u64::from(self.config.granule);
        if len == 0 {
            return Err(Status::Unaligned);
        }
        if gpa.is_multiple_of(g) && len.is_multiple_of(g) {
            return Ok(());
        }
        let inside_one = (gpa - base) / g == (end - 1 - base) / g;
        let unit = SUB_GRANULE_UNIT;
        if features & F_SUB_GRANULE != 0
            && inside_one
            && gpa.is_multiple_of(unit)
            && len.is_multiple_of(unit)
        {
            return Ok(());
        }
        Err(Status::Unaligned)
    }

    /// Carries out one request of a driver that negotiated `features`; for STAT also returns
    /// the counters. A request relying on a feature that was not negotiated is `INVAL` and
    /// changes nothing.
    pub fn handle(&self, req: Request, features: u64) -> (Response, Option<Stat>) {
        if req.required_features() & !features != 0 {
            return (Response::status(Status::Inval), None);
        }
        match req {
            Request::Map {
                gpa,
                len,
                failfast,
                discard,
                deadline_ms,
            } => {
                let opts = MapOptions {
                    failfast,
                    discard,
                    deadline: Duration::from_millis(u64::from(deadline_ms)),
                };
                (self.map(gpa, len, opts, features), None)
            }
            Request::Unmap { gpa, len, .. } => (self.unmap(gpa, len, features), None),
            Request::Stat => (Response::status(Status::Ok), Some(self.stat())),
        }
    }

    /// MAP; the response names a host-physical address only if the driver negotiated
    /// `VIRTIO_DMA_F_HOST_PHYS`, and the region offset otherwise.
    fn map(&self, gpa: u64, len: u64, opts: MapOptions, features: u64) -> Response {
        let host_phys = features & F_HOST_PHYS != 0;
        let fail = |table: &mut MappingTable, status: Status| {
            table.stat.maps_failed += 1;
            match status {
                Status::Busy => table.stat.maps_busy += 1,
                Status::Timeout => table.stat.maps_timeout += 1,
                _ => {}
            }
            Response::status(status)
        };
        {
            let mut table = self.table();
            if let Err(status) = self.check_range(gpa, len, features) {
                return fail(&mut table, status);
            }
            if len > self.config.max_map_len {
                return fail(&mut table, Status::TooBig);
            }
            let overlaps = table
                .entries
                .range(..gpa + len)
                .next_back()
                .is_some_and(|(&start, e)| start + e.len() > gpa);
            if overlaps {
                return fail(&mut table, Status::Exists);
            }
            if table.entries.len() >= self.config.max_mappings as usize {
                return fail(&mut table, Status::NoMem);
            }
            table.entries.insert(gpa, Entry::Pending { len });
        }
        // The slow part, without the lock: placement may migrate pages or wait for pins.
        let result = self.memory.map(gpa, len, opts);
        let mut table = self.table();
        match result {
            Ok(placement) => {
                table.entries.insert(gpa, Entry::Mapped { len });
                table.stat.maps_ok += 1;
                table.stat.mappings += 1;
                table.stat.mapped_bytes += len;
                table.stat.bytes_migrated += placement.bytes_migrated;
                let (flags, host_addr) = if host_phys && placement.host_phys {
                    (RESP_HOST_PHYS, placement.host_addr)
                } else {
                    (0, placement.region_offset)
                };
                Response {
                    status: Status::Ok as u32,
                    flags,
                    host_addr,
                    extent: placement.extent,
                }
            }
            Err(e) => {
                table.entries.remove(&gpa);
                tracing::debug!(gpa, len, ?opts, "virtio-dma: MAP failed: {e}");
                fail(&mut table, e.status())
            }
        }
    }

    fn unmap(&self, gpa: u64, len: u64, features: u64) -> Response {
        {
            let mut table = self.table();
            if let Err(status) = self.check_range(gpa, len, features) {
                return Response::status(status);
            }
            match table.entries.get(&gpa) {
                Some(Entry::Mapped { len: l }) if *l == len => {}
                _ => return Response::status(Status::NoEnt),
            }
            table.entries.remove(&gpa);
            table.stat.unmaps += 1;
            table.stat.mappings -= 1;
            table.stat.mapped_bytes -= len;
        }
        match self.memory.unmap(gpa, len) {
            Ok(()) => Response::status(Status::Ok),
            Err(e) => {
                // The table said mapped and the owner did not: a bug, not a guest error.
                tracing::error!(gpa, len, "virtio-dma: UNMAP: {e}");
                Response::status(e.status())
            }
        }
    }

    /// Ends every mapping (device reset): the guest's view of the window stays RAM.
    pub fn unmap_all(&self) {
        let entries = std::mem::take(&mut self.table().entries);
        for (gpa, entry) in entries {
            if let Entry::Mapped { len } = entry {
                if let Err(e) = self.memory.unmap(gpa, len) {
                    tracing::error!(gpa, len, "virtio-dma: reset: {e}");
                }
            }
        }
        let mut table = self.table();
        table.stat.mappings = 0;
        table.stat.mapped_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma_memory::Placement;
    use crate::virtio::dma::protocol::{
        F_DEADLINE, F_DISCARD, MAP_DISCARD, MAP_FAILFAST, REQ_MAP, REQ_STAT, REQ_UNMAP,
    };
    use std::sync::atomic::{AtomicU64, Ordering};

    const BASE: u64 = 0x2000_0000;
    const MIB: u64 = 1 << 20;

    /// Where [`BumpMapper`]'s "region" is on the host.
    const PHYS_BASE: u64 = 0x1_4000_0000;

    /// Places mappings bump-style in a 16 MiB "region" whose host-physical addresses it knows,
    /// fails on command, and can hold a MAP until told to go on.
    #[derive(Default)]
    struct BumpMapper {
        next: AtomicU64,
        fail_with: Mutex<Option<MapError>>,
        unmapped: Mutex<Vec<(u64, u64)>>,
        last_opts: Mutex<Option<MapOptions>>,
        /// While true, MAP waits (a placement that takes long).
        hold: (Mutex<bool>, std::sync::Condvar),
    }

    impl BumpMapper {
        fn set_hold(&self, on: bool) {
            *self.hold.0.lock().unwrap() = on;
            self.hold.1.notify_all();
        }
    }

    impl DmaMapper for BumpMapper {
        fn map(&self, _gpa: u64, len: u64, o: MapOptions) -> Result<Placement, MapError> {
            *self.last_opts.lock().unwrap() = Some(o);
            let mut held = self.hold.0.lock().unwrap();
            while *held {
                held = self.hold.1.wait(held).unwrap();
            }
            drop(held);
            if let Some(e) = self.fail_with.lock().unwrap().clone() {
                return Err(e);
            }
            let at = self.next.fetch_add(len, Ordering::SeqCst);
            if at + len > 16 * MIB {
                return Err(MapError::NoMem);
            }
            Ok(Placement {
                host_addr: PHYS_BASE + at,
                host_phys: true,
                region_offset: at,
                extent: 0,
                bytes_migrated: 0,
            })
        }
        fn unmap(&self, gpa: u64, len: u64) -> Result<(), MapError> {
            self.unmapped.lock().unwrap().push((gpa, len));
            Ok(())
        }
        fn host_phys(&self) -> bool {
            true
        }
    }

    fn handler() -> RequestHandler<BumpMapper> {
        RequestHandler::new(
            Config {
                window_base: BASE,
                window_size: 64 * MIB,
                granule: 4096,
                max_mappings: 4,
                max_map_len: 8 * MIB,
                region_size: 16 * MIB,
            },
            BumpMapper::default(),
        )
    }

    fn send(c: &RequestHandler<BumpMapper>, kind: u32, flags: u32, gpa: u64, len: u64) -> u32 {
        let req = Request::parse(&Request::encode(kind, flags, gpa, len, 0)).unwrap();
        c.handle(req, ALL).0.status
    }

    const OK: u32 = Status::Ok as u32;
    const ALL: u64 = F_HOST_PHYS | F_DEADLINE | F_DISCARD;

    fn request(kind: u32, flags: u32, gpa: u64, len: u64, deadline_ms: u32) -> Request {
        Request::parse(&Request::encode(kind, flags, gpa, len, deadline_ms)).unwrap()
    }

    #[test]
    fn discard_without_f_discard_is_inval_and_changes_nothing() {
        let c = handler();
        let no_discard = ALL & !F_DISCARD;
        let map = request(REQ_MAP, MAP_DISCARD, BASE, MIB, 0);
        assert_eq!(c.handle(map, no_discard).0.status, Status::Inval as u32);
        assert!(
            c.memory.last_opts.lock().unwrap().is_none(),
            "nothing placed"
        );
        assert_eq!(c.stat().mappings, 0);
        assert_eq!(send(&c, REQ_MAP, 0, BASE, MIB), OK);
        let unmap = request(REQ_UNMAP, MAP_DISCARD, BASE, MIB, 0);
        assert_eq!(c.handle(unmap, no_discard).0.status, Status::Inval as u32);
        assert_eq!(c.stat().mappings, 1, "the mapping is still there");
        assert!(c.memory.unmapped.lock().unwrap().is_empty());
        // With the feature, the same requests are fine.
        assert_eq!(c.handle(unmap, ALL).0.status, OK);
        assert_eq!(c.handle(map, ALL).0.status, OK);
        assert!(c.memory.last_opts.lock().unwrap().unwrap().discard);
    }

    #[test]
    fn deadline_without_f_deadline_is_inval_and_changes_nothing() {
        let c = handler();
        let no_deadline = ALL & !F_DEADLINE;
        let map = request(REQ_MAP, 0, BASE, MIB, 50);
        assert_eq!(c.handle(map, no_deadline).0.status, Status::Inval as u32);
        assert!(
            c.memory.last_opts.lock().unwrap().is_none(),
            "nothing placed"
        );
        // deadline_ms 0 needs no feature: one sweep.
        let once = request(REQ_MAP, 0, BASE, MIB, 0);
        assert_eq!(c.handle(once, no_deadline).0.status, OK);
        let opts = c.memory.last_opts.lock().unwrap().unwrap();
        assert_eq!((opts.failfast, opts.deadline), (false, Duration::ZERO));
        // With the feature, the deadline reaches the placement.
        let map = request(REQ_MAP, 0, BASE + MIB, MIB, 50);
        assert_eq!(c.handle(map, ALL).0.status, OK);
        let opts = c.memory.last_opts.lock().unwrap().unwrap();
        assert_eq!(opts.deadline, Duration::from_millis(50));
    }

    #[test]
    fn map_response_carries_no_host_physical_address_without_f_host_phys() {
        let c = handler();
        let (r, _) = c.handle(request(REQ_MAP, 0, BASE, MIB, 0), ALL & !F_HOST_PHYS);
        assert_eq!(
            (r.status, r.flags, r.host_addr),
            (OK, 0, 0),
            "the region offset"
        );
        let (r, _) = c.handle(request(REQ_MAP, 0, BASE + MIB, MIB, 0), ALL & !F_HOST_PHYS);
        assert_eq!((r.status, r.flags, r.host_addr), (OK, 0, MIB));
        // With the feature: the host-physical address, flagged.
        let (r, _) = c.handle(request(REQ_MAP, 0, BASE + 2 * MIB, MIB, 0), ALL);
        assert_eq!(
            (r.status, r.flags, r.host_addr),
            (OK, RESP_HOST_PHYS, PHYS_BASE + 2 * MIB)
        );
    }

    #[test]
    fn a_range_being_mapped_is_exists_to_map_and_noent_to_unmap_and_unmap_never_waits() {
        let c = std::sync::Arc::new(handler());
        assert_eq!(send(&c, REQ_MAP, 0, BASE + 8 * MIB, MIB), OK);
        c.memory.set_hold(true);
        let slow = {
            let c = c.clone();
            std::thread::spawn(move || send(&c, REQ_MAP, 0, BASE, 2 * MIB))
        };
        // Wait until the slow MAP has reserved its range (it then waits in the placement).
        while !c.table().entries.contains_key(&BASE) {
            std::thread::yield_now();
        }
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE + MIB, MIB),
            Status::Exists as u32,
            "overlaps the range being mapped"
        );
        assert_eq!(
            send(&c, REQ_UNMAP, 0, BASE, 2 * MIB),
            Status::NoEnt as u32,
            "not mapped yet"
        );
        // UNMAP and STAT of everything else go on while the MAP waits.
        assert_eq!(send(&c, REQ_UNMAP, 0, BASE + 8 * MIB, MIB), OK);
        assert_eq!(send(&c, REQ_STAT, 0, 0, 0), OK);
        assert!(!slow.is_finished(), "the MAP was still waiting all along");
        c.memory.set_hold(false);
        assert_eq!(slow.join().unwrap(), OK);
        assert_eq!(send(&c, REQ_UNMAP, 0, BASE, 2 * MIB), OK);
    }

    #[test]
    fn map_then_unmap() {
        let c = handler();
        assert_eq!(send(&c, REQ_MAP, 0, BASE, MIB), OK);
        assert_eq!(c.stat().mappings, 1);
        assert_eq!(send(&c, REQ_UNMAP, 0, BASE, MIB), OK);
        assert_eq!(c.memory.unmapped.lock().unwrap().as_slice(), &[(BASE, MIB)]);
        let s = c.stat();
        assert_eq!(
            (s.mappings, s.mapped_bytes, s.maps_ok, s.unmaps),
            (0, 0, 1, 1)
        );
    }

    #[test]
    fn range_status_for_outside_or_wrapping() {
        let c = handler();
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE - 4096, 8192),
            Status::Range as u32
        );
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE + 64 * MIB - 4096, 8192),
            Status::Range as u32
        );
        assert_eq!(
            send(&c, REQ_MAP, 0, u64::MAX - 4095, 8192),
            Status::Range as u32
        );
        assert_eq!(send(&c, REQ_UNMAP, 0, 0, 4096), Status::Range as u32);
    }

    #[test]
    fn unaligned_or_zero_length() {
        let c = handler();
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE + 1, 4096),
            Status::Unaligned as u32
        );
        assert_eq!(send(&c, REQ_MAP, 0, BASE, 4097), Status::Unaligned as u32);
        assert_eq!(send(&c, REQ_MAP, 0, BASE, 0), Status::Unaligned as u32);
    }

    #[test]
    fn too_big_exists_nomem() {
        let c = handler();
        assert_eq!(send(&c, REQ_MAP, 0, BASE, 16 * MIB), Status::TooBig as u32);
        assert_eq!(send(&c, REQ_MAP, 0, BASE + MIB, 2 * MIB), OK);
        for (gpa, len) in [
            (BASE, 2 * MIB),
            (BASE + 2 * MIB, MIB),
            (BASE + MIB, MIB),
            (BASE, 4 * MIB),
        ] {
            assert_eq!(
                send(&c, REQ_MAP, 0, gpa, len),
                Status::Exists as u32,
                "{gpa:#x}+{len:#x}"
            );
        }
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE, MIB),
            OK,
            "adjacent below is fine"
        );
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE + 3 * MIB, MIB),
            OK,
            "adjacent above is fine"
        );
        assert_eq!(send(&c, REQ_MAP, 0, BASE + 8 * MIB, MIB), OK);
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE + 16 * MIB, MIB),
            Status::NoMem as u32,
            "max_mappings"
        );
    }

    #[test]
    fn backend_failures_map_to_statuses_and_change_nothing() {
        let c = handler();
        for (e, st) in [
            (MapError::Busy, Status::Busy),
            (MapError::Timeout, Status::Timeout),
            (MapError::NoMem, Status::NoMem),
            (MapError::Io("remap".into()), Status::IoErr),
        ] {
            *c.memory.fail_with.lock().unwrap() = Some(e);
            assert_eq!(send(&c, REQ_MAP, MAP_FAILFAST, BASE, MIB), st as u32);
        }
        *c.memory.fail_with.lock().unwrap() = None;
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE, MIB),
            OK,
            "a failed MAP left no pending entry"
        );
        let s = c.stat();
        assert_eq!(
            (s.maps_failed, s.maps_busy, s.maps_timeout, s.maps_ok),
            (4, 1, 1, 1)
        );
    }

    #[test]
    fn unmap_needs_the_exact_mapping_once() {
        let c = handler();
        assert_eq!(
            send(&c, REQ_UNMAP, 0, BASE, MIB),
            Status::NoEnt as u32,
            "never mapped"
        );
        assert_eq!(send(&c, REQ_MAP, 0, BASE, 2 * MIB), OK);
        assert_eq!(
            send(&c, REQ_UNMAP, 0, BASE, MIB),
            Status::NoEnt as u32,
            "different length"
        );
        assert_eq!(
            send(&c, REQ_UNMAP, 0, BASE + MIB, MIB),
            Status::NoEnt as u32,
            "inside"
        );
        assert_eq!(send(&c, REQ_UNMAP, 0, BASE, 2 * MIB), OK);
        assert_eq!(
            send(&c, REQ_UNMAP, 0, BASE, 2 * MIB),
            Status::NoEnt as u32,
            "double UNMAP"
        );
    }

    #[test]
    fn stat_reports_and_reset_unmaps_everything() {
        let c = handler();
        send(&c, REQ_MAP, 0, BASE, MIB);
        send(&c, REQ_MAP, 0, BASE + MIB, MIB);
        let (r, s) = c.handle(
            Request::parse(&Request::encode(REQ_STAT, 0, 0, 0, 0)).unwrap(),
            ALL,
        );
        assert_eq!(r.status, OK);
        assert_eq!(s.unwrap().mapped_bytes, 2 * MIB);
        c.unmap_all();
        assert_eq!(c.memory.unmapped.lock().unwrap().len(), 2);
        assert_eq!(c.stat().mappings, 0);
    }
}

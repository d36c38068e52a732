//! What the device does with a decoded request: checks it against the window and the live
//! mappings, asks the backend for host memory, and keeps the books.
//!
//! Lock discipline: `DmaCore` sits behind one mutex, held only for checks and table updates,
//! never while the backend places memory (which may wait up to a MAP's deadline). A MAP
//! reserves its guest range as *pending* first, so a concurrent MAP sees the overlap and an
//! UNMAP of a range still being mapped gets NOENT. UNMAP never waits on a MAP.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::protocol::{Config, Request, Response, Stat, Status, RESP_HOST_PHYS};

/// How a MAP may be placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapOptions {
    /// Never wait; skip placements with pinned pages.
    pub failfast: bool,
    /// The guest does not need the range's current contents.
    pub discard: bool,
    /// How long the backend may retry (ignored with `failfast`).
    pub deadline: Duration,
}

/// Where a mapping landed on the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Host-physical address if `host_phys`, else the offset in the region.
    pub host_addr: u64,
    pub host_phys: bool,
    /// Index of the host-contiguous extent that holds the mapping.
    pub extent: u64,
    /// Bytes of other occupants moved to make room.
    pub bytes_migrated: u64,
}

/// Why the backend could not place a mapping.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    #[error("no host-contiguous extent is that large")]
    TooBig,
    #[error("no room in the region")]
    NoMem,
    #[error("every placement with room has a pinned page")]
    Busy,
    #[error("the deadline passed")]
    Timeout,
    #[error("host failure: {0}")]
    Io(String),
}

impl MapError {
    fn status(&self) -> Status {
        match self {
            MapError::TooBig => Status::TooBig,
            MapError::NoMem => Status::NoMem,
            MapError::Busy => Status::Busy,
            MapError::Timeout => Status::Timeout,
            MapError::Io(_) => Status::IoErr,
        }
    }
}

/// The host side of virtio-dma: makes guest ranges host-contiguous and gives them back.
pub trait DmaBackend: Send + Sync {
    /// What keeps a mapping alive; dropping it must not be the way to end one.
    type Mapping: Send;
    /// Backs `[gpa, gpa + len)` with host-contiguous, pinned memory.
    fn map(
        &self,
        gpa: u64,
        len: u64,
        opts: MapOptions,
    ) -> Result<(Self::Mapping, Placement), MapError>;
    /// Ends a mapping, copying its contents back to ordinary memory unless `discard`. Must not
    /// block on anything but that copy.
    fn unmap(&self, gpa: u64, len: u64, mapping: Self::Mapping, discard: bool);
    /// Whether placements carry host-physical addresses.
    fn host_phys(&self) -> bool {
        false
    }
    /// Held by the device's threads while they write guest memory, when the backend moves
    /// guest pages behind the guest's back (see `lending::MoveGate`).
    fn guest_access(&self) -> Option<std::sync::RwLockReadGuard<'_, ()>> {
        None
    }
}

enum Entry<M> {
    Pending { len: u64 },
    Mapped { len: u64, mapping: M },
}

impl<M> Entry<M> {
    fn len(&self) -> u64 {
        match self {
            Entry::Pending { len } | Entry::Mapped { len, .. } => *len,
        }
    }
}

struct Books<M> {
    entries: BTreeMap<u64, Entry<M>>,
    stat: Stat,
}

/// The device's request logic, shared by the queue handlers.
pub struct DmaCore<B: DmaBackend> {
    config: Config,
    backend: B,
    books: Mutex<Books<B::Mapping>>,
}

impl<B: DmaBackend> DmaCore<B> {
    pub fn new(config: Config, backend: B) -> Self {
        Self {
            config,
            backend,
            books: Mutex::new(Books {
                entries: BTreeMap::new(),
                stat: Stat::default(),
            }),
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books<B::Mapping>> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stat(&self) -> Stat {
        self.books().stat
    }

    /// Range and alignment checks shared by MAP and UNMAP.
    fn check_range(&self, gpa: u64, len: u64) -> Result<(), Status> {
        let end = gpa.checked_add(len).ok_or(Status::Range)?;
        let (base, size) = (self.config.window_base, self.config.window_size);
        if gpa < base || end > base + size {
            return Err(Status::Range);
        }
        let g = u64::from(self.config.granule);
        if len == 0 || !gpa.is_multiple_of(g) || !len.is_multiple_of(g) {
            return Err(Status::Unaligned);
        }
        Ok(())
    }

    /// Carries out one request; for STAT also returns the counters.
    pub fn handle(&self, req: Request) -> (Response, Option<Stat>) {
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
                (self.map(gpa, len, opts), None)
            }
            Request::Unmap { gpa, len, discard } => (self.unmap(gpa, len, discard), None),
            Request::Stat => (Response::status(Status::Ok), Some(self.stat())),
        }
    }

    fn map(&self, gpa: u64, len: u64, opts: MapOptions) -> Response {
        let fail = |books: &mut Books<B::Mapping>, status: Status| {
            books.stat.maps_failed += 1;
            match status {
                Status::Busy => books.stat.maps_busy += 1,
                Status::Timeout => books.stat.maps_timeout += 1,
                _ => {}
            }
            Response::status(status)
        };
        {
            let mut books = self.books();
            if let Err(status) = self.check_range(gpa, len) {
                return fail(&mut books, status);
            }
            if len > self.config.max_map_len {
                return fail(&mut books, Status::TooBig);
            }
            let overlaps = books
                .entries
                .range(..gpa + len)
                .next_back()
                .is_some_and(|(&start, e)| start + e.len() > gpa);
            if overlaps {
                return fail(&mut books, Status::Exists);
            }
            if books.entries.len() >= self.config.max_mappings as usize {
                return fail(&mut books, Status::NoMem);
            }
            books.entries.insert(gpa, Entry::Pending { len });
        }
        // The slow part, without the lock: placement may migrate pages or wait for pins.
        let result = self.backend.map(gpa, len, opts);
        let mut books = self.books();
        match result {
            Ok((mapping, placement)) => {
                books.entries.insert(gpa, Entry::Mapped { len, mapping });
                books.stat.maps_ok += 1;
                books.stat.mappings += 1;
                books.stat.mapped_bytes += len;
                books.stat.bytes_migrated += placement.bytes_migrated;
                Response {
                    status: Status::Ok as u32,
                    flags: if placement.host_phys {
                        RESP_HOST_PHYS
                    } else {
                        0
                    },
                    host_addr: placement.host_addr,
                    extent: placement.extent,
                }
            }
            Err(e) => {
                books.entries.remove(&gpa);
                tracing::debug!(gpa, len, ?opts, "virtio-dma: MAP failed: {e}");
                fail(&mut books, e.status())
            }
        }
    }

    fn unmap(&self, gpa: u64, len: u64, discard: bool) -> Response {
        let mapping = {
            let mut books = self.books();
            if let Err(status) = self.check_range(gpa, len) {
                return Response::status(status);
            }
            match books.entries.get(&gpa) {
                Some(Entry::Mapped { len: l, .. }) if *l == len => {}
                _ => return Response::status(Status::NoEnt),
            }
            let Some(Entry::Mapped { mapping, .. }) = books.entries.remove(&gpa) else {
                unreachable!("checked above under the same lock")
            };
            books.stat.unmaps += 1;
            books.stat.mappings -= 1;
            books.stat.mapped_bytes -= len;
            mapping
        };
        self.backend.unmap(gpa, len, mapping, discard);
        Response::status(Status::Ok)
    }

    /// Ends every mapping (device reset): the guest's view of the window stays RAM.
    pub fn unmap_all(&self) {
        let entries = std::mem::take(&mut self.books().entries);
        for (gpa, entry) in entries {
            if let Entry::Mapped { len, mapping } = entry {
                // The driver that held these is gone: nobody needs the contents.
                self.backend.unmap(gpa, len, mapping, true);
            }
        }
        let mut books = self.books();
        books.stat.mappings = 0;
        books.stat.mapped_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::dma::protocol::{MAP_FAILFAST, REQ_MAP, REQ_STAT, REQ_UNMAP};
    use std::sync::atomic::{AtomicU64, Ordering};

    const BASE: u64 = 0x2000_0000;
    const MIB: u64 = 1 << 20;

    /// A backend that places mappings bump-style in a 16 MiB "region" and fails on command.
    #[derive(Default)]
    struct Fake {
        next: AtomicU64,
        fail_with: Mutex<Option<MapError>>,
        unmapped: Mutex<Vec<(u64, u64)>>,
    }

    impl DmaBackend for Fake {
        type Mapping = u64;
        fn map(&self, _gpa: u64, len: u64, _o: MapOptions) -> Result<(u64, Placement), MapError> {
            if let Some(e) = self.fail_with.lock().unwrap().clone() {
                return Err(e);
            }
            let at = self.next.fetch_add(len, Ordering::SeqCst);
            if at + len > 16 * MIB {
                return Err(MapError::NoMem);
            }
            Ok((
                at,
                Placement {
                    host_addr: at,
                    host_phys: false,
                    extent: 0,
                    bytes_migrated: 0,
                },
            ))
        }
        fn unmap(&self, gpa: u64, len: u64, _m: u64, _discard: bool) {
            self.unmapped.lock().unwrap().push((gpa, len));
        }
    }

    fn core() -> DmaCore<Fake> {
        DmaCore::new(
            Config {
                window_base: BASE,
                window_size: 64 * MIB,
                granule: 4096,
                max_mappings: 4,
                max_map_len: 8 * MIB,
                region_size: 16 * MIB,
            },
            Fake::default(),
        )
    }

    fn send(c: &DmaCore<Fake>, kind: u32, flags: u32, gpa: u64, len: u64) -> u32 {
        let req = Request::parse(&Request::encode(kind, flags, gpa, len, 0)).unwrap();
        c.handle(req).0.status
    }

    const OK: u32 = Status::Ok as u32;

    #[test]
    fn map_then_unmap() {
        let c = core();
        assert_eq!(send(&c, REQ_MAP, 0, BASE, MIB), OK);
        assert_eq!(c.stat().mappings, 1);
        assert_eq!(send(&c, REQ_UNMAP, 0, BASE, MIB), OK);
        assert_eq!(
            c.backend.unmapped.lock().unwrap().as_slice(),
            &[(BASE, MIB)]
        );
        let s = c.stat();
        assert_eq!(
            (s.mappings, s.mapped_bytes, s.maps_ok, s.unmaps),
            (0, 0, 1, 1)
        );
    }

    #[test]
    fn range_status_for_outside_or_wrapping() {
        let c = core();
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
        let c = core();
        assert_eq!(
            send(&c, REQ_MAP, 0, BASE + 1, 4096),
            Status::Unaligned as u32
        );
        assert_eq!(send(&c, REQ_MAP, 0, BASE, 4097), Status::Unaligned as u32);
        assert_eq!(send(&c, REQ_MAP, 0, BASE, 0), Status::Unaligned as u32);
    }

    #[test]
    fn too_big_exists_nomem() {
        let c = core();
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
        let c = core();
        for (e, st) in [
            (MapError::Busy, Status::Busy),
            (MapError::Timeout, Status::Timeout),
            (MapError::NoMem, Status::NoMem),
            (MapError::Io("remap".into()), Status::IoErr),
        ] {
            *c.backend.fail_with.lock().unwrap() = Some(e);
            assert_eq!(send(&c, REQ_MAP, MAP_FAILFAST, BASE, MIB), st as u32);
        }
        *c.backend.fail_with.lock().unwrap() = None;
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
        let c = core();
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
        let c = core();
        send(&c, REQ_MAP, 0, BASE, MIB);
        send(&c, REQ_MAP, 0, BASE + MIB, MIB);
        let (r, s) = c.handle(Request::parse(&Request::encode(REQ_STAT, 0, 0, 0, 0)).unwrap());
        assert_eq!(r.status, OK);
        assert_eq!(s.unwrap().mapped_bytes, 2 * MIB);
        c.unmap_all();
        assert_eq!(c.backend.unmapped.lock().unwrap().len(), 2);
        assert_eq!(c.stat().mappings, 0);
    }
}

//! The virtio-dma wire format (docs/virtio-dma.md): device ID, features, configuration space,
//! request and response layouts and status codes. Everything little-endian.
//!
//! Each wire layout is a `#[repr(C)]` struct of little-endian fields implementing vm-memory's
//! `ByteValued` ([`RequestHeader`], [`WireResponse`], [`WireStat`], [`WireConfig`]), so a
//! device can move it in and out of guest memory whole (`reader.read_obj::<RequestHeader>()`).
//! [`Request`], [`Response`], [`Stat`] and [`Config`] are the native-endian forms the device's
//! logic works with.

use std::mem::size_of;

use vm_memory::{ByteValued, Le32, Le64};

/// The virtio device ID (docs/virtio-dma.md, Device ID): 60, not assigned by OASIS. Nonstandard
/// IDs count down from 63, as crosvm's do (61-63 are crosvm's), so that the modern virtio-pci
/// device ID `0x1040 + 60 = 0x107c` stays inside the range Linux's virtio-pci accepts
/// (0x1040..=0x107f, virtio IDs 0..=63).
pub const VIRTIO_ID_DMA: u32 = 60;

// Usable on virtio-pci as well as virtio-mmio.
const _: () = assert!(VIRTIO_ID_DMA <= 0x7f - 0x40);

pub const MAPQ: usize = 0;
pub const CTRLQ: usize = 1;

pub const F_HOST_PHYS: u64 = 1 << 0;
pub const F_DEADLINE: u64 = 1 << 1;
pub const F_DISCARD: u64 = 1 << 2;
/// MAP and UNMAP also take a range shorter than the granule that lies inside one granule, in
/// whole [`SUB_GRANULE_UNIT`]s.
pub const F_SUB_GRANULE: u64 = 1 << 3;
/// The unit of a range inside one granule (with [`F_SUB_GRANULE`]).
pub const SUB_GRANULE_UNIT: u64 = 4096;

pub const REQ_MAP: u32 = 1;
pub const REQ_UNMAP: u32 = 2;
pub const REQ_STAT: u32 = 3;

pub const MAP_FAILFAST: u32 = 1 << 0;
pub const MAP_DISCARD: u32 = 1 << 1;
const MAP_FLAGS: u32 = MAP_FAILFAST | MAP_DISCARD;

pub const RESP_HOST_PHYS: u32 = 1 << 0;

/// Bytes in a request header (`struct virtio_dma_req`).
pub const REQ_SIZE: usize = size_of::<RequestHeader>();
/// Bytes in a response (`struct virtio_dma_resp`).
pub const RESP_SIZE: usize = size_of::<WireResponse>();
/// Bytes in the statistics that follow a STAT response (`struct virtio_dma_stat`).
pub const STAT_SIZE: usize = size_of::<WireStat>();
/// Bytes in the configuration space (`struct virtio_dma_config`).
pub const CONFIG_SIZE: usize = size_of::<WireConfig>();

// The sizes docs/virtio-dma.md gives. Each struct's fields add up to exactly this size (see
// the field lists), so these also prove the structs have no padding, which `ByteValued` needs.
const _: () = assert!(REQ_SIZE == 32);
const _: () = assert!(RESP_SIZE == 24);
const _: () = assert!(STAT_SIZE == 64);
const _: () = assert!(CONFIG_SIZE == 40);
const _: () = assert!(4 + 4 + 8 + 8 + 4 + 4 == REQ_SIZE);
const _: () = assert!(4 + 4 + 8 + 8 == RESP_SIZE);
const _: () = assert!(8 * 8 == STAT_SIZE);
const _: () = assert!(8 + 8 + 4 + 4 + 8 + 8 == CONFIG_SIZE);

/// Copies a wire struct into a byte array of its size.
fn to_bytes<T: ByteValued, const N: usize>(v: &T) -> [u8; N] {
    let mut b = [0u8; N];
    b.copy_from_slice(v.as_slice());
    b
}

/// Builds a wire struct from a byte array of its size (no alignment needed).
fn from_bytes<T: ByteValued, const N: usize>(b: &[u8; N]) -> T {
    let mut v = T::zeroed();
    v.as_mut_slice().copy_from_slice(b);
    v
}

/// `struct virtio_dma_req` (docs/virtio-dma.md §6.1): the device-readable request header, as the
/// guest wrote it. Nothing in it is checked yet; [`Request::from_header`] does that.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    /// `type`: 1 = MAP, 2 = UNMAP, 3 = STAT.
    pub kind: Le32,
    pub flags: Le32,
    pub gpa: Le64,
    pub len: Le64,
    pub deadline_ms: Le32,
    /// Must be 0.
    pub reserved: Le32,
}

// SAFETY: `RequestHeader` is `#[repr(C)]` and made only of `Le32`/`Le64` (transparent wrappers
// of `u32`/`u64`, for which every bit pattern is valid); the fields are naturally aligned and
// fill the struct exactly (asserted above), so it has no padding bytes.
unsafe impl ByteValued for RequestHeader {}

impl RequestHeader {
    /// A header with `reserved` 0 (the driver's side; used by tests and fuzz seeds).
    pub fn new(kind: u32, flags: u32, gpa: u64, len: u64, deadline_ms: u32) -> Self {
        Self {
            kind: kind.into(),
            flags: flags.into(),
            gpa: gpa.into(),
            len: len.into(),
            deadline_ms: deadline_ms.into(),
            reserved: 0.into(),
        }
    }
}

/// `struct virtio_dma_resp` (docs/virtio-dma.md §6.1): the wire form of [`Response`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireResponse {
    pub status: Le32,
    pub flags: Le32,
    pub host_addr: Le64,
    pub extent: Le64,
}

// SAFETY: `#[repr(C)]`, only `Le32`/`Le64` fields (any bit pattern valid), naturally aligned
// and filling the struct exactly (asserted above): no padding.
unsafe impl ByteValued for WireResponse {}

/// `struct virtio_dma_stat` (docs/virtio-dma.md §6.4): the wire form of [`Stat`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireStat {
    pub mappings: Le64,
    pub mapped_bytes: Le64,
    pub maps_ok: Le64,
    pub maps_failed: Le64,
    pub maps_busy: Le64,
    pub maps_timeout: Le64,
    pub unmaps: Le64,
    pub bytes_migrated: Le64,
}

// SAFETY: `#[repr(C)]`, only `Le64` fields (any bit pattern valid), filling the struct exactly
// (asserted above): no padding.
unsafe impl ByteValued for WireStat {}

/// `struct virtio_dma_config` (docs/virtio-dma.md §4): the wire form of [`Config`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WireConfig {
    pub window_base: Le64,
    pub window_size: Le64,
    pub granule: Le32,
    pub max_mappings: Le32,
    pub max_map_len: Le64,
    pub region_size: Le64,
}

// SAFETY: `#[repr(C)]`, only `Le32`/`Le64` fields (any bit pattern valid), naturally aligned
// (the two `Le32`s share one 8-byte slot) and filling the struct exactly (asserted above): no
// padding.
unsafe impl ByteValued for WireConfig {}

/// The status of a request, as the driver sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    Inval = 1,
    Range = 2,
    Unaligned = 3,
    TooBig = 4,
    NoMem = 5,
    Busy = 6,
    Timeout = 7,
    Exists = 8,
    NoEnt = 9,
    IoErr = 10,
}

/// A request header the device could decode; what it asks is not yet checked against the
/// window or the existing mappings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Map {
        gpa: u64,
        len: u64,
        failfast: bool,
        discard: bool,
        deadline_ms: u32,
    },
    Unmap {
        gpa: u64,
        len: u64,
        discard: bool,
    },
    Stat,
}

impl Request {
    /// Decodes a 32-byte header; anything malformed is `INVAL`.
    pub fn parse(header: &[u8; REQ_SIZE]) -> Result<Request, Status> {
        Self::from_header(from_bytes(header))
    }

    /// Checks a header read from the guest; anything malformed (unknown type, unknown flags,
    /// fields a request type does not use set, `reserved` not 0) is `INVAL`.
    pub fn from_header(header: RequestHeader) -> Result<Request, Status> {
        let (kind, flags) = (header.kind.to_native(), header.flags.to_native());
        let (gpa, len, deadline_ms, reserved) = (
            header.gpa.to_native(),
            header.len.to_native(),
            header.deadline_ms.to_native(),
            header.reserved.to_native(),
        );
        if reserved != 0 {
            return Err(Status::Inval);
        }
        match kind {
            REQ_MAP if flags & !MAP_FLAGS == 0 => Ok(Request::Map {
                gpa,
                len,
                failfast: flags & MAP_FAILFAST != 0,
                discard: flags & MAP_DISCARD != 0,
                deadline_ms,
            }),
            REQ_UNMAP if flags & !MAP_DISCARD == 0 && deadline_ms == 0 => Ok(Request::Unmap {
                gpa,
                len,
                discard: flags & MAP_DISCARD != 0,
            }),
            REQ_STAT if flags == 0 && gpa == 0 && len == 0 && deadline_ms == 0 => Ok(Request::Stat),
            _ => Err(Status::Inval),
        }
    }

    /// The device features a request relies on: `DISCARD` needs `VIRTIO_DMA_F_DISCARD`, a
    /// nonzero `deadline_ms` needs `VIRTIO_DMA_F_DEADLINE`. A request relying on one that was
    /// not negotiated is `INVAL` (docs/virtio-dma.md, Device Requirements).
    pub fn required_features(&self) -> u64 {
        let (discard, deadline_ms) = match *self {
            Request::Map {
                discard,
                deadline_ms,
                ..
            } => (discard, deadline_ms),
            Request::Unmap { discard, .. } => (discard, 0),
            Request::Stat => (false, 0),
        };
        (if discard { F_DISCARD } else { 0 }) | (if deadline_ms != 0 { F_DEADLINE } else { 0 })
    }

    /// The response bytes a request of this kind needs.
    pub fn response_len(&self) -> usize {
        match self {
            Request::Stat => RESP_SIZE + STAT_SIZE,
            _ => RESP_SIZE,
        }
    }

    /// Encodes a request (the driver's side; used by tests and fuzz seeds).
    pub fn encode(kind: u32, flags: u32, gpa: u64, len: u64, deadline_ms: u32) -> [u8; REQ_SIZE] {
        to_bytes(&RequestHeader::new(kind, flags, gpa, len, deadline_ms))
    }
}

/// A response: status, and for MAP where the range now lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Response {
    pub status: u32,
    pub flags: u32,
    pub host_addr: u64,
    pub extent: u64,
}

impl From<Response> for WireResponse {
    fn from(r: Response) -> Self {
        Self {
            status: r.status.into(),
            flags: r.flags.into(),
            host_addr: r.host_addr.into(),
            extent: r.extent.into(),
        }
    }
}

impl From<WireResponse> for Response {
    fn from(w: WireResponse) -> Self {
        Self {
            status: w.status.into(),
            flags: w.flags.into(),
            host_addr: w.host_addr.into(),
            extent: w.extent.into(),
        }
    }
}

impl Response {
    pub fn status(status: Status) -> Self {
        Self {
            status: status as u32,
            ..Default::default()
        }
    }

    pub fn encode(&self) -> [u8; RESP_SIZE] {
        to_bytes(&WireResponse::from(*self))
    }

    pub fn decode(b: &[u8; RESP_SIZE]) -> Self {
        from_bytes::<WireResponse, RESP_SIZE>(b).into()
    }
}

/// The device's counters, as STAT returns them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stat {
    pub mappings: u64,
    pub mapped_bytes: u64,
    pub maps_ok: u64,
    pub maps_failed: u64,
    pub maps_busy: u64,
    pub maps_timeout: u64,
    pub unmaps: u64,
    pub bytes_migrated: u64,
}

impl From<Stat> for WireStat {
    fn from(s: Stat) -> Self {
        Self {
            mappings: s.mappings.into(),
            mapped_bytes: s.mapped_bytes.into(),
            maps_ok: s.maps_ok.into(),
            maps_failed: s.maps_failed.into(),
            maps_busy: s.maps_busy.into(),
            maps_timeout: s.maps_timeout.into(),
            unmaps: s.unmaps.into(),
            bytes_migrated: s.bytes_migrated.into(),
        }
    }
}

impl Stat {
    pub fn encode(&self) -> [u8; STAT_SIZE] {
        to_bytes(&WireStat::from(*self))
    }
}

/// The configuration space (docs/virtio-dma.md §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub window_base: u64,
    pub window_size: u64,
    pub granule: u32,
    pub max_mappings: u32,
    pub max_map_len: u64,
    pub region_size: u64,
}

impl From<Config> for WireConfig {
    fn from(c: Config) -> Self {
        Self {
            window_base: c.window_base.into(),
            window_size: c.window_size.into(),
            granule: c.granule.into(),
            max_mappings: c.max_mappings.into(),
            max_map_len: c.max_map_len.into(),
            region_size: c.region_size.into(),
        }
    }
}

impl Config {
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        to_bytes(&WireConfig::from(*self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_round_trips_and_flags_decode() {
        let h = Request::encode(REQ_MAP, MAP_FAILFAST, 0x2000_0000, 1 << 20, 5);
        assert_eq!(
            Request::parse(&h),
            Ok(Request::Map {
                gpa: 0x2000_0000,
                len: 1 << 20,
                failfast: true,
                discard: false,
                deadline_ms: 5
            })
        );
    }

    #[test]
    fn malformed_headers_are_inval() {
        for h in [
            Request::encode(0, 0, 0, 0, 0),
            Request::encode(99, 0, 0, 0, 0),
            Request::encode(REQ_MAP, 1 << 7, 0, 4096, 0),
            Request::encode(REQ_UNMAP, MAP_FAILFAST, 0, 4096, 0),
            Request::encode(REQ_UNMAP, 0, 0, 4096, 10),
            Request::encode(REQ_STAT, 0, 4096, 0, 0),
        ] {
            assert_eq!(Request::parse(&h), Err(Status::Inval), "{h:?}");
        }
        let mut h = Request::encode(REQ_STAT, 0, 0, 0, 0);
        h[28] = 1;
        assert_eq!(Request::parse(&h), Err(Status::Inval), "reserved must be 0");
    }

    #[test]
    fn response_round_trips() {
        let r = Response {
            status: 0,
            flags: RESP_HOST_PHYS,
            host_addr: 0x1_4000_0000,
            extent: 2,
        };
        assert_eq!(Response::decode(&r.encode()), r);
    }

    #[test]
    fn layouts_match_the_documented_offsets() {
        use std::mem::offset_of;
        // docs/virtio-dma.md §6.1, struct virtio_dma_req.
        assert_eq!(
            [
                offset_of!(RequestHeader, kind),
                offset_of!(RequestHeader, flags),
                offset_of!(RequestHeader, gpa),
                offset_of!(RequestHeader, len),
                offset_of!(RequestHeader, deadline_ms),
                offset_of!(RequestHeader, reserved),
                REQ_SIZE
            ],
            [0, 4, 8, 16, 24, 28, 32]
        );
        // struct virtio_dma_resp.
        assert_eq!(
            [
                offset_of!(WireResponse, status),
                offset_of!(WireResponse, flags),
                offset_of!(WireResponse, host_addr),
                offset_of!(WireResponse, extent),
                RESP_SIZE
            ],
            [0, 4, 8, 16, 24]
        );
        // struct virtio_dma_stat.
        assert_eq!(
            [
                offset_of!(WireStat, mappings),
                offset_of!(WireStat, mapped_bytes),
                offset_of!(WireStat, maps_ok),
                offset_of!(WireStat, maps_failed),
                offset_of!(WireStat, maps_busy),
                offset_of!(WireStat, maps_timeout),
                offset_of!(WireStat, unmaps),
                offset_of!(WireStat, bytes_migrated),
                STAT_SIZE
            ],
            [0, 8, 16, 24, 32, 40, 48, 56, 64]
        );
        // §4, struct virtio_dma_config.
        assert_eq!(
            [
                offset_of!(WireConfig, window_base),
                offset_of!(WireConfig, window_size),
                offset_of!(WireConfig, granule),
                offset_of!(WireConfig, max_mappings),
                offset_of!(WireConfig, max_map_len),
                offset_of!(WireConfig, region_size),
                CONFIG_SIZE
            ],
            [0, 8, 16, 20, 24, 32, 40]
        );
    }

    #[test]
    fn encodings_are_little_endian_at_the_documented_offsets() {
        let h = Request::encode(REQ_MAP, 0x0102_0304, 0x1112_1314_1516_1718, 0x2122, 0x3132);
        assert_eq!(&h[0..4], &[1, 0, 0, 0]);
        assert_eq!(&h[4..8], &[4, 3, 2, 1]);
        assert_eq!(&h[8..16], &[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]);
        assert_eq!(&h[16..24], &[0x22, 0x21, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&h[24..32], &[0x32, 0x31, 0, 0, 0, 0, 0, 0]);

        let r = Response {
            status: 5,
            flags: 1,
            host_addr: 0x0102,
            extent: 0x0304,
        }
        .encode();
        assert_eq!(r[0..4], [5, 0, 0, 0]);
        assert_eq!(r[4..8], [1, 0, 0, 0]);
        assert_eq!(r[8..10], [2, 1]);
        assert_eq!(r[16..18], [4, 3]);

        let s = Stat {
            mappings: 1,
            bytes_migrated: 0x0102,
            ..Default::default()
        }
        .encode();
        assert_eq!(s[0], 1);
        assert_eq!(s[56..58], [2, 1]);
        assert!(s[1..56].iter().all(|&b| b == 0));

        let c = Config {
            window_base: 0x0102,
            window_size: 0x0304,
            granule: 0x0506,
            max_mappings: 0x0708,
            max_map_len: 0x090a,
            region_size: 0x0b0c,
        }
        .encode();
        for (at, v) in [
            (0, 0x0102u16),
            (8, 0x0304),
            (16, 0x0506),
            (20, 0x0708),
            (24, 0x090a),
            (32, 0x0b0c),
        ] {
            assert_eq!(c[at..at + 2], v.to_le_bytes(), "config field at {at}");
        }
    }

    #[test]
    fn from_header_checks_what_parse_checks() {
        let mut h = RequestHeader::new(REQ_STAT, 0, 0, 0, 0);
        assert_eq!(Request::from_header(h), Ok(Request::Stat));
        h.reserved = 1.into();
        assert_eq!(Request::from_header(h), Err(Status::Inval));
        let h = RequestHeader::new(REQ_UNMAP, MAP_DISCARD, 0x1000, 0x2000, 0);
        assert_eq!(
            Request::from_header(h),
            Request::parse(&Request::encode(REQ_UNMAP, MAP_DISCARD, 0x1000, 0x2000, 0))
        );
        assert_eq!(
            Request::from_header(h),
            Ok(Request::Unmap {
                gpa: 0x1000,
                len: 0x2000,
                discard: true
            })
        );
    }

    #[test]
    fn header_reads_whole_from_a_descriptor_chain() {
        use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
        use virtio_queue::desc::{split::Descriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use virtio_queue::{Queue, QueueT, Reader, Writer};
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let h = Request::encode(REQ_MAP, MAP_DISCARD, 0x20_0000, 0x1000, 7);
        // The header split over two descriptors at odd addresses.
        mem.write_slice(&h[..10], GuestAddress(0x8003)).unwrap();
        mem.write_slice(&h[10..], GuestAddress(0xa001)).unwrap();
        let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
        let vq = MockSplitQueue::new(&mem, 16);
        let raw = [(0x8003, 10, next), (0xa001, 22, next), (0x9000, 24, write)]
            .map(|(a, l, f)| RawDescriptor::from(Descriptor::new(a, l, f, 0)));
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();

        let mut reader = Reader::<()>::new(&mem, chain.clone()).unwrap();
        let header = reader.read_obj::<RequestHeader>().unwrap();
        assert_eq!(
            header,
            RequestHeader::new(REQ_MAP, MAP_DISCARD, 0x20_0000, 0x1000, 7)
        );
        assert_eq!(Request::from_header(header), Request::parse(&h));

        let mut writer = Writer::<()>::new(&mem, chain).unwrap();
        let r = Response {
            status: Status::Busy as u32,
            ..Default::default()
        };
        writer.write_obj(WireResponse::from(r)).unwrap();
        let mut b = [0u8; RESP_SIZE];
        mem.read_slice(&mut b, GuestAddress(0x9000)).unwrap();
        assert_eq!(Response::decode(&b), r);
    }
}

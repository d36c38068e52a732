//! The virtio-dma wire format (docs/virtio-dma.md): device ID, features, configuration space,
//! request and response layouts and status codes. Everything little-endian.

/// Not an assigned virtio ID; see docs/virtio-dma.md §1.
pub const VIRTIO_ID_DMA: u32 = 200;

pub const MAPQ: usize = 0;
pub const CTRLQ: usize = 1;

pub const F_HOST_PHYS: u64 = 1 << 0;
pub const F_DEADLINE: u64 = 1 << 1;
pub const F_DISCARD: u64 = 1 << 2;

pub const REQ_MAP: u32 = 1;
pub const REQ_UNMAP: u32 = 2;
pub const REQ_STAT: u32 = 3;

pub const MAP_FAILFAST: u32 = 1 << 0;
pub const MAP_DISCARD: u32 = 1 << 1;
const MAP_FLAGS: u32 = MAP_FAILFAST | MAP_DISCARD;

pub const RESP_HOST_PHYS: u32 = 1 << 0;

pub const REQ_SIZE: usize = 32;
pub const RESP_SIZE: usize = 24;
pub const STAT_SIZE: usize = 64;
pub const CONFIG_SIZE: usize = 40;

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

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Request {
    /// Decodes a 32-byte header; anything malformed is `INVAL`.
    pub fn parse(header: &[u8; REQ_SIZE]) -> Result<Request, Status> {
        let (kind, flags) = (le32(header, 0), le32(header, 4));
        let (gpa, len, deadline_ms, reserved) = (
            le64(header, 8),
            le64(header, 16),
            le32(header, 24),
            le32(header, 28),
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

    /// The response bytes a request of this kind needs.
    pub fn response_len(&self) -> usize {
        match self {
            Request::Stat => RESP_SIZE + STAT_SIZE,
            _ => RESP_SIZE,
        }
    }

    /// Encodes a request (the driver's side; used by tests and fuzz seeds).
    pub fn encode(kind: u32, flags: u32, gpa: u64, len: u64, deadline_ms: u32) -> [u8; REQ_SIZE] {
        let mut b = [0u8; REQ_SIZE];
        b[0..4].copy_from_slice(&kind.to_le_bytes());
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[8..16].copy_from_slice(&gpa.to_le_bytes());
        b[16..24].copy_from_slice(&len.to_le_bytes());
        b[24..28].copy_from_slice(&deadline_ms.to_le_bytes());
        b
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

impl Response {
    pub fn status(status: Status) -> Self {
        Self {
            status: status as u32,
            ..Default::default()
        }
    }

    pub fn encode(&self) -> [u8; RESP_SIZE] {
        let mut b = [0u8; RESP_SIZE];
        b[0..4].copy_from_slice(&self.status.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.host_addr.to_le_bytes());
        b[16..24].copy_from_slice(&self.extent.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; RESP_SIZE]) -> Self {
        Self {
            status: le32(b, 0),
            flags: le32(b, 4),
            host_addr: le64(b, 8),
            extent: le64(b, 16),
        }
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

impl Stat {
    pub fn encode(&self) -> [u8; STAT_SIZE] {
        let fields = [
            self.mappings,
            self.mapped_bytes,
            self.maps_ok,
            self.maps_failed,
            self.maps_busy,
            self.maps_timeout,
            self.unmaps,
            self.bytes_migrated,
        ];
        let mut b = [0u8; STAT_SIZE];
        for (chunk, v) in b.chunks_exact_mut(8).zip(fields) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        b
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

impl Config {
    pub fn encode(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0u8; CONFIG_SIZE];
        b[0..8].copy_from_slice(&self.window_base.to_le_bytes());
        b[8..16].copy_from_slice(&self.window_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.granule.to_le_bytes());
        b[20..24].copy_from_slice(&self.max_mappings.to_le_bytes());
        b[24..32].copy_from_slice(&self.max_map_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.region_size.to_le_bytes());
        b
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
}

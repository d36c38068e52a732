//! Fuzzes the virtio-dma request handler with guest memory and descriptor chains under the
//! fuzzer's control: the chain's addresses, lengths and flags, and every byte of guest memory
//! (so headers, lengths, windows and overlaps are all fuzzed). The handler must never panic,
//! must write only inside the chain's writable descriptors, and must answer with a known status.
#![no_main]

use std::sync::Mutex;

use devices::dma_memory::{DmaMapper, MapError, MapOptions, Placement};
use devices::guest_memory::GuestMemoryHandle;
use devices::virtio::dma::protocol::{
    F_DEADLINE, F_DISCARD, F_HOST_PHYS, F_SUB_GRANULE, RESP_SIZE, STAT_SIZE,
};
use devices::virtio::dma::{serve_chain, Config, RequestHandler, Response};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};

const MEM: usize = 0x4_0000;
const WINDOW: u64 = 0x1_0000;

/// Places mappings bump-style; fails some MAPs with the next error in turn.
struct Mapper(Mutex<u64>);

impl DmaMapper for Mapper {
    fn map(&self, _gpa: u64, len: u64, _o: MapOptions) -> Result<Placement, MapError> {
        let mut n = self.0.lock().unwrap();
        *n += 1;
        match *n % 9 {
            3 => Err(MapError::Busy),
            6 => Err(MapError::Timeout),
            _ => Ok(Placement {
                host_addr: *n << 12,
                host_phys: false,
                region_offset: *n << 12,
                extent: 0,
                bytes_migrated: len,
            }),
        }
    }
    fn unmap(&self, _gpa: u64, _len: u64) -> Result<(), MapError> {
        Ok(())
    }
    fn host_phys(&self) -> bool {
        false
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let guest =
        GuestMemoryHandle::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
    let handler = RequestHandler::new(
        Config {
            window_base: WINDOW,
            window_size: 0x2_0000,
            granule: 0x4000,
            max_mappings: 4,
            max_map_len: 0x1_0000,
            region_size: 0x2_0000,
        },
        Mapper(Mutex::new(0)),
    );
    // The negotiated features, from the fuzzer too.
    let all = [F_HOST_PHYS, F_DEADLINE, F_DISCARD, F_SUB_GRANULE];
    let features = all
        .iter()
        .enumerate()
        .filter(|(i, _)| data[0] >> (4 + i) & 1 == 1)
        .fold(0, |f, (_, b)| f | b);
    // Several chains per input, so MAP/UNMAP sequences (double UNMAP, overlap) get exercised.
    let chains = 1 + (data[0] % 4) as usize;
    let mut rest = &data[1..];
    for _ in 0..chains {
        let Some((&n, tail)) = rest.split_first() else {
            return;
        };
        let n = 1 + (n % 6) as usize;
        if tail.len() < n * 7 {
            return;
        }
        let (descs, tail) = tail.split_at(n * 7);
        let mut raw = Vec::new();
        let mut writable = Vec::new();
        for d in descs.chunks_exact(7) {
            // Addresses land in [0x1000, 0x4_0000 + 32K) so some fall outside guest memory.
            let addr = 0x1000 + u64::from(u32::from_le_bytes([d[0], d[1], d[2], 0]) % 0x4_7000);
            let len = u32::from(u16::from_le_bytes([d[3], d[4]]));
            let flags = u16::from(d[5] & 0x2); // WRITE only; NEXT is set by the chain builder
            if flags != 0 {
                writable.push((addr, len));
            }
            raw.push(RawDescriptor::from(Descriptor::new(addr, len, flags, 0)));
        }
        // Guest memory contents (request headers among them) from the fuzzer too.
        let take = tail.len().min(256);
        let (content, tail) = tail.split_at(take);
        let mem = guest.memory();
        let _ = mem.write_slice(content, GuestAddress(0x1000));
        rest = tail;

        let snapshot = {
            let mut v = vec![0u8; MEM];
            mem.read_slice(&mut v, GuestAddress(0)).unwrap();
            v
        };
        let vq = MockSplitQueue::new(&*mem, 16);
        if vq.build_desc_chain(&raw).is_err() {
            continue;
        }
        let mut q: Queue = vq.create_queue().unwrap();
        drop(vq);
        drop(mem);
        let Some((_, written)) = serve_chain(&handler, &guest, &mut q, features) else {
            continue;
        };
        let written = written as usize;
        let mem = guest.memory();
        assert!(
            written == 0 || written == RESP_SIZE || written == RESP_SIZE + STAT_SIZE,
            "odd response size {written}"
        );

        // Only the writable descriptors may have changed, besides the mock queue's own rings,
        // which sit below 0x1000.
        let mut after = vec![0u8; MEM];
        mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        for (i, (a, b)) in snapshot.iter().zip(&after).enumerate() {
            if a != b {
                let i = i as u64;
                let inside = writable
                    .iter()
                    .any(|&(addr, len)| i >= addr && i < addr + u64::from(len));
                let ring = i < 0x1000;
                assert!(
                    inside || ring,
                    "handler wrote guest byte {i:#x} outside its response buffers"
                );
            }
        }
        if written >= RESP_SIZE && writable[0].1 as usize >= RESP_SIZE {
            let (addr, _) = writable[0];
            let mut b = [0u8; RESP_SIZE];
            if mem.read_slice(&mut b, GuestAddress(addr)).is_ok() {
                assert!(Response::decode(&b).status <= 10, "unknown status");
            }
        }
    }
});

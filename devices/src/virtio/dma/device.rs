//! The virtio-dma device on its transport: configuration space, and one worker per queue, so an
//! UNMAP on `ctrlq` never waits behind a MAP that is retrying on `mapq`.
//!
//! Guest memory is reached only through [`GuestMemoryHandle`], whose access guard keeps page
//! moves out; a request is decoded under one guard, carried out with none held (a MAP may move
//! guest pages), and answered under another.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT, Reader};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::handler::RequestHandler;
use super::protocol::{
    Request, RequestHeader, Response, Status, CTRLQ, F_DEADLINE, F_DISCARD, F_HOST_PHYS,
    F_SUB_GRANULE, MAPQ, REQ_SIZE, RESP_SIZE,
};
use crate::dma_memory::DmaMapper;
use crate::guest_memory::GuestMemoryHandle;
use crate::virtio::device::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::worker::Worker;

const QUEUE_SIZES: &[u16] = &[256, 256];

/// What a descriptor chain asks, read under one access guard: the request (or why it is
/// invalid) and where the device may write its answer.
struct Decoded {
    head: u16,
    request: Result<Request, Status>,
    /// The device-writable buffers, in order.
    writable: Vec<(GuestAddress, u32)>,
}

/// Reads the next chain of `queue`; `None` when the queue is empty.
///
/// The chain must be device-readable descriptors (at least `REQ_SIZE` bytes, the header) then
/// device-writable ones (room for the response). Anything else is answered `INVAL` if the
/// response fits, and returned with nothing written otherwise.
fn decode_next(queue: &mut Queue, guest: &GuestMemoryHandle) -> Option<Decoded> {
    let mem = guest.memory();
    let chain = queue.pop_descriptor_chain(&*mem)?;
    let head = chain.head_index();
    let mut seen_writable = false;
    let mut well_ordered = true;
    let mut writable = Vec::new();
    for desc in chain.clone() {
        if desc.is_write_only() {
            seen_writable = true;
            writable.push((desc.addr(), desc.len()));
        } else if seen_writable {
            well_ordered = false;
        }
    }
    let request = match Reader::<()>::new(&*mem, chain) {
        Ok(mut reader) if well_ordered && reader.available_bytes() >= REQ_SIZE => reader
            .read_obj::<RequestHeader>()
            .map_err(|_| Status::Inval)
            .and_then(Request::from_header),
        _ => Err(Status::Inval),
    };
    Some(Decoded {
        head,
        request,
        writable,
    })
}

/// Writes `out` across the writable buffers; returns the bytes written, 0 if it did not fit or
/// a buffer lies outside guest memory.
fn write_reply(guest: &GuestMemoryHandle, writable: &[(GuestAddress, u32)], out: &[u8]) -> u32 {
    let room: u64 = writable.iter().map(|&(_, len)| u64::from(len)).sum();
    if room < out.len() as u64 {
        return 0;
    }
    let mem = guest.memory();
    let mut done = 0;
    for &(addr, len) in writable {
        if done == out.len() {
            break;
        }
        let n = (len as usize).min(out.len() - done);
        if mem.write_slice(&out[done..done + n], addr).is_err() {
            return 0;
        }
        done += n;
    }
    done as u32
}

/// Serves one descriptor chain of `queue` for a driver that negotiated `features`: decodes
/// it, carries it out and writes the answer. Returns the head index and the bytes written, or
/// `None` when the queue is empty.
pub fn serve_chain<M: DmaMapper>(
    handler: &RequestHandler<M>,
    guest: &GuestMemoryHandle,
    queue: &mut Queue,
    features: u64,
) -> Option<(u16, u32)> {
    let decoded = decode_next(queue, guest)?;
    let room: u64 = decoded.writable.iter().map(|&(_, l)| u64::from(l)).sum();
    if room < RESP_SIZE as u64 {
        return Some((decoded.head, 0));
    }
    // No guard is held here: a MAP may move guest pages.
    let (response, stat) = match decoded.request {
        Ok(req) if room < req.response_len() as u64 => (Response::status(Status::Inval), None),
        Ok(req) => handler.handle(req, features),
        Err(status) => (Response::status(status), None),
    };
    let mut out = response.encode().to_vec();
    if let Some(stat) = stat {
        out.extend_from_slice(&stat.encode());
    }
    Some((decoded.head, write_reply(guest, &decoded.writable, &out)))
}

/// One queue's worker: serves the queue each time the driver notifies it.
struct QueueWorker<M: DmaMapper> {
    handler: Arc<RequestHandler<M>>,
    /// The features the driver negotiated.
    features: u64,
    guest: GuestMemoryHandle,
    queue: Queue,
    kick: EventFd,
    interrupt: Arc<Interrupt>,
}

impl<M: DmaMapper> QueueWorker<M> {
    fn serve(&mut self) {
        let mut served = 0;
        // While the host stalls the device, requests wait on the queue (a test of the driver's
        // timeouts); the worker is woken when the stall ends.
        while !self.handler.stalled() {
            let Some((head, written)) =
                serve_chain(&self.handler, &self.guest, &mut self.queue, self.features)
            else {
                break;
            };
            let mem = self.guest.memory();
            if let Err(e) = self.queue.add_used(&*mem, head, written) {
                tracing::warn!("virtio-dma: returning request {head}: {e:?}");
                break;
            }
            served += 1;
        }
        let notify = served > 0
            && self
                .queue
                .needs_notification(&*self.guest.memory())
                .unwrap_or(true);
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::warn!("virtio-dma: interrupt: {e}");
            }
        }
    }
}

impl<M: DmaMapper + 'static> MutEventSubscriber for QueueWorker<M> {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        self.serve();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            tracing::error!(
                "virtio-dma: watching queue fd {}: {e:?}",
                self.kick.as_raw_fd()
            );
        }
    }
}

/// Where the device's request handler comes from: ready, or still being built on another
/// thread (the host region is reserved while the guest boots; the guest first needs the device
/// when its driver probes it).
type HandlerResult<M> = Result<Arc<RequestHandler<M>>, String>;

/// The device half that the transport drives.
pub struct Dma<M: DmaMapper + 'static> {
    pending: std::sync::Mutex<Option<JoinHandle<HandlerResult<M>>>>,
    handler: std::sync::OnceLock<HandlerResult<M>>,
    /// Whether the host allows `VIRTIO_DMA_F_HOST_PHYS` (off unless asked for: it tells the
    /// guest where its memory is on the host).
    offer_host_phys: bool,
    acked: u64,
    workers: Vec<Worker>,
}

impl<M: DmaMapper + 'static> Dma<M> {
    /// A device whose request handler `build` is still making. It offers
    /// `VIRTIO_DMA_F_HOST_PHYS` only if `offer_host_phys` and the region knows its physical
    /// addresses.
    pub fn deferred(build: JoinHandle<HandlerResult<M>>, offer_host_phys: bool) -> Self {
        Self {
            pending: std::sync::Mutex::new(Some(build)),
            handler: std::sync::OnceLock::new(),
            offer_host_phys,
            acked: 0,
            workers: Vec::new(),
        }
    }

    /// The features the driver acked and the device offered: what the device honours.
    fn negotiated(&self) -> u64 {
        self.acked & self.device_features()
    }

    /// The request handler, waiting for it if it is still being built.
    pub fn handler(&self) -> Result<&Arc<RequestHandler<M>>, &str> {
        self.handler
            .get_or_init(|| {
                let handle = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                match handle.map(JoinHandle::join) {
                    Some(Ok(result)) => result,
                    Some(Err(_)) => Err("building the device panicked".into()),
                    None => Err("the device was never built".into()),
                }
            })
            .as_ref()
            .map_err(|e| {
                tracing::error!("virtio-dma: {e}");
                e.as_str()
            })
    }
}

impl<M: DmaMapper + 'static> VirtioDevice for Dma<M> {
    fn device_type(&self) -> u32 {
        super::protocol::VIRTIO_ID_DMA
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        let phys = match self.handler() {
            Ok(h) if self.offer_host_phys && h.memory().host_phys() => F_HOST_PHYS,
            _ => 0,
        };
        VIRTIO_F_VERSION_1 | F_DEADLINE | F_DISCARD | F_SUB_GRANULE | phys
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Ok(handler) = self.handler() else {
            data.fill(0);
            return;
        };
        let config = handler.config().encode();
        let start = offset as usize;
        match start
            .checked_add(data.len())
            .filter(|&end| end <= config.len())
        {
            Some(end) => data.copy_from_slice(&config[start..end]),
            None => data.fill(0),
        }
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::warn!("virtio-dma: the configuration space is read-only (write at {offset:#x})");
    }

    fn activate(
        &mut self,
        guest: GuestMemoryHandle,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 || queue_evts.len() != 2 {
            return Err(ActivateError::Device(
                "virtio-dma needs mapq and ctrlq".into(),
            ));
        }
        let handler = self
            .handler()
            .map_err(|e| ActivateError::Device(e.to_string()))?
            .clone();
        self.workers.clear();
        let kicks = queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ActivateError::Device(format!("cloning the queue eventfds: {e}")))?;
        handler.set_kicks(kicks);
        let features = self.negotiated();
        for (index, (queue, kick)) in queues.into_iter().zip(queue_evts).enumerate() {
            let name = if index == MAPQ {
                "virtio-dma-map"
            } else {
                "virtio-dma-ctrl"
            };
            debug_assert!(index == MAPQ || index == CTRLQ);
            let worker = QueueWorker {
                handler: handler.clone(),
                features,
                guest: guest.clone(),
                queue,
                kick,
                interrupt: interrupt.clone(),
            };
            let worker = Worker::spawn(name, worker)
                .map_err(|e| ActivateError::Device(format!("starting {name}: {e}")))?;
            self.workers.push(worker);
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Requests still on the queues (a stalled device's too) are dropped with them.
        self.workers.clear();
        // A reset driver has forgotten its mappings; so does the device.
        if let Ok(handler) = self.handler() {
            handler.set_kicks(Vec::new());
            handler.unmap_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dma_memory::{MapError, MapOptions, Placement};
    use crate::virtio::dma::protocol::{Config, REQ_MAP, REQ_STAT, STAT_SIZE};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const ALL_FEATURES: u64 =
        VIRTIO_F_VERSION_1 | F_HOST_PHYS | F_DEADLINE | F_DISCARD | F_SUB_GRANULE;

    /// Places every MAP at host-physical 0x1000 in extent 3.
    struct FixedPlacement;
    impl DmaMapper for FixedPlacement {
        fn map(&self, _g: u64, _l: u64, _o: MapOptions) -> Result<Placement, MapError> {
            Ok(Placement {
                host_addr: 0x1000,
                host_phys: true,
                region_offset: 0x3000,
                extent: 3,
                bytes_migrated: 0,
            })
        }
        fn unmap(&self, _g: u64, _l: u64) -> Result<(), MapError> {
            Ok(())
        }
        fn host_phys(&self) -> bool {
            true
        }
    }

    fn handler() -> RequestHandler<FixedPlacement> {
        RequestHandler::new(
            Config {
                window_base: 0x10_0000,
                window_size: 0x10_0000,
                granule: 4096,
                max_mappings: 8,
                max_map_len: 0x10_0000,
                region_size: 0x10_0000,
            },
            FixedPlacement,
        )
    }

    /// Builds a chain from (addr, len, flags) and serves it; returns (bytes written, response).
    fn serve(guest: &GuestMemoryHandle, descs: &[(u64, u32, u16)]) -> (u32, Response) {
        let mem = guest.memory();
        let vq = MockSplitQueue::new(&*mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        drop(mem);
        let (_, written) = serve_chain(&handler(), guest, &mut q, ALL_FEATURES).unwrap();
        let mem = guest.memory();
        let resp_at = descs.iter().find(|d| d.2 & F_WRITE != 0).map_or(0, |d| d.0);
        let mut b = [0xffu8; RESP_SIZE];
        let _ = mem.read_slice(&mut b, GuestAddress(resp_at));
        (written, Response::decode(&b))
    }

    fn mem_with(header_at: u64, header: &[u8]) -> GuestMemoryHandle {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        mem.write_slice(header, GuestAddress(header_at)).unwrap();
        GuestMemoryHandle::new(mem)
    }

    #[test]
    fn well_formed_map_gets_placement() {
        let mem = mem_with(0x8000, &Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0));
        let (n, r) = serve(&mem, &[(0x8000, 32, F_NEXT), (0x9000, 24, F_WRITE)]);
        assert_eq!(n, 24);
        assert_eq!(
            (r.status, r.flags, r.host_addr, r.extent),
            (0, 1, 0x1000, 3)
        );
    }

    #[test]
    fn header_split_across_descriptors_is_fine() {
        let mem = mem_with(0x8000, &Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0));
        let h = Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0);
        mem.memory()
            .write_slice(&h[..10], GuestAddress(0x8000))
            .unwrap();
        mem.memory()
            .write_slice(&h[10..], GuestAddress(0xa000))
            .unwrap();
        let (n, r) = serve(
            &mem,
            &[
                (0x8000, 10, F_NEXT),
                (0xa000, 22, F_NEXT),
                (0x9000, 24, F_WRITE),
            ],
        );
        assert_eq!((n, r.status), (24, 0));
    }

    #[test]
    fn short_header_wrong_order_and_short_stat_space_are_inval() {
        let mem = mem_with(0x8000, &Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0));
        let (_, r) = serve(&mem, &[(0x8000, 16, F_NEXT), (0x9000, 24, F_WRITE)]);
        assert_eq!(r.status, Status::Inval as u32, "header too short");
        let (_, r) = serve(&mem, &[(0x9000, 24, F_WRITE | F_NEXT), (0x8000, 32, 0)]);
        assert_eq!(r.status, Status::Inval as u32, "readable after writable");
        mem.memory()
            .write_slice(&Request::encode(REQ_STAT, 0, 0, 0, 0), GuestAddress(0x8000))
            .unwrap();
        let (_, r) = serve(&mem, &[(0x8000, 32, F_NEXT), (0x9000, 24, F_WRITE)]);
        assert_eq!(r.status, Status::Inval as u32, "no room for the statistics");
        let (n, r) = serve(
            &mem,
            &[
                (0x8000, 32, F_NEXT),
                (0x9000, (RESP_SIZE + STAT_SIZE) as u32, F_WRITE),
            ],
        );
        assert_eq!((n as usize, r.status), (RESP_SIZE + STAT_SIZE, 0));
    }

    #[test]
    fn a_looping_chain_terminates_without_effect() {
        let mem = mem_with(0x8000, &Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0));
        let access = mem.memory();
        let vq = MockSplitQueue::new(&*access, 16);
        // desc 0 -> desc 1 -> desc 0 -> ...
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8000, 32, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 24, F_WRITE | F_NEXT, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        drop(access);
        let handler = handler();
        serve_chain(&handler, &mem, &mut q, ALL_FEATURES).unwrap();
        assert_eq!(handler.stat().mappings, 0, "a looping chain maps nothing");
    }

    #[test]
    fn no_room_for_a_response_writes_nothing() {
        let mem = mem_with(0x8000, &Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0));
        assert_eq!(
            serve(&mem, &[(0x8000, 32, F_NEXT), (0x9000, 8, F_WRITE)]).0,
            0
        );
        assert_eq!(serve(&mem, &[(0x8000, 32, 0)]).0, 0);
        // A descriptor outside guest memory is no crash, just nothing written.
        assert_eq!(
            serve(&mem, &[(0x8000, 32, F_NEXT), (0x1_0000_0000, 24, F_WRITE)]).0,
            0
        );
    }

    #[test]
    fn a_stalled_device_keeps_requests_and_answers_them_when_the_stall_ends() {
        let mem = mem_with(0x8000, &Request::encode(REQ_MAP, 0, 0x10_0000, 0x1000, 0));
        let access = mem.memory();
        let vq = MockSplitQueue::new(&*access, 16);
        let raw = [(0x8000, 32, F_NEXT), (0x9000, 24, F_WRITE)]
            .map(|(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)));
        vq.build_desc_chain(&raw).unwrap();
        let queue: Queue = vq.create_queue().unwrap();
        drop(access);
        let handler = Arc::new(handler());
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        handler.set_kicks(vec![kick.try_clone().unwrap()]);
        let mut worker = QueueWorker {
            handler: handler.clone(),
            features: ALL_FEATURES,
            guest: mem.clone(),
            queue,
            kick: kick.try_clone().unwrap(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap())),
        };
        assert!(!handler.set_stalled(true));
        worker.serve();
        let used = |q: &Queue| q.used_idx(&*mem.memory(), std::sync::atomic::Ordering::Acquire);
        assert_eq!(used(&worker.queue).unwrap().0, 0, "nothing answered");
        assert_eq!(handler.stat().maps_ok, 0, "nothing carried out");
        // Ending the stall wakes the worker through the queue's eventfd.
        assert!(handler.set_stalled(false));
        assert_eq!(kick.read().unwrap(), 1, "the worker was woken");
        worker.serve();
        assert_eq!(
            used(&worker.queue).unwrap().0,
            1,
            "answered after the stall"
        );
        assert_eq!(handler.stat().maps_ok, 1);
    }
}

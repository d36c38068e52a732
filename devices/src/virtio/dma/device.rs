//! The virtio-dma device on its transport: configuration space, and one worker thread per
//! queue, so an UNMAP on `ctrlq` never waits behind a MAP that is retrying on `mapq`.

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::core::{DmaBackend, DmaCore};
use super::protocol::{
    Request, Response, Status, CTRLQ, F_DEADLINE, F_DISCARD, F_HOST_PHYS, MAPQ, REQ_SIZE, RESP_SIZE,
};
use crate::virtio::device::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::virtio::GuestMemory;

const QUEUE_SIZES: &[u16] = &[256, 256];

/// Serves one descriptor chain; returns the bytes written into it.
///
/// The chain must be device-readable descriptors (at least `REQ_SIZE` bytes, the header) then
/// device-writable ones (room for the response). Anything else is answered `INVAL` if the
/// response fits, and returned with nothing written otherwise.
pub fn serve_chain<B: DmaBackend>(
    core: &DmaCore<B>,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> u32 {
    let mut seen_writable = false;
    let mut well_ordered = true;
    for desc in chain.clone() {
        if desc.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            well_ordered = false;
        }
    }
    // Guest memory is accessed only under the backend's access guard, and never while the
    // backend works on the request (it may move guest pages).
    let access = core.backend().guest_access();
    let Ok(mut writer) = Writer::<()>::new(mem, chain.clone()) else {
        return 0;
    };
    if writer.available_bytes() < RESP_SIZE {
        return 0;
    }
    let request = match Reader::<()>::new(mem, chain) {
        Ok(mut reader) if well_ordered && reader.available_bytes() >= REQ_SIZE => {
            let mut header = [0u8; REQ_SIZE];
            match std::io::Read::read_exact(&mut reader, &mut header) {
                Ok(()) => Request::parse(&header),
                Err(_) => Err(Status::Inval),
            }
        }
        _ => Err(Status::Inval),
    };
    drop(access);
    let (response, stat) = match request {
        Ok(req) if writer.available_bytes() < req.response_len() => {
            (Response::status(Status::Inval), None)
        }
        Ok(req) => core.handle(req),
        Err(status) => (Response::status(status), None),
    };
    let _access = core.backend().guest_access();
    let mut out = response.encode().to_vec();
    if let Some(stat) = stat {
        out.extend_from_slice(&stat.encode());
    }
    match std::io::Write::write_all(&mut writer, &out) {
        Ok(()) => writer.bytes_written() as u32,
        Err(_) => 0,
    }
}

/// Where the device's core comes from: ready, or still being built on another thread (the
/// host region is reserved while the guest boots; the guest first needs the device when its
/// driver probes it).
type CoreResult<B> = Result<Arc<DmaCore<B>>, String>;

/// The device half that the transport drives.
pub struct Dma<B: DmaBackend + 'static> {
    pending: std::sync::Mutex<Option<JoinHandle<CoreResult<B>>>>,
    core: std::sync::OnceLock<CoreResult<B>>,
    acked: u64,
    workers: Vec<(EventFd, JoinHandle<()>)>,
}

impl<B: DmaBackend + 'static> Dma<B> {
    /// A device whose core `build` is still making.
    pub fn deferred(build: JoinHandle<CoreResult<B>>) -> Self {
        Self {
            pending: std::sync::Mutex::new(Some(build)),
            core: std::sync::OnceLock::new(),
            acked: 0,
            workers: Vec::new(),
        }
    }

    /// The core, waiting for it if it is still being built.
    pub fn core(&self) -> Result<&Arc<DmaCore<B>>, &str> {
        self.core
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

    fn stop_workers(&mut self) {
        for (stop, handle) in self.workers.drain(..) {
            let _ = stop.write(1);
            let _ = handle.join();
        }
    }
}

impl<B: DmaBackend + 'static> Drop for Dma<B> {
    fn drop(&mut self) {
        self.stop_workers();
    }
}

/// Waits for a queue notification or the stop signal; true when a notification came.
fn wait_for_kick(kick: &EventFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if rc < 0 || fds[1].revents != 0 {
            return false;
        }
        let _ = kick.read();
        return true;
    }
}

fn run_queue<B: DmaBackend>(
    core: &DmaCore<B>,
    mem: &GuestMemory,
    queue: &mut Queue,
    kick: &EventFd,
    stop: &EventFd,
    interrupt: &Interrupt,
) {
    while wait_for_kick(kick, stop) {
        let mut served = 0;
        loop {
            let access = core.backend().guest_access();
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            drop(access);
            let head = chain.head_index();
            let written = serve_chain(core, mem, chain);
            let _access = core.backend().guest_access();
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("virtio-dma: returning request {head}: {e:?}");
                break;
            }
            served += 1;
        }
        if served > 0 && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = interrupt.signal_used_queue() {
                tracing::warn!("virtio-dma: interrupt: {e}");
            }
        }
    }
}

impl<B: DmaBackend + 'static> VirtioDevice for Dma<B> {
    fn device_type(&self) -> u32 {
        super::protocol::VIRTIO_ID_DMA
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        let phys = match self.core() {
            Ok(core) if core.backend().host_phys() => F_HOST_PHYS,
            _ => 0,
        };
        VIRTIO_F_VERSION_1 | F_DEADLINE | F_DISCARD | phys
    }
    fn set_acked_features(&mut self, acked: u64) {
        self.acked = acked;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let Ok(core) = self.core() else {
            data.fill(0);
            return;
        };
        let config = core.config().encode();
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
        mem: GuestMemory,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 || queue_evts.len() != 2 {
            return Err(ActivateError::Device(
                "virtio-dma needs mapq and ctrlq".into(),
            ));
        }
        let core = self
            .core()
            .map_err(|e| ActivateError::Device(e.to_string()))?
            .clone();
        self.stop_workers();
        for (index, (mut queue, kick)) in queues.into_iter().zip(queue_evts).enumerate() {
            let name = if index == MAPQ {
                "virtio-dma-map"
            } else {
                "virtio-dma-ctrl"
            };
            debug_assert!(index == MAPQ || index == CTRLQ);
            let stop = EventFd::new(libc::EFD_NONBLOCK)
                .map_err(|e| ActivateError::Device(format!("eventfd: {e}")))?;
            let stop_worker = stop
                .try_clone()
                .map_err(|e| ActivateError::Device(format!("eventfd: {e}")))?;
            let (core, mem, interrupt) = (core.clone(), mem.clone(), interrupt.clone());
            let handle = std::thread::Builder::new()
                .name(name.into())
                .spawn(move || run_queue(&core, &mem, &mut queue, &kick, &stop_worker, &interrupt))
                .map_err(|e| ActivateError::Device(format!("starting {name}: {e}")))?;
            self.workers.push((stop, handle));
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_workers();
        // A reset driver has forgotten its mappings; so does the device.
        if let Ok(core) = self.core() {
            core.unmap_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::dma::core::{MapError, MapOptions, Placement};
    use crate::virtio::dma::protocol::{Config, REQ_MAP, REQ_STAT, STAT_SIZE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_WRITE: u16 = 2;
    const F_NEXT: u16 = 1;

    struct Always;
    impl DmaBackend for Always {
        type Mapping = ();
        fn map(&self, _g: u64, _l: u64, _o: MapOptions) -> Result<((), Placement), MapError> {
            Ok((
                (),
                Placement {
                    host_addr: 0x1000,
                    host_phys: true,
                    extent: 3,
                    bytes_migrated: 0,
                },
            ))
        }
        fn unmap(&self, _g: u64, _l: u64, _m: (), _d: bool) {}
    }

    fn core() -> DmaCore<Always> {
        DmaCore::new(
            Config {
                window_base: 0x10_0000,
                window_size: 0x10_0000,
                granule: 4096,
                max_mappings: 8,
                max_map_len: 0x10_0000,
                region_size: 0x10_0000,
            },
            Always,
        )
    }

    /// Builds a chain from (addr, len, flags) and serves it; returns (bytes written, response).
    fn serve(mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> (u32, Response) {
        let vq = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        vq.build_desc_chain(&raw).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(mem).unwrap();
        let written = serve_chain(&core(), mem, chain);
        let resp_at = descs.iter().find(|d| d.2 & F_WRITE != 0).map_or(0, |d| d.0);
        let mut b = [0xffu8; RESP_SIZE];
        let _ = mem.read_slice(&mut b, GuestAddress(resp_at));
        (written, Response::decode(&b))
    }

    fn mem_with(header_at: u64, header: &[u8]) -> GuestMemory {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap();
        mem.write_slice(header, GuestAddress(header_at)).unwrap();
        mem
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
        mem.write_slice(&h[..10], GuestAddress(0x8000)).unwrap();
        mem.write_slice(&h[10..], GuestAddress(0xa000)).unwrap();
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
        mem.write_slice(&Request::encode(REQ_STAT, 0, 0, 0, 0), GuestAddress(0x8000))
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
        let vq = MockSplitQueue::new(&mem, 16);
        // desc 0 -> desc 1 -> desc 0 -> ...
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x8000, 32, F_NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 24, F_WRITE | F_NEXT, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        let core = core();
        serve_chain(&core, &mem, chain);
        assert_eq!(core.stat().mappings, 0, "a looping chain maps nothing");
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
}

//! virtio-rng (virtio 1.2 §5.4, device ID 4): the guest's entropy source, served from the
//! host's `/dev/urandom`. Also the smallest real device on the virtio-mmio transport: it proves
//! the notify → event loop → used ring → interrupt path end to end.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use super::dma::MoveGate;
use super::GuestMemory;
use crate::bus::lock;

pub use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
const QUEUE_SIZES: &[u16] = &[256];
/// The most bytes one request is given: bounds the work a single guest request can cause.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

struct Active {
    mem: GuestMemory,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<Interrupt>,
}

/// State shared between the device (driven by the transport on vCPU threads) and its event
/// handler (driven by the VMM's event loop). The lock is held for one activation, reset or
/// batch of requests.
struct Shared {
    active: Option<Active>,
    entropy: File,
    gate: Arc<MoveGate>,
}

/// The device half: what the transport talks to.
pub struct Rng {
    shared: Arc<Mutex<Shared>>,
    activate_evt: EventFd,
}

/// The event-loop half: serves the queue when the driver notifies it.
pub struct RngHandler {
    shared: Arc<Mutex<Shared>>,
    activate_evt: EventFd,
    queue_fd: Option<RawFd>,
}

impl Rng {
    /// A device and its event handler; register the handler with the VMM's event manager.
    /// `gate`: the VMM's move gate; the device writes guest memory only while no guest page
    /// is being moved.
    pub fn new(gate: Arc<MoveGate>) -> std::io::Result<(Rng, RngHandler)> {
        let shared = Arc::new(Mutex::new(Shared {
            active: None,
            entropy: File::open("/dev/urandom")?,
            gate,
        }));
        let activate_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let handler = RngHandler {
            shared: shared.clone(),
            activate_evt: activate_evt.try_clone()?,
            queue_fd: None,
        };
        Ok((
            Rng {
                shared,
                activate_evt,
            },
            handler,
        ))
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }
    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn set_acked_features(&mut self, _acked: u64) {}
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemory,
        mut queues: Vec<Queue>,
        mut queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let (Some(queue), Some(queue_evt)) = (queues.pop(), queue_evts.pop()) else {
            return Err(ActivateError::Device(
                "virtio-rng needs its request queue".into(),
            ));
        };
        lock(&self.shared).active = Some(Active {
            mem,
            queue,
            queue_evt,
            interrupt,
        });
        self.activate_evt
            .write(1)
            .map_err(|e| ActivateError::Device(format!("waking the event loop: {e}")))
    }

    fn reset(&mut self) {
        lock(&self.shared).active = None;
    }
}

impl Shared {
    /// Fills every available request with random bytes; returns how many were served.
    fn serve_requests(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let _access = self.gate.access();
        let mut served = 0;
        let mut buf = vec![0u8; 4096];
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let mut written = 0usize;
            for desc in chain {
                if !desc.is_write_only() {
                    // A device-readable buffer has no place in an entropy request: skip it.
                    continue;
                }
                let mut left = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
                let mut addr = desc.addr();
                while left > 0 {
                    let n = left.min(buf.len());
                    if self.entropy.read_exact(&mut buf[..n]).is_err()
                        || active.mem.write_slice(&buf[..n], addr).is_err()
                    {
                        // Unreadable entropy or a buffer outside guest memory: stop this request.
                        left = 0;
                        continue;
                    }
                    written += n;
                    left -= n;
                    match addr.checked_add(n as u64) {
                        Some(next) => addr = next,
                        None => left = 0,
                    }
                }
                if written >= MAX_BYTES_PER_REQUEST {
                    break;
                }
            }
            if let Err(e) = active.queue.add_used(&active.mem, head, written as u32) {
                tracing::warn!("virtio-rng: returning request {head}: {e:?}");
                break;
            }
            served += 1;
        }
        if served > 0 {
            let notify = active.queue.needs_notification(&active.mem).unwrap_or(true);
            if notify {
                if let Err(e) = active.interrupt.signal_used_queue() {
                    tracing::warn!("virtio-rng: interrupt: {e}");
                }
            }
        }
        served
    }
}

impl MutEventSubscriber for RngHandler {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            let shared = lock(&self.shared);
            if let Some(active) = &shared.active {
                if let Some(old) = self.queue_fd.take() {
                    let _ = ops.remove(Events::empty_raw(old));
                }
                let fd = active.queue_evt.as_raw_fd();
                match ops.add(Events::new_raw(fd, EventSet::IN)) {
                    Ok(()) => self.queue_fd = Some(fd),
                    Err(e) => tracing::error!("virtio-rng: watching the queue: {e:?}"),
                }
            }
            return;
        }
        let mut shared = lock(&self.shared);
        match &shared.active {
            Some(active) if active.queue_evt.as_raw_fd() == events.fd() => {
                let _ = active.queue_evt.read();
                shared.serve_requests();
            }
            _ => {
                // The device was reset: its old queue is gone.
                let _ = ops.remove(events);
                self.queue_fd = None;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            tracing::error!("virtio-rng: watching activation: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    const VRING_DESC_F_WRITE: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    fn activated(mem: &GuestMemory, q: Queue) -> (Rng, Arc<Interrupt>) {
        let (mut rng, _handler) = Rng::new(Arc::default()).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        rng.activate(
            mem.clone(),
            vec![q],
            vec![EventFd::new(0).unwrap()],
            irq.clone(),
        )
        .unwrap();
        (rng, irq)
    }

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            512,
            VRING_DESC_F_WRITE,
            0,
        ))];
        vq.build_desc_chain(&descs).unwrap();
        let (rng, irq) = activated(&mem, vq.create_queue().unwrap());
        assert_eq!(lock(&rng.shared).serve_requests(), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 512);
        let mut got = [0u8; 512];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        let distinct = got.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(
            distinct > 100,
            "512 random bytes with only {distinct} distinct values"
        );
        assert_eq!(irq.status() & 1, 1);
    }

    #[test]
    fn hostile_requests_are_bounded_and_do_not_escape_memory() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let descs = [
            // Device-readable: skipped. Outside guest memory: stops the request.
            RawDescriptor::from(SplitDescriptor::new(0x8000, 64, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(
                0x4000_0000,
                4096,
                VRING_DESC_F_WRITE,
                0,
            )),
        ];
        vq.build_desc_chain(&descs).unwrap();
        let (rng, _) = activated(&mem, vq.create_queue().unwrap());
        assert_eq!(lock(&rng.shared).serve_requests(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}

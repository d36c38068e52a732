//! virtio-rng (virtio 1.2 §5.4, device ID 4): the guest's entropy source, served from the
//! host's `/dev/urandom`. Also the smallest real device on the virtio-mmio transport: it proves
//! the notify → event loop → used ring → interrupt path end to end.

use std::fs::File;
use std::io::Read;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddressSpace};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::device::{ActivateError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::guest_memory::GuestMemoryHandle;
use crate::worker::Worker;

pub use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
const QUEUE_SIZES: &[u16] = &[256];
/// The most bytes one request is given: bounds the work a single guest request can cause.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// The device half: what the transport talks to. Its queue is served by a [`Worker`] from
/// activation to reset.
pub struct Rng {
    entropy: File,
    worker: Option<Worker>,
}

/// The queue, served on the worker each time the driver notifies it.
struct RngQueue {
    guest: GuestMemoryHandle,
    queue: Queue,
    kick: EventFd,
    interrupt: Arc<Interrupt>,
    entropy: File,
}

impl Rng {
    pub fn new() -> std::io::Result<Rng> {
        Ok(Rng {
            entropy: File::open("/dev/urandom")?,
            worker: None,
        })
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
        guest: GuestMemoryHandle,
        mut queues: Vec<Queue>,
        mut queue_evts: Vec<EventFd>,
        interrupt: Arc<Interrupt>,
    ) -> Result<(), ActivateError> {
        let (Some(queue), Some(kick)) = (queues.pop(), queue_evts.pop()) else {
            return Err(ActivateError::Device(
                "virtio-rng needs its request queue".into(),
            ));
        };
        let entropy = self
            .entropy
            .try_clone()
            .map_err(|e| ActivateError::Device(format!("entropy source: {e}")))?;
        let served = RngQueue {
            guest,
            queue,
            kick,
            interrupt,
            entropy,
        };
        self.worker = Some(
            Worker::spawn("virtio-rng", served)
                .map_err(|e| ActivateError::Device(format!("starting virtio-rng: {e}")))?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }
}

impl RngQueue {
    /// Fills every available request with random bytes; returns how many were served.
    fn serve_requests(&mut self) -> usize {
        let mem = self.guest.memory();
        let mut served = 0;
        let mut buf = vec![0u8; 4096];
        while let Some(chain) = self.queue.pop_descriptor_chain(&*mem) {
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
                        || mem.write_slice(&buf[..n], addr).is_err()
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
            if let Err(e) = self.queue.add_used(&*mem, head, written as u32) {
                tracing::warn!("virtio-rng: returning request {head}: {e:?}");
                break;
            }
            served += 1;
        }
        if served > 0 && self.queue.needs_notification(&*mem).unwrap_or(true) {
            if let Err(e) = self.interrupt.signal_used_queue() {
                tracing::warn!("virtio-rng: interrupt: {e}");
            }
        }
        served
    }
}

impl MutEventSubscriber for RngQueue {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.kick.read();
        self.serve_requests();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.kick, EventSet::IN)) {
            tracing::error!("virtio-rng: watching the queue: {e:?}");
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

    fn served(mem: &GuestMemoryHandle, queue: Queue) -> (RngQueue, Arc<Interrupt>) {
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let q = RngQueue {
            guest: mem.clone(),
            queue,
            kick: EventFd::new(0).unwrap(),
            interrupt: irq.clone(),
            entropy: File::open("/dev/urandom").unwrap(),
        };
        (q, irq)
    }

    fn guest() -> GuestMemoryHandle {
        GuestMemoryHandle::new(
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        )
    }

    #[test]
    fn fills_writable_buffers_and_interrupts() {
        let mem = guest();
        let access = mem.memory();
        let vq = MockSplitQueue::new(&*access, 16);
        let descs = [RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            512,
            VRING_DESC_F_WRITE,
            0,
        ))];
        vq.build_desc_chain(&descs).unwrap();
        let (mut rng, irq) = served(&mem, vq.create_queue().unwrap());
        assert_eq!(rng.serve_requests(), 1);
        let used = vq.used().ring().ref_at(0).unwrap().load();
        assert_eq!(used.len(), 512);
        let mut got = [0u8; 512];
        mem.memory()
            .read_slice(&mut got, GuestAddress(0x8000))
            .unwrap();
        let distinct = got.iter().collect::<std::collections::HashSet<_>>().len();
        assert!(
            distinct > 100,
            "512 random bytes with only {distinct} distinct values"
        );
        assert_eq!(irq.status() & 1, 1);
    }

    #[test]
    fn hostile_requests_are_bounded_and_do_not_escape_memory() {
        let mem = guest();
        let access = mem.memory();
        let vq = MockSplitQueue::new(&*access, 16);
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
        let (mut rng, _) = served(&mem, vq.create_queue().unwrap());
        assert_eq!(rng.serve_requests(), 1);
        assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    }
}

//! virtio-dma: the guest asks for host-contiguous, pinned backing of ranges of its DMA window
//! (docs/virtio-dma.md). The device decodes and checks requests (`handler.rs`) and serves
//! them from guest DMA memory's owner ([`crate::dma_memory::DmaMemory`]) through the
//! [`DmaMapper`](crate::dma_memory::DmaMapper) trait.

mod device;
mod handler;
pub mod protocol;
#[cfg(test)]
mod requirements;

pub use device::{serve_chain, Dma};
pub use handler::RequestHandler;
pub use protocol::{Config, Request, Response, Stat, Status, VIRTIO_ID_DMA};

//! virtio-dma: the guest asks for host-contiguous, pinned backing of ranges of its DMA window
//! (docs/virtio-dma.md).

mod backend;
pub mod core;
mod device;
pub mod lending;
pub mod protocol;

pub use self::core::{DmaBackend, DmaCore, MapError, MapOptions, Placement};
pub use backend::{check_window, BackendError, CmaBackend, MapPercentiles, WindowMapping};
pub use device::{serve_chain, Dma};
pub use lending::{Lending, LendingStats, MoveGate, PageBacking};
pub use protocol::{Config, Request, Response, Stat, Status, VIRTIO_ID_DMA};

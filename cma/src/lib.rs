//! Host contiguous-memory allocator for guest DMA.
//!
//! A [`Region`] reserves host memory (hugetlb, dma-heap, or a labelled plain-memfd
//! fallback) and reports its physically contiguous [`Extent`]s. An [`Allocator`]
//! over it hands out contiguous, aligned [`Allocation`]s that never straddle an
//! extent, while the same frames are lent to movable [`Occupant`]s that it migrates
//! away through a caller-supplied [`Mover`] when a request needs their frames.
//! Frames may be pinned ([`PinGuard`]); pinned frames are never migrated or handed
//! out, and each request's [`Policy`] decides whether to skip them, retry, or wait.
//!
//! ```no_run
//! use std::sync::Arc;
//! use cma::{AllocRequest, Allocator, AllocatorConfig, Backing, HugePageSize, MemcpyMover, Policy, Region};
//!
//! let region = Arc::new(Region::reserve(1 << 30, Backing::Hugetlb(HugePageSize::Auto))?);
//! let mover = Arc::new(MemcpyMover::new(region.clone()));
//! let alloc = Allocator::new(region, AllocatorConfig::default(), mover)?;
//! let dma = alloc.alloc(AllocRequest::new(1 << 20).align(1 << 20).policy(Policy::FailFast))?;
//! println!("{:#x} bytes at offset {:#x}, phys {:?}", dma.len(), dma.offset(), dma.phys_addr());
//! drop(dma); // released without blocking
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The design, lock discipline and benchmark results are in `docs/cma.md`.

mod allocator;
mod error;
mod frame;
mod freetree;
mod migrate;
mod pin;
mod region;
mod release;
mod stats;

pub use allocator::{
    AllocRequest, Allocation, Allocator, AllocatorConfig, FrameInfo, FrameState, Policy, Usage,
};
pub use error::{AllocError, ConfigError, MoveError, OccupyError, PinError, RegionError};
pub use frame::PinKind;
pub use migrate::{Destination, FrameMove, MemcpyMover, MigrationPlan, Mover, Occupant};
pub use pin::{LongTermPin, PinGuard, PinnedAs, Revoke, RevokeRequest};
pub use region::{Backing, Contiguity, Extent, HugePageSize, Region};
pub use stats::{HistogramSnapshot, StatsSnapshot};

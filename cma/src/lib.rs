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
//! use cma::{AllocRequest, Allocator, AllocatorConfig, Backing, HugePageSize, Policy, Region};
//! use cma::{MigrationPlan, MoveError, Mover};
//!
//! /// The VMM's mover copies and remaps guest pages; with nothing lent to
//! /// occupants, the allocator never has anything to move.
//! struct NothingLent;
//! impl Mover for NothingLent {
//!     fn move_frames(&self, _: &MigrationPlan) -> Result<(), MoveError> {
//!         unreachable!("no occupants were placed")
//!     }
//! }
//!
//! let region = Arc::new(Region::reserve(1 << 30, Backing::Hugetlb(HugePageSize::Auto))?);
//! let alloc = Allocator::new(region, AllocatorConfig::default(), Arc::new(NothingLent))?;
//! let dma = alloc.alloc(AllocRequest::new(1 << 20).align(1 << 20).policy(Policy::FailFast))?;
//! println!("{:#x} bytes at offset {:#x}, phys {:?}", dma.len(), dma.offset(), dma.phys_addr());
//! drop(dma); // released without blocking
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Feature `test-util` adds what only cma's own tests and benchmarks use:
//! `MemcpyMover` (a [`Mover`] that copies inside the region) and
//! `Allocator::place_occupant_with`.
//!
//! The design, lock discipline and benchmark results are in `docs/cma.md`.

mod allocator;
mod error;
mod frame;
mod freetree;
#[cfg(any(test, feature = "test-util"))]
mod memcpy_mover;
mod migrate;
mod region;
mod release;
mod shard;
mod stats;

pub use allocator::{
    AllocRequest, Allocation, Allocator, AllocatorConfig, FrameInfo, FrameState, LongTermPin,
    PinGuard, PinnedAs, Policy, Usage,
};
pub use error::{AllocError, ConfigError, OccupyError, PinError, RegionError};
pub use frame::PinKind;
#[cfg(any(test, feature = "test-util"))]
pub use memcpy_mover::MemcpyMover;
pub use migrate::{Destination, FrameMove, MigrationPlan, MoveError, Mover, Occupant};
pub use region::{Backing, Contiguity, Extent, HugePageSize, Region};
pub use stats::{HistogramSnapshot, StatsSnapshot};

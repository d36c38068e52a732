//! Typed errors. Every variant carries what was asked and what was found so that a
//! failed DMA request can be reported to the guest (and to a log) without guesswork.

use std::path::PathBuf;
use std::time::Duration;

use thiserror::Error;

use crate::migrate::{MoveError, Occupant};

/// Why a [`crate::Region`] could not be reserved.
#[derive(Debug, Error)]
pub enum RegionError {
    /// The requested length is zero or not a multiple of the backing's page size.
    #[error("region length {len:#x} is invalid for {backing}: {reason}")]
    InvalidLength {
        len: usize,
        backing: &'static str,
        reason: &'static str,
    },
    /// A system call failed.
    #[error("{op} failed for {backing} region of {len:#x} bytes: {source}")]
    Syscall {
        op: &'static str,
        backing: &'static str,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    /// The host has no dma-heap of that name (or no dma-heap support at all).
    #[error("dma-heap backing unavailable: {path} does not exist ({source})")]
    DmaHeapMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not enough free huge pages of the requested size are reserved on the host.
    #[error(
        "hugetlb {page_size:#x}-byte pages: need {needed}, host has {free} free \
         (set /sys/kernel/mm/hugepages/hugepages-{kib}kB/nr_hugepages)"
    )]
    HugePagesUnavailable {
        page_size: usize,
        needed: usize,
        free: usize,
        kib: usize,
    },
}

/// Why an [`crate::Allocator`] could not be built over a region.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("granule {granule:#x} must be a power of two >= 4096 and divide the host page size {page:#x} or be a multiple of it")]
    BadGranule { granule: usize, page: usize },
    #[error(
        "pageblock {pageblock:#x} must be a power of two multiple of the granule {granule:#x}"
    )]
    BadPageblock { pageblock: usize, granule: usize },
    #[error("region length {len:#x} is not a multiple of the granule {granule:#x}")]
    RegionNotGranular { len: usize, granule: usize },
    #[error("region has {frames} frames; at most {max} are supported")]
    TooManyFrames { frames: usize, max: usize },
}

/// Why an allocation request failed. Each variant is one distinct reason, as the
/// virtio-dma device maps them onto distinct status codes.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AllocError {
    /// The request itself is malformed (zero length, alignment not a power of two, ...).
    #[error("invalid request len={len:#x} align={align:#x}: {reason}")]
    InvalidRequest {
        len: usize,
        align: usize,
        reason: &'static str,
    },
    /// Larger than the largest physically contiguous extent: can never succeed.
    #[error("request of {requested:#x} bytes exceeds the largest contiguous extent ({largest_extent:#x} bytes)")]
    LargerThanExtent {
        requested: usize,
        largest_extent: usize,
    },
    /// No candidate range is free of other DMA allocations: only a free can help.
    #[error("no room for {requested:#x} bytes (align {align:#x}): {allocated_bytes:#x} of {region_bytes:#x} bytes are allocated")]
    NoRoom {
        requested: usize,
        align: usize,
        allocated_bytes: usize,
        region_bytes: usize,
    },
    /// Candidate ranges exist but every one had a pinned frame (or its migration failed).
    #[error("all {candidates} candidate ranges for {requested:#x} bytes were busy ({pinned} had pinned frames, {move_failed} failed to migrate)")]
    AllCandidatesPinned {
        requested: usize,
        candidates: usize,
        pinned: usize,
        move_failed: usize,
    },
    /// `Retry` policy: the deadline passed before any sweep succeeded.
    #[error("deadline passed after {sweeps} sweeps and {waited:?} for {requested:#x} bytes")]
    DeadlinePassed {
        requested: usize,
        sweeps: u32,
        waited: Duration,
    },
    /// `WaitForPin` policy: the pin that blocked the best candidate was not released in time.
    #[error("pin on frame {frame} not released within {timeout:?} (request {requested:#x} bytes)")]
    PinWaitTimedOut {
        requested: usize,
        frame: usize,
        timeout: Duration,
    },
}

/// Why a pin could not be taken.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PinError {
    #[error("frame {frame} is outside the region ({frames} frames)")]
    OutOfRange { frame: usize, frames: usize },
    #[error("frame {frame} is free: there is nothing to pin")]
    FrameFree { frame: usize },
    /// `pin_occupant` on a frame that holds no movable occupant (free or allocated).
    #[error("frame {frame} holds no movable occupant")]
    NotOccupied { frame: usize },
    /// The frame's occupant is being migrated; look it up again and retry.
    #[error("frame {frame} is being migrated; its occupant is moving")]
    Migrating { frame: usize },
    #[error("frame {frame} already has the maximum number of pins")]
    TooManyPins { frame: usize },
    /// Long-term pin on an occupied frame: the occupant must move out first, but it
    /// is pinned by someone else, so it cannot move now.
    #[error("long-term pin on frame {frame}: occupant {occupant:?} cannot move out, it holds {pins} other pins")]
    OccupantPinned {
        frame: usize,
        occupant: Occupant,
        pins: u32,
    },
    /// Long-term pin on an occupied frame: the mover failed to move the occupant out.
    #[error("long-term pin on frame {frame}: moving occupant {occupant:?} out of the region failed: {source}")]
    MoveOutFailed {
        frame: usize,
        occupant: Occupant,
        #[source]
        source: MoveError,
    },
}

/// Why an occupant could not be placed or removed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OccupyError {
    #[error("frame {frame} is outside the region ({frames} frames)")]
    OutOfRange { frame: usize, frames: usize },
    #[error("frame {frame} is not free (it is {found})")]
    NotFree { frame: usize, found: &'static str },
    #[error("no free frame left for occupant {occupant:?}")]
    RegionFull { occupant: Occupant },
    #[error("frame {frame} holds {found:?}, not {expected:?}")]
    WrongOccupant {
        frame: usize,
        expected: Occupant,
        found: Option<Occupant>,
    },
    #[error("frame {frame} is being migrated; retry after the move completes")]
    Migrating { frame: usize },
    #[error("frame {frame} is pinned ({pins} pins); unpin before vacating")]
    Pinned { frame: usize, pins: u32 },
    #[error("frames {start}..{end} are not inside one host-contiguous extent")]
    Straddles { start: usize, end: usize },
}

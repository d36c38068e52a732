//! Host contiguous-memory allocator (placeholder until the cma issue lands).

//! Architecture-specific VM setup. Only x86-64 is supported.

pub mod x86_64;

//! The control API: a Unix socket (`--api-sock PATH`) that answers one JSON request per
//! connection (`types.rs`: the serde request and reply types; `server.rs`: served on its own
//! worker; `client.rs`: `dmavisor api` and `dmavisor stat`). docs/api.md documents it.

mod client;
mod server;
mod types;

use std::path::PathBuf;

pub use client::{send, stat, summary};
pub use server::{ApiServer, TestCommands};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-sock {0}: another dmavisor is listening there; pick another path")]
    InUse(PathBuf),
    #[error("--api-sock {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot reach the API at {path}: {source}; is `dmavisor run --api-sock {path}` running?"
    )]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the API at {path}: {message}")]
    Protocol { path: PathBuf, message: String },
}

#[cfg(test)]
mod tests;

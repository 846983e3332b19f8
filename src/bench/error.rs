//! Why a benchmark could not run or finish: one error type for the harness, each variant saying
//! what failed, so that `thunderline bench` prints it as it is.

use std::net::SocketAddr;

use crate::daemon::error::DaemonError;
use crate::pipeline::{ConfigError, ShutdownError};
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Arguments that cannot make a benchmark.
    #[error("{0}")]
    Args(String),
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot build the pipeline: {0}")]
    Config(#[from] ConfigError),
    #[error("the pipeline did not finish: {0}")]
    Shutdown(#[from] ShutdownError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database error in the baseline: {0}")]
    Baseline(#[from] sqlx::Error),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error("cannot start the daemon: {0}")]
    Start(String),
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    #[error("{method} {path} answered {status}: {body}")]
    Status {
        method: hyper::Method,
        path: String,
        status: u16,
        body: String,
    },
    #[error("the admin API answered something that is not JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    #[error("websocket: {0}")]
    Socket(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("RabbitMQ: {0}")]
    Rabbit(String),
    #[error("the pipeline acknowledged {acked} of {events} commands within {secs} s")]
    Stalled { acked: u64, events: u64, secs: u64 },
    /// The workload ran but did not do what it must (a missed event, a timeout).
    #[error("{0}")]
    Failed(String),
}

impl BenchError {
    pub(crate) fn nats(e: impl std::fmt::Display) -> Self {
        Self::Nats(e.to_string())
    }

    pub(crate) fn rabbit(e: impl std::fmt::Display) -> Self {
        Self::Rabbit(e.to_string())
    }

    pub(crate) fn failed(e: impl std::fmt::Display) -> Self {
        Self::Failed(e.to_string())
    }
}

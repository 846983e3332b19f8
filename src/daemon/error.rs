//! Why the daemon could not do what it was asked: one error type for the layer (starting,
//! serving and stopping the server, its pipeline file, its broker sources, `token` and
//! `replay`), each variant saying what failed and with what, so that the entry point prints it
//! as it is. The admin API answers with its own JSON errors ([`ApiError`](super::api::ApiError)).

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::pipeline::{ConfigError, ShutdownError};
use crate::realtime::TokenError;
use crate::sources::jetstream::JetStreamError;
use crate::sources::rabbitmq::RabbitMqError;
use crate::store::StoreError;
use crate::zone::ZoneError;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot read {path}: {source}")]
    ReadPipelineFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    InvalidPipelineFile { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the zone pipeline: {0}")]
    Pipeline(#[from] ConfigError),
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{env} must be at least 32 characters: a short token can be guessed")]
    WeakSecret { env: String },
    #[error(
        "{path} is readable by {who} (mode {mode:o}): it holds a secret; run `chmod 600 {path}` and start again"
    )]
    SharedSecret {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error(
        "the data directory {path} is open to {who} (mode {mode:o}): it holds the server's secrets and database; run `chmod 700 {path}` and start again"
    )]
    SharedDataDir {
        path: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error(
        "no data directory at {path}: `thunderline serve` creates it, with the server's secret and database, on first start; run this where the server runs, or point at its data directory with --data-dir DIR (or THUNDERLINE_DATA_DIR)"
    )]
    NoDataDir { path: PathBuf },
    #[error(
        "no signing secret at {path}: `thunderline serve` creates it on first start; point at the server's data directory with --data-dir DIR, or set THUNDERLINE_SECRET"
    )]
    NoSecret { path: PathBuf },
    #[error("cannot read or write {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the signing secret is unusable: {0}")]
    Token(#[from] TokenError),
    #[error("the HTTP server failed: {0}")]
    Http(std::io::Error),
    #[error("the pipeline did not drain: {0}")]
    Drain(#[from] ShutdownError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("[sources.nats]: {0}")]
    JetStream(#[from] JetStreamError),
    #[error("[sources.rabbitmq]: {0}")]
    RabbitMq(#[from] RabbitMqError),
    #[error(transparent)]
    Zone(#[from] ZoneError),
    #[error("--ttl {ttl} is above the maximum of {max} seconds (--max-token-ttl)")]
    TtlTooLong { ttl: u64, max: u64 },
    #[error("--since {0:?} is not an RFC 3339 time (expected e.g. 2026-11-27T10:00:00Z)")]
    BadSince(String),
    #[error("cannot write the output: {0}")]
    Output(std::io::Error),
}

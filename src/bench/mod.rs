//! The load-test harness behind `thunderline bench`: each benchmark runs its workload and, in
//! the same run, a baseline to compare against, and reports both (as a table, or one JSON object
//! with `--json`).

mod admin_client;
pub mod audit;
pub mod batches;
pub mod broker;
pub mod crowd;
mod error;
pub mod migrate;
pub mod pipeline;
pub mod recovery;
pub mod ws;
mod ws_baseline;
mod ws_report;

use std::sync::atomic::{AtomicU64, Ordering};

pub use error::BenchError;

use crate::pipeline::{Acknowledger, Message};

/// The runtime a benchmark runs on: every core, timers and I/O.
fn runtime() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(BenchError::Runtime)
}

/// Counts what the pipeline acknowledges, in both benchmarks that need to know.
#[derive(Default)]
pub struct AckCounter {
    pub successful: AtomicU64,
    pub failed: AtomicU64,
}

impl<T: 'static> Acknowledger<T> for AckCounter {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) {
        self.successful
            .fetch_add(successful.len() as u64, Ordering::Relaxed);
        self.failed
            .fetch_add(failed.len() as u64, Ordering::Relaxed);
    }
}

/// Reads this process's peak resident set size (VmHWM) in bytes, where the OS tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

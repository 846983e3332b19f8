//! Writing zone snapshots: a small pipeline of its own, fed as zone messages are acknowledged.
//!
//! A snapshot enters it only once every event up to its seq is in the audit log (the zone counts
//! the acknowledged ones, which parallel audit batches may deliver out of order), so a snapshot
//! never holds what the log lacks, and loading (snapshot, then the log after it) always rebuilds
//! the live state. Snapshots are
//! batched and coalesced per zone, written idempotently, and retried until the store takes them;
//! none is on the way of a reply. When the queue is full a snapshot is dropped: a later one
//! supersedes it, and loading replays the log in between.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use prometheus::{IntCounter, Registry};

use super::registry::ZoneRegistry;
use crate::pipeline::{
    Acknowledger, BatcherConfig, ConfigError, Failure, Message, Pipeline, PipelineMetrics,
    Processor, ProcessorConfig, PushError, PushHandle, RetryPolicy, ShutdownError, in_memory,
};
use crate::store::{SnapshotSink, Snapshotted, Store};
use crate::zone::ZoneSnapshot;

/// Snapshots waiting to be written, at most.
const QUEUE: usize = 4_096;

/// A snapshot, and the fencing token of the writer that took it (in a cluster).
#[derive(Clone)]
struct SnapshotWork(Arc<ZoneSnapshot>, Option<u64>);

impl Snapshotted for SnapshotWork {
    fn snapshot(&self) -> &ZoneSnapshot {
        &self.0
    }

    fn fence(&self) -> Option<u64> {
        self.1
    }
}

struct Pass;

impl Processor<SnapshotWork> for Pass {
    async fn handle_message(&self, _m: &mut Message<SnapshotWork>) -> Result<(), Failure> {
        Ok(())
    }
}

/// Tells each live zone which snapshot of it is written.
struct Written(Weak<ZoneRegistry>);

impl Acknowledger<SnapshotWork> for Written {
    fn ack(&self, successful: Vec<Message<SnapshotWork>>, _failed: Vec<Message<SnapshotWork>>) {
        let Some(registry) = self.0.upgrade() else {
            return;
        };
        for m in successful {
            let snapshot = &m.data.0;
            if let Some(live) = registry.live(snapshot.zone.id) {
                live.written(snapshot.seq);
                // A deleted zone's row is gone now: nothing can load it again, and its memory
                // (which answered `zone_not_found` meanwhile) may go too.
                if snapshot.deleted {
                    registry.remove(snapshot.zone.id);
                }
            }
        }
    }
}

/// The snapshot writer.
pub struct Snapshots {
    pipeline: Mutex<Option<Pipeline<SnapshotWork>>>,
    push: PushHandle<SnapshotWork>,
    acker: Arc<Written>,
    dropped: IntCounter,
}

impl Snapshots {
    pub fn start(
        store: Store,
        registry: &Arc<ZoneRegistry>,
        metrics_registry: Registry,
        metrics: Arc<PipelineMetrics>,
    ) -> Result<Self, ConfigError> {
        let dropped = IntCounter::new(
            "thunderline_zone_snapshots_dropped_total",
            "Zone snapshots not queued for writing because the queue was full (a later one \
             supersedes each).",
        )?;
        metrics_registry.register(Box::new(dropped.clone()))?;
        let (producer, push) = in_memory(QUEUE);
        let pipeline = Pipeline::builder("snapshots")
            .producer(producer)
            .processor(
                Pass,
                ProcessorConfig::default().concurrency(1).max_demand(256),
            )
            .batcher(
                BatcherConfig::new("snapshots")
                    .batch_size(256)
                    .batch_timeout(Duration::from_millis(200))
                    .retry(RetryPolicy::exponential(
                        u32::MAX,
                        Duration::from_millis(100),
                        2.0,
                        Duration::from_secs(10),
                    )),
                SnapshotSink::new(store),
            )
            .in_flight_bound(QUEUE)
            .metrics(metrics_registry, metrics)
            .start()?;
        Ok(Self {
            pipeline: Mutex::new(Some(pipeline)),
            push,
            acker: Arc::new(Written(Arc::downgrade(registry))),
            dropped,
        })
    }

    /// Queues a snapshot to write, or drops it when the queue is full.
    pub fn offer(&self, snapshot: Arc<ZoneSnapshot>, fence: Option<u64>) {
        let msg = Message::with_acker(SnapshotWork(snapshot, fence), self.acker.clone());
        if let Err(PushError::Full(_)) = self.push.try_push(msg) {
            self.dropped.inc();
        }
    }

    /// Writes every queued snapshot, then stops taking more.
    pub async fn shutdown(&self) -> Result<(), ShutdownError> {
        let pipeline = self
            .pipeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match pipeline {
            Some(p) => p.shutdown().await.map(|_| ()),
            None => Ok(()),
        }
    }
}

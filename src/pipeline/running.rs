//! A started pipeline: introspection, and the drain that ends it without losing a message.
//!
//! The shutdown contract: `shutdown()` tells every producer to stop asking its source for more
//! and to hand over what it still holds; everything already handed out is processed, batched,
//! flushed (trigger `flush`) and acknowledged; then the stages end, upstream first, as each one
//! sees its inputs close. A message waiting to retry gets one last attempt at once (however
//! many attempts its policy allows), then is dead-lettered or acknowledged as failed. If the
//! drain takes longer than the deadline, every stage is aborted, whatever they still held is
//! acknowledged as failed ("abandoned"), and the error says how many messages that was.
//! Dropping the handle also starts a drain, but nobody waits for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{IntGauge, Registry};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use super::builder::PipelineBuilder;
use super::error::{ConfigError, ShutdownError};
use super::pool::ProcessorPool;
use super::sink::SinkPool;
use super::stage::Shared;
use super::telemetry::{StageKind, StageMetrics, StageTopology, Topology};

/// A running pipeline. See the module documentation for how it shuts down.
#[must_use = "dropping a Pipeline starts a drain that nobody waits for: keep it, and end it with \
              `shutdown().await` or `join().await`"]
pub struct Pipeline<T: Send + 'static> {
    pub(crate) shared: Arc<Shared<T>>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) tasks: Tasks,
    pub(crate) pool: Arc<ProcessorPool<T>>,
    pub(crate) sink_pools: Vec<SinkPool<T>>,
    pub(crate) stages: Vec<StageHandle>,
    pub(crate) registry: Registry,
    pub(crate) shutdown_timeout: Duration,
}

/// Every stage task, those spawned by resizes included, for the drain to wait for or abort.
#[derive(Clone, Default)]
pub(crate) struct Tasks(Arc<Mutex<TaskList>>);

#[derive(Default)]
struct TaskList {
    waiting: VecDeque<(String, JoinHandle<()>)>,
    aborts: Vec<AbortHandle>,
}

impl Tasks {
    pub fn push(&self, stage: impl Into<String>, task: JoinHandle<()>) {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        list.aborts.push(task.abort_handle());
        list.waiting.push_back((stage.into(), task));
    }

    fn next(&self) -> Option<(String, JoinHandle<()>)> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .waiting
            .pop_front()
    }

    fn abort_all(&self) {
        for task in &self.0.lock().unwrap_or_else(|e| e.into_inner()).aborts {
            task.abort();
        }
    }
}

pub(crate) struct StageHandle {
    name: String,
    kind: StageKind,
    concurrency: Arc<AtomicUsize>,
    in_flight: IntGauge,
}

impl StageHandle {
    pub fn new(
        name: String,
        kind: StageKind,
        concurrency: Arc<AtomicUsize>,
        metrics: &StageMetrics,
    ) -> Self {
        Self {
            name,
            kind,
            concurrency,
            in_flight: metrics.in_flight.clone(),
        }
    }
}

/// Running totals, counted in messages as producers handed them out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PipelineStats {
    pub produced: u64,
    /// Acknowledged as successful.
    pub successful: u64,
    /// Acknowledged as failed (dead-lettered ones included).
    pub failed: u64,
    /// Messages that went to the dead-letter sink (once each, whatever their fan-out).
    pub dead_lettered: u64,
    /// Messages acknowledged as failed because the pipeline dropped them outside the ack path
    /// (a stage aborted at the drain deadline); included in `failed`.
    pub abandoned: u64,
    pub in_flight: usize,
    pub max_in_flight: usize,
    pub in_flight_bound: usize,
}

impl<T: Clone + Send + 'static> Pipeline<T> {
    /// Starts declaring a pipeline. `name` labels its metrics.
    pub fn builder(name: impl Into<String>) -> PipelineBuilder<T> {
        PipelineBuilder::new(name)
    }
}

impl<T: Clone + Send + 'static> Pipeline<T> {
    /// Replaces the processor pool with one of `concurrency` workers, under load: nothing is
    /// lost, and with `partition_by` a key's messages keep their order across the change (the
    /// new workers start once the previous ones have finished what they held). Refuses 0, and
    /// a pipeline that is draining.
    pub fn resize_processors(&self, concurrency: usize) -> Result<(), ConfigError> {
        self.pool.resize(concurrency)
    }
}

impl<T: Send + 'static> Pipeline<T> {
    /// Sets how many sink workers hand batcher `name`'s batches to its sink, under load:
    /// workers are added at once; a worker removed first finishes the batch it has. Refuses 0,
    /// an unknown batcher, and a pipeline that is draining.
    pub fn resize_batcher(&self, name: &str, concurrency: usize) -> Result<(), ConfigError> {
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                what: format!("batcher {name:?}"),
                reason,
            })
        };
        let Some(pool) = self.sink_pools.iter().find(|p| p.batcher == name) else {
            return invalid("there is no batcher by that name".into());
        };
        if concurrency == 0 {
            return invalid("concurrency must be at least 1".into());
        }
        if *self.stop.borrow() {
            return invalid("the pipeline is draining: it cannot be resized".into());
        }
        pool.resize(concurrency);
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.shared.pipeline
    }

    /// The registry the pipeline's metrics are in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn stats(&self) -> PipelineStats {
        let s = &self.shared;
        PipelineStats {
            produced: s.produced.load(Ordering::Relaxed),
            successful: s.successful.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            dead_lettered: s.dead_lettered.load(Ordering::Relaxed),
            abandoned: s.abandoned.load(Ordering::Relaxed),
            in_flight: s.in_flight_now(),
            max_in_flight: s.in_flight.peak(),
            in_flight_bound: s.in_flight.bound(),
        }
    }

    /// The stages, their concurrency, and what each holds right now.
    pub fn topology(&self) -> Topology {
        Topology {
            pipeline: self.shared.pipeline.clone(),
            stages: self
                .stages
                .iter()
                .map(|s| StageTopology {
                    name: s.name.clone(),
                    kind: s.kind,
                    concurrency: s.concurrency.load(Ordering::Acquire),
                    in_flight: s.in_flight.get(),
                })
                .collect(),
            in_flight: self.shared.in_flight_now(),
            in_flight_bound: self.shared.in_flight.bound(),
            max_in_flight: self.shared.in_flight.peak(),
        }
    }

    /// Drains within the pipeline's shutdown timeout.
    pub async fn shutdown(self) -> Result<PipelineStats, ShutdownError> {
        let deadline = self.shutdown_timeout;
        self.shutdown_within(deadline).await
    }

    /// Drains: stops taking new messages and finishes, flushes and acknowledges every message
    /// already taken. Past `deadline` it aborts and reports what was left.
    pub async fn shutdown_within(
        mut self,
        deadline: Duration,
    ) -> Result<PipelineStats, ShutdownError> {
        self.stop.send_replace(true);
        self.pool.close();
        self.finish(Some(deadline)).await
    }

    /// Waits for the pipeline to end by itself, once every producer is exhausted and everything
    /// it produced is acknowledged.
    pub async fn join(mut self) -> Result<PipelineStats, ShutdownError> {
        self.finish(None).await
    }

    async fn finish(&mut self, deadline: Option<Duration>) -> Result<PipelineStats, ShutdownError> {
        let tasks = self.tasks.clone();
        // The task being waited for stays here, not in the future, so that a deadline can
        // still wait for it once aborted.
        let mut current: Option<(String, JoinHandle<()>)> = None;
        let wait = async {
            let mut first_error = None;
            loop {
                current = tasks.next();
                let Some((stage, task)) = current.as_mut() else {
                    break;
                };
                if let Err(e) = task.await {
                    first_error.get_or_insert(ShutdownError::StageFailed {
                        stage: stage.clone(),
                        reason: e.to_string(),
                    });
                }
            }
            first_error
        };
        let outcome = match deadline {
            None => Ok(wait.await),
            Some(d) => tokio::time::timeout(d, wait).await.map_err(|_| d),
        };
        match outcome {
            Ok(None) => Ok(self.stats()),
            Ok(Some(error)) => Err(error),
            Err(deadline) => {
                let left = self.shared.in_flight_now() + self.shared.held.load(Ordering::Relaxed);
                self.pool.close();
                self.tasks.abort_all();
                // Aborted tasks drop what they hold, which acknowledges it as failed: wait for
                // that, so that every message is acknowledged when this returns.
                if let Some((_, task)) = current {
                    let _ = task.await;
                }
                while let Some((_, task)) = self.tasks.next() {
                    let _ = task.await;
                }
                Err(ShutdownError::Deadline { deadline, left })
            }
        }
    }
}

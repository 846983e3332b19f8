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

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus::{IntGauge, Registry};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::builder::PipelineBuilder;
use super::error::ShutdownError;
use super::stage::Shared;
use super::telemetry::{StageKind, StageMetrics, StageTopology, Topology};

/// A running pipeline. See the module documentation for how it shuts down.
pub struct Pipeline<T> {
    shared: Arc<Shared<T>>,
    stop: watch::Sender<bool>,
    tasks: Vec<(String, JoinHandle<()>)>,
    stages: Vec<StageHandle>,
    registry: Registry,
    shutdown_timeout: Duration,
}

pub(crate) struct StageHandle {
    name: String,
    kind: StageKind,
    concurrency: usize,
    in_flight: IntGauge,
}

impl StageHandle {
    pub fn new(name: String, kind: StageKind, concurrency: usize, metrics: &StageMetrics) -> Self {
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

impl<T: Send + 'static> Pipeline<T> {
    pub(crate) fn new(
        shared: Arc<Shared<T>>,
        stop: watch::Sender<bool>,
        tasks: Vec<(String, JoinHandle<()>)>,
        stages: Vec<StageHandle>,
        registry: Registry,
        shutdown_timeout: Duration,
    ) -> Self {
        Self {
            shared,
            stop,
            tasks,
            stages,
            registry,
            shutdown_timeout,
        }
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
                    concurrency: s.concurrency,
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
        self.finish(Some(deadline)).await
    }

    /// Waits for the pipeline to end by itself, once every producer is exhausted and everything
    /// it produced is acknowledged.
    pub async fn join(mut self) -> Result<PipelineStats, ShutdownError> {
        self.finish(None).await
    }

    async fn finish(&mut self, deadline: Option<Duration>) -> Result<PipelineStats, ShutdownError> {
        let tasks = &mut self.tasks;
        let wait = async {
            let mut first_error = None;
            for (stage, task) in tasks.iter_mut() {
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
                for (_, task) in &self.tasks {
                    task.abort();
                }
                // Aborted tasks drop what they hold, which acknowledges it as failed: wait for
                // that, so that every message is acknowledged when this returns.
                for (_, task) in &mut self.tasks {
                    let _ = task.await;
                }
                Err(ShutdownError::Deadline { deadline, left })
            }
        }
    }
}

//! A started pipeline: introspection, run-time controls, and the drain that ends it without
//! losing a message.
//!
//! The shutdown contract: a drain (`shutdown()`, [`ShutdownHandle::shutdown`], or dropping the
//! `Pipeline`) tells every producer to stop asking its source for more and to hand over what it
//! still holds; everything already handed out is processed, batched, flushed (trigger `flush`)
//! and acknowledged; then the stages end, upstream first, as each one sees its inputs close. A
//! message waiting to retry gets one last attempt at once (however many attempts its policy
//! allows), then is dead-lettered or acknowledged as failed. If the drain takes longer than its
//! deadline, every stage is aborted, whatever they still held is acknowledged as failed
//! ("abandoned"), and the error says how many messages that was. Nobody needs to wait for a
//! drain for it to happen: `join` only reports how it ended.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use prometheus::{IntGauge, Registry};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

use super::builder::PipelineBuilder;
use super::error::{ConfigError, ShutdownError};
use super::flow::RateLimiter;
use super::pool::ProcessorPool;
use super::sink::SinkPool;
use super::stage::Shared;
use super::telemetry::{RateLimitMetrics, StageKind, StageMetrics, StageTopology, Topology};

/// A running pipeline: resize it, change its rate limit, watch it, drain it. Dropping it starts
/// a drain that nobody waits for; see the module documentation.
#[must_use = "dropping a Pipeline starts its drain at once: keep it, or call shutdown() or join()"]
pub struct Pipeline<T: Send + 'static> {
    control: Arc<Control<T>>,
    sink_pools: Vec<SinkPool<T>>,
    stages: Vec<StageHandle>,
    registry: Registry,
    rate_limit: Arc<RateLimiter>,
    rate_metrics: RateLimitMetrics,
}

/// Starts a pipeline's drain and waits for its end, from anywhere: a signal handler, another
/// task, a supervisor. Cheap to clone; it does not keep the pipeline running.
///
/// ```no_run
/// # use thunderline_pipeline::*;
/// # async fn run(pipeline: Pipeline<u64>) -> Result<(), ShutdownError> {
/// // Run until the source ends by itself, or until SIGTERM.
/// let handle = pipeline.shutdown_handle();
/// let on_signal = handle.clone();
/// tokio::spawn(async move {
///     let _ = tokio::signal::ctrl_c().await;
///     on_signal.shutdown();
/// });
/// let stats = handle.join().await?;
/// println!("{} messages acknowledged", stats.successful + stats.failed);
/// # drop(pipeline);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ShutdownHandle(Arc<dyn Drain>);

impl ShutdownHandle {
    /// Starts the drain, under the pipeline's shutdown timeout. Calling it again, or after the
    /// pipeline has ended, does nothing.
    pub fn shutdown(&self) {
        self.0.begin();
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.0.draining()
    }

    /// Waits until the pipeline has ended (drained, or every producer exhausted and everything
    /// acknowledged) and says how. Every handle's `join` gets the same answer.
    pub async fn join(self) -> Result<PipelineStats, ShutdownError> {
        self.0.join().await
    }
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("draining", &self.is_draining())
            .finish()
    }
}

/// What a [`ShutdownHandle`] needs of a pipeline, whatever its message type.
trait Drain: Send + Sync + 'static {
    fn begin(&self);
    fn draining(&self) -> bool;
    fn join(&self) -> BoxFuture<'static, Result<PipelineStats, ShutdownError>>;
}

type Ended = Option<Result<PipelineStats, ShutdownError>>;

/// What ends a pipeline, shared by the `Pipeline` and its shutdown handles.
pub(crate) struct Control<T: Send + 'static> {
    shared: Arc<Shared<T>>,
    stop: watch::Sender<bool>,
    tasks: Tasks,
    pool: Arc<ProcessorPool<T>>,
    shutdown_timeout: Duration,
    /// Set once a task waits for every stage to end.
    waiting: AtomicBool,
    /// The drain deadline that passed, and what was still in flight then.
    cut_short: Mutex<Option<(Duration, usize)>>,
    ended: watch::Sender<Ended>,
}

impl<T: Send + 'static> Control<T> {
    pub fn new(
        shared: Arc<Shared<T>>,
        stop: watch::Sender<bool>,
        tasks: Tasks,
        pool: Arc<ProcessorPool<T>>,
        shutdown_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            shared,
            stop,
            tasks,
            pool,
            shutdown_timeout,
            waiting: AtomicBool::new(false),
            cut_short: Mutex::new(None),
            ended: watch::channel(None).0,
        })
    }

    fn stats(&self) -> PipelineStats {
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

    fn is_draining(&self) -> bool {
        *self.stop.borrow()
    }

    /// Starts the drain, and a watchdog that cuts it short at `deadline`. A drain already
    /// under way keeps going, but a shorter deadline still applies.
    fn drain(self: &Arc<Self>, deadline: Duration) {
        let first = !self.stop.send_replace(true);
        if first {
            self.pool.close();
        }
        if self.ended.borrow().is_some() {
            return;
        }
        // Without a runtime (dropped after it), the stages see the stop flag by themselves
        // when it runs again, or were dropped with it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let control = self.clone();
        let mut ended = self.ended.subscribe();
        runtime.spawn(async move {
            tokio::select! {
                _ = ended.wait_for(Option::is_some) => {}
                () = tokio::time::sleep(deadline) => control.abort(deadline),
            }
        });
        self.wait_in_background(&runtime);
    }

    /// The deadline passed: aborts every stage, which acknowledges what they held as failed.
    fn abort(&self, deadline: Duration) {
        let left = self.shared.in_flight_now() + self.shared.held.load(Ordering::Relaxed);
        self.cut_short
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert((deadline, left));
        self.pool.close();
        self.tasks.abort_all();
    }

    /// Spawns, once, the task that waits for every stage to end and records how it ended.
    fn wait_in_background(self: &Arc<Self>, runtime: &tokio::runtime::Handle) {
        if self.waiting.swap(true, Ordering::AcqRel) {
            return;
        }
        let control = self.clone();
        runtime.spawn(async move {
            let mut first_error = None;
            while let Some((stage, task)) = control.tasks.next() {
                if let Err(e) = task.await
                    && !e.is_cancelled()
                {
                    first_error.get_or_insert(ShutdownError::StageFailed {
                        stage,
                        reason: e.to_string(),
                    });
                }
            }
            let cut_short = *control.cut_short.lock().unwrap_or_else(|e| e.into_inner());
            let ended = match (cut_short, first_error) {
                (Some((deadline, left)), _) => Err(ShutdownError::Deadline { deadline, left }),
                (None, Some(error)) => Err(error),
                (None, None) => Ok(control.stats()),
            };
            control.ended.send_replace(Some(ended));
        });
    }

    async fn ended(self: Arc<Self>) -> Result<PipelineStats, ShutdownError> {
        self.wait_in_background(&tokio::runtime::Handle::current());
        let mut ended = self.ended.subscribe();
        let ended = ended
            .wait_for(Option::is_some)
            .await
            .expect("the control outlives this borrow");
        ended.clone().expect("waited for")
    }
}

/// A shutdown handle's view of one pipeline.
struct Handle<T: Send + 'static>(Arc<Control<T>>);

impl<T: Send + 'static> Drain for Handle<T> {
    fn begin(&self) {
        self.0.drain(self.0.shutdown_timeout);
    }

    fn draining(&self) -> bool {
        self.0.is_draining()
    }

    fn join(&self) -> BoxFuture<'static, Result<PipelineStats, ShutdownError>> {
        Box::pin(self.0.clone().ended())
    }
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
    concurrency: IntGauge,
    in_flight: IntGauge,
}

impl StageHandle {
    pub fn new(name: String, kind: StageKind, metrics: &StageMetrics) -> Self {
        Self {
            name,
            kind,
            concurrency: metrics.concurrency.clone(),
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

    /// Replaces the processor pool with one of `concurrency` workers, under load: nothing is
    /// lost, and with `partition_by` a key's messages keep their order across the change (the
    /// new workers start once the previous ones have finished what they held). Refuses 0, and
    /// a pipeline that is draining.
    pub fn resize_processors(&self, concurrency: usize) -> Result<(), ConfigError> {
        self.control.pool.resize(concurrency)
    }
}

impl<T: Send + 'static> Pipeline<T> {
    pub(crate) fn new(
        control: Arc<Control<T>>,
        sink_pools: Vec<SinkPool<T>>,
        stages: Vec<StageHandle>,
        registry: Registry,
        (rate_limit, rate_metrics): (Arc<RateLimiter>, RateLimitMetrics),
    ) -> Self {
        Self {
            control,
            sink_pools,
            stages,
            registry,
            rate_limit,
            rate_metrics,
        }
    }

    /// Sets how many sink workers hand batcher `name`'s batches to its sink, under load:
    /// workers are added at once; a worker removed first finishes the batch it has. Refuses 0,
    /// an unknown batcher, and a pipeline that is draining.
    pub fn resize_batcher(&self, name: &str, concurrency: usize) -> Result<(), ConfigError> {
        let Some(pool) = self.sink_pools.iter().find(|p| p.batcher == name) else {
            return Err(ConfigError::UnknownBatcher(name.to_owned()));
        };
        if concurrency == 0 {
            return Err(ConfigError::Invalid {
                what: format!("batcher {name:?}"),
                reason: "concurrency must be at least 1".into(),
            });
        }
        if self.control.is_draining() {
            return Err(ConfigError::Draining);
        }
        pool.resize(concurrency);
        Ok(())
    }

    /// Lets the producers hand out at most `allowed` messages per `interval`, from now on: a
    /// new interval starts at once, and nobody waits out the old one. Works on a pipeline
    /// started without a rate limit too. Refuses 0 for either.
    pub fn set_rate_limit(&self, allowed: usize, interval: Duration) -> Result<(), ConfigError> {
        if allowed == 0 || interval.is_zero() {
            return Err(ConfigError::Invalid {
                what: "rate limit".into(),
                reason: "allowed messages and interval must both be above zero".into(),
            });
        }
        self.rate_limit.set(allowed, interval);
        self.rate_metrics.show(self.rate_limit.limit());
        Ok(())
    }

    /// The rate limit in force, if any: `(allowed, interval)`.
    pub fn rate_limit(&self) -> Option<(usize, Duration)> {
        self.rate_limit.limit()
    }

    /// A handle that can start the drain and wait for the end from elsewhere.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(Arc::new(Handle(self.control.clone())))
    }

    /// Whether a drain has begun.
    pub fn is_draining(&self) -> bool {
        self.control.is_draining()
    }

    pub fn name(&self) -> &str {
        &self.control.shared.pipeline
    }

    /// The registry the pipeline's metrics are in.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn stats(&self) -> PipelineStats {
        self.control.stats()
    }

    /// The stages, their concurrency, and what each holds right now.
    pub fn topology(&self) -> Topology {
        let shared = &self.control.shared;
        Topology {
            pipeline: shared.pipeline.clone(),
            stages: self
                .stages
                .iter()
                .map(|s| StageTopology {
                    name: s.name.clone(),
                    kind: s.kind,
                    concurrency: usize::try_from(s.concurrency.get()).unwrap_or(0),
                    in_flight: s.in_flight.get(),
                })
                .collect(),
            in_flight: shared.in_flight_now(),
            in_flight_bound: shared.in_flight.bound(),
            max_in_flight: shared.in_flight.peak(),
        }
    }

    /// Drains within the pipeline's shutdown timeout.
    pub async fn shutdown(self) -> Result<PipelineStats, ShutdownError> {
        let deadline = self.control.shutdown_timeout;
        self.shutdown_within(deadline).await
    }

    /// Drains: stops taking new messages and finishes, flushes and acknowledges every message
    /// already taken. Past `deadline` it aborts and reports what was left.
    pub async fn shutdown_within(self, deadline: Duration) -> Result<PipelineStats, ShutdownError> {
        self.control.drain(deadline);
        self.control.clone().ended().await
    }

    /// Waits for the pipeline to end by itself, once every producer is exhausted and everything
    /// it produced is acknowledged (or for a drain started through a [`ShutdownHandle`]).
    pub async fn join(self) -> Result<PipelineStats, ShutdownError> {
        self.control.clone().ended().await
    }
}

impl<T: Send + 'static> Drop for Pipeline<T> {
    fn drop(&mut self) {
        self.control.drain(self.control.shutdown_timeout);
    }
}

//! Declaring a pipeline: its producers, processors, batchers and sinks, checked and then started.

use std::num::{NonZeroU64, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, mpsc, watch};

use super::batcher::{BatcherStage, IdleWorkers};
use super::error::ConfigError;
use super::flow::RateLimiter;
use super::message::{BatcherName, Message};
use super::pool::{DefaultBound, ProcessorPool, Template, gauge};
use super::processor::{
    AsyncHandler, ChunkHandler, CpuProcessor, HandlerPolicy, Processor, RayonHandler, Router,
};
use super::producer::{DynProducer, PartitionFn, Producer, ProducerStage};
use super::retry::{RetryPolicy, millis};
use super::running::{Control, Pipeline, StageHandle, Tasks};
use super::sink::{
    BatchSink, DeadLetterSink, DynDeadLetter, DynSink, PoolSize, SinkPool, SinkWorker,
};
use super::stage::{Custody, Shared};
use super::telemetry::{PipelineMetrics, StageKind};

/// The processor pool's settings.
///
/// In a file (`[processors]`) the keys are `concurrency`, `max_demand`, `min_demand`,
/// `timeout_ms` and a `retry` table (see [`RetryPolicy`]); an omitted key takes the default.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(try_from = "ProcessorFile", into = "ProcessorFile")]
pub struct ProcessorConfig {
    /// None: the number of cores.
    concurrency: Option<usize>,
    max_demand: usize,
    /// None: `max_demand / 2`.
    min_demand: Option<usize>,
    retry: RetryPolicy,
    timeout: Option<Duration>,
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            concurrency: None,
            max_demand: 10,
            min_demand: None,
            retry: RetryPolicy::none(),
            timeout: None,
        }
    }
}

impl ProcessorConfig {
    /// Workers in the pool. Default: the number of cores.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// A worker asks for `max` messages at once, and again once it is owed `min` or fewer.
    pub fn demand(mut self, max: usize, min: usize) -> Self {
        self.max_demand = max;
        self.min_demand = Some(min);
        self
    }

    /// Messages a worker asks for at once (default 10); it asks again once it is owed half.
    pub fn max_demand(mut self, max: usize) -> Self {
        self.max_demand = max;
        self
    }

    /// How a message that failed retryably is retried. Default: it is not.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Longest a single `handle_message` call may take; past it the call is cancelled and the
    /// message fails retryably. Async processors only. Default: no limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn get_concurrency(&self) -> usize {
        self.concurrency
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    pub fn get_max_demand(&self) -> usize {
        self.max_demand
    }

    pub fn get_retry(&self) -> &RetryPolicy {
        &self.retry
    }

    fn min_demand(&self) -> usize {
        self.min_demand.unwrap_or(self.max_demand / 2)
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |reason: String| {
            Err(ConfigError::Invalid {
                what: "processors".into(),
                reason,
            })
        };
        if self.concurrency == Some(0) {
            return invalid("concurrency must be at least 1".into());
        }
        if self.max_demand == 0 {
            return invalid("max_demand must be at least 1".into());
        }
        if self.min_demand() >= self.max_demand {
            return invalid(format!(
                "min_demand ({}) must be below max_demand ({})",
                self.min_demand(),
                self.max_demand
            ));
        }
        if self.timeout == Some(Duration::ZERO) {
            return invalid("timeout must be above zero".into());
        }
        validate_retry("processors", &self.retry)
    }
}

fn validate_retry(stage: &str, retry: &RetryPolicy) -> Result<(), ConfigError> {
    retry.validate().map_err(|e| ConfigError::Invalid {
        what: format!("{stage} retry"),
        reason: e.to_string(),
    })
}

/// One batcher's settings.
///
/// In a file (`[batchers.<name>]`, the name being the table's) the keys are `batch_size`,
/// `batch_timeout_ms`, `concurrency`, `group_commit`, `timeout_ms` and a `retry` table (see
/// [`RetryPolicy`]); an omitted key takes the default.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(from = "BatcherFile", into = "BatcherFile")]
pub struct BatcherConfig {
    name: String,
    batch_size: usize,
    batch_timeout: Duration,
    concurrency: usize,
    retry: RetryPolicy,
    timeout: Option<Duration>,
    group_commit: bool,
}

impl Default for BatcherConfig {
    /// A batcher without a name yet (see [`name`](Self::name)): batches of 20 or 2 s, one sink
    /// worker, no retry.
    fn default() -> Self {
        Self::new("")
    }
}

impl BatcherConfig {
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            batch_size: 20,
            batch_timeout: Duration::from_secs(2),
            concurrency: 1,
            retry: RetryPolicy::none(),
            timeout: None,
            group_commit: false,
        }
    }

    /// The name messages route to it by (a file names it by its table).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Group commit: a batch also leaves as soon as a sink worker is free, so that what is
    /// waiting never waits for the timeout while a worker could take it; `batch_size` and
    /// `batch_timeout` stay the upper bounds. Default: off.
    pub fn group_commit(mut self, on: bool) -> Self {
        self.group_commit = on;
        self
    }

    /// Default: 20.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n;
        self
    }

    /// Counted from a batch's first message. Default: 2 s.
    pub fn batch_timeout(mut self, d: Duration) -> Self {
        self.batch_timeout = d;
        self
    }

    /// Batch processors handing batches to the sink. Default: 1 (keeps batch order).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// How a batch's retryable failures are retried. Default: they are not.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Longest a single `handle_batch` call may take. Default: no limit.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    pub fn get_name(&self) -> &str {
        &self.name
    }

    pub fn get_batch_size(&self) -> usize {
        self.batch_size
    }

    pub fn get_batch_timeout(&self) -> Duration {
        self.batch_timeout
    }

    pub fn get_retry(&self) -> &RetryPolicy {
        &self.retry
    }

    pub fn get_concurrency(&self) -> usize {
        self.concurrency
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let what = format!("batcher {:?}", self.name);
        let invalid = |reason: &str| {
            Err(ConfigError::Invalid {
                what: what.clone(),
                reason: reason.into(),
            })
        };
        if self.name.is_empty() {
            return invalid("the name must not be empty");
        }
        if self.batch_size == 0 {
            return invalid("batch_size must be at least 1");
        }
        if self.batch_timeout.is_zero() {
            return invalid("batch_timeout must be above zero");
        }
        if self.concurrency == 0 {
            return invalid("concurrency must be at least 1");
        }
        if self.timeout == Some(Duration::ZERO) {
            return invalid("timeout must be above zero");
        }
        validate_retry(&what, &self.retry)
    }
}

/// `[processors]` as a file writes it. Counts are nonzero and durations whole milliseconds, so
/// that a wrong value is refused at its line; what relates two keys is checked after.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct ProcessorFile {
    #[serde(skip_serializing_if = "Option::is_none")]
    concurrency: Option<NonZeroUsize>,
    max_demand: NonZeroUsize,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_demand: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<NonZeroU64>,
    retry: RetryPolicy,
}

impl Default for ProcessorFile {
    fn default() -> Self {
        ProcessorConfig::default().into()
    }
}

impl From<ProcessorConfig> for ProcessorFile {
    fn from(c: ProcessorConfig) -> Self {
        Self {
            concurrency: c.concurrency.and_then(NonZeroUsize::new),
            max_demand: NonZeroUsize::new(c.max_demand).unwrap_or(NonZeroUsize::MIN),
            min_demand: c.min_demand,
            timeout_ms: c.timeout.and_then(|t| NonZeroU64::new(millis(t))),
            retry: c.retry,
        }
    }
}

impl TryFrom<ProcessorFile> for ProcessorConfig {
    type Error = String;

    fn try_from(f: ProcessorFile) -> Result<Self, String> {
        let config = Self {
            concurrency: f.concurrency.map(NonZeroUsize::get),
            max_demand: f.max_demand.get(),
            min_demand: f.min_demand,
            retry: f.retry,
            timeout: f.timeout_ms.map(|t| Duration::from_millis(t.get())),
        };
        config.validate().map_err(|e| match e {
            ConfigError::Invalid { reason, .. } => reason,
            other => other.to_string(),
        })?;
        Ok(config)
    }
}

/// `[batchers.<name>]` as a file writes it; see [`ProcessorFile`].
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct BatcherFile {
    batch_size: NonZeroUsize,
    batch_timeout_ms: NonZeroU64,
    concurrency: NonZeroUsize,
    group_commit: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<NonZeroU64>,
    retry: RetryPolicy,
}

impl Default for BatcherFile {
    fn default() -> Self {
        BatcherConfig::default().into()
    }
}

impl From<BatcherConfig> for BatcherFile {
    fn from(c: BatcherConfig) -> Self {
        Self {
            batch_size: NonZeroUsize::new(c.batch_size).unwrap_or(NonZeroUsize::MIN),
            batch_timeout_ms: NonZeroU64::new(millis(c.batch_timeout)).unwrap_or(NonZeroU64::MIN),
            concurrency: NonZeroUsize::new(c.concurrency).unwrap_or(NonZeroUsize::MIN),
            group_commit: c.group_commit,
            timeout_ms: c.timeout.and_then(|t| NonZeroU64::new(millis(t))),
            retry: c.retry,
        }
    }
}

impl From<BatcherFile> for BatcherConfig {
    fn from(f: BatcherFile) -> Self {
        Self {
            name: String::new(),
            batch_size: f.batch_size.get(),
            batch_timeout: Duration::from_millis(f.batch_timeout_ms.get()),
            concurrency: f.concurrency.get(),
            retry: f.retry,
            timeout: f.timeout_ms.map(|t| Duration::from_millis(t.get())),
            group_commit: f.group_commit,
        }
    }
}

/// Declares a pipeline; [`start`](Self::start) checks it and spawns its stages.
pub struct PipelineBuilder<T> {
    name: String,
    producers: Vec<Box<dyn DynProducer<T>>>,
    rate_limit: Option<(usize, Duration)>,
    processor: Option<(Arc<dyn ChunkHandler<T>>, bool)>,
    processors: ProcessorConfig,
    partition_by: Option<PartitionFn<T>>,
    batchers: Vec<(BatcherConfig, Arc<dyn DynSink<T>>)>,
    dead_letter: Option<Arc<dyn DynDeadLetter<T>>>,
    dead_letter_permanent: bool,
    in_flight_bound: Option<usize>,
    shutdown_timeout: Duration,
    registry: Option<(Registry, Arc<PipelineMetrics>)>,
}

impl<T: Clone + Send + 'static> PipelineBuilder<T> {
    pub(crate) fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            producers: Vec::new(),
            rate_limit: None,
            processor: None,
            processors: ProcessorConfig::default(),
            partition_by: None,
            batchers: Vec::new(),
            dead_letter: None,
            dead_letter_permanent: false,
            in_flight_bound: None,
            shutdown_timeout: Duration::from_secs(30),
            registry: None,
        }
    }

    /// Adds a producer; each runs in its own task and every processor draws from all of them.
    pub fn producer(mut self, producer: impl Producer<T>) -> Self {
        self.producers.push(Box::new(producer));
        self
    }

    /// At most `allowed` messages per `interval`, across all producers.
    pub fn rate_limit(mut self, allowed: usize, interval: Duration) -> Self {
        self.rate_limit = Some((allowed, interval));
        self
    }

    /// The async message handler and its pool's settings.
    pub fn processor(mut self, processor: impl Processor<T>, config: ProcessorConfig) -> Self {
        self.processor = Some((Arc::new(AsyncHandler(processor)), false));
        self.processors = config;
        self
    }

    /// A CPU-bound message handler, run on the global rayon pool.
    pub fn cpu_processor(
        mut self,
        processor: impl CpuProcessor<T>,
        config: ProcessorConfig,
    ) -> Self {
        self.processor = Some((
            Arc::new(RayonHandler {
                processor: Arc::new(processor),
            }),
            true,
        ));
        self.processors = config;
        self
    }

    /// All messages with one key go to one processor, in order.
    pub fn partition_by(
        mut self,
        key: impl Fn(&Message<T>) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.partition_by = Some(Arc::new(key));
        self
    }

    /// Adds a batcher and the sink its batches go to. Messages that name no batcher go to the
    /// first one added.
    pub fn batcher(mut self, config: BatcherConfig, sink: impl BatchSink<T>) -> Self {
        self.batchers.push((config, Arc::new(sink)));
        self
    }

    /// Where messages go whose retryable failures outlasted their attempts, before they are
    /// acknowledged as failed.
    pub fn dead_letter(mut self, sink: impl DeadLetterSink<T>) -> Self {
        self.dead_letter = Some(Arc::new(sink));
        self
    }

    /// Sends permanent failures to the dead-letter sink too: poison messages are what
    /// dead-letter queues are for. Default: off (they are acknowledged as failed at once).
    pub fn dead_letter_permanent(mut self, on: bool) -> Self {
        self.dead_letter_permanent = on;
        self
    }

    /// The most messages the pipeline holds at once, from the moment a producer hands one out
    /// to its acknowledgement. Default: what the processors can ask for plus room for every
    /// batcher to fill a batch while its sinks work on theirs.
    pub fn in_flight_bound(mut self, n: usize) -> Self {
        self.in_flight_bound = Some(n);
        self
    }

    /// How long [`Pipeline::shutdown`] waits for the drain. Default: 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Reports metrics into `registry` through `metrics` (registered there once, shareable by
    /// several pipelines). Default: a registry of the pipeline's own.
    pub fn metrics(mut self, registry: Registry, metrics: Arc<PipelineMetrics>) -> Self {
        self.registry = Some((registry, metrics));
        self
    }

    /// The default in-flight bound, as what one processor worker adds and what the rest
    /// needs: a resize of the pool moves it.
    fn default_in_flight_bound(&self) -> DefaultBound {
        let batchers: usize = self
            .batchers
            .iter()
            .map(|(b, _)| b.batch_size * (2 * b.concurrency + 1))
            .sum();
        DefaultBound {
            per_worker: self.producers.len() * self.processors.max_demand,
            rest: batchers,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() {
            return Err(ConfigError::Invalid {
                what: "pipeline".into(),
                reason: "the name must not be empty".into(),
            });
        }
        if self.producers.is_empty() {
            return Err(ConfigError::NoProducer);
        }
        let Some((_, cpu_bound)) = &self.processor else {
            return Err(ConfigError::NoProcessor);
        };
        self.processors.validate()?;
        if *cpu_bound && self.processors.timeout.is_some() {
            return Err(ConfigError::Invalid {
                what: "processors".into(),
                reason: "a CPU-bound processor runs on rayon, where work cannot be cancelled: \
                         it cannot have a timeout"
                    .into(),
            });
        }
        for (i, (b, _)) in self.batchers.iter().enumerate() {
            b.validate()?;
            if self.batchers[..i].iter().any(|(o, _)| o.name == b.name) {
                return Err(ConfigError::DuplicateBatcher(b.name.clone()));
            }
        }
        if let Some((allowed, interval)) = self.rate_limit
            && (allowed == 0 || interval.is_zero())
        {
            return Err(ConfigError::Invalid {
                what: "rate limit".into(),
                reason: "allowed messages and interval must both be above zero".into(),
            });
        }
        if let Some(bound) = self.in_flight_bound {
            if bound < self.producers.len().max(1) {
                return Err(ConfigError::Invalid {
                    what: "in_flight_bound".into(),
                    reason: format!(
                        "must be at least 1 per producer ({}): each producer needs a permit of \
                         its own",
                        self.producers.len()
                    ),
                });
            }
            if let Some((b, _)) = self.batchers.iter().find(|(b, _)| b.batch_size > bound) {
                return Err(ConfigError::Invalid {
                    what: "in_flight_bound".into(),
                    reason: format!(
                        "{bound} is below batch_size {} of batcher {:?}: its batches could never \
                         fill, and every one would wait out its timeout",
                        b.batch_size, b.name
                    ),
                });
            }
        }
        Ok(())
    }

    /// Checks the declaration and spawns every stage on the current tokio runtime.
    pub fn start(self) -> Result<Pipeline<T>, ConfigError> {
        self.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
        let default_bound = self
            .in_flight_bound
            .is_none()
            .then(|| self.default_in_flight_bound());
        let bound = match default_bound {
            Some(d) => d.for_workers(self.processors.get_concurrency()),
            None => self.in_flight_bound.expect("set when there is no default"),
        };
        let (registry, metrics) = match self.registry {
            Some(r) => r,
            None => {
                let registry = Registry::new();
                let metrics = PipelineMetrics::register(&registry)?;
                (registry, metrics)
            }
        };
        let name = self.name;
        let shared = Arc::new(Shared::new(
            name.clone(),
            bound,
            self.dead_letter,
            self.dead_letter_permanent,
            metrics.abandoned(&name),
        ));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut batcher_stages = Vec::new();
        let tasks = Tasks::default();
        let mut sink_pools = Vec::new();

        // Batchers and their sinks.
        let mut routes: Vec<(BatcherName, mpsc::Sender<Custody<T>>)> = Vec::new();
        for (config, sink) in self.batchers {
            let batcher_name: BatcherName = config.name.as_str().into();
            let (tx, inbox) = mpsc::channel(2 * self.processors.get_concurrency().max(2));
            // Room for a processor chunk's worth of batches, so that the batcher and its sinks
            // do not wake each other for every batch. The in-flight bound still caps the total.
            let (out, batches) = mpsc::channel((4 * config.concurrency).max(32));
            let stage = format!("batcher:{}", config.name);
            let metrics_b = metrics.stage(&name, &stage);
            metrics_b.concurrency.set(1);
            batcher_stages.push(StageHandle::new(
                stage.clone(),
                StageKind::Batcher,
                &metrics_b,
            ));
            let idle = config
                .group_commit
                .then(|| Arc::new(IdleWorkers::default()));
            let batcher = BatcherStage {
                name: batcher_name.clone(),
                batch_size: config.batch_size,
                batch_timeout: config.batch_timeout,
                inbox,
                out,
                idle: idle.clone(),
                metrics: metrics_b,
                sizes: metrics.batch_sizes(&name, &config.name),
                stop: stop_rx.clone(),
            };
            tasks.push(stage, runtime.spawn(batcher.run()));

            let stage = format!("sink:{}", config.name);
            let metrics_s = metrics.stage(&name, &stage);
            let worker = SinkWorker {
                batches: Arc::new(Mutex::new(batches)),
                idle: idle.clone(),
                sink: sink.clone(),
                retry: config.retry.clone(),
                timeout: config.timeout,
                stop: stop_rx.clone(),
                shared: shared.clone(),
                metrics: metrics_s.clone(),
                size: Arc::new(PoolSize::new(metrics_s.concurrency.clone())),
            };
            let sinks = SinkPool::start(
                config.name.clone(),
                worker,
                config.concurrency,
                runtime.clone(),
                tasks.clone(),
            );
            batcher_stages.push(StageHandle::new(stage.clone(), StageKind::Sink, &metrics_s));
            sink_pools.push(sinks);
            routes.push((batcher_name, tx));
        }
        let router = Router { batchers: routes };

        // Processors.
        let (handler, _) = self.processor.expect("validated");
        let config = self.processors;
        let policy = Arc::new(HandlerPolicy {
            retry: config.retry.clone(),
            timeout: config.timeout,
            inline_retries: self.partition_by.is_some(),
        });
        let metrics_p = metrics.stage(&name, "processor");
        let mut signal_txs = Vec::new();
        let mut signal_rxs = Vec::new();
        for _ in 0..self.producers.len() {
            let (tx, rx) = mpsc::unbounded_channel();
            signal_txs.push(tx);
            signal_rxs.push(rx);
        }
        let (pool, worker_sets) = ProcessorPool::start(
            Template {
                handler,
                policy,
                max_demand: config.max_demand,
                min_demand: config.min_demand(),
                stop: stop_rx.clone(),
                shared: shared.clone(),
                metrics: metrics_p.clone(),
                default_bound,
            },
            config.get_concurrency(),
            signal_txs,
            router,
            runtime.clone(),
            tasks.clone(),
        );
        let pool = Arc::new(pool);
        let processor_stage =
            StageHandle::new("processor".into(), StageKind::Processor, &metrics_p);

        // Producers.
        let rate_limit = Arc::new(match self.rate_limit {
            Some((allowed, interval)) => RateLimiter::new(allowed, interval),
            None => RateLimiter::unlimited(),
        });
        let rate_metrics = metrics.rate_limit(&name);
        rate_metrics.show(rate_limit.limit());
        let metrics_r = metrics.stage(&name, "producer");
        metrics_r.concurrency.set(gauge(self.producers.len()));
        let mut stages = vec![
            StageHandle::new("producer".into(), StageKind::Producer, &metrics_r),
            processor_stage,
        ];
        stages.extend(batcher_stages);
        let producer_count = self.producers.len();
        let producers = self.producers.into_iter().zip(signal_rxs).zip(worker_sets);
        for (index, ((producer, signals), workers)) in producers.enumerate() {
            let stage = ProducerStage {
                index,
                producer,
                signals,
                workers,
                max_demand: config.max_demand,
                partition_by: self.partition_by.clone(),
                max_chunk: (config.max_demand - config.min_demand()).max(1),
                producers: producer_count,
                rate_limit: rate_limit.clone(),
                stop: stop_rx.clone(),
                shared: shared.clone(),
                pool: pool.clone(),
                metrics: metrics_r.clone(),
            };
            tasks.push("producer", runtime.spawn(stage.run()));
        }

        Ok(Pipeline::new(
            Control::new(shared, stop_tx, tasks, pool, self.shutdown_timeout),
            sink_pools,
            stages,
            registry,
            (rate_limit, rate_metrics),
        ))
    }
}

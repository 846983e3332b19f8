//! The processor pool: spawns its workers, and replaces them with a pool of another size while
//! the pipeline runs, losing nothing and keeping order per partition key.
//!
//! A resize starts a new generation of workers and tells every producer. Producers hand
//! nothing more to the previous workers, which finish what they hold (retries included) and
//! end. Without `partition_by` the new workers get messages at once; with it, producers wait
//! until every previous worker has ended, so that a key's messages, which may now belong to
//! another worker, never overtake the ones before them.

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntGauge;
use std::sync::{Arc, Mutex};

use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use super::error::ConfigError;
use super::processor::{ChunkHandler, HandlerPolicy, ProcessorWorker, Router};
use super::producer::{Signal, WorkerSet};
use super::running::Tasks;
use super::stage::{Shared, draining};
use super::telemetry::StageMetrics;

/// What every worker of the pool is made from.
pub(crate) struct Template<T: Send + 'static> {
    pub handler: Arc<dyn ChunkHandler<T>>,
    pub policy: Arc<HandlerPolicy>,
    pub max_demand: usize,
    pub min_demand: usize,
    pub stop: watch::Receiver<bool>,
    pub shared: Arc<Shared<T>>,
    pub metrics: StageMetrics,
    /// When the in-flight bound is the default, it follows the pool's size.
    pub default_bound: Option<DefaultBound>,
}

/// The default in-flight bound: what the processors can ask for plus room for every batcher.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DefaultBound {
    pub per_worker: usize,
    pub rest: usize,
}

impl DefaultBound {
    pub fn for_workers(self, n: usize) -> usize {
        self.per_worker * n + self.rest
    }
}

struct Live<T: Send + 'static> {
    /// One per producer.
    signals: Vec<mpsc::UnboundedSender<Signal<T>>>,
    router: Router<T>,
    generation: u64,
    /// Closes when every worker of the current generation has ended.
    current: Arc<watch::Sender<()>>,
}

pub(crate) struct ProcessorPool<T: Send + 'static> {
    template: Template<T>,
    /// None once the pipeline drains: the pool then holds nothing that keeps a later stage
    /// open, and refuses resizes.
    live: Mutex<Option<Live<T>>>,
    runtime: Handle,
    tasks: Tasks,
    /// The concurrency asked for last, as topology shows it.
    pub concurrency: IntGauge,
    /// Producers still running: when the last one ends, nothing more comes, and the pool lets
    /// go as in a drain.
    producers: AtomicUsize,
}

impl<T: Clone + Send + 'static> ProcessorPool<T> {
    /// Spawns the first generation of `n` workers; returns the pool and what each producer
    /// starts with.
    pub fn start(
        template: Template<T>,
        n: usize,
        signals: Vec<mpsc::UnboundedSender<Signal<T>>>,
        router: Router<T>,
        runtime: Handle,
        tasks: Tasks,
    ) -> (Self, Vec<WorkerSet<T>>) {
        let signals_len = signals.len();
        let concurrency = template.metrics.concurrency.clone();
        let pool = Self {
            template,
            live: Mutex::new(Some(Live {
                signals,
                router,
                generation: 0,
                current: Arc::new(watch::channel(()).0),
            })),
            runtime,
            tasks,
            concurrency,
            producers: AtomicUsize::new(signals_len),
        };
        let sets = {
            let mut live = pool.live.lock().unwrap_or_else(|e| e.into_inner());
            let live = live.as_mut().expect("just made");
            pool.spawn(live, n)
        };
        (pool, sets)
    }

    /// Spawns a generation of `n` workers; returns what to tell each producer.
    fn spawn(&self, live: &mut Live<T>, n: usize) -> Vec<WorkerSet<T>> {
        let (done, alive) = watch::channel(());
        let previous = std::mem::replace(&mut live.current, Arc::new(done));
        let t = &self.template;
        let mut inboxes = Vec::with_capacity(n);
        for index in 0..n {
            // Unbounded, because demand bounds it: a worker is never sent more than it asked for.
            let (tx, inbox) = mpsc::unbounded_channel();
            inboxes.push(tx);
            let worker = ProcessorWorker {
                index,
                generation: live.generation,
                inbox,
                asks: live.signals.clone(),
                _alive: alive.clone(),
                max_demand: t.max_demand,
                min_demand: t.min_demand,
                handler: t.handler.clone(),
                policy: t.policy.clone(),
                router: live.router.clone(),
                stop: t.stop.clone(),
                shared: t.shared.clone(),
                metrics: t.metrics.clone(),
            };
            self.tasks
                .push("processor", self.runtime.spawn(worker.run()));
        }
        self.concurrency.set(gauge(n));
        if let Some(bound) = t.default_bound {
            t.shared.in_flight.set_bound(bound.for_workers(n));
        }
        live.signals
            .iter()
            .map(|_| WorkerSet {
                generation: live.generation,
                inboxes: inboxes.clone(),
                previous: previous.clone(),
            })
            .collect()
    }

    /// Replaces the workers with `n` new ones; see the module documentation.
    pub fn resize(&self, n: usize) -> Result<(), ConfigError> {
        let invalid = |reason: &str| {
            Err(ConfigError::Invalid {
                what: "processors".into(),
                reason: reason.into(),
            })
        };
        if n == 0 {
            return invalid("concurrency must be at least 1");
        }
        if draining(&self.template.stop) {
            return Err(ConfigError::Draining);
        }
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let Some(live) = live.as_mut() else {
            return Err(ConfigError::Draining);
        };
        live.generation += 1;
        let sets = self.spawn(live, n);
        for (signals, set) in live.signals.iter().zip(sets) {
            // A producer that has finished no longer listens; that is fine.
            let _ = signals.send(Signal::Workers(set));
        }
        Ok(())
    }
}

impl<T: Send + 'static> ProcessorPool<T> {
    /// The drain began: let go of the router and the producers, so that stages end as their
    /// inputs close.
    pub fn close(&self) {
        self.live.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    pub fn producer_finished(&self) {
        if self.producers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.close();
        }
    }
}

/// A worker count as a gauge's value.
pub(crate) fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

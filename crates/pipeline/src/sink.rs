//! The sink stage: a pool of batch processors per batcher that hand each batch to the user's
//! [`BatchSink`], retry what failed under the batcher's retry policy, and settle the batch:
//! exhausted failures to the [`DeadLetterSink`], then one acknowledgement per acknowledger.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use prometheus::IntGauge;
use tokio::runtime::Handle;
use tokio::sync::{Mutex, mpsc, watch};

use super::batcher::{Batch, BatchInfo, IdleWorkers};
use super::message::{Failure, Message};
use super::pool::gauge;
use super::retry::{RetryPolicy, backoff};
use super::running::Tasks;
use super::stage::{Custody, Shared, within};
use super::telemetry::StageMetrics;

/// Where a batcher's batches go: a database, a socket, a broker.
///
/// The sink gets the batch's messages by reference, so it cannot lose one. It may fail single
/// messages (`message.fail(..)`) or return a failure for the whole batch; retryable failures are
/// retried, as a smaller batch of just those messages, under the batcher's retry policy.
pub trait BatchSink<T>: Send + Sync + 'static {
    fn handle_batch(
        &self,
        batch: &BatchInfo,
        messages: &mut [Message<T>],
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Sees the batch's failed messages after their last attempt, before acknowledgement.
    fn handle_failed(
        &self,
        batch: &BatchInfo,
        messages: &mut [Message<T>],
    ) -> impl Future<Output = ()> + Send {
        let _ = (batch, messages);
        std::future::ready(())
    }
}

/// Receives messages whose retryable failures outlasted their attempts (and, with
/// [`dead_letter_permanent`](super::PipelineBuilder::dead_letter_permanent), permanent
/// failures), before they are acknowledged as failed. `stage` names where they gave up
/// (`producer`, `processor`, `sink:<batcher>`). It runs under that stage's timeout.
pub trait DeadLetterSink<T>: Send + Sync + 'static {
    fn dead_letter(
        &self,
        stage: &str,
        messages: &mut [Message<T>],
    ) -> impl Future<Output = ()> + Send;
}

pub(crate) trait DynSink<T>: Send + Sync + 'static {
    fn handle_batch<'a>(
        &'a self,
        batch: &'a BatchInfo,
        messages: &'a mut [Message<T>],
    ) -> BoxFuture<'a, Result<(), Failure>>;
    fn handle_failed<'a>(
        &'a self,
        batch: &'a BatchInfo,
        messages: &'a mut [Message<T>],
    ) -> BoxFuture<'a, ()>;
}

impl<T: Send + 'static, S: BatchSink<T>> DynSink<T> for S {
    fn handle_batch<'a>(
        &'a self,
        batch: &'a BatchInfo,
        messages: &'a mut [Message<T>],
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(BatchSink::handle_batch(self, batch, messages))
    }

    fn handle_failed<'a>(
        &'a self,
        batch: &'a BatchInfo,
        messages: &'a mut [Message<T>],
    ) -> BoxFuture<'a, ()> {
        Box::pin(BatchSink::handle_failed(self, batch, messages))
    }
}

pub(crate) trait DynDeadLetter<T>: Send + Sync + 'static {
    fn dead_letter<'a>(
        &'a self,
        stage: &'a str,
        messages: &'a mut [Message<T>],
    ) -> BoxFuture<'a, ()>;
}

impl<T: Send + 'static, D: DeadLetterSink<T>> DynDeadLetter<T> for D {
    fn dead_letter<'a>(
        &'a self,
        stage: &'a str,
        messages: &'a mut [Message<T>],
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if AssertUnwindSafe(DeadLetterSink::dead_letter(self, stage, messages))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("the dead-letter sink panicked");
            }
        })
    }
}

/// One batch processor of a batcher's pool.
pub(crate) struct SinkWorker<T: Send + 'static> {
    pub batches: Arc<Mutex<mpsc::Receiver<Batch<T>>>>,
    /// Tells a group-commit batcher when this worker waits for a batch.
    pub idle: Option<Arc<IdleWorkers>>,
    pub sink: Arc<dyn DynSink<T>>,
    pub retry: RetryPolicy,
    /// Bounds each `handle_batch`, `handle_failed` and dead-letter call.
    pub timeout: Option<Duration>,
    /// The drain: once it starts, a retry wait is cut short for one last attempt.
    pub stop: watch::Receiver<bool>,
    pub shared: Arc<Shared<T>>,
    pub metrics: StageMetrics,
    /// The pool's running workers and the number wanted, shared by every worker.
    pub size: Arc<PoolSize>,
}

impl<T: Send + 'static> Clone for SinkWorker<T> {
    fn clone(&self) -> Self {
        Self {
            batches: self.batches.clone(),
            idle: self.idle.clone(),
            sink: self.sink.clone(),
            retry: self.retry.clone(),
            timeout: self.timeout,
            stop: self.stop.clone(),
            shared: self.shared.clone(),
            metrics: self.metrics.clone(),
            size: self.size.clone(),
        }
    }
}

/// How many sink workers run, and how many are wanted: a worker over the count ends before it
/// takes its next batch.
pub(crate) struct PoolSize {
    running: AtomicUsize,
    /// The sink stage's concurrency gauge.
    wanted: IntGauge,
}

impl PoolSize {
    /// Claims the end of one surplus worker; true when the caller should end.
    pub fn new(wanted: IntGauge) -> Self {
        Self {
            running: AtomicUsize::new(0),
            wanted,
        }
    }

    fn leave_if_surplus(&self) -> bool {
        let wanted = usize::try_from(self.wanted.get()).unwrap_or(0);
        self.running
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| {
                (r > wanted).then(|| r - 1)
            })
            .is_ok()
    }
}

/// A batcher's sink workers, resizable while the pipeline runs.
pub(crate) struct SinkPool<T: Send + 'static> {
    pub batcher: String,
    template: SinkWorker<T>,
    runtime: Handle,
    tasks: Tasks,
    /// Serialises resizes, so that the count spawned matches the count wanted.
    resizing: std::sync::Mutex<()>,
}

impl<T: Send + 'static> SinkPool<T> {
    pub fn start(
        batcher: String,
        template: SinkWorker<T>,
        n: usize,
        runtime: Handle,
        tasks: Tasks,
    ) -> Self {
        let pool = Self {
            batcher,
            template,
            runtime,
            tasks,
            resizing: std::sync::Mutex::new(()),
        };
        pool.resize(n);
        pool
    }

    /// Spawns workers up to `n`, or lets the surplus end after their current batch.
    pub fn resize(&self, n: usize) {
        let _turn = self.resizing.lock().unwrap_or_else(|e| e.into_inner());
        let size = &self.template.size;
        size.wanted.set(gauge(n));
        let running = size.running.load(Ordering::Acquire);
        for _ in running..n {
            size.running.fetch_add(1, Ordering::AcqRel);
            let worker = self.template.clone();
            let stage = format!("sink:{}", self.batcher);
            self.tasks.push(stage, self.runtime.spawn(worker.run()));
        }
    }
}

impl<T: Send + 'static> SinkWorker<T> {
    pub async fn run(self) {
        loop {
            if self.size.leave_if_surplus() {
                break;
            }
            if let Some(idle) = &self.idle {
                idle.waiting();
            }
            let batch = { self.batches.lock().await.recv().await };
            if let Some(idle) = &self.idle {
                idle.busy();
            }
            let Some(Batch { mut info, messages }) = batch else {
                break;
            };
            let n = messages.len();
            self.metrics.received.inc_by(n as u64);
            self.metrics.in_flight.add(n as i64);
            let started = std::time::Instant::now();

            let mut done = self.deliver(&mut info, messages).await;
            let failed = done.iter().filter(|m| m.is_failed()).count();
            if failed > 0 {
                done.sort_by_key(|m| !m.is_failed());
                info.size = failed;
                let call = async {
                    let failed_part = &mut done[..failed];
                    if AssertUnwindSafe(self.sink.handle_failed(&info, failed_part))
                        .catch_unwind()
                        .await
                        .is_err()
                    {
                        tracing::error!(batcher = %info.batcher, "handle_failed panicked");
                    }
                };
                if !within(self.timeout, call).await {
                    tracing::error!(
                        batcher = %info.batcher,
                        "handle_failed timed out after {:?}", self.timeout
                    );
                }
            }
            self.metrics.sent.inc_by((n - failed) as u64);
            self.shared.settle(&self.metrics, done, self.timeout).await;
            self.metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            self.metrics.in_flight.sub(n as i64);
        }
    }

    /// Hands the batch to the sink, retrying what failed retryably; returns every message.
    async fn deliver(&self, info: &mut BatchInfo, mut messages: Custody<T>) -> Custody<T> {
        for m in messages.iter_mut() {
            m.attempts = 0;
        }
        let mut done = messages.empty();
        let mut stop = self.stop.clone();
        let mut last = false;
        loop {
            for m in messages.iter_mut() {
                m.attempts += 1;
            }
            info.size = messages.len();
            if let Some(failure) = self.attempt(info, &mut messages).await {
                for m in messages.iter_mut() {
                    if !m.is_failed() {
                        m.fail(failure.clone());
                    }
                }
            }
            if !messages.iter().any(Message::is_failed) {
                break;
            }
            let max = self.retry.max_attempts();
            let mut settled = messages.split_by(|m| {
                !last && m.failure().is_some_and(Failure::is_retryable) && m.attempts < max
            });
            done.extend(settled.take());
            if messages.is_empty() {
                break;
            }
            self.metrics.retried.inc_by(messages.len() as u64);
            for m in messages.iter_mut() {
                m.reset_status();
            }
            let delay = self.retry.delay(messages[0].attempts - 1);
            // Cut short by the drain: one last attempt, then whatever fails is final.
            last = !backoff(delay, &mut stop).await;
        }
        if done.is_empty() {
            return messages;
        }
        done.extend(messages.take());
        done
    }

    async fn attempt(&self, info: &BatchInfo, messages: &mut [Message<T>]) -> Option<Failure> {
        let call = AssertUnwindSafe(self.sink.handle_batch(info, messages)).catch_unwind();
        let outcome = match self.timeout {
            None => call.await,
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Some(Failure::retryable(format!(
                        "handle_batch timed out after {limit:?}"
                    )));
                }
            },
        };
        match outcome {
            Ok(Ok(())) => None,
            Ok(Err(failure)) => Some(failure),
            Err(panic) => Some(Failure::panicked("handle_batch", &*panic)),
        }
    }
}

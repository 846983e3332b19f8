//! The processor stage: a pool of workers that run the user's handler on each message, retry
//! retryable failures, and pass the results on to batchers (or straight to acknowledgement).
//!
//! A worker handles its chunk in order, one message after another, retries included: with
//! `partition_by`, all messages with one key go to one worker, so their order is kept. An async
//! handler ([`Processor`]) runs on the tokio worker; a CPU-bound one ([`CpuProcessor`]) runs on
//! the rayon pool so that it never stalls the async runtime.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::ack::{AckRef, Join};
use super::message::{BatcherName, Failure, Message, Route};
use super::producer::{Ask, Chunk};
use super::retry::{Delays, RetryPolicy};
use super::stage::Shared;
use super::telemetry::StageMetrics;

/// An async message handler, for handlers that wait on I/O.
///
/// Handlers change messages in place and cannot drop them: every message handed in comes out,
/// which is how the pipeline keeps its promise to acknowledge each one exactly once.
pub trait Processor<T>: Send + Sync + 'static {
    /// Runs once per chunk, before `handle_message`: a place to load what the whole chunk needs
    /// in one round trip.
    fn prepare_messages(&self, messages: &mut [Message<T>]) -> impl Future<Output = ()> + Send {
        let _ = messages;
        std::future::ready(())
    }

    /// Handles one message. A returned failure (or `message.fail(..)`) fails the message; a
    /// retryable one is retried under the processor's retry policy.
    fn handle_message(
        &self,
        message: &mut Message<T>,
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Sees the chunk's failed messages, after their last attempt and before they are
    /// acknowledged (and, when exhausted, dead-lettered).
    fn handle_failed(&self, messages: &mut [Message<T>]) -> impl Future<Output = ()> + Send {
        let _ = messages;
        std::future::ready(())
    }
}

/// A CPU-bound message handler: it runs on the rayon pool, never on the async runtime.
///
/// Work on rayon cannot be cancelled, so a per-message timeout cannot be set for it.
pub trait CpuProcessor<T>: Send + Sync + 'static {
    fn prepare_messages(&self, messages: &mut [Message<T>]) {
        let _ = messages;
    }

    fn handle_message(&self, message: &mut Message<T>) -> Result<(), Failure>;

    fn handle_failed(&self, messages: &mut [Message<T>]) {
        let _ = messages;
    }
}

/// How a processor retries and times out.
#[derive(Clone, Debug, Default)]
pub(crate) struct HandlerPolicy {
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
}

/// A handler, async or CPU-bound, seen a chunk at a time.
pub(crate) trait ChunkHandler<T>: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        messages: Vec<Message<T>>,
        policy: &'a HandlerPolicy,
        metrics: &'a StageMetrics,
    ) -> BoxFuture<'a, Vec<Message<T>>>;

    fn handle_failed(&self, failed: Vec<Message<T>>) -> BoxFuture<'_, Vec<Message<T>>>;
}

pub(crate) struct AsyncHandler<P>(pub P);

impl<T: Send + 'static, P: Processor<T>> ChunkHandler<T> for AsyncHandler<P> {
    fn run<'a>(
        &'a self,
        mut messages: Vec<Message<T>>,
        policy: &'a HandlerPolicy,
        metrics: &'a StageMetrics,
    ) -> BoxFuture<'a, Vec<Message<T>>> {
        Box::pin(async move {
            let prepared = AssertUnwindSafe(self.0.prepare_messages(&mut messages))
                .catch_unwind()
                .await;
            if let Err(panic) = prepared {
                let failure = Failure::permanent(format!(
                    "prepare_messages panicked: {}",
                    panic_message(&*panic)
                ));
                for m in &mut messages {
                    m.fail(failure.clone());
                }
                return messages;
            }
            for msg in &mut messages {
                self.handle_with_retry(msg, policy, metrics).await;
            }
            messages
        })
    }

    fn handle_failed(&self, mut failed: Vec<Message<T>>) -> BoxFuture<'_, Vec<Message<T>>> {
        Box::pin(async move {
            if AssertUnwindSafe(self.0.handle_failed(&mut failed))
                .catch_unwind()
                .await
                .is_err()
            {
                tracing::error!("handle_failed panicked; the messages are acknowledged as failed");
            }
            failed
        })
    }
}

impl<P> AsyncHandler<P> {
    async fn handle_with_retry<T>(
        &self,
        msg: &mut Message<T>,
        policy: &HandlerPolicy,
        metrics: &StageMetrics,
    ) where
        T: Send + 'static,
        P: Processor<T>,
    {
        if msg.is_failed() {
            return;
        }
        msg.attempts = 0;
        let mut delays: Option<Delays> = None;
        loop {
            msg.attempts += 1;
            let Some(failure) = self.attempt(msg, policy.timeout).await else {
                return;
            };
            if failure.is_retryable() && msg.attempts < policy.retry.max_attempts {
                let delay = delays
                    .get_or_insert_with(|| policy.retry.delays())
                    .next()
                    .unwrap_or_default();
                metrics.retried.inc();
                msg.reset_status();
                tokio::time::sleep(delay).await;
                continue;
            }
            msg.fail(failure);
            return;
        }
    }

    /// One call of the handler; the failure, if any.
    async fn attempt<T>(&self, msg: &mut Message<T>, timeout: Option<Duration>) -> Option<Failure>
    where
        T: Send + 'static,
        P: Processor<T>,
    {
        let call = AssertUnwindSafe(self.0.handle_message(msg)).catch_unwind();
        let outcome = match timeout {
            None => call.await,
            Some(limit) => match tokio::time::timeout(limit, call).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    return Some(Failure::retryable(format!(
                        "handle_message timed out after {limit:?}"
                    )));
                }
            },
        };
        match outcome {
            Ok(Ok(())) => msg.failure().cloned(),
            Ok(Err(failure)) => Some(failure),
            Err(panic) => Some(Failure::permanent(format!(
                "handle_message panicked: {}",
                panic_message(&*panic)
            ))),
        }
    }
}

/// Runs on rayon's global pool (size it with `rayon::ThreadPoolBuilder::build_global`).
pub(crate) struct RayonHandler<P> {
    pub processor: Arc<P>,
}

impl<P> RayonHandler<P> {
    /// Runs `job` on the rayon pool and waits for it without blocking the async runtime.
    async fn on_pool<R: Send + 'static>(&self, job: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = oneshot::channel();
        let job = move || {
            let _ = tx.send(job());
        };
        rayon::spawn(job);
        // Every user call inside `job` is wrapped in catch_unwind, so the job always answers.
        rx.await.expect("rayon job ended without a result")
    }
}

impl<T: Send + 'static, P: CpuProcessor<T>> ChunkHandler<T> for RayonHandler<P> {
    fn run<'a>(
        &'a self,
        messages: Vec<Message<T>>,
        policy: &'a HandlerPolicy,
        metrics: &'a StageMetrics,
    ) -> BoxFuture<'a, Vec<Message<T>>> {
        Box::pin(async move {
            let max_attempts = policy.retry.max_attempts;
            let mut messages = messages;
            let mut from = 0;
            let mut prepare = true;
            // The delays of the message being retried, and its index.
            let mut delays: Option<(usize, Delays)> = None;
            loop {
                let processor = self.processor.clone();
                let (back, retry_at) = self
                    .on_pool(move || {
                        if prepare {
                            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| {
                                processor.prepare_messages(&mut messages)
                            })) {
                                let failure = Failure::permanent(format!(
                                    "prepare_messages panicked: {}",
                                    panic_message(&*panic)
                                ));
                                for m in &mut messages {
                                    m.fail(failure.clone());
                                }
                                return (messages, None);
                            }
                            for m in &mut messages {
                                m.attempts = 0;
                            }
                        }
                        for i in from..messages.len() {
                            let msg = &mut messages[i];
                            if msg.is_failed() && msg.attempts == 0 {
                                continue;
                            }
                            msg.attempts += 1;
                            let outcome =
                                catch_unwind(AssertUnwindSafe(|| processor.handle_message(msg)));
                            let failure = match outcome {
                                Ok(Ok(())) => msg.failure().cloned(),
                                Ok(Err(failure)) => Some(failure),
                                Err(panic) => Some(Failure::permanent(format!(
                                    "handle_message panicked: {}",
                                    panic_message(&*panic)
                                ))),
                            };
                            let Some(failure) = failure else { continue };
                            if failure.is_retryable() && msg.attempts < max_attempts {
                                // Wait off the pool, then resume here: order is kept.
                                msg.reset_status();
                                return (messages, Some(i));
                            }
                            msg.fail(failure);
                        }
                        (messages, None)
                    })
                    .await;
                messages = back;
                prepare = false;
                let Some(i) = retry_at else {
                    return messages;
                };
                if delays.as_ref().is_none_or(|(at, _)| *at != i) {
                    delays = Some((i, policy.retry.delays()));
                }
                let delay = delays
                    .as_mut()
                    .and_then(|(_, d)| d.next())
                    .unwrap_or_default();
                metrics.retried.inc();
                tokio::time::sleep(delay).await;
                from = i;
            }
        })
    }

    fn handle_failed(&self, mut failed: Vec<Message<T>>) -> BoxFuture<'_, Vec<Message<T>>> {
        let processor = self.processor.clone();
        Box::pin(self.on_pool(move || {
            if catch_unwind(AssertUnwindSafe(|| processor.handle_failed(&mut failed))).is_err() {
                tracing::error!("handle_failed panicked; the messages are acknowledged as failed");
            }
            failed
        }))
    }
}

pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Where processed messages go: the batchers, by name.
pub(crate) struct Router<T> {
    pub batchers: Vec<(BatcherName, mpsc::Sender<Vec<Message<T>>>)>,
}

impl<T> Clone for Router<T> {
    fn clone(&self) -> Self {
        Self {
            batchers: self.batchers.clone(),
        }
    }
}

impl<T: Clone + Send + 'static> Router<T> {
    fn index_of(&self, name: &str) -> Option<usize> {
        self.batchers.iter().position(|(n, _)| &**n == name)
    }

    /// Sends each message to its batcher(s), or settles it when the pipeline has none.
    pub async fn route(
        &self,
        messages: Vec<Message<T>>,
        shared: &Shared<T>,
        metrics: &StageMetrics,
    ) {
        if self.batchers.is_empty() {
            shared.settle(metrics, messages).await;
            return;
        }
        let mut per_batcher: Vec<Vec<Message<T>>> =
            (0..self.batchers.len()).map(|_| Vec::new()).collect();
        // Messages that end here: routed nowhere, or failed for want of a batcher.
        let mut finished = Vec::new();
        // The common case, everything to the first batcher, moves the chunk as it is.
        let first = &self.batchers[0].0;
        let all_to_first = messages.iter().all(|m| match &m.route {
            Route::Default => true,
            Route::One(name) => name == first,
            Route::Many(_) | Route::Done => false,
        });
        let spread = if all_to_first {
            per_batcher[0] = messages;
            Vec::new()
        } else {
            messages
        };
        for mut msg in spread {
            match std::mem::take(&mut msg.route) {
                Route::Done => finished.push(msg),
                Route::Default => per_batcher[0].push(msg),
                Route::One(name) => match self.index_of(&name) {
                    Some(i) => {
                        msg.route = Route::One(name);
                        per_batcher[i].push(msg);
                    }
                    None => {
                        msg.fail(unknown_batcher(&name));
                        finished.push(msg);
                    }
                },
                Route::Many(names) => {
                    let join =
                        Join::new(names.len(), std::mem::replace(&mut msg.ack, AckRef::None));
                    let (last, rest) = names.split_last().expect("fan-out names are never empty");
                    for name in rest {
                        let mut copy = msg.branch(AckRef::Branch(join.clone()), name.clone());
                        match self.index_of(name) {
                            Some(i) => per_batcher[i].push(copy),
                            None => {
                                copy.fail(unknown_batcher(name));
                                finished.push(copy);
                            }
                        }
                    }
                    msg.ack = AckRef::Branch(join);
                    msg.route = Route::One(last.clone());
                    match self.index_of(last) {
                        Some(i) => per_batcher[i].push(msg),
                        None => {
                            msg.fail(unknown_batcher(last));
                            finished.push(msg);
                        }
                    }
                }
            }
        }
        for (i, batch) in per_batcher.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            if let Err(lost) = self.batchers[i].1.send(batch).await {
                let mut messages = lost.0;
                for m in &mut messages {
                    m.fail(Failure::permanent("the batcher stopped"));
                }
                finished.extend(messages);
            }
        }
        if !finished.is_empty() {
            shared.settle(metrics, finished).await;
        }
    }
}

fn unknown_batcher(name: &str) -> Failure {
    Failure::permanent(format!("no batcher is named {name:?}"))
}

/// One worker of the processor pool.
pub(crate) struct ProcessorWorker<T> {
    pub index: usize,
    pub inbox: mpsc::UnboundedReceiver<Chunk<T>>,
    /// One per producer.
    pub asks: Vec<mpsc::UnboundedSender<Ask>>,
    pub max_demand: usize,
    pub min_demand: usize,
    pub handler: Arc<dyn ChunkHandler<T>>,
    pub policy: Arc<HandlerPolicy>,
    pub router: Router<T>,
    pub shared: Arc<Shared<T>>,
    pub metrics: StageMetrics,
}

impl<T: Clone + Send + 'static> ProcessorWorker<T> {
    pub async fn run(mut self) {
        // What each producer still owes this worker.
        let mut owed = vec![self.max_demand; self.asks.len()];
        for ask in &self.asks {
            let _ = ask.send(Ask {
                worker: self.index,
                n: self.max_demand,
            });
        }
        while let Some(Chunk { producer, messages }) = self.inbox.recv().await {
            let n = messages.len();
            owed[producer] -= n;
            self.metrics.received.inc_by(n as u64);
            self.metrics.in_flight.add(n as i64);
            let started = std::time::Instant::now();

            let mut messages = self
                .handler
                .run(messages, &self.policy, &self.metrics)
                .await;
            if messages.iter().any(Message::is_failed) {
                let (failed, ok): (Vec<_>, Vec<_>) =
                    messages.into_iter().partition(Message::is_failed);
                let failed = self.handler.handle_failed(failed).await;
                self.shared.settle(&self.metrics, failed).await;
                messages = ok;
            }
            self.metrics.sent.inc_by(messages.len() as u64);
            self.router
                .route(messages, &self.shared, &self.metrics)
                .await;
            self.metrics
                .duration
                .observe(started.elapsed().as_secs_f64());
            self.metrics.in_flight.sub(n as i64);

            if owed[producer] <= self.min_demand {
                let n = self.max_demand - owed[producer];
                owed[producer] = self.max_demand;
                // A producer that has finished no longer listens; that is fine.
                let _ = self.asks[producer].send(Ask {
                    worker: self.index,
                    n,
                });
            }
        }
    }
}

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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::ack::{AckRef, Join};
use super::message::{BatcherName, Failure, Message, Route};
use super::producer::{Chunk, Signal};
use super::retry::{RetryPolicy, backoff};
use super::stage::{Custody, Shared, draining, later, within};
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
    /// Retries wait inside the handler, in order (with `partition_by`); otherwise a message
    /// waiting to retry is set aside by its worker and the messages behind it go on.
    pub inline_retries: bool,
}

/// What one run of a handler over some messages needs besides them.
pub(crate) struct Run<'a> {
    pub policy: &'a HandlerPolicy,
    pub metrics: &'a StageMetrics,
    /// Runs `prepare_messages` first (a new chunk; not a retry).
    pub prepare: bool,
    /// The drain: once it starts, a retry wait is cut short for one last attempt.
    pub stop: watch::Receiver<bool>,
}

/// A handler, async or CPU-bound, seen a chunk at a time.
pub(crate) trait ChunkHandler<T: Send + 'static>: Send + Sync + 'static {
    /// Makes an attempt at each message not already failed. A retryable failure with attempts
    /// left is retried here when retries are inline, and otherwise left failed for the worker
    /// to retry later.
    fn run<'a>(&'a self, messages: Custody<T>, run: Run<'a>) -> BoxFuture<'a, Custody<T>>;

    /// `handle_failed`, under the processor's timeout.
    fn handle_failed<'a>(
        &'a self,
        failed: Custody<T>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Custody<T>>;
}

/// Whether a failure earns another attempt in this stage. A message failed before its first
/// attempt (its chunk's `prepare_messages` failed) has none to repeat.
fn retries(failure: &Failure, attempts: u32, policy: &RetryPolicy) -> bool {
    failure.is_retryable() && attempts > 0 && attempts < policy.max_attempts()
}

fn fail_all<T>(messages: &mut [Message<T>], failure: Failure) {
    for m in messages {
        m.fail(failure.clone());
    }
}

pub(crate) struct AsyncHandler<P>(pub P);

impl<T: Send + 'static, P: Processor<T>> ChunkHandler<T> for AsyncHandler<P> {
    fn run<'a>(&'a self, mut messages: Custody<T>, mut run: Run<'a>) -> BoxFuture<'a, Custody<T>> {
        Box::pin(async move {
            if run.prepare {
                let call = AssertUnwindSafe(self.0.prepare_messages(&mut messages)).catch_unwind();
                let failure = match run.policy.timeout {
                    None => call.await.err().map(|panic| (panic, None)),
                    Some(limit) => match tokio::time::timeout(limit, call).await {
                        Ok(outcome) => outcome.err().map(|panic| (panic, None)),
                        Err(_) => Some((Box::new(()) as Box<_>, Some(limit))),
                    },
                };
                if let Some((panic, timed_out)) = failure {
                    let failure = match timed_out {
                        Some(limit) => Failure::retryable(format!(
                            "prepare_messages timed out after {limit:?}"
                        )),
                        None => Failure::panicked("prepare_messages", &*panic),
                    };
                    fail_all(&mut messages, failure);
                    return messages;
                }
            }
            for msg in messages.iter_mut() {
                if !msg.is_failed() {
                    self.handle_with_retry(msg, &mut run).await;
                }
            }
            messages
        })
    }

    fn handle_failed<'a>(
        &'a self,
        mut failed: Custody<T>,
        timeout: Option<Duration>,
    ) -> BoxFuture<'a, Custody<T>> {
        Box::pin(async move {
            let call = async {
                if AssertUnwindSafe(self.0.handle_failed(&mut failed))
                    .catch_unwind()
                    .await
                    .is_err()
                {
                    tracing::error!(
                        "handle_failed panicked; the messages are acknowledged as failed"
                    );
                }
            };
            if !within(timeout, call).await {
                tracing::error!(
                    "handle_failed timed out after {timeout:?}; the messages are acknowledged \
                     as failed"
                );
            }
            failed
        })
    }
}

impl<P> AsyncHandler<P> {
    async fn handle_with_retry<T>(&self, msg: &mut Message<T>, run: &mut Run<'_>)
    where
        T: Send + 'static,
        P: Processor<T>,
    {
        let policy = run.policy;
        let mut last = false;
        loop {
            msg.attempts += 1;
            let Some(failure) = self.attempt(msg, policy.timeout).await else {
                return;
            };
            if policy.inline_retries && !last && retries(&failure, msg.attempts, &policy.retry) {
                run.metrics.retried.inc();
                msg.reset_status();
                let delay = policy.retry.delay(msg.attempts - 1);
                last = !backoff(delay, &mut run.stop).await;
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
            Err(panic) => Some(Failure::panicked("handle_message", &*panic)),
        }
    }
}

/// Runs on rayon's global pool (size it with `rayon::ThreadPoolBuilder::build_global`).
pub(crate) struct RayonHandler<P> {
    pub processor: Arc<P>,
}

/// Runs `job` on the rayon pool and waits for it without blocking the async runtime. If the
/// waiting task is aborted, the job's result is dropped when it is sent: messages in it are in
/// custody, so they are acknowledged as abandoned, not lost.
async fn on_pool<R: Send + 'static>(job: impl FnOnce() -> R + Send + 'static) -> R {
    let (tx, rx) = oneshot::channel();
    rayon::spawn(move || {
        let _ = tx.send(job());
    });
    // Every user call inside `job` is wrapped in catch_unwind, so the job always answers.
    rx.await.expect("rayon job ended without a result")
}

impl<T: Send + 'static, P: CpuProcessor<T>> ChunkHandler<T> for RayonHandler<P> {
    fn run<'a>(&'a self, messages: Custody<T>, mut run: Run<'a>) -> BoxFuture<'a, Custody<T>> {
        Box::pin(async move {
            let retry = run.policy.retry.clone();
            let inline = run.policy.inline_retries;
            let mut messages = messages;
            let mut from = 0;
            let mut prepare = run.prepare;
            let mut last = false;
            loop {
                let processor = self.processor.clone();
                let policy = retry.clone();
                // After a wait cut short by the drain, the message resumed at gets one last try.
                let last_at = last.then_some(from);
                let (back, retry_at) = on_pool(move || {
                    if prepare
                        && let Err(panic) = catch_unwind(AssertUnwindSafe(|| {
                            processor.prepare_messages(&mut messages)
                        }))
                    {
                        let failure = Failure::panicked("prepare_messages", &*panic);
                        fail_all(&mut messages, failure);
                        return (messages, None);
                    }
                    for i in from..messages.len() {
                        let msg = &mut messages[i];
                        if msg.is_failed() {
                            continue;
                        }
                        msg.attempts += 1;
                        let outcome =
                            catch_unwind(AssertUnwindSafe(|| processor.handle_message(msg)));
                        let failure = match outcome {
                            Ok(Ok(())) => msg.failure().cloned(),
                            Ok(Err(failure)) => Some(failure),
                            Err(panic) => Some(Failure::panicked("handle_message", &*panic)),
                        };
                        let Some(failure) = failure else { continue };
                        if inline && last_at != Some(i) && retries(&failure, msg.attempts, &policy)
                        {
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
                run.metrics.retried.inc();
                let delay = retry.delay(messages[i].attempts - 1);
                last = !backoff(delay, &mut run.stop).await;
                from = i;
            }
        })
    }

    fn handle_failed<'a>(
        &'a self,
        mut failed: Custody<T>,
        _timeout: Option<Duration>,
    ) -> BoxFuture<'a, Custody<T>> {
        // Work on rayon cannot be cancelled: CPU-bound processors have no timeout.
        let processor = self.processor.clone();
        Box::pin(on_pool(move || {
            if catch_unwind(AssertUnwindSafe(|| processor.handle_failed(&mut failed))).is_err() {
                tracing::error!("handle_failed panicked; the messages are acknowledged as failed");
            }
            failed
        }))
    }
}

/// Where processed messages go: the batchers, by name.
pub(crate) struct Router<T: Send + 'static> {
    pub batchers: Vec<(BatcherName, mpsc::Sender<Custody<T>>)>,
}

impl<T: Send + 'static> Clone for Router<T> {
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

    /// Sends each message to its batcher(s), or settles it when the pipeline has none. A
    /// batch for a batcher that is gone is dropped, and so acknowledged as abandoned.
    pub async fn route(
        &self,
        mut messages: Custody<T>,
        shared: &Shared<T>,
        metrics: &StageMetrics,
        timeout: Option<Duration>,
    ) {
        if self.batchers.is_empty() {
            shared.settle(metrics, messages, timeout).await;
            return;
        }
        let mut per_batcher: Vec<Custody<T>> =
            (0..self.batchers.len()).map(|_| messages.empty()).collect();
        // Messages that end here: routed nowhere, or failed for want of a batcher.
        let mut finished = messages.empty();
        // The common case, everything to the first batcher, moves the chunk as it is.
        let first = &self.batchers[0].0;
        let all_to_first = messages.iter().all(|m| match &m.route {
            Route::Default => true,
            Route::One(name) => name == first,
            Route::Many(_) | Route::Done => false,
        });
        if all_to_first {
            per_batcher[0] = messages.take_all();
        }
        for mut msg in messages.take() {
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
            if !batch.is_empty() {
                let _ = self.batchers[i].1.send(batch).await;
            }
        }
        if !finished.is_empty() {
            shared.settle(metrics, finished, timeout).await;
        }
    }
}

fn unknown_batcher(name: &str) -> Failure {
    Failure::permanent(format!("no batcher is named {name:?}"))
}

/// One worker of the processor pool.
pub(crate) struct ProcessorWorker<T: Send + 'static> {
    pub index: usize,
    /// The resize this worker came from (0: the pool's start).
    pub generation: u64,
    pub inbox: mpsc::UnboundedReceiver<Chunk<T>>,
    /// One per producer.
    pub asks: Vec<mpsc::UnboundedSender<Signal<T>>>,
    /// Held while the worker runs: the next generation's workers wait for every worker of this
    /// one to drop it, when the pipeline is partitioned.
    pub _alive: watch::Receiver<()>,
    pub max_demand: usize,
    pub min_demand: usize,
    pub handler: Arc<dyn ChunkHandler<T>>,
    pub policy: Arc<HandlerPolicy>,
    pub router: Router<T>,
    pub stop: watch::Receiver<bool>,
    pub shared: Arc<Shared<T>>,
    pub metrics: StageMetrics,
}

/// Messages a worker set aside to retry later, with when each is due.
struct Waiting<T: Send + 'static> {
    messages: Custody<T>,
    due: Vec<Instant>,
}

impl<T: Clone + Send + 'static> ProcessorWorker<T> {
    pub async fn run(mut self) {
        // What each producer still owes this worker: producers count a new worker's first ask
        // themselves.
        let mut owed = vec![self.max_demand; self.asks.len()];
        let mut waiting = Waiting {
            messages: Custody::new(&self.shared, Vec::new()),
            due: Vec::new(),
        };
        let mut inbox_open = true;
        let mut stop = self.stop.clone();
        while inbox_open || !waiting.due.is_empty() {
            let next_due = waiting.due.iter().min().copied();
            tokio::select! {
                biased;
                // The drain: whatever waits to retry is due now, for one last attempt.
                () = async { let _ = stop.wait_for(|&s| s).await; }, if next_due.is_some() => {
                    let now = Instant::now();
                    waiting.due.iter_mut().for_each(|d| *d = now);
                    self.retry_due(&mut waiting).await;
                }
                () = async {
                    match next_due {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                }, if next_due.is_some() => self.retry_due(&mut waiting).await,
                chunk = self.inbox.recv(), if inbox_open => {
                    let Some(Chunk { producer, mut messages }) = chunk else {
                        inbox_open = false;
                        continue;
                    };
                    let n = messages.len();
                    owed[producer] -= n;
                    self.metrics.received.inc_by(n as u64);
                    self.metrics.in_flight.add(n as i64);
                    for m in messages.iter_mut() {
                        m.attempts = 0;
                    }
                    self.handle(messages, true, &mut waiting).await;
                    if owed[producer] <= self.min_demand {
                        let n = self.max_demand - owed[producer];
                        owed[producer] = self.max_demand;
                        // A producer that has finished no longer listens; that is fine.
                        let _ = self.asks[producer].send(Signal::Ask {
                            generation: self.generation,
                            worker: self.index,
                            n,
                        });
                    }
                }
            }
        }
    }

    /// Retries the messages whose wait is over, in the order they were set aside.
    async fn retry_due(&self, waiting: &mut Waiting<T>) {
        let now = Instant::now();
        let mut due = waiting.messages.empty();
        let mut kept = waiting.messages.empty();
        let mut kept_due = Vec::new();
        for (msg, at) in waiting
            .messages
            .take()
            .into_iter()
            .zip(waiting.due.drain(..))
        {
            if at <= now {
                due.push(msg);
            } else {
                kept.push(msg);
                kept_due.push(at);
            }
        }
        waiting.messages = kept;
        waiting.due = kept_due;
        for m in due.iter_mut() {
            m.reset_status();
        }
        self.handle(due, false, waiting).await;
    }

    /// Runs the handler over `messages`, sets aside those to retry later, and sends the rest
    /// on: failed ones to `handle_failed` and acknowledgement, the others to their batchers.
    async fn handle(&self, messages: Custody<T>, prepare: bool, waiting: &mut Waiting<T>) {
        let started = std::time::Instant::now();
        let run = Run {
            policy: &self.policy,
            metrics: &self.metrics,
            prepare,
            stop: self.stop.clone(),
        };
        let mut messages = self.handler.run(messages, run).await;
        if messages.iter().any(Message::is_failed) {
            let mut failed = messages.split_by(|m| !m.is_failed());
            if !self.policy.inline_retries && !draining(&self.stop) {
                let policy = &self.policy.retry;
                let mut again = failed
                    .split_by(|m| !m.failure().is_some_and(|f| retries(f, m.attempts, policy)));
                let now = Instant::now();
                for m in again.iter() {
                    waiting.due.push(later(now, policy.delay(m.attempts - 1)));
                }
                self.metrics.retried.inc_by(again.len() as u64);
                waiting.messages.extend(again.take());
            }
            if !failed.is_empty() {
                let n = failed.len();
                let failed = self
                    .handler
                    .handle_failed(failed, self.policy.timeout)
                    .await;
                self.shared
                    .settle(&self.metrics, failed, self.policy.timeout)
                    .await;
                self.metrics.in_flight.sub(n as i64);
            }
        }
        let n = messages.len();
        self.metrics.sent.inc_by(n as u64);
        self.router
            .route(messages, &self.shared, &self.metrics, self.policy.timeout)
            .await;
        self.metrics.in_flight.sub(n as i64);
        self.metrics
            .duration
            .observe(started.elapsed().as_secs_f64());
    }
}

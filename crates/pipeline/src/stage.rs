//! What every stage shares: the in-flight bound, the dead-letter sink, the totals, the one path
//! by which a message leaves the pipeline (`settle`), and the custody that catches any message
//! dropped on another path.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::watch;
use tokio::time::Instant;

use super::ack::acknowledge;
use super::flow::InFlight;
use super::message::{Failure, Message};
use super::sink::DynDeadLetter;
use super::telemetry::StageMetrics;

pub(crate) struct Shared<T> {
    pub pipeline: String,
    pub in_flight: InFlight,
    pub dead_letter: Option<Arc<dyn DynDeadLetter<T>>>,
    /// Permanent failures go to the dead-letter sink too, not only exhausted retryable ones.
    pub dead_letter_permanent: bool,
    pub produced: AtomicU64,
    pub successful: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub abandoned: AtomicU64,
    pub abandoned_metric: IntCounter,
    /// Messages producers handed over while draining that still wait for a permit.
    pub held: AtomicUsize,
}

impl<T: Send + 'static> Shared<T> {
    pub fn new(
        pipeline: String,
        in_flight_bound: usize,
        dead_letter: Option<Arc<dyn DynDeadLetter<T>>>,
        dead_letter_permanent: bool,
        abandoned_metric: IntCounter,
    ) -> Self {
        Self {
            pipeline,
            in_flight: InFlight::new(in_flight_bound),
            dead_letter,
            dead_letter_permanent,
            produced: AtomicU64::new(0),
            successful: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
            abandoned_metric,
            held: AtomicUsize::new(0),
        }
    }

    /// Messages handed out by producers and not yet acknowledged.
    pub fn in_flight_now(&self) -> usize {
        let produced = self.produced.load(Ordering::Acquire);
        let settled = self.successful.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire);
        produced.saturating_sub(settled) as usize
    }

    fn goes_to_dead_letters(&self, m: &Message<T>) -> bool {
        m.failure()
            .is_some_and(|f| f.is_retryable() || self.dead_letter_permanent)
    }

    /// Ends the journey of `messages` at `stage`: failures that ran out of attempts (and, with
    /// `dead_letter_permanent`, permanent ones) go to the dead-letter sink first, under the
    /// stage's `timeout`; then everything is acknowledged and its permit freed.
    pub async fn settle(
        &self,
        stage: &StageMetrics,
        mut messages: Custody<T>,
        timeout: Option<Duration>,
    ) {
        let failed = messages.iter().filter(|m| m.is_failed()).count();
        if failed > 0 {
            stage.failed.inc_by(failed as u64);
            if let Some(dead_letter) = &self.dead_letter {
                messages.sort_by_key(|m| !self.goes_to_dead_letters(m));
                let dead = messages
                    .iter()
                    .take_while(|m| self.goes_to_dead_letters(m))
                    .count();
                if dead > 0 {
                    let call = dead_letter.dead_letter(&stage.name, &mut messages[..dead]);
                    if !within(timeout, call).await {
                        tracing::error!(
                            pipeline = %self.pipeline, stage = %stage.name,
                            "the dead-letter sink timed out after {timeout:?}; its messages are \
                             acknowledged as failed"
                        );
                    }
                    for m in &mut messages[..dead] {
                        m.dead_lettered = true;
                    }
                    stage.dead_lettered.inc_by(dead as u64);
                }
            }
        }
        let settled = acknowledge(messages.take());
        self.count(settled);
        self.in_flight.release(settled.total());
    }

    fn count(&self, settled: super::ack::Settled) {
        self.successful
            .fetch_add(settled.successful as u64, Ordering::Relaxed);
        self.failed
            .fetch_add(settled.failed as u64, Ordering::Relaxed);
        self.dead_lettered
            .fetch_add(settled.dead_lettered as u64, Ordering::Relaxed);
    }

    /// Acknowledges as failed messages dropped outside `settle`. `permits` says whether they
    /// hold in-flight permits (drained messages waiting for one do not).
    fn abandon(&self, mut messages: Vec<Message<T>>, permits: bool) {
        let n = messages.len();
        tracing::error!(
            pipeline = %self.pipeline,
            "{n} message(s) dropped before acknowledgement: acknowledged as failed"
        );
        for m in &mut messages {
            if !m.is_failed() {
                m.fail(Failure::abandoned());
            }
        }
        if !permits {
            self.held.fetch_sub(n, Ordering::Relaxed);
            self.produced.fetch_add(n as u64, Ordering::Relaxed);
        }
        let settled = acknowledge(messages);
        self.abandoned.fetch_add(n as u64, Ordering::Relaxed);
        self.abandoned_metric.inc_by(n as u64);
        self.count(settled);
        if permits {
            self.in_flight.release(settled.total());
        }
    }
}

/// Runs `call` within `timeout` (if any); false when it timed out.
pub(crate) async fn within(timeout: Option<Duration>, call: impl Future<Output = ()>) -> bool {
    match timeout {
        None => {
            call.await;
            true
        }
        Some(limit) => tokio::time::timeout(limit, call).await.is_ok(),
    }
}

/// Messages in the pipeline's custody. Every container that holds messages between stages (a
/// producer's ready queue, a chunk, an open batch, a batch in a sink) is one, so that a message
/// dropped anywhere but through `settle` (a task aborted at the drain deadline, a panic in the
/// engine) is still acknowledged, as failed, exactly once, and its permit returned.
pub(crate) struct Custody<T: Send + 'static> {
    messages: Vec<Message<T>>,
    shared: Arc<Shared<T>>,
    /// Whether the messages hold in-flight permits.
    permits: bool,
}

impl<T: Send + 'static> Custody<T> {
    /// Messages holding in-flight permits.
    pub fn new(shared: &Arc<Shared<T>>, messages: Vec<Message<T>>) -> Self {
        Self {
            messages,
            shared: shared.clone(),
            permits: true,
        }
    }

    /// Messages taken from a draining producer, not yet given permits.
    pub fn unpermitted(shared: &Arc<Shared<T>>) -> Self {
        Self {
            messages: Vec::new(),
            shared: shared.clone(),
            permits: false,
        }
    }

    /// An empty custody of the same kind.
    pub fn empty(&self) -> Self {
        Self {
            messages: Vec::new(),
            shared: self.shared.clone(),
            permits: self.permits,
        }
    }

    /// Takes the messages out of custody: the caller settles or re-wraps them.
    pub fn take(&mut self) -> Vec<Message<T>> {
        std::mem::take(&mut self.messages)
    }

    /// Moves every message into a custody of their own, leaving this one empty. Unlike
    /// `split_off(0)`, which copies every message into a new buffer, it moves the buffer.
    pub fn take_all(&mut self) -> Self {
        Self {
            messages: self.take(),
            shared: self.shared.clone(),
            permits: self.permits,
        }
    }

    /// Splits off the messages from `at` on, into a custody of their own.
    pub fn split_off(&mut self, at: usize) -> Self {
        Self {
            messages: self.messages.split_off(at),
            shared: self.shared.clone(),
            permits: self.permits,
        }
    }

    /// Splits the messages by `pred`: those it holds for stay, the rest come back.
    pub fn split_by(&mut self, pred: impl Fn(&Message<T>) -> bool) -> Self {
        let (keep, rest): (Vec<_>, Vec<_>) = self.take().into_iter().partition(pred);
        self.messages = keep;
        let mut other = self.empty();
        other.messages = rest;
        other
    }
}

impl<T: Send + 'static> Deref for Custody<T> {
    type Target = Vec<Message<T>>;

    fn deref(&self) -> &Vec<Message<T>> {
        &self.messages
    }
}

impl<T: Send + 'static> DerefMut for Custody<T> {
    fn deref_mut(&mut self) -> &mut Vec<Message<T>> {
        &mut self.messages
    }
}

impl<T: Send + 'static> Drop for Custody<T> {
    fn drop(&mut self) {
        if !self.messages.is_empty() {
            let messages = self.take();
            self.shared.abandon(messages, self.permits);
        }
    }
}

/// Whether the drain has begun: the stop flag is up, or the pipeline handle is gone.
pub(crate) fn draining(stop: &watch::Receiver<bool>) -> bool {
    let up = *stop.borrow();
    up || stop.has_changed().is_err()
}

/// `now + d`, where a duration too long to add (`Duration::MAX` says "never") gives a point
/// about thirty years on, as tokio's own timers do.
pub(crate) fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

/// Sleeps until `at`, or forever when there is no `at`.
pub(crate) async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

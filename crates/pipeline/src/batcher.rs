//! The batcher stage: groups processed messages by batch key into batches for a sink.
//!
//! A batch leaves when it reaches `batch_size` (trigger `size`), when `batch_timeout` has passed
//! since its first message (trigger `timeout`; the timer is never reset), when a message in
//! `Flush` mode joins it, or when the pipeline drains (both trigger `flush`). With group commit,
//! a batch also leaves as soon as one of its sink workers is idle (trigger `idle`): under light
//! load each batch is small and leaves at once, under heavy load batches fill while every
//! worker is busy, so size and timeout stay the upper bounds and nothing waits for a timer
//! while a worker could take it. A `batch_timeout` too long to add to the clock
//! (`Duration::MAX`) means never: such batches leave by size, flush or idle workers only.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustc_hash::FxHashMap as HashMap;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::message::{BatchKey, BatchMode, BatcherName};
use super::stage::{Custody, later};
use super::telemetry::{BatchSizeMetrics, StageMetrics};

/// What sent a batch out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    Size,
    Timeout,
    Flush,
    /// A sink worker was idle (group commit).
    Idle,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Size => "size",
            Self::Timeout => "timeout",
            Self::Flush => "flush",
            Self::Idle => "idle",
        })
    }
}

/// How many of a batcher's sink workers wait for a batch, and a wake-up for the batcher when
/// one starts waiting. Only batchers with group commit look at it.
#[derive(Default)]
pub(crate) struct IdleWorkers {
    waiting: AtomicUsize,
    started_waiting: Notify,
}

impl IdleWorkers {
    pub fn waiting(&self) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        self.started_waiting.notify_one();
    }

    pub fn busy(&self) {
        self.waiting.fetch_sub(1, Ordering::AcqRel);
    }

    fn count(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// What a sink is told about the batch it handles.
#[derive(Clone, Debug)]
pub struct BatchInfo {
    pub batcher: BatcherName,
    pub batch_key: BatchKey,
    /// Messages in this call (fewer than the batch when retrying part of it).
    pub size: usize,
    pub trigger: Trigger,
}

pub(crate) struct Batch<T: Send + 'static> {
    pub info: BatchInfo,
    pub messages: Custody<T>,
}

struct Open<T: Send + 'static> {
    messages: Custody<T>,
    generation: u64,
}

/// Drops the deadlines of batches that already left by size or flush, so that the queue holds
/// about as many entries as there are open batches, not as many as left within one timeout.
fn forget_left_batches<T: Send + 'static>(
    open: &HashMap<BatchKey, Open<T>>,
    deadlines: &mut VecDeque<(Instant, u64, BatchKey)>,
) {
    let live = |(_, generation, key): &(Instant, u64, BatchKey)| {
        open.get(key).is_some_and(|b| b.generation == *generation)
    };
    while deadlines.front().is_some_and(|d| !live(d)) {
        deadlines.pop_front();
    }
    // A long-lived batch at the front keeps stale entries behind it; compacting once they
    // outnumber the open batches keeps the cost amortised constant.
    if deadlines.len() > 2 * open.len() + 64 {
        deadlines.retain(live);
    }
}

pub(crate) struct BatcherStage<T: Send + 'static> {
    pub name: BatcherName,
    pub batch_size: usize,
    pub batch_timeout: Duration,
    pub inbox: mpsc::Receiver<Custody<T>>,
    pub out: mpsc::Sender<Batch<T>>,
    /// Group commit: the sink workers that wait, when batches leave as soon as one does.
    pub idle: Option<Arc<IdleWorkers>>,
    pub metrics: StageMetrics,
    pub sizes: BatchSizeMetrics,
    pub stop: watch::Receiver<bool>,
}

impl<T: Send + 'static> BatcherStage<T> {
    pub async fn run(mut self) {
        // Fx, not SipHash: keys come from our own pipeline, and this lookup runs per message.
        let mut open: HashMap<BatchKey, Open<T>> = HashMap::default();
        // Every batch has the same timeout, so deadlines come due in the order batches opened.
        // Entries of batches that already left are skipped by their generation.
        let mut deadlines: VecDeque<(Instant, u64, BatchKey)> = VecDeque::new();
        let mut generation = 0u64;
        let timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(timer);
        // Sealed batches on their way to the sinks. The batcher goes on taking messages while
        // its sinks are busy (the in-flight bound, not this queue, limits how many wait), so a
        // slow sink slows the producers without stopping the pipeline's other batchers.
        let mut ready: VecDeque<Batch<T>> = VecDeque::new();
        let mut draining = false;
        let mut stop = self.stop.clone();

        loop {
            let next_deadline = deadlines.front().map(|d| d.0);
            if let Some(at) = next_deadline
                && timer.deadline() != at
            {
                timer.as_mut().reset(at);
            }
            tokio::select! {
                biased;
                () = async { let _ = stop.wait_for(|&s| s).await; }, if !draining => {
                    draining = true;
                }
                chunk = self.inbox.recv() => {
                    let Some(mut chunk) = chunk else { break };
                    let n = chunk.len() as i64;
                    self.metrics.received.inc_by(n as u64);
                    self.metrics.in_flight.add(n);
                    let empty = chunk.empty();
                    let mut messages = chunk.take().into_iter();
                    // Messages move in runs that share a batch: one copy each, straight into
                    // the batch, instead of one out of the chunk and another into the batch.
                    while let Some(first) = messages.as_slice().first() {
                        let key = first.batch_key().clone();
                        let batch = match open.entry(key.clone()) {
                            Entry::Occupied(batch) => batch.into_mut(),
                            Entry::Vacant(slot) => {
                                generation += 1;
                                deadlines.push_back((
                                    later(Instant::now(), self.batch_timeout),
                                    generation,
                                    slot.key().clone(),
                                ));
                                // Room for what comes, as it comes: a batch's whole size
                                // up front (256 broadcasts of ~450 bytes: 112 KiB) would be
                                // allocated for the one message an idle zone's batch holds.
                                let messages = empty.empty();
                                slot.insert(Open { messages, generation })
                            }
                        };
                        let room = self.batch_size.saturating_sub(batch.messages.len()).max(1);
                        let (mut run, mut flush) = (0, false);
                        for m in messages.as_slice().iter().take(room) {
                            if *m.batch_key() != key {
                                break;
                            }
                            run += 1;
                            if m.batch_mode() == BatchMode::Flush {
                                flush = true;
                                break;
                            }
                        }
                        batch.messages.extend(messages.by_ref().take(run));
                        if batch.messages.len() >= self.batch_size || flush {
                            let trigger = if batch.messages.len() >= self.batch_size {
                                Trigger::Size
                            } else {
                                Trigger::Flush
                            };
                            let batch = open.remove(&key).expect("the batch is open");
                            ready.push_back(self.seal(key, batch.messages, trigger));
                        }
                    }
                    // Under steady load the timer arm may not get polled: check it here too.
                    if next_deadline.is_some_and(|at| at <= Instant::now()) {
                        self.expire(&mut open, &mut deadlines, &mut ready);
                    }
                }
                () = &mut timer, if next_deadline.is_some() => {
                    self.expire(&mut open, &mut deadlines, &mut ready);
                }
                () = async {
                    match &self.idle {
                        Some(idle) => idle.started_waiting.notified().await,
                        None => std::future::pending().await,
                    }
                }, if self.idle.is_some() && !open.is_empty() => {}
                // Room for several batches at once: the sinks then wake this batcher once per
                // few batches they take, not once per batch.
                permits = self.out.reserve_many(
                    ready.len().min(self.out.max_capacity() / 4).max(1)
                ), if !ready.is_empty() => match permits {
                    Ok(permits) => {
                        for permit in permits {
                            let batch = ready.pop_front().expect("one permit per ready batch");
                            self.count_sent(&batch);
                            permit.send(batch);
                        }
                    }
                    // The sinks are gone (they can only have been aborted): what waits for
                    // them is abandoned.
                    Err(_) => ready.clear(),
                },
            }
            self.to_idle_workers(&mut open, &mut deadlines, &mut ready);
            // While draining, no batch waits for its timeout once nothing more is queued: the
            // messages it holds may be the permits the producers need to finish.
            if draining && self.inbox.is_empty() {
                self.flush_all(&mut open, &mut deadlines, &mut ready);
            }
            forget_left_batches(&open, &mut deadlines);
            while !ready.is_empty() {
                match self.out.try_reserve() {
                    Ok(permit) => {
                        let batch = ready.pop_front().expect("checked non-empty");
                        self.count_sent(&batch);
                        permit.send(batch);
                    }
                    Err(mpsc::error::TrySendError::Full(())) => break,
                    Err(mpsc::error::TrySendError::Closed(())) => ready.clear(),
                }
            }
        }

        // The inputs are closed: every open batch leaves now.
        self.flush_all(&mut open, &mut deadlines, &mut ready);
        for batch in ready.drain(..) {
            self.count_sent(&batch);
            let _ = self.out.send(batch).await;
        }
    }

    /// Group commit: while sink workers wait and none of them has a batch queued, the oldest
    /// open batches leave now, one per waiting worker.
    fn to_idle_workers(
        &self,
        open: &mut HashMap<BatchKey, Open<T>>,
        deadlines: &mut VecDeque<(Instant, u64, BatchKey)>,
        ready: &mut VecDeque<Batch<T>>,
    ) {
        let Some(idle) = &self.idle else { return };
        // Batches already queued, or waiting to be, go to the waiting workers first.
        let queued = self.out.max_capacity() - self.out.capacity() + ready.len();
        let mut free = idle.count().saturating_sub(queued);
        while free > 0 {
            let Some((_, generation, key)) = deadlines.pop_front() else {
                break;
            };
            if open.get(&key).is_some_and(|b| b.generation == generation) {
                let batch = open.remove(&key).expect("the batch is open");
                ready.push_back(self.seal(key, batch.messages, Trigger::Idle));
                free -= 1;
            }
        }
    }

    /// Sends every open batch out, oldest first, with trigger `flush`.
    fn flush_all(
        &self,
        open: &mut HashMap<BatchKey, Open<T>>,
        deadlines: &mut VecDeque<(Instant, u64, BatchKey)>,
        ready: &mut VecDeque<Batch<T>>,
    ) {
        for (_, generation, key) in deadlines.drain(..) {
            if open.get(&key).is_some_and(|b| b.generation == generation) {
                let batch = open.remove(&key).expect("the batch is open");
                ready.push_back(self.seal(key, batch.messages, Trigger::Flush));
            }
        }
    }

    fn expire(
        &self,
        open: &mut HashMap<BatchKey, Open<T>>,
        deadlines: &mut VecDeque<(Instant, u64, BatchKey)>,
        ready: &mut VecDeque<Batch<T>>,
    ) {
        let now = Instant::now();
        while let Some((at, generation, _)) = deadlines.front() {
            if *at > now {
                break;
            }
            let generation = *generation;
            let (_, _, key) = deadlines.pop_front().expect("front exists");
            if open.get(&key).is_some_and(|b| b.generation == generation) {
                let batch = open.remove(&key).expect("the batch is open");
                ready.push_back(self.seal(key, batch.messages, Trigger::Timeout));
            }
        }
    }

    fn seal(&self, batch_key: BatchKey, messages: Custody<T>, trigger: Trigger) -> Batch<T> {
        let size = messages.len();
        match trigger {
            Trigger::Size => &self.sizes.size,
            Trigger::Timeout => &self.sizes.timeout,
            Trigger::Flush => &self.sizes.flush,
            Trigger::Idle => &self.sizes.idle,
        }
        .observe(size as f64);
        Batch {
            info: BatchInfo {
                batcher: self.name.clone(),
                batch_key,
                size,
                trigger,
            },
            messages,
        }
    }

    fn count_sent(&self, batch: &Batch<T>) {
        let n = batch.messages.len();
        self.metrics.in_flight.sub(n as i64);
        self.metrics.sent.inc_by(n as u64);
    }
}

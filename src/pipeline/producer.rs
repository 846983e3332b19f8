//! The producer stage: pulls messages from a source only as fast as the processors ask for them.
//!
//! Demand flows upstream as in GenStage: each processor asks for `max_demand` messages, and asks
//! again to refill once what it is owed falls to `min_demand`. A producer task adds up that
//! demand, takes as many in-flight permits (and rate-limit tokens) as it can use, and asks its
//! [`Producer`] for at most that many messages. Then it hands them to the processors in chunks of
//! at most `max_demand - min_demand`: to whichever has the most demand, or, with `partition_by`,
//! to the one that owns each message's key.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};

use super::error::PushError;
use super::flow::RateLimiter;
use super::message::{Failure, Message};
use super::stage::Shared;
use super::telemetry::StageMetrics;

/// What a producer says after filling demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Produced {
    /// There may be more later.
    More,
    /// The source is finished: nothing more will come. When every producer is exhausted the
    /// pipeline drains and [`Pipeline::join`](super::Pipeline::join) returns.
    Exhausted,
}

/// Room for at most as many messages as the pipeline asked for.
///
/// A producer can never hand out more than was asked: `push` gives the message back when the
/// demand is filled.
pub struct Demand<T> {
    buf: Vec<Message<T>>,
    limit: usize,
}

impl<T> Demand<T> {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::new(),
            limit: 0,
        }
    }

    /// How many more messages fit.
    pub fn remaining(&self) -> usize {
        self.limit - self.buf.len()
    }

    pub fn is_filled(&self) -> bool {
        self.buf.len() >= self.limit
    }

    /// Hands out one message, or gives it back when the demand is already filled.
    pub fn push(&mut self, msg: Message<T>) -> Result<(), Message<T>> {
        if self.is_filled() {
            return Err(msg);
        }
        self.buf.push(msg);
        Ok(())
    }

    fn reset(&mut self, limit: usize) {
        debug_assert!(self.buf.is_empty());
        self.limit = limit;
    }
}

/// A source of messages. The pipeline calls `produce` whenever the processors have demand.
///
/// `produce` should return once it has handed out at least one message (or the source is
/// exhausted), waiting for messages if there are none yet. It must be cancel-safe: on shutdown
/// the pipeline may drop the future, and anything already pushed into `demand` is kept and
/// processed, while anything held only inside the future would be lost.
pub trait Producer<T>: Send + 'static {
    fn produce(&mut self, demand: &mut Demand<T>) -> impl Future<Output = Produced> + Send;

    /// Called once when the pipeline drains: hand over whatever the producer still holds (and
    /// stop accepting more), so that nothing accepted is lost.
    fn drain(&mut self, held: &mut Vec<Message<T>>) -> impl Future<Output = ()> + Send {
        let _ = held;
        std::future::ready(())
    }
}

pub(crate) trait DynProducer<T>: Send {
    fn produce<'a>(&'a mut self, demand: &'a mut Demand<T>) -> BoxFuture<'a, Produced>;
    fn drain<'a>(&'a mut self, held: &'a mut Vec<Message<T>>) -> BoxFuture<'a, ()>;
}

impl<T: Send + 'static, P: Producer<T>> DynProducer<T> for P {
    fn produce<'a>(&'a mut self, demand: &'a mut Demand<T>) -> BoxFuture<'a, Produced> {
        Box::pin(Producer::produce(self, demand))
    }

    fn drain<'a>(&'a mut self, held: &'a mut Vec<Message<T>>) -> BoxFuture<'a, ()> {
        Box::pin(Producer::drain(self, held))
    }
}

/// The built-in producer: a bounded in-memory queue fed through [`PushHandle`]s.
pub struct InMemoryProducer<T> {
    rx: mpsc::Receiver<Message<T>>,
}

/// Feeds an [`InMemoryProducer`]. Cheap to clone; the producer is exhausted once every handle
/// is dropped and the queue is empty.
pub struct PushHandle<T> {
    tx: mpsc::Sender<Message<T>>,
}

impl<T> Clone for PushHandle<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

/// An in-memory producer whose queue holds up to `capacity` messages not yet taken by the
/// pipeline, and the handle that fills it.
pub fn in_memory<T: Send + 'static>(capacity: usize) -> (InMemoryProducer<T>, PushHandle<T>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (InMemoryProducer { rx }, PushHandle { tx })
}

impl<T: Send + 'static> PushHandle<T> {
    /// Queues a message, waiting while the pipeline is full.
    pub async fn push(&self, msg: Message<T>) -> Result<(), PushError<T>> {
        self.tx.send(msg).await.map_err(|e| PushError::Closed(e.0))
    }

    /// Queues a message if there is room right now.
    pub fn try_push(&self, msg: Message<T>) -> Result<(), PushError<T>> {
        self.tx.try_send(msg).map_err(|e| match e {
            mpsc::error::TrySendError::Full(m) => PushError::Full(m),
            mpsc::error::TrySendError::Closed(m) => PushError::Closed(m),
        })
    }

    /// Free room in the queue right now.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// Waits for room for one message and holds it, or None once the pipeline is shutting down.
    /// Cancel-safe: dropping the future (or the permit) gives the room back and loses nothing,
    /// so a caller can wait for room while it also waits for other things.
    pub async fn reserve(&self) -> Option<PushPermit<'_, T>> {
        self.tx.reserve().await.ok().map(PushPermit)
    }
}

/// Room for one message in an in-memory producer's queue, held by [`PushHandle::reserve`].
pub struct PushPermit<'a, T>(mpsc::Permit<'a, Message<T>>);

impl<T> PushPermit<'_, T> {
    /// Queues the message in the room held: it cannot fail.
    pub fn push(self, msg: Message<T>) {
        self.0.send(msg);
    }
}

impl<T: Send + 'static> Producer<T> for InMemoryProducer<T> {
    async fn produce(&mut self, demand: &mut Demand<T>) -> Produced {
        let limit = demand.remaining();
        // `recv_many` is cancel-safe: a message is either in `demand` or still in the queue.
        match self.rx.recv_many(&mut demand.buf, limit).await {
            0 => Produced::Exhausted,
            _ => Produced::More,
        }
    }

    async fn drain(&mut self, held: &mut Vec<Message<T>>) {
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            held.push(msg);
        }
    }
}

/// A chunk of messages from one producer to one processor.
pub(crate) struct Chunk<T> {
    pub producer: usize,
    pub messages: Vec<Message<T>>,
}

/// A processor's request for `n` more messages.
pub(crate) struct Ask {
    pub worker: usize,
    pub n: usize,
}

pub(crate) type KeyFn<T> = dyn Fn(&Message<T>) -> u64 + Send + Sync;
pub(crate) type PartitionFn<T> = Arc<KeyFn<T>>;

pub(crate) struct ProducerStage<T> {
    pub index: usize,
    pub producer: Box<dyn DynProducer<T>>,
    pub asks: mpsc::UnboundedReceiver<Ask>,
    pub workers: Vec<mpsc::UnboundedSender<Chunk<T>>>,
    pub partition_by: Option<PartitionFn<T>>,
    pub max_chunk: usize,
    pub rate_limit: Option<Arc<RateLimiter>>,
    pub stop: watch::Receiver<bool>,
    pub shared: Arc<Shared<T>>,
    pub metrics: StageMetrics,
}

/// Messages that have permits and wait for a processor with demand, kept in the chunks they
/// were produced in so that a chunk usually travels to its processor without being copied.
struct Ready<T> {
    /// One queue, or one per processor when partitioned.
    queues: Vec<VecDeque<Vec<Message<T>>>>,
    len: usize,
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped pipeline handle also means stop.
    let _ = stop.wait_for(|&s| s).await;
}

impl<T: Send + 'static> ProducerStage<T> {
    pub async fn run(self) {
        let Self {
            index,
            mut producer,
            mut asks,
            workers,
            partition_by,
            max_chunk,
            rate_limit,
            mut stop,
            shared,
            metrics,
        } = self;
        let mut demand = vec![0usize; workers.len()];
        let queues = if partition_by.is_some() {
            workers.len()
        } else {
            1
        };
        let mut ready = Ready {
            queues: (0..queues).map(|_| VecDeque::new()).collect(),
            len: 0,
        };
        let mut out = Demand::new();
        // Drained messages still waiting for permits.
        let mut held: VecDeque<Message<T>> = VecDeque::new();
        let mut stopping = false;
        let mut exhausted = false;

        loop {
            while let Ok(ask) = asks.try_recv() {
                demand[ask.worker] += ask.n;
            }
            dispatch(
                index,
                &mut ready,
                &mut demand,
                &workers,
                partition_by.as_deref(),
                max_chunk,
                &shared,
                &metrics,
            )
            .await;

            let total: usize = demand.iter().sum();
            let mut want = total.saturating_sub(ready.len);
            if partition_by.is_none() {
                // Ask for what one processor can take in one chunk: it then goes as it is.
                let largest = demand.iter().copied().max().unwrap_or(0);
                want = want.min(largest).min(max_chunk);
            }
            let finished = (stopping && held.is_empty()) || exhausted;
            if finished && ready.len == 0 {
                break;
            }
            if want == 0 || finished {
                // Nothing to ask for until a processor asks for more.
                tokio::select! {
                    biased;
                    () = stopped(&mut stop), if !stopping => {
                        stopping = true;
                        drain(&mut *producer, &mut held, &shared).await;
                    }
                    ask = asks.recv() => match ask {
                        Some(ask) => demand[ask.worker] += ask.n,
                        None => break,
                    },
                }
                continue;
            }

            let permits = if stopping {
                // Draining: what the producer held before it closed needs permits too.
                let n = shared.in_flight.acquire_up_to(want.min(held.len())).await;
                let messages: Vec<_> = held.drain(..n).collect();
                shared.held.fetch_sub(n, Ordering::Relaxed);
                shared.in_flight.record_peak();
                add_ready(&mut ready, messages, partition_by.as_deref());
                metrics.sent.inc_by(n as u64);
                shared.produced.fetch_add(n as u64, Ordering::Relaxed);
                continue;
            } else {
                // Messages ready for a processor without demand wait for its next ask: listen
                // for it while waiting here, or they (and the permits they hold) would wait for
                // whatever this waits for.
                tokio::select! {
                    biased;
                    () = stopped(&mut stop) => None,
                    ask = asks.recv(), if ready.len > 0 => match ask {
                        Some(ask) => {
                            demand[ask.worker] += ask.n;
                            continue;
                        }
                        None => break,
                    },
                    n = shared.in_flight.acquire_up_to(want) => Some(n),
                }
            };
            let Some(mut permits) = permits else {
                stopping = true;
                drain(&mut *producer, &mut held, &shared).await;
                continue;
            };
            if let Some(rl) = &rate_limit {
                let tokens = tokio::select! {
                    biased;
                    () = stopped(&mut stop) => 0,
                    ask = asks.recv(), if ready.len > 0 => {
                        if let Some(ask) = ask {
                            demand[ask.worker] += ask.n;
                        }
                        0
                    }
                    n = rl.acquire_up_to(permits) => n,
                };
                shared.in_flight.release(permits - tokens);
                permits = tokens;
                if permits == 0 {
                    continue;
                }
            }

            out.reset(permits);
            // `produce` is cancel-safe: an ask cuts it short, and what it handed out is kept.
            let outcome = tokio::select! {
                biased;
                () = stopped(&mut stop) => None,
                ask = asks.recv(), if ready.len > 0 => {
                    if let Some(ask) = ask {
                        demand[ask.worker] += ask.n;
                    }
                    Some(Produced::More)
                }
                produced = producer.produce(&mut out) => Some(produced),
            };
            let got = out.buf.len();
            shared.in_flight.release(permits - got);
            shared.in_flight.record_peak();
            if let Some(rl) = &rate_limit {
                rl.refund(permits - got);
            }
            if got > 0 {
                metrics.sent.inc_by(got as u64);
                shared.produced.fetch_add(got as u64, Ordering::Relaxed);
                let messages = std::mem::take(&mut out.buf);
                add_ready(&mut ready, messages, partition_by.as_deref());
            }
            match outcome {
                Some(Produced::More) => {}
                Some(Produced::Exhausted) => exhausted = true,
                None => {
                    stopping = true;
                    drain(&mut *producer, &mut held, &shared).await;
                }
            }
        }
        tracing::debug!(pipeline = %shared.pipeline, producer = index, "producer finished");
    }
}

/// Takes over what the producer still holds; it gets permits as they free up.
async fn drain<T: Send + 'static>(
    producer: &mut dyn DynProducer<T>,
    held: &mut VecDeque<Message<T>>,
    shared: &Shared<T>,
) {
    let mut drained = Vec::new();
    producer.drain(&mut drained).await;
    shared.held.fetch_add(drained.len(), Ordering::Relaxed);
    held.extend(drained);
}

fn add_ready<T>(ready: &mut Ready<T>, messages: Vec<Message<T>>, partition_by: Option<&KeyFn<T>>) {
    ready.len += messages.len();
    match partition_by {
        None => ready.queues[0].push_back(messages),
        Some(key) => {
            let n = ready.queues.len();
            let mut per_worker: Vec<Vec<Message<T>>> = (0..n).map(|_| Vec::new()).collect();
            for msg in messages {
                per_worker[(key(&msg) % n as u64) as usize].push(msg);
            }
            for (queue, chunk) in ready.queues.iter_mut().zip(per_worker) {
                if !chunk.is_empty() {
                    queue.push_back(chunk);
                }
            }
        }
    }
}

/// Hands ready messages to processors that have demand, in chunks of at most `max_chunk`.
#[allow(clippy::too_many_arguments)]
async fn dispatch<T: Send + 'static>(
    producer: usize,
    ready: &mut Ready<T>,
    demand: &mut [usize],
    workers: &[mpsc::UnboundedSender<Chunk<T>>],
    partition_by: Option<&KeyFn<T>>,
    max_chunk: usize,
    shared: &Shared<T>,
    metrics: &StageMetrics,
) {
    while ready.len > 0 {
        let (worker, queue) = if partition_by.is_some() {
            match (0..workers.len()).find(|&w| demand[w] > 0 && !ready.queues[w].is_empty()) {
                Some(w) => (w, w),
                None => return,
            }
        } else {
            let (w, &d) = demand
                .iter()
                .enumerate()
                .max_by_key(|(_, d)| **d)
                .expect("a pipeline has at least one processor");
            if d == 0 {
                return;
            }
            (w, 0)
        };
        let queue = &mut ready.queues[queue];
        let Some(mut messages) = queue.pop_front() else {
            return;
        };
        let n = demand[worker].min(max_chunk);
        if messages.len() > n {
            queue.push_front(messages.split_off(n));
        }
        let n = messages.len();
        ready.len -= n;
        demand[worker] -= n;
        if let Err(lost) = workers[worker].send(Chunk { producer, messages }) {
            // The processor is gone (it can only have crashed): fail its messages rather than
            // hold their permits forever.
            let mut messages = lost.0.messages;
            for m in &mut messages {
                m.fail(Failure::permanent("the processor worker stopped"));
            }
            shared.settle(metrics, messages).await;
        }
    }
}

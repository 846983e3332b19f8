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
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::error::PushError;
use super::failure::panic_message;
use super::flow::RateLimiter;
use super::message::{Failure, Message};
use super::pool::ProcessorPool;
use super::retry::RetryPolicy;
use super::stage::{Custody, Shared, until};
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
    /// How many the last call handed out: room for as many is made up front, so that a
    /// producer filling its demand does not grow the buffer (and copy it) step by step.
    last: usize,
}

impl<T> Demand<T> {
    pub(crate) fn new() -> Self {
        Self {
            buf: Vec::new(),
            limit: 0,
            last: 0,
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
        self.buf.reserve(limit.min(self.last.max(16)));
    }
}

/// A source of messages. The pipeline calls `produce` whenever the processors have demand.
///
/// `produce` should return once it has handed out at least one message (or the source is
/// exhausted), waiting for messages if there are none yet; a producer that returns
/// [`Produced::More`] with nothing handed out is called again only after a pause that grows
/// while it has nothing (up to 100 ms). It must be cancel-safe: on shutdown the pipeline may
/// drop the future, and anything already pushed into `demand` is kept and processed, while
/// anything held only inside the future would be lost.
///
/// A panic in `produce` keeps what was already pushed into `demand`; the producer is called
/// again after a pause (growing to 10 s while it keeps panicking). A panic in `drain` keeps
/// what was already pushed into `held`.
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
        // Until None, not until the first empty read: a push that was given room before the
        // close may still be on its way, and it was accepted.
        while let Some(msg) = self.rx.recv().await {
            held.push(msg);
        }
    }
}

/// A chunk of messages from one producer to one processor.
pub(crate) struct Chunk<T: Send + 'static> {
    pub producer: usize,
    pub messages: Custody<T>,
}

/// What reaches a producer from downstream.
pub(crate) enum Signal<T: Send + 'static> {
    /// A processor asks for `n` more messages.
    Ask {
        generation: u64,
        worker: usize,
        n: usize,
    },
    /// The processor pool was resized: these workers replace the previous ones.
    Workers(WorkerSet<T>),
}

/// One generation of the processor pool, as a producer sees it.
pub(crate) struct WorkerSet<T: Send + 'static> {
    pub generation: u64,
    pub inboxes: Vec<mpsc::UnboundedSender<Chunk<T>>>,
    /// Closed once every worker of the previous generation has ended. With `partition_by`, a
    /// producer hands nothing to the new workers before that, so that a key's messages never
    /// overtake each other across the change.
    pub previous: Arc<watch::Sender<()>>,
}

pub(crate) type KeyFn<T> = dyn Fn(&Message<T>) -> u64 + Send + Sync;
pub(crate) type PartitionFn<T> = Arc<KeyFn<T>>;

pub(crate) struct ProducerStage<T: Send + 'static> {
    pub index: usize,
    pub producer: Box<dyn DynProducer<T>>,
    pub signals: mpsc::UnboundedReceiver<Signal<T>>,
    pub workers: WorkerSet<T>,
    /// What each new worker asks for at first (it does not send that ask).
    pub max_demand: usize,
    pub partition_by: Option<PartitionFn<T>>,
    pub max_chunk: usize,
    /// How many producers share the in-flight bound.
    pub producers: usize,
    pub rate_limit: Arc<RateLimiter>,
    pub stop: watch::Receiver<bool>,
    pub shared: Arc<Shared<T>>,
    pub pool: Arc<ProcessorPool<T>>,
    pub metrics: StageMetrics,
}

/// Messages that have permits and wait for a processor with demand, kept in the chunks they
/// were produced in so that a chunk usually travels to its processor without being copied.
struct Ready<T: Send + 'static> {
    /// One queue, or one per processor when partitioned.
    queues: Vec<VecDeque<Custody<T>>>,
    len: usize,
}

/// The producer's side of the processor pool: the current workers, what each has asked for,
/// and the messages ready for them.
struct Dispatch<T: Send + 'static> {
    producer: usize,
    generation: u64,
    workers: Vec<mpsc::UnboundedSender<Chunk<T>>>,
    demand: Vec<usize>,
    ready: Ready<T>,
    partition_by: Option<PartitionFn<T>>,
    max_chunk: usize,
    max_demand: usize,
    /// A resize heard but not yet applied.
    switch: Option<WorkerSet<T>>,
    /// Signals are gone: every worker and the pipeline handle are.
    closed: bool,
}

impl<T: Send + 'static> Dispatch<T> {
    fn new(producer: usize, set: WorkerSet<T>, stage: &ProducerStage<T>) -> Self {
        let n = set.inboxes.len();
        let queues = if stage.partition_by.is_some() { n } else { 1 };
        Self {
            producer,
            generation: set.generation,
            demand: vec![stage.max_demand; n],
            workers: set.inboxes,
            ready: Ready {
                queues: (0..queues).map(|_| VecDeque::new()).collect(),
                len: 0,
            },
            partition_by: stage.partition_by.clone(),
            max_chunk: stage.max_chunk,
            max_demand: stage.max_demand,
            switch: None,
            closed: false,
        }
    }

    fn hear(&mut self, signal: Option<Signal<T>>) {
        match signal {
            Some(Signal::Ask {
                generation,
                worker,
                n,
            }) => {
                // A retired worker's ask is for messages it will never get.
                if generation == self.generation {
                    self.demand[worker] += n;
                }
            }
            Some(Signal::Workers(mut set)) => {
                // Two resizes before this producer applied the first: it still feeds the
                // workers before both, so those are the ones to wait for, not the generation
                // in between, which it never fed.
                if let Some(pending) = self.switch.take() {
                    set.previous = pending.previous;
                }
                self.switch = Some(set);
            }
            None => self.closed = true,
        }
    }

    /// Moves to the workers of a resize: the previous ones get nothing more (they end once
    /// every producer has let go of them), and what was ready for them is spread again.
    async fn apply_switch(&mut self, shared: &Shared<T>, metrics: &StageMetrics) {
        let Some(set) = self.switch.take() else {
            return;
        };
        let n = set.inboxes.len();
        self.generation = set.generation;
        self.workers = set.inboxes;
        self.demand = vec![self.max_demand; n];
        let queues = std::mem::take(&mut self.ready.queues);
        self.ready = Ready {
            queues: (0..if self.partition_by.is_some() { n } else { 1 })
                .map(|_| VecDeque::new())
                .collect(),
            len: 0,
        };
        if self.partition_by.is_some() {
            set.previous.closed().await;
        }
        for queue in queues {
            for mut chunk in queue {
                let rejected = add_ready(&mut self.ready, &mut chunk, self.partition_by.as_deref());
                settle_rejected(rejected, shared, metrics).await;
            }
        }
    }

    /// Hands ready messages to processors that have demand, in chunks of at most `max_chunk`.
    /// A chunk for a processor that is gone is dropped, and so acknowledged as abandoned.
    fn dispatch(&mut self) {
        let ready = &mut self.ready;
        let demand = &mut self.demand;
        while ready.len > 0 {
            let (worker, queue) = if self.partition_by.is_some() {
                match (0..self.workers.len())
                    .find(|&w| demand[w] > 0 && !ready.queues[w].is_empty())
                {
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
            let n = demand[worker].min(self.max_chunk);
            if messages.len() > n {
                queue.push_front(messages.split_off(n));
            }
            let n = messages.len();
            ready.len -= n;
            demand[worker] -= n;
            let _ = self.workers[worker].send(Chunk {
                producer: self.producer,
                messages,
            });
        }
    }

    /// How many more messages to ask the source for.
    fn want(&self) -> usize {
        let total: usize = self.demand.iter().sum();
        let want = total.saturating_sub(self.ready.len);
        if self.partition_by.is_some() {
            return want;
        }
        // Ask for what one processor can take in one chunk: it then goes as it is.
        let largest = self.demand.iter().copied().max().unwrap_or(0);
        want.min(largest).min(self.max_chunk)
    }
}

/// What a producer hands out, guarded while `produce` fills it: if the producer task is aborted
/// mid-call, what it already handed out is acknowledged as failed, not lost.
struct Out<T: Send + 'static> {
    demand: Demand<T>,
    shared: Arc<Shared<T>>,
}

impl<T: Send + 'static> Out<T> {
    fn take(&mut self) -> Custody<T> {
        self.demand.last = self.demand.buf.len();
        Custody::new(&self.shared, std::mem::take(&mut self.demand.buf))
    }
}

impl<T: Send + 'static> Drop for Out<T> {
    fn drop(&mut self) {
        drop(self.take());
    }
}

/// How one call of `produce` ended.
enum Call {
    Returned(Produced),
    /// Messages are ready for a processor that asked, or the pool was resized: hand out first.
    CutShort,
    Panicked(String),
    Stopped,
}

/// Pauses between calls of a producer that has nothing, or that panics: short and growing, so
/// that a polling source does not spin and a broken one does not flood the log.
fn pause(nothing: u32, panicked: u32) -> Duration {
    if panicked > 0 {
        RetryPolicy::exponential(
            u32::MAX,
            Duration::from_millis(100),
            2.0,
            Duration::from_secs(10),
        )
        .cap(panicked - 1)
    } else {
        RetryPolicy::exponential(
            u32::MAX,
            Duration::from_millis(1),
            2.0,
            Duration::from_millis(100),
        )
        .cap(nothing.saturating_sub(1))
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    // A dropped pipeline handle also means stop.
    let _ = stop.wait_for(|&s| s).await;
}

impl<T: Send + 'static> ProducerStage<T> {
    pub async fn run(mut self) {
        let workers = std::mem::replace(
            &mut self.workers,
            WorkerSet {
                generation: 0,
                inboxes: Vec::new(),
                previous: Arc::new(watch::channel(()).0),
            },
        );
        let mut d = Dispatch::new(self.index, workers, &self);
        let Self {
            index,
            mut producer,
            mut signals,
            rate_limit,
            mut stop,
            shared,
            pool,
            metrics,
            producers,
            ..
        } = self;
        // A producer waiting for input keeps the permits it took for it: at most its share of
        // the bound, so that idle producers can never hold every permit a busy one needs.
        let share = |shared: &Shared<T>| (shared.in_flight.bound() / producers).max(1);
        let mut out = Out {
            demand: Demand::new(),
            shared: shared.clone(),
        };
        // Drained messages still waiting for permits.
        let mut held = Custody::unpermitted(&shared);
        let mut stopping = false;
        let mut exhausted = false;
        // Consecutive calls that handed out nothing, and that panicked; and the pause they earn.
        let (mut nothing, mut panicked) = (0u32, 0u32);
        let mut paused_until: Option<Instant> = None;

        loop {
            while let Ok(signal) = signals.try_recv() {
                d.hear(Some(signal));
            }
            d.apply_switch(&shared, &metrics).await;
            d.dispatch();
            if d.closed {
                // Every worker is gone (aborted): what is left is abandoned.
                break;
            }

            let want = d.want();
            let finished = (stopping && held.is_empty()) || exhausted;
            if finished && d.ready.len == 0 {
                break;
            }
            let pausing = !stopping && paused_until.is_some();
            if want == 0 || finished || pausing {
                // Nothing to ask for until a processor asks for more (or the pause is over).
                let pause = paused_until.filter(|_| pausing);
                tokio::select! {
                    biased;
                    () = stopped(&mut stop), if !stopping => {
                        stopping = true;
                        drain(&mut *producer, &mut held, &shared).await;
                    }
                    signal = signals.recv() => d.hear(signal),
                    () = until(pause), if pause.is_some() => paused_until = None,
                }
                continue;
            }

            let permits = if stopping {
                // Draining: what the producer held before it closed needs permits too.
                let n = shared
                    .in_flight
                    .acquire_up_to(want.min(held.len()).min(share(&shared)))
                    .await;
                let rest = held.split_off(n);
                let mut messages = Custody::new(&shared, std::mem::replace(&mut held, rest).take());
                shared.held.fetch_sub(n, Ordering::Relaxed);
                shared.in_flight.record_peak();
                metrics.sent.inc_by(n as u64);
                shared.produced.fetch_add(n as u64, Ordering::Relaxed);
                let rejected = add_ready(&mut d.ready, &mut messages, d.partition_by.as_deref());
                settle_rejected(rejected, &shared, &metrics).await;
                continue;
            } else {
                // Messages ready for a processor without demand wait for its next ask: listen
                // for it while waiting here, or they (and the permits they hold) would wait for
                // whatever this waits for.
                tokio::select! {
                    biased;
                    () = stopped(&mut stop) => None,
                    signal = signals.recv() => {
                        d.hear(signal);
                        continue;
                    }
                    n = shared.in_flight.acquire_up_to(want.min(share(&shared))) => Some(n),
                }
            };
            let Some(mut permits) = permits else {
                stopping = true;
                drain(&mut *producer, &mut held, &shared).await;
                continue;
            };
            if rate_limit.is_limited() {
                let tokens = tokio::select! {
                    biased;
                    () = stopped(&mut stop) => 0,
                    signal = signals.recv() => {
                        d.hear(signal);
                        0
                    }
                    n = rate_limit.acquire_up_to(permits) => n,
                };
                shared.in_flight.release(permits - tokens);
                permits = tokens;
                if permits == 0 {
                    continue;
                }
            }

            out.demand.reset(permits);
            // `produce` is cancel-safe: a signal that needs handing out first cuts it short,
            // and what it handed out so far is kept.
            let call = {
                let produce = AssertUnwindSafe(producer.produce(&mut out.demand)).catch_unwind();
                tokio::pin!(produce);
                loop {
                    tokio::select! {
                        biased;
                        () = stopped(&mut stop) => break Call::Stopped,
                        signal = signals.recv() => {
                            d.hear(signal);
                            if d.ready.len > 0 || d.switch.is_some() || d.closed {
                                break Call::CutShort;
                            }
                        }
                        produced = &mut produce => break match produced {
                            Ok(produced) => Call::Returned(produced),
                            Err(panic) => Call::Panicked(panic_message(&*panic)),
                        },
                    }
                }
            };
            let mut messages = out.take();
            let got = messages.len();
            shared.in_flight.release(permits - got);
            shared.in_flight.record_peak();
            rate_limit.refund(permits - got);
            if got > 0 {
                metrics.sent.inc_by(got as u64);
                shared.produced.fetch_add(got as u64, Ordering::Relaxed);
                let rejected = add_ready(&mut d.ready, &mut messages, d.partition_by.as_deref());
                settle_rejected(rejected, &shared, &metrics).await;
            }
            match call {
                Call::Returned(Produced::More) if got == 0 => nothing += 1,
                Call::Returned(Produced::More) | Call::CutShort => (nothing, panicked) = (0, 0),
                Call::Returned(Produced::Exhausted) => exhausted = true,
                Call::Panicked(reason) => {
                    tracing::error!(
                        pipeline = %shared.pipeline, producer = index,
                        "produce panicked ({reason}); it is called again after a pause"
                    );
                    panicked += 1;
                }
                Call::Stopped => {
                    stopping = true;
                    drain(&mut *producer, &mut held, &shared).await;
                }
            }
            if nothing > 0 || panicked > 0 {
                paused_until = Some(Instant::now() + pause(nothing, panicked));
            }
        }
        pool.producer_finished();
        tracing::debug!(pipeline = %shared.pipeline, producer = index, "producer finished");
    }
}

/// Takes over what the producer still holds; it gets permits as they free up.
async fn drain<T: Send + 'static>(
    producer: &mut dyn DynProducer<T>,
    held: &mut Custody<T>,
    shared: &Shared<T>,
) {
    let mut drained = Vec::new();
    if let Err(panic) = AssertUnwindSafe(producer.drain(&mut drained))
        .catch_unwind()
        .await
    {
        tracing::error!(
            pipeline = %shared.pipeline,
            "drain panicked ({}); what it handed over is kept",
            panic_message(&*panic)
        );
    }
    shared.held.fetch_add(drained.len(), Ordering::Relaxed);
    held.extend(drained);
}

/// Queues messages for the processors: one queue, or the queue of each key's processor. A
/// message whose key cannot be computed (the partition function panicked) comes back failed.
fn add_ready<T: Send + 'static>(
    ready: &mut Ready<T>,
    messages: &mut Custody<T>,
    partition_by: Option<&KeyFn<T>>,
) -> Custody<T> {
    let mut rejected = messages.empty();
    match partition_by {
        None => {
            ready.len += messages.len();
            let all = messages.take_all();
            ready.queues[0].push_back(all);
        }
        Some(key) => {
            let n = ready.queues.len();
            let mut per_worker: Vec<Vec<Message<T>>> = (0..n).map(|_| Vec::new()).collect();
            for mut msg in messages.take() {
                match catch_unwind(AssertUnwindSafe(|| key(&msg))) {
                    Ok(k) => per_worker[(k % n as u64) as usize].push(msg),
                    Err(panic) => {
                        msg.fail(Failure::panicked("the partition function", &*panic));
                        rejected.push(msg);
                    }
                }
            }
            for (queue, chunk) in ready.queues.iter_mut().zip(per_worker) {
                if !chunk.is_empty() {
                    ready.len += chunk.len();
                    let mut custody = messages.empty();
                    *custody = chunk;
                    queue.push_back(custody);
                }
            }
        }
    }
    rejected
}

async fn settle_rejected<T: Send + 'static>(
    rejected: Custody<T>,
    shared: &Shared<T>,
    metrics: &StageMetrics,
) {
    if !rejected.is_empty() {
        shared.settle(metrics, rejected, None).await;
    }
}

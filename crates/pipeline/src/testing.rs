//! Testing a pipeline end to end, in the spirit of Broadway's `test_message` and `test_batch`:
//! push data into a running pipeline fed by an [`in_memory`](super::in_memory) producer, and
//! await how each message ended — successful, or failed for which reason and whether retryably,
//! after how many attempts, dead-lettered or not.
//!
//! [`test_message`] and [`test_batch`] cover the common case. Underneath them is a
//! [`Collector`], an acknowledger that records every message acknowledged to it; use one
//! directly to shape the messages first (batch key, batch mode, metadata), to feed them from a
//! producer of your own, to look at how acknowledgements were grouped, or to check that nothing
//! was acknowledged yet.
//!
//! Waiting is bounded: past [`TIMEOUT`] a wait panics, saying how many messages never came back,
//! so a stuck pipeline fails its test instead of hanging it. The wait is on tokio's clock, so
//! under a paused clock (`#[tokio::test(start_paused = true)]`) it takes no real time, and batch
//! timeouts and retry delays pass at once.
//!
//! ```
//! use thunderline_pipeline::testing::test_message;
//! use thunderline_pipeline::*;
//!
//! /// Parses a reading; what does not parse never will.
//! struct Parse;
//! impl Processor<String> for Parse {
//!     async fn handle_message(&self, m: &mut Message<String>) -> Result<(), Failure> {
//!         let celsius: f64 = m.data.parse()?;
//!         m.data = format!("{:.1}", celsius * 1.8 + 32.0);
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let (producer, push) = in_memory(10);
//! let pipeline = Pipeline::builder("readings")
//!     .producer(producer)
//!     .processor(Parse, ProcessorConfig::default())
//!     .start()
//!     .unwrap();
//!
//! let ok = test_message(&push, "21.5".to_string()).await;
//! assert!(ok.is_successful());
//! assert_eq!(ok.data, "70.7");
//!
//! let bad = test_message(&push, "n/a".to_string()).await;
//! assert_eq!(bad.reason(), Some("invalid float literal"));
//! assert!(!bad.failure().unwrap().is_retryable());
//! assert_eq!((bad.attempts, bad.dead_lettered), (1, false));
//!
//! pipeline.shutdown().await.unwrap();
//! # }
//! ```

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::ack::{AckRef, Acknowledger};
use super::batcher::BatchInfo;
use super::failure::Failure;
use super::message::{BatchMode, Message, Metadata, Status};
use super::processor::Processor;
use super::producer::PushHandle;
use super::sink::BatchSink;

/// A processor that passes every message on as it is: for tests about the other stages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Pass;

impl<T: Send + 'static> Processor<T> for Pass {
    async fn handle_message(&self, _: &mut Message<T>) -> Result<(), Failure> {
        Ok(())
    }
}

/// A batch sink that takes every batch and keeps nothing: for tests about the other stages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Discard;

impl<T: Send + 'static> BatchSink<T> for Discard {
    async fn handle_batch(&self, _: &BatchInfo, _: &mut [Message<T>]) -> Result<(), Failure> {
        Ok(())
    }
}

/// How long a wait lasts before it panics: longer than any batch timeout or retry schedule a
/// test should need (the default batch timeout is 2 s), short enough that a stuck test fails
/// within a minute on a real clock.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The metadata entry by which a collector knows the messages it made apart, whatever the
/// handlers did to their data. Removed before the message is recorded.
const INDEX_KEY: &str = "thunderline.testing.index";

/// How one message ended, as its acknowledger saw it.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Outcome<T> {
    /// The data as the last stage left it (handlers may have changed it).
    pub data: T,
    pub status: Status,
    /// Its metadata, without the entry the collector tracks it by.
    pub metadata: Metadata,
    /// How many times the stage it ended in tried it: 1 unless that stage retried it. A stage
    /// counts its own attempts, so a message a processor retried that a sink then took
    /// successfully shows the sink's 1.
    pub attempts: u32,
    /// Whether it went to the dead-letter sink.
    pub dead_lettered: bool,
    /// The order in which the collector made it, from 0; `None` for a message handed to the
    /// collector with [`Message::with_acker`] rather than [`Collector::message`] or
    /// [`Collector::track`].
    pub index: Option<usize>,
    /// Which call of `ack` on the collector delivered it, from 0: messages acknowledged
    /// together share it.
    pub ack_call: usize,
    /// When it was acknowledged, on tokio's clock.
    pub acked_at: Instant,
}

impl<T> Outcome<T> {
    pub fn is_successful(&self) -> bool {
        matches!(self.status, Status::Ok)
    }

    pub fn is_failed(&self) -> bool {
        !self.is_successful()
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.status {
            Status::Failed(failure) => Some(failure),
            Status::Ok => None,
        }
    }

    /// Why it failed; `None` when it did not.
    pub fn reason(&self) -> Option<&str> {
        self.failure().map(Failure::reason)
    }

    fn new(mut msg: Message<T>, ack_call: usize, acked_at: Instant) -> Self {
        let index = msg
            .metadata_mut()
            .remove(INDEX_KEY)
            .and_then(|i| i.parse().ok());
        Self {
            status: msg.status().clone(),
            metadata: std::mem::take(msg.metadata_mut()),
            attempts: msg.attempts(),
            dead_lettered: msg.dead_lettered,
            index,
            ack_call,
            acked_at,
            data: msg.data,
        }
    }
}

/// An acknowledger that records every message acknowledged to it, for a test to await and
/// inspect.
///
/// Messages that share a collector are acknowledged together, as messages from one source are:
/// a batch reaches it in one `ack` call, which [`Outcome::ack_call`] shows.
///
/// ```
/// # use thunderline_pipeline::{*, testing::Collector};
/// # struct Pass;
/// # impl Processor<u32> for Pass {
/// #     async fn handle_message(&self, _: &mut Message<u32>) -> Result<(), Failure> { Ok(()) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// # let (producer, push) = in_memory(10);
/// # let pipeline = Pipeline::builder("doc")
/// #     .producer(producer)
/// #     .processor(Pass, ProcessorConfig::default())
/// #     .start()
/// #     .unwrap();
/// let acks = Collector::new();
/// for key in [1u64, 2, 1] {
///     let mut m = acks.message(key as u32);
///     m.put_batch_key(key);
///     push.push(m).await.unwrap();
/// }
/// let outcomes = acks.wait_for(3).await;
/// assert!(outcomes.iter().all(|o| o.is_successful()));
/// # pipeline.shutdown().await.unwrap();
/// # }
/// ```
pub struct Collector<T> {
    state: Mutex<State<T>>,
    /// Woken after every `ack` call.
    acked: Notify,
}

struct State<T> {
    outcomes: Vec<Outcome<T>>,
    ack_calls: usize,
    made: usize,
}

impl<T: Send + 'static> Collector<T> {
    /// A collector, shared: each message it makes holds a reference to it.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                outcomes: Vec::new(),
                ack_calls: 0,
                made: 0,
            }),
            acked: Notify::new(),
        })
    }

    /// A message acknowledged to this collector.
    pub fn message(self: &Arc<Self>, data: T) -> Message<T> {
        self.track(Message::new(data))
    }

    /// Points `msg` at this collector: it is acknowledged here instead of to the acknowledger it
    /// had, if any.
    ///
    /// It carries a metadata entry, named `thunderline.testing.index`, by which the collector
    /// knows it whatever the handlers do to its data: a handler that lists the metadata sees it,
    /// and one that removes it turns the outcome's [`index`](Outcome::index) into `None`.
    pub fn track(self: &Arc<Self>, mut msg: Message<T>) -> Message<T> {
        let index = {
            let mut state = self.lock();
            state.made += 1;
            state.made - 1
        };
        msg.metadata_mut().insert(INDEX_KEY, index.to_string());
        msg.ack = AckRef::Direct(self.clone());
        msg
    }

    /// How many messages have been acknowledged so far.
    pub fn len(&self) -> usize {
        self.lock().outcomes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many times `ack` has been called so far.
    pub fn ack_calls(&self) -> usize {
        self.lock().ack_calls
    }

    /// Every outcome so far, in the order acknowledged (within one `ack` call, the successful
    /// ones first).
    pub fn outcomes(&self) -> Vec<Outcome<T>>
    where
        T: Clone,
    {
        self.lock().outcomes.clone()
    }

    /// Waits until `n` messages in all have been acknowledged, then returns every outcome so
    /// far (see [`outcomes`](Self::outcomes)).
    ///
    /// # Panics
    ///
    /// After [`TIMEOUT`] on tokio's clock, saying how many of the `n` never came back.
    pub async fn wait_for(&self, n: usize) -> Vec<Outcome<T>>
    where
        T: Clone,
    {
        if tokio::time::timeout(TIMEOUT, self.acknowledged(n))
            .await
            .is_err()
        {
            panic!("Collector::wait_for: {}", self.missing(n));
        }
        self.outcomes()
    }

    /// Waits until `n` messages in all have been acknowledged or `limit` has passed, whichever
    /// comes first, and returns every outcome so far: fewer than `n` if the time ran out.
    pub async fn wait_for_within(&self, n: usize, limit: Duration) -> Vec<Outcome<T>>
    where
        T: Clone,
    {
        let _ = tokio::time::timeout(limit, self.acknowledged(n)).await;
        self.outcomes()
    }

    /// Resolves once `n` messages in all have been acknowledged.
    async fn acknowledged(&self, n: usize) {
        loop {
            // Registered before the count is read, so that an `ack` in between still wakes it.
            let acked = self.acked.notified();
            tokio::pin!(acked);
            acked.as_mut().enable();
            if self.len() >= n {
                return;
            }
            acked.await;
        }
    }

    /// What a wait for `n` that timed out says.
    fn missing(&self, n: usize) -> String {
        let got = self.len();
        format!(
            "{} of {n} message(s) never came back: {got} acknowledged within {TIMEOUT:?} (is a \
             handler or sink stuck, or a batch waiting for a timeout longer than that?)",
            n - got.min(n),
        )
    }

    fn take(&self) -> Vec<Outcome<T>> {
        std::mem::take(&mut self.lock().outcomes)
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A test that panicked while holding the lock has failed already: keep the outcomes.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T: Send + 'static> Acknowledger<T> for Collector<T> {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            let call = state.ack_calls;
            state.ack_calls += 1;
            let outcomes = successful
                .into_iter()
                .chain(failed)
                .map(|m| Outcome::new(m, call, now));
            state.outcomes.extend(outcomes);
        }
        self.acked.notify_waiters();
    }
}

/// Pushes `data` through the pipeline fed by `push`, and awaits how it ended.
///
/// As in Broadway, the message goes in [`BatchMode::Flush`]: its batch leaves as soon as the
/// message joins it, instead of waiting to fill up or time out.
///
/// # Panics
///
/// When the pipeline no longer takes messages, and when the message is not acknowledged within
/// [`TIMEOUT`] on tokio's clock.
pub async fn test_message<T: Send + 'static>(push: &PushHandle<T>, data: T) -> Outcome<T> {
    let acks = Collector::new();
    let mut msg = acks.message(data);
    msg.put_batch_mode(BatchMode::Flush);
    let mut outcomes = run("test_message", push, &acks, vec![msg]).await;
    outcomes.pop().expect("one message was acknowledged")
}

/// Pushes each of `data` through the pipeline fed by `push`, and awaits how they all ended.
/// The outcomes come in push order.
///
/// As in Broadway, the messages go in [`BatchMode::Bulk`]: they are batched as they would be in
/// production, so a partial batch waits for its batch timeout (at once under a paused clock).
/// They share one acknowledger, so each [`Outcome::ack_call`] says which ones were acknowledged
/// together.
///
/// # Panics
///
/// When the pipeline no longer takes messages, and when they are not all acknowledged within
/// [`TIMEOUT`] on tokio's clock, pushes included.
pub async fn test_batch<T: Send + 'static>(
    push: &PushHandle<T>,
    data: impl IntoIterator<Item = T>,
) -> Vec<Outcome<T>> {
    let acks = Collector::new();
    let messages = data.into_iter().map(|d| acks.message(d)).collect();
    let mut outcomes = run("test_batch", push, &acks, messages).await;
    outcomes.sort_by_key(|o| o.index);
    outcomes
}

/// Pushes `messages` and awaits their outcomes; the pushes count against the timeout too, since
/// a pipeline that does not take messages blocks them.
async fn run<T: Send + 'static>(
    caller: &str,
    push: &PushHandle<T>,
    acks: &Collector<T>,
    messages: Vec<Message<T>>,
) -> Vec<Outcome<T>> {
    let n = messages.len();
    let mut pushed = 0;
    let all = tokio::time::timeout(TIMEOUT, async {
        for msg in messages {
            if let Err(refused) = push.push(msg).await {
                panic!("{caller}: {refused}");
            }
            pushed += 1;
        }
        acks.acknowledged(n).await;
    })
    .await;
    if all.is_err() && pushed < n {
        panic!(
            "{caller}: only {pushed} of {n} message(s) could be pushed within {TIMEOUT:?}: the \
             pipeline takes no more (is a handler or sink stuck?)"
        );
    }
    if all.is_err() {
        panic!("{caller}: {}", acks.missing(n));
    }
    acks.take()
}

#[cfg(test)]
mod tests {
    use tokio::sync::Notify;

    use super::*;
    use crate::{
        BatchInfo, BatchSink, BatcherConfig, DeadLetterSink, Pipeline, Processor, ProcessorConfig,
        RetryPolicy, in_memory,
    };

    /// Doubles even numbers, refuses odd ones, and holds 13's first attempt until `release` is
    /// notified.
    struct Even {
        release: Arc<Notify>,
    }

    impl Processor<u32> for Even {
        async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
            if m.data == 13 && m.attempts() == 1 {
                self.release.notified().await;
            }
            if m.data % 2 == 1 {
                return Err(Failure::retryable(format!("{} is odd", m.data)));
            }
            m.data *= 2;
            Ok(())
        }
    }

    struct Discard;

    impl BatchSink<u32> for Discard {
        async fn handle_batch(&self, _: &BatchInfo, _: &mut [Message<u32>]) -> Result<(), Failure> {
            Ok(())
        }
    }

    impl DeadLetterSink<u32> for Discard {
        async fn dead_letter(&self, _: &str, _: &mut [Message<u32>]) {}
    }

    fn start(release: &Arc<Notify>) -> (Pipeline<u32>, PushHandle<u32>) {
        let (producer, push) = in_memory(10);
        let pipeline = Pipeline::builder("testing")
            .producer(producer)
            .processor(
                Even {
                    release: release.clone(),
                },
                ProcessorConfig::default()
                    .concurrency(2)
                    .retry(RetryPolicy::exponential(
                        2,
                        Duration::from_millis(10),
                        2.0,
                        Duration::from_millis(10),
                    )),
            )
            .batcher(BatcherConfig::new("b").batch_size(3), Discard)
            .dead_letter(Discard)
            .start()
            .unwrap();
        (pipeline, push)
    }

    /// Lets the producer hand what was pushed to a worker, so that the next push goes to the
    /// other worker rather than waiting behind a held message in the same chunk.
    async fn hand_over() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn test_message_awaits_a_success_and_a_failure() {
        let (pipeline, push) = start(&Arc::new(Notify::new()));
        let started = Instant::now();
        let ok = test_message(&push, 4).await;
        assert!(ok.is_successful() && !ok.is_failed());
        assert_eq!((ok.data, ok.attempts, ok.index), (8, 1, Some(0)));
        assert!(ok.metadata.is_empty(), "the tracking entry is gone");
        assert_eq!(ok.metadata, Metadata::default());
        // Flushed at once: it did not wait for the 2 s batch timeout.
        assert!(ok.acked_at - started < Duration::from_secs(1));

        let failed = test_message(&push, 3).await;
        assert_eq!(failed.failure(), Some(&Failure::retryable("3 is odd")));
        assert_eq!(failed.reason(), Some("3 is odd"));
        assert_eq!((failed.attempts, failed.dead_lettered), (2, true));
        pipeline.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn test_batch_returns_outcomes_in_push_order_grouped_by_ack_call() {
        let (pipeline, push) = start(&Arc::new(Notify::new()));
        let outcomes = test_batch(&push, [5, 2, 4, 6, 8]).await;
        let seen: Vec<(u32, Option<&str>, Option<usize>)> = outcomes
            .iter()
            .map(|o| (o.data, o.reason(), o.index))
            .collect();
        assert_eq!(
            seen,
            vec![
                (5, Some("5 is odd"), Some(0)),
                (4, None, Some(1)),
                (8, None, Some(2)),
                (12, None, Some(3)),
                (16, None, Some(4)),
            ]
        );
        // The four even ones made a full batch of 3 and a partial one that timed out.
        let mut calls: Vec<usize> = outcomes[1..].iter().map(|o| o.ack_call).collect();
        calls.sort_unstable();
        calls.dedup();
        assert_eq!(calls.len(), 2, "{outcomes:?}");
        pipeline.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(
        expected = "test_message: 1 of 1 message(s) never came back: 0 acknowledged \
                               within 30s"
    )]
    async fn test_message_gives_up_on_a_message_that_never_returns() {
        let (_pipeline, push) = start(&Arc::new(Notify::new()));
        test_message(&push, 13).await;
    }

    #[tokio::test(start_paused = true)]
    #[should_panic(expected = "message(s) could be pushed within 30s: the pipeline takes no more")]
    async fn test_batch_gives_up_on_a_pipeline_that_takes_no_more() {
        let (producer, push) = in_memory(1);
        let _pipeline = Pipeline::builder("full")
            .producer(producer)
            .processor(
                Even {
                    release: Arc::new(Notify::new()),
                },
                ProcessorConfig::default().concurrency(1).demand(1, 0),
            )
            .in_flight_bound(1)
            .start()
            .unwrap();
        test_batch(&push, [13, 2, 4, 6]).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_collector_waits_for_what_comes_back_and_says_what_did_not() {
        let release = Arc::new(Notify::new());
        let (pipeline, push) = start(&release);
        let acks = Collector::new();
        for data in [13, 2] {
            let mut msg = acks.message(data);
            msg.put_batch_mode(BatchMode::Flush);
            push.push(msg).await.unwrap();
            hand_over().await;
        }
        let started = Instant::now();
        let early = acks.wait_for_within(2, Duration::from_secs(1)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(early.len(), 1);
        assert_eq!((early[0].data, early[0].index), (4, Some(1)));

        release.notify_one();
        let all = acks.wait_for(2).await;
        assert_eq!(all.len(), 2);
        assert_eq!(
            (all[1].index, all[1].reason()),
            (Some(0), Some("13 is odd"))
        );
        assert_eq!(acks.ack_calls(), 2);

        // A message acknowledged to the collector without being made by it has no index.
        push.push(Message::with_acker(6, acks.clone()))
            .await
            .unwrap();
        let last = acks.wait_for(3).await.pop().unwrap();
        assert_eq!((last.data, last.index), (12, None));
        pipeline.shutdown().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_times_out_names_how_many_never_came_back() {
        let (pipeline, push) = start(&Arc::new(Notify::new()));
        let acks = Collector::new();
        push.push(acks.message(13)).await.unwrap();
        hand_over().await;
        push.push(acks.message(2)).await.unwrap();
        let waited = tokio::spawn({
            let acks = acks.clone();
            async move { acks.wait_for(2).await }
        });
        let panic = waited.await.unwrap_err().into_panic();
        assert_eq!(
            panic.downcast_ref::<String>().map(String::as_str),
            Some(
                "Collector::wait_for: 1 of 2 message(s) never came back: 1 acknowledged within 30s (is a \
                 handler or sink stuck, or a batch waiting for a timeout longer than that?)"
            )
        );
        drop(pipeline);
    }
}

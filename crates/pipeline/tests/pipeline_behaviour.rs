//! The engine's contract, one behaviour at a time, on tokio's paused clock: batch triggers and
//! timers, retry timing, dead letters, fan-out, timeouts, rate limits, backpressure, drain
//! deadlines, panics, configuration errors, topology and metrics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thunderline_pipeline::testing::{Collector, Outcome, test_batch, test_message};
use thunderline_pipeline::*;
use tokio::sync::Notify;
use tokio::time::Instant;

/// A batch as a sink saw it: batcher, key, trigger, data, when.
type SeenBatch = (String, BatchKey, Trigger, Vec<u32>, Instant);
type Build = Box<dyn FnOnce(PipelineBuilder<u32>) -> PipelineBuilder<u32>>;

/// What the test saw, in order (acknowledgements aside: a `Collector` records those).
#[derive(Default)]
struct Seen {
    batches: Mutex<Vec<SeenBatch>>,
    attempts: Mutex<Vec<(u32, Instant)>>,
    dead: Mutex<Vec<(String, u32)>>,
}

/// The data of the messages acknowledged as successful so far, sorted.
fn acked_ok(acks: &Collector<u32>) -> Vec<u32> {
    let mut ok: Vec<u32> = acks
        .outcomes()
        .into_iter()
        .filter(Outcome::is_successful)
        .map(|o| o.data)
        .collect();
    ok.sort_unstable();
    ok
}

/// How each message ended: its data, why it failed, whether it was dead-lettered.
fn ended(outcomes: &[Outcome<u32>]) -> Vec<(u32, Option<&str>, bool)> {
    outcomes
        .iter()
        .map(|o| (o.data, o.reason(), o.dead_lettered))
        .collect()
}

struct Record(Arc<Seen>);

impl BatchSink<u32> for Record {
    async fn handle_batch(&self, b: &BatchInfo, ms: &mut [Message<u32>]) -> Result<(), Failure> {
        self.0.batches.lock().unwrap().push((
            b.batcher.to_string(),
            b.batch_key.clone(),
            b.trigger,
            ms.iter().map(|m| m.data).collect(),
            Instant::now(),
        ));
        Ok(())
    }
}

impl DeadLetterSink<u32> for Record {
    async fn dead_letter(&self, stage: &str, ms: &mut [Message<u32>]) {
        let mut dead = self.0.dead.lock().unwrap();
        dead.extend(ms.iter().map(|m| (stage.to_owned(), m.data)));
    }
}

/// Passes every message; keys it by `data % 2` when asked to.
struct Pass {
    keyed: bool,
}

impl Processor<u32> for Pass {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        if self.keyed {
            m.put_batch_key(u64::from(m.data % 2));
        }
        Ok(())
    }
}

fn one_worker() -> ProcessorConfig {
    ProcessorConfig::default().concurrency(1)
}

#[tokio::test(start_paused = true)]
async fn a_partial_batch_leaves_at_its_timeout_counted_from_its_first_message() {
    let seen = Arc::new(Seen::default());
    let acks = Collector::new();
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("timeout")
        .producer(producer)
        .processor(Pass { keyed: false }, one_worker())
        .batcher(BatcherConfig::new("b"), Record(seen.clone()))
        .start()
        .unwrap();
    let start = Instant::now();
    push.push(acks.message(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A second message does not restart the batch's timer.
    push.push(acks.message(2)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    {
        let batches = seen.batches.lock().unwrap();
        assert_eq!(batches.len(), 1);
        let (_, _, trigger, ids, at) = &batches[0];
        assert_eq!(*trigger, Trigger::Timeout);
        assert_eq!(ids, &vec![1, 2]);
        // Default batch_timeout is 2 s.
        assert_eq!(*at - start, Duration::from_secs(2));
    }
    assert_eq!(acked_ok(&acks), vec![1, 2]);
    pipeline.shutdown().await.unwrap();
}

/// Records batches like `Record`, taking 10 ms per batch (a commit).
struct SlowRecord(Arc<Seen>);

impl BatchSink<u32> for SlowRecord {
    async fn handle_batch(&self, b: &BatchInfo, ms: &mut [Message<u32>]) -> Result<(), Failure> {
        Record(self.0.clone()).handle_batch(b, ms).await?;
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn with_group_commit_a_batch_leaves_when_a_sink_worker_is_free() {
    let seen = Arc::new(Seen::default());
    let acks = Collector::new();
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("group-commit")
        .producer(producer)
        .processor(Pass { keyed: false }, one_worker())
        .batcher(
            BatcherConfig::new("log").group_commit(true),
            SlowRecord(seen.clone()),
        )
        .start()
        .unwrap();
    let start = Instant::now();
    // Alone, a message leaves at once: the worker is idle, nothing waits for the 2 s timer.
    push.push(acks.message(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    // While the worker commits, what arrives waits, and leaves together when it is free.
    for i in 1..=45 {
        push.push(acks.message(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let batches = seen.batches.lock().unwrap().clone();
    let (_, _, trigger, ids, at) = &batches[0];
    assert_eq!(
        (*trigger, ids.clone(), *at - start),
        (Trigger::Idle, vec![0], Duration::ZERO)
    );
    let rest: Vec<(Trigger, usize)> = batches[1..].iter().map(|b| (b.2, b.3.len())).collect();
    assert!(
        rest.iter()
            .all(|(t, n)| matches!(t, Trigger::Idle | Trigger::Size) && *n <= 20),
        "{rest:?}"
    );
    assert!(
        rest.len() < 45 / 2,
        "waiting messages were grouped: {rest:?}"
    );
    assert!(
        batches
            .iter()
            .all(|b| b.4 - start < Duration::from_millis(100)),
        "nothing waited for a timeout"
    );
    assert_eq!(acked_ok(&acks), (0..=45).collect::<Vec<_>>());
    // Without it, the first message would have waited for its batch's timeout.
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn batches_leave_by_size_by_key_and_on_flush() {
    let seen = Arc::new(Seen::default());
    let acks = Collector::new();
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("size")
        .producer(producer)
        .processor(Pass { keyed: true }, one_worker())
        .batcher(BatcherConfig::new("b").batch_size(3), Record(seen.clone()))
        .start()
        .unwrap();
    for i in 0..8 {
        push.push(acks.message(i)).await.unwrap();
    }
    let mut flush = acks.message(9);
    flush.put_batch_mode(BatchMode::Flush);
    push.push(flush).await.unwrap();
    tokio::time::sleep(Duration::from_millis(10)).await;
    let batches: Vec<_> = seen
        .batches
        .lock()
        .unwrap()
        .iter()
        .map(|b| (b.1.clone(), b.2, b.3.clone()))
        .collect();
    assert_eq!(
        batches,
        vec![
            (BatchKey::Int(0), Trigger::Size, vec![0, 2, 4]),
            (BatchKey::Int(1), Trigger::Size, vec![1, 3, 5]),
            // 9 is odd: it joins 7 in key 1's batch and sends it out at once.
            (BatchKey::Int(1), Trigger::Flush, vec![7, 9]),
        ]
    );
    // Key 0's partial batch (6) leaves when the pipeline drains.
    pipeline.shutdown().await.unwrap();
    let last = seen.batches.lock().unwrap().last().cloned().unwrap();
    assert_eq!((last.2, last.3), (Trigger::Flush, vec![6]));
    assert_eq!(acked_ok(&acks), vec![0, 1, 2, 3, 4, 5, 6, 7, 9]);
}

/// Fails its first `fails` attempts per message, retryably, noting when each attempt ran.
struct Flaky {
    seen: Arc<Seen>,
    fails: u32,
}

impl Processor<u32> for Flaky {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        self.seen
            .attempts
            .lock()
            .unwrap()
            .push((m.attempts(), Instant::now()));
        if m.attempts() <= self.fails {
            return Err(Failure::retryable("flaky"));
        }
        Ok(())
    }
}

fn gaps(attempts: &[(u32, Instant)]) -> Vec<Duration> {
    attempts.windows(2).map(|w| w[1].1 - w[0].1).collect()
}

#[tokio::test(start_paused = true)]
async fn processor_retries_follow_the_exponential_backoff() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(10);
    let retry = RetryPolicy::exponential(
        5,
        Duration::from_millis(100),
        2.0,
        Duration::from_millis(300),
    )
    .with_jitter(Jitter::None);
    let pipeline = Pipeline::builder("retry")
        .producer(producer)
        .processor(
            Flaky {
                seen: seen.clone(),
                fails: 4,
            },
            one_worker().retry(retry),
        )
        .start()
        .unwrap();
    let outcome = test_message(&push, 1).await;
    assert!(outcome.is_successful(), "{outcome:?}");
    assert_eq!(outcome.attempts, 5);
    drop(push);
    let stats = pipeline.join().await.unwrap();
    let attempts = seen.attempts.lock().unwrap().clone();
    assert_eq!(
        attempts.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    let ms: Vec<u128> = gaps(&attempts).iter().map(Duration::as_millis).collect();
    assert_eq!(ms, vec![100, 200, 300, 300]);
    assert_eq!(stats.successful, 1);
}

#[tokio::test(start_paused = true)]
async fn full_jitter_keeps_each_wait_under_its_cap() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let retry =
        RetryPolicy::exponential(4, Duration::from_millis(100), 3.0, Duration::from_secs(1));
    let pipeline = Pipeline::builder("jitter")
        .producer(producer)
        .processor(
            Flaky {
                seen: seen.clone(),
                fails: 3,
            },
            one_worker().retry(retry.clone()),
        )
        // Partitioned, so that retries wait in line and each message's attempts are adjacent.
        .partition_by(|_| 0)
        .start()
        .unwrap();
    let outcomes = test_batch(&push, 0..30).await;
    assert!(outcomes.iter().all(Outcome::is_successful), "{outcomes:?}");
    drop(push);
    pipeline.join().await.unwrap();
    let attempts = seen.attempts.lock().unwrap().clone();
    // One worker handles one message at a time, retries in line, so each message's attempts
    // are adjacent.
    let mut distinct = std::collections::HashSet::new();
    for per_message in attempts.chunks(4) {
        for (n, gap) in gaps(per_message).into_iter().enumerate() {
            assert!(
                gap <= retry.cap(n as u32),
                "wait {n} was {gap:?}, over {:?}",
                retry.cap(n as u32)
            );
            distinct.insert(gap);
        }
    }
    assert!(distinct.len() > 30, "full jitter should vary the waits");
}

/// Fails a batch's messages whose data is odd, retryably, on their first `fails` attempts.
struct FlakySink {
    seen: Arc<Seen>,
    fails: u32,
}

impl BatchSink<u32> for FlakySink {
    async fn handle_batch(&self, _b: &BatchInfo, ms: &mut [Message<u32>]) -> Result<(), Failure> {
        for m in ms.iter_mut() {
            self.seen
                .attempts
                .lock()
                .unwrap()
                .push((m.attempts(), Instant::now()));
            if m.data % 2 == 1 && m.attempts() <= self.fails {
                m.fail(Failure::retryable("odd"));
            }
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn sink_retries_only_the_failed_messages_then_dead_letters_them() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(10);
    let retry = RetryPolicy::exponential(3, Duration::from_millis(50), 2.0, Duration::from_secs(1))
        .with_jitter(Jitter::None);
    let pipeline = Pipeline::builder("sink-retry")
        .producer(producer)
        .processor(Pass { keyed: false }, one_worker())
        .batcher(
            BatcherConfig::new("b").batch_size(4).retry(retry),
            FlakySink {
                seen: seen.clone(),
                fails: 10,
            },
        )
        .dead_letter(Record(seen.clone()))
        .start()
        .unwrap();
    let outcomes = test_batch(&push, 0..4).await;
    drop(push);
    let stats = pipeline.join().await.unwrap();
    let attempts = seen.attempts.lock().unwrap().clone();
    // 4 messages on the first call, then only the 2 odd ones, twice, 50 ms then 100 ms later.
    assert_eq!(attempts.len(), 8);
    assert_eq!(attempts[4].1 - attempts[0].1, Duration::from_millis(50));
    assert_eq!(attempts[6].1 - attempts[4].1, Duration::from_millis(100));
    assert_eq!(
        ended(&outcomes),
        vec![
            (0, None, false),
            (1, Some("odd"), true),
            (2, None, false),
            (3, Some("odd"), true),
        ]
    );
    assert_eq!(
        outcomes.iter().map(|o| o.attempts).collect::<Vec<_>>(),
        vec![1, 3, 1, 3]
    );
    let mut dead = seen.dead.lock().unwrap().clone();
    dead.sort();
    assert_eq!(
        dead,
        vec![("sink:b".to_owned(), 1), ("sink:b".to_owned(), 3)]
    );
    assert_eq!(
        (stats.successful, stats.failed, stats.dead_lettered),
        (2, 2, 2)
    );
    // One acknowledgement call for the whole batch: acks are grouped, not per message.
    assert!(outcomes.iter().all(|o| o.ack_call == 0), "{outcomes:?}");
}

struct Refuse;

impl Processor<u32> for Refuse {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        match m.data {
            0 => Ok(()),
            1 => Err(Failure::permanent("refused")),
            2 => Err(Failure::retryable("transient")),
            _ => panic!("boom {}", m.data),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_skip_retries_and_dead_letters_and_panics_fail_only_their_message() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("failures")
        .producer(producer)
        .processor(
            Refuse,
            one_worker().retry(RetryPolicy::exponential(
                3,
                Duration::from_millis(1),
                2.0,
                Duration::from_millis(10),
            )),
        )
        .batcher(BatcherConfig::new("b"), Record(seen.clone()))
        .dead_letter(Record(seen.clone()))
        .start()
        .unwrap();
    let outcomes = test_batch(&push, 0..4).await;
    drop(push);
    pipeline.join().await.unwrap();
    assert_eq!(
        ended(&outcomes),
        vec![
            (0, None, false),
            (1, Some("refused"), false),
            (2, Some("transient"), true),
            (3, Some("handle_message panicked: boom 3"), false),
        ]
    );
    let retryable: Vec<Option<bool>> = outcomes
        .iter()
        .map(|o| o.failure().map(Failure::is_retryable))
        .collect();
    assert_eq!(retryable, vec![None, Some(false), Some(true), Some(false)]);
    assert_eq!(
        outcomes.iter().map(|o| o.attempts).collect::<Vec<_>>(),
        vec![1, 1, 3, 1]
    );
    assert_eq!(
        seen.dead.lock().unwrap().clone(),
        vec![("processor".to_owned(), 2)]
    );
}

struct Slow;

impl Processor<u32> for Slow {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        tokio::time::sleep(Duration::from_secs(u64::from(m.data))).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_handler_past_its_timeout_is_cancelled_and_failed() {
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("timeout")
        .producer(producer)
        .processor(Slow, one_worker().timeout(Duration::from_secs(5)))
        .start()
        .unwrap();
    let start = Instant::now();
    let outcomes = test_batch(&push, [1, 60]).await;
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    assert_eq!(
        ended(&outcomes),
        vec![
            (1, None, false),
            (60, Some("handle_message timed out after 5s"), false),
        ]
    );
    assert!(outcomes[1].failure().unwrap().is_retryable());
    drop(push);
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn fan_out_acknowledges_once_after_every_branch_with_the_worst_status() {
    struct Route;
    impl Processor<u32> for Route {
        async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
            m.put_batchers(Arc::from(vec![BatcherName::from("fast"), "slow".into()]));
            Ok(())
        }
    }
    struct FailSome(Arc<Seen>);
    impl BatchSink<u32> for FailSome {
        async fn handle_batch(
            &self,
            b: &BatchInfo,
            ms: &mut [Message<u32>],
        ) -> Result<(), Failure> {
            for m in ms.iter_mut() {
                if m.data == 1 {
                    m.fail(Failure::permanent("slow branch refused 1"));
                }
            }
            Record(self.0.clone()).handle_batch(b, ms).await
        }
    }
    let seen = Arc::new(Seen::default());
    let acks = Collector::new();
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("fan-out")
        .producer(producer)
        .processor(Route, one_worker())
        .batcher(
            BatcherConfig::new("fast").batch_size(2),
            Record(seen.clone()),
        )
        .batcher(
            BatcherConfig::new("slow")
                .batch_size(100)
                .batch_timeout(Duration::from_secs(5)),
            FailSome(seen.clone()),
        )
        .start()
        .unwrap();
    let start = Instant::now();
    push.push(acks.message(0)).await.unwrap();
    push.push(acks.message(1)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The fast branch is done, but nothing is acknowledged until the slow one is too.
    assert_eq!(seen.batches.lock().unwrap().len(), 1);
    assert!(acks.is_empty());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let outcomes = acks.outcomes();
    assert_eq!(acks.ack_calls(), 1, "one call for the group");
    assert_eq!(
        ended(&outcomes),
        vec![(0, None, false), (1, Some("slow branch refused 1"), false)]
    );
    assert!(
        outcomes
            .iter()
            .all(|o| o.acked_at - start == Duration::from_secs(5))
    );
    let stats = pipeline.shutdown().await.unwrap();
    assert_eq!((stats.produced, stats.successful, stats.failed), (2, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn each_message_reaches_its_acknowledger_with_its_ack_data_through_a_fan_out() {
    struct Route;
    impl Processor<u32> for Route {
        async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
            m.put_batchers(Arc::from(vec![BatcherName::from("a"), "b".into()]));
            Ok(())
        }
    }
    /// (data, ack_data, successful) of every message it was told about.
    #[derive(Default)]
    struct ByData(Mutex<Vec<(u32, u64, bool)>>);
    impl Acknowledger<u32> for ByData {
        fn ack(&self, ok: Vec<Message<u32>>, failed: Vec<Message<u32>>) {
            let mut seen = self.0.lock().unwrap();
            seen.extend(ok.iter().map(|m| (m.data, m.ack_data(), true)));
            seen.extend(failed.iter().map(|m| (m.data, m.ack_data(), false)));
        }
    }
    let seen = Arc::new(Seen::default());
    let acker = Arc::new(ByData::default());
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("ack-data")
        .producer(producer)
        .processor(Route, one_worker())
        .batcher(BatcherConfig::new("a").batch_size(1), Record(seen.clone()))
        .batcher(BatcherConfig::new("b").batch_size(1), Record(seen.clone()))
        .start()
        .unwrap();
    for (data, key) in [(7, 1_000_u64), (8, u64::MAX)] {
        push.push(Message::with_ack_data(data, acker.clone(), key))
            .await
            .unwrap();
    }
    push.push(Message::with_acker(9, acker.clone()))
        .await
        .unwrap();
    drop(push);
    pipeline.join().await.unwrap();
    let mut told = acker.0.lock().unwrap().clone();
    told.sort_unstable();
    assert_eq!(
        told,
        vec![(7, 1_000, true), (8, u64::MAX, true), (9, 0, true)]
    );
}

#[tokio::test(start_paused = true)]
async fn an_unknown_batcher_fails_the_message_instead_of_losing_it() {
    struct Misroute;
    impl Processor<u32> for Misroute {
        async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
            m.put_batcher("nowhere");
            Ok(())
        }
    }
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("misroute")
        .producer(producer)
        .processor(Misroute, one_worker())
        .batcher(BatcherConfig::new("b"), Record(seen.clone()))
        .start()
        .unwrap();
    let outcome = test_message(&push, 5).await;
    assert_eq!(
        outcome.failure(),
        Some(&Failure::permanent("no batcher is named \"nowhere\""))
    );
    drop(push);
    pipeline.join().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_caps_messages_per_interval() {
    struct Stamp(Arc<Seen>);
    impl Processor<u32> for Stamp {
        async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
            self.0
                .attempts
                .lock()
                .unwrap()
                .push((m.data, Instant::now()));
            Ok(())
        }
    }
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("rate")
        .producer(producer)
        .rate_limit(10, Duration::from_secs(1))
        .processor(
            Stamp(seen.clone()),
            ProcessorConfig::default().concurrency(2),
        )
        .start()
        .unwrap();
    let start = Instant::now();
    for i in 0..35 {
        push.push(Message::new(i)).await.unwrap();
    }
    drop(push);
    pipeline.join().await.unwrap();
    let mut per_second = [0usize; 4];
    for (_, at) in seen.attempts.lock().unwrap().iter() {
        per_second[(*at - start).as_secs() as usize] += 1;
    }
    assert_eq!(per_second, [10, 10, 10, 5]);
}

/// Holds every message until released.
struct Gate(Arc<Notify>);

impl Processor<u32> for Gate {
    async fn handle_message(&self, _m: &mut Message<u32>) -> Result<(), Failure> {
        self.0.notified().await;
        Ok(())
    }
}

/// Holds every batch until the gate opens.
struct GatedSink(Arc<Notify>, Arc<Seen>);

impl BatchSink<u32> for GatedSink {
    async fn handle_batch(&self, b: &BatchInfo, ms: &mut [Message<u32>]) -> Result<(), Failure> {
        self.0.notified().await;
        Record(self.1.clone()).handle_batch(b, ms).await
    }
}

/// Sends every message to both batchers.
struct Both(Arc<[BatcherName]>);

impl Processor<u32> for Both {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        m.put_batchers(self.0.clone());
        Ok(())
    }
}

/// A sink that cannot keep up holds back its own batcher, and through the in-flight bound the
/// producers; it does not stop the other batchers while the bound has room.
#[tokio::test(start_paused = true)]
async fn a_stuck_sink_does_not_stop_the_other_batchers() {
    let stuck = Arc::new(Seen::default());
    let flowing = Arc::new(Seen::default());
    let acks = Collector::new();
    let gate = Arc::new(Notify::new());
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("two-sinks")
        .producer(producer)
        .processor(
            Both(Arc::from(vec![
                BatcherName::from("stuck"),
                "flowing".into(),
            ])),
            one_worker(),
        )
        .batcher(
            BatcherConfig::new("stuck").batch_size(1),
            GatedSink(gate.clone(), stuck.clone()),
        )
        .batcher(
            BatcherConfig::new("flowing").batch_size(1),
            Record(flowing.clone()),
        )
        .in_flight_bound(500)
        .start()
        .unwrap();
    for i in 0..300 {
        push.push(acks.message(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        flowing.batches.lock().unwrap().len(),
        300,
        "the other batcher delivered everything while one sink was stuck"
    );
    assert!(
        acks.is_empty(),
        "nothing is acknowledged before every sink has it"
    );
    let stats = pipeline.stats();
    assert_eq!(stats.in_flight, 300);
    for _ in 0..300 {
        gate.notify_one();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(push);
    pipeline.join().await.unwrap();
    assert_eq!(acked_ok(&acks), (0..300).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn a_full_pipeline_pushes_back_without_dropping_anything() {
    let acks = Collector::new();
    let gate = Arc::new(Notify::new());
    let (producer, push) = in_memory(2);
    let pipeline = Pipeline::builder("full")
        .producer(producer)
        .processor(Gate(gate.clone()), one_worker().demand(1, 0))
        .in_flight_bound(1)
        .start()
        .unwrap();
    // One message in flight, two queued: the fourth does not fit.
    for i in 0..3 {
        push.push(acks.message(i)).await.unwrap();
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(pipeline.stats().in_flight, 1);
    let refused = push.try_push(acks.message(3)).unwrap_err();
    assert!(matches!(refused, PushError::Full(_)));
    assert_eq!(
        refused.to_string(),
        "the pipeline is full: retry later or use push(..).await to wait"
    );
    assert_eq!(refused.into_message().data, 3, "the message comes back");
    // push(..).await waits for room instead.
    let waiting = tokio::spawn({
        let push = push.clone();
        let acks = acks.clone();
        async move { push.push(acks.message(3)).await.is_ok() }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(!waiting.is_finished());
    for _ in 0..4 {
        gate.notify_one();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(waiting.await.unwrap());
    drop(push);
    let stats = pipeline.join().await.unwrap();
    assert_eq!(acked_ok(&acks), vec![0, 1, 2, 3]);
    assert_eq!(stats.max_in_flight, 1);
}

/// With `partition_by`, messages ready for a worker that has used up its demand wait for its
/// next ask. The producer must hear that ask even while it waits for new input: a burst for one
/// key must finish without any later push to wake the producer.
#[tokio::test(start_paused = true)]
async fn a_burst_for_one_partition_finishes_without_more_input() {
    // Sizes that leave fewer messages ready than the idle worker's demand at the end.
    for n in [13u32, 23, 57] {
        let acks = Collector::new();
        let (producer, push) = in_memory(1000);
        let pipeline = Pipeline::builder("partitioned")
            .producer(producer)
            .processor(
                Pass { keyed: false },
                ProcessorConfig::default().concurrency(2).demand(10, 5),
            )
            .partition_by(|_| 0)
            .start()
            .unwrap();
        for i in 0..n {
            push.push(acks.message(i)).await.unwrap();
        }
        // No more pushes: everything already pushed must still be handled.
        let acked = acks
            .wait_for_within(n as usize, Duration::from_secs(5))
            .await
            .len();
        assert_eq!(
            acked, n as usize,
            "{acked} of {n} acknowledged; the rest sat ready for a worker whose ask went unheard"
        );
        drop(push);
        pipeline.join().await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_past_its_deadline_aborts_and_says_what_was_left() {
    let acks = Collector::new();
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("stuck")
        .producer(producer)
        .processor(Gate(Arc::new(Notify::new())), one_worker())
        .start()
        .unwrap();
    for i in 0..3 {
        push.push(acks.message(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = pipeline
        .shutdown_within(Duration::from_secs(5))
        .await
        .unwrap_err();
    match err {
        ShutdownError::Deadline { deadline, left } => {
            assert_eq!(deadline, Duration::from_secs(5));
            assert_eq!(left, 3);
        }
        other => panic!("unexpected {other}"),
    }
    // What was left is acknowledged as failed by the time the error is back.
    let outcomes = acks.outcomes();
    assert_eq!(outcomes.len(), 3);
    assert!(
        outcomes
            .iter()
            .all(|o| o.reason().is_some_and(|r| r.starts_with("abandoned"))),
        "{outcomes:?}"
    );
    // Pushes after the drain began are refused, and the message handed back.
    let refused = push.push(Message::new(9)).await.unwrap_err();
    assert!(matches!(refused, PushError::Closed(_)));
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_open_batches_and_acknowledges_everything_taken() {
    let seen = Arc::new(Seen::default());
    let acks = Collector::new();
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("drain")
        .producer(producer)
        .processor(
            Pass { keyed: true },
            ProcessorConfig::default().concurrency(2),
        )
        .batcher(
            BatcherConfig::new("b").batch_timeout(Duration::from_secs(3600)),
            Record(seen.clone()),
        )
        .start()
        .unwrap();
    for i in 0..105 {
        push.push(acks.message(i)).await.unwrap();
    }
    let start = Instant::now();
    let stats = pipeline.shutdown().await.unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "the drain does not wait out timeouts"
    );
    assert_eq!(acked_ok(&acks), (0..105).collect::<Vec<_>>());
    assert_eq!(
        (stats.produced, stats.successful, stats.in_flight),
        (105, 105, 0)
    );
    let triggers: Vec<Trigger> = seen.batches.lock().unwrap().iter().map(|b| b.2).collect();
    assert!(triggers.contains(&Trigger::Flush));
}

#[tokio::test(start_paused = true)]
async fn cpu_bound_handlers_run_on_rayon_and_retry_in_order_per_key_or_out_of_line() {
    struct Cpu(Arc<AtomicUsize>);
    impl CpuProcessor<u32> for Cpu {
        fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
            assert!(
                rayon::current_thread_index().is_some(),
                "CPU-bound work must run on the rayon pool"
            );
            self.0.fetch_add(1, Ordering::SeqCst);
            if m.data == 2 && m.attempts() < 3 {
                return Err(Failure::retryable("not yet"));
            }
            m.data *= 10;
            Ok(())
        }
    }
    for partitioned in [true, false] {
        let seen = Arc::new(Seen::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let (producer, push) = in_memory(10);
        let mut builder = Pipeline::builder("cpu")
            .producer(producer)
            .cpu_processor(
                Cpu(calls.clone()),
                one_worker().retry(RetryPolicy::exponential(
                    3,
                    Duration::from_millis(10),
                    2.0,
                    Duration::from_secs(1),
                )),
            )
            .batcher(BatcherConfig::new("b").batch_size(5), Record(seen.clone()));
        if partitioned {
            builder = builder.partition_by(|_| 0);
        }
        let pipeline = builder.start().unwrap();
        for i in 0..5 {
            push.push(Message::new(i)).await.unwrap();
        }
        drop(push);
        pipeline.join().await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 7);
        let order: Vec<u32> = seen
            .batches
            .lock()
            .unwrap()
            .iter()
            .flat_map(|b| b.3.clone())
            .collect();
        if partitioned {
            assert_eq!(
                order,
                vec![0, 10, 20, 30, 40],
                "order kept across the retry"
            );
        } else {
            assert_eq!(
                order,
                vec![0, 10, 30, 40, 20],
                "the retry waits out of line"
            );
        }
    }
}

#[tokio::test]
async fn impossible_configurations_are_refused_before_anything_starts() {
    fn start(
        build: impl FnOnce(PipelineBuilder<u32>) -> PipelineBuilder<u32>,
    ) -> Result<Pipeline<u32>, ConfigError> {
        let (producer, _push) = in_memory::<u32>(1);
        build(
            Pipeline::builder("bad")
                .producer(producer)
                .processor(Pass { keyed: false }, ProcessorConfig::default()),
        )
        .start()
    }
    let cases: Vec<(Build, &str)> = vec![
        (
            Box::new(|b| {
                b.batcher(
                    BatcherConfig::new("x").batch_size(0),
                    Record(Default::default()),
                )
            }),
            "batcher \"x\": batch_size must be at least 1",
        ),
        (
            Box::new(|b| {
                b.batcher(BatcherConfig::new("x"), Record(Default::default()))
                    .batcher(BatcherConfig::new("x"), Record(Default::default()))
            }),
            "two batchers are named \"x\": batcher names must be unique",
        ),
        (
            Box::new(|b| {
                b.processor(
                    Pass { keyed: false },
                    ProcessorConfig::default().demand(5, 5),
                )
            }),
            "processors: min_demand (5) must be below max_demand (5)",
        ),
        (
            Box::new(|b| b.rate_limit(0, Duration::from_secs(1))),
            "rate limit: allowed messages and interval must both be above zero",
        ),
        (
            Box::new(|b| {
                b.batcher(BatcherConfig::new("x"), Record(Default::default()))
                    .in_flight_bound(5)
            }),
            "in_flight_bound: 5 is below batch_size 20 of batcher \"x\": its batches could never \
             fill, and every one would wait out its timeout",
        ),
        (
            Box::new(|b| {
                b.processor(
                    Pass { keyed: false },
                    ProcessorConfig::default().retry(RetryPolicy::exponential(
                        0,
                        Duration::ZERO,
                        2.0,
                        Duration::ZERO,
                    )),
                )
            }),
            "processors retry: max_attempts must be at least 1 (1 means no retry)",
        ),
    ];
    for (build, expected) in cases {
        let err = start(build).err().expect("refused");
        assert_eq!(err.to_string(), expected);
    }
    let err = Pipeline::<u32>::builder("none")
        .processor(Pass { keyed: false }, ProcessorConfig::default())
        .start()
        .err()
        .unwrap();
    assert!(matches!(err, ConfigError::NoProducer));
}

#[tokio::test(start_paused = true)]
async fn topology_and_metrics_describe_the_running_pipeline() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("observed")
        .producer(producer)
        .processor(
            Pass { keyed: false },
            ProcessorConfig::default().concurrency(3),
        )
        .batcher(
            BatcherConfig::new("audit").batch_size(5).concurrency(2),
            Record(seen.clone()),
        )
        .start()
        .unwrap();
    for i in 0..12 {
        push.push(Message::new(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let topology = pipeline.topology();
    let stages: Vec<(String, StageKind, usize)> = topology
        .stages
        .iter()
        .map(|s| (s.name.clone(), s.kind, s.concurrency))
        .collect();
    assert_eq!(
        stages,
        vec![
            ("producer".into(), StageKind::Producer, 1),
            ("processor".into(), StageKind::Processor, 3),
            ("batcher:audit".into(), StageKind::Batcher, 1),
            ("sink:audit".into(), StageKind::Sink, 2),
        ]
    );
    // Two batches of 5 went out; 2 messages wait in the batcher.
    assert_eq!(topology.in_flight, 2);
    assert_eq!(topology.stages[2].in_flight, 2);

    let text = prometheus::TextEncoder::new()
        .encode_to_string(&pipeline.registry().gather())
        .unwrap();
    for line in [
        r#"thunderline_pipeline_messages_total{outcome="in",pipeline="observed",stage="processor"} 12"#,
        r#"thunderline_pipeline_messages_total{outcome="out",pipeline="observed",stage="sink:audit"} 10"#,
        r#"thunderline_pipeline_batch_size_count{batcher="audit",pipeline="observed",trigger="size"} 2"#,
        r#"thunderline_pipeline_in_flight{pipeline="observed",stage="batcher:audit"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    assert!(text.contains("thunderline_pipeline_stage_duration_seconds_bucket"));
    pipeline.shutdown().await.unwrap();
}

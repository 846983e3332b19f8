//! Property tests of the engine's invariants over random workloads, failure patterns and shapes:
//! every message acknowledged exactly once with the status it earned, nothing lost (drain
//! included), order kept per partition key, in-flight never above its bound, no batch above
//! `batch_size`, dead letters exactly the exhausted messages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use thunderline::pipeline::*;

/// One test message: what it is, and how it is scripted to fail.
#[derive(Clone, Debug)]
struct Item {
    id: u32,
    key: u8,
    /// The processor fails (retryably) on attempts up to and including this one.
    fail_processor_until: u32,
    /// The processor fails permanently.
    permanent: bool,
    /// The sink fails (retryably) on attempts up to and including this one...
    fail_sink_until: u32,
    /// ...in these batchers (bit 0: "a", bit 1: "b").
    fail_sink_in: u8,
    /// Sent to both batchers.
    fan_out: bool,
}

#[derive(Clone, Debug)]
struct Shape {
    processors: usize,
    max_demand: usize,
    min_demand: usize,
    batch_size: usize,
    sink_concurrency: usize,
    processor_attempts: u32,
    sink_attempts: u32,
    partitioned: bool,
    cpu_bound: bool,
    in_flight_bound: Option<usize>,
}

fn item_strategy() -> impl Strategy<Value = (u8, u32, bool, (u32, u8), bool)> {
    (
        0u8..6,
        prop_oneof![6 => Just(0u32), 2 => 1u32..3, 1 => 3u32..6],
        prop::bool::weighted(0.05),
        (prop_oneof![8 => Just(0u32), 1 => 1u32..4], 1u8..4),
        prop::bool::weighted(0.2),
    )
}

fn items_strategy() -> impl Strategy<Value = Vec<Item>> {
    prop::collection::vec(item_strategy(), 0..300).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(
                |(
                    i,
                    (
                        key,
                        fail_processor_until,
                        permanent,
                        (fail_sink_until, fail_sink_in),
                        fan_out,
                    ),
                )| {
                    Item {
                        id: i as u32,
                        key,
                        fail_processor_until,
                        permanent,
                        fail_sink_until,
                        fail_sink_in,
                        fan_out,
                    }
                },
            )
            .collect()
    })
}

fn shape_strategy() -> impl Strategy<Value = Shape> {
    (
        1usize..5,
        1usize..24,
        1usize..30,
        1usize..3,
        1u32..5,
        1u32..4,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0usize..64),
    )
        .prop_flat_map(
            |(
                processors,
                max_demand,
                batch_size,
                sink_concurrency,
                processor_attempts,
                sink_attempts,
                partitioned,
                cpu_bound,
                in_flight_bound,
            )| {
                (0..max_demand).prop_map(move |min_demand| Shape {
                    processors,
                    max_demand,
                    min_demand,
                    batch_size,
                    sink_concurrency,
                    processor_attempts,
                    sink_attempts,
                    partitioned,
                    cpu_bound,
                    // A bound below batch_size is refused at start (tested elsewhere).
                    in_flight_bound: in_flight_bound.map(|extra| batch_size + extra),
                })
            },
        )
}

/// Everything the pipeline did, as the test saw it.
#[derive(Default)]
struct Log {
    acks: Mutex<HashMap<u32, Vec<bool>>>,
    ack_calls: AtomicUsize,
    /// (key, id, worker thread/task marker) in the order the processor first handled them.
    handled: Mutex<Vec<(u8, u32)>>,
    /// (batcher, key, id) in the order sinks received them, first attempts only.
    sunk: Mutex<Vec<(String, u8, u32)>>,
    batch_sizes: Mutex<Vec<usize>>,
    dead: Mutex<Vec<u32>>,
    /// Messages acknowledged before every sink they were routed to had them.
    early_acks: Mutex<Vec<u32>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

struct Acker(Arc<Log>);

impl Acknowledger<Item> for Acker {
    fn ack(&self, successful: Vec<Message<Item>>, failed: Vec<Message<Item>>) {
        self.0.ack_calls.fetch_add(1, Ordering::SeqCst);
        let n = successful.len() + failed.len();
        self.0.in_flight.fetch_sub(n, Ordering::SeqCst);
        {
            let sunk = self.0.sunk.lock().unwrap();
            let mut early = self.0.early_acks.lock().unwrap();
            for m in &successful {
                let branches: &[&str] = if m.data.fan_out { &["a", "b"] } else { &["a"] };
                for b in branches {
                    if !sunk.iter().any(|(n, _, id)| n == b && *id == m.data.id) {
                        early.push(m.data.id);
                    }
                }
            }
        }
        let mut acks = self.0.acks.lock().unwrap();
        for m in successful {
            acks.entry(m.data.id).or_default().push(true);
        }
        for m in failed {
            acks.entry(m.data.id).or_default().push(false);
        }
    }
}

/// Hands out scripted items, counting what is in flight from the outside.
struct Script {
    items: std::vec::IntoIter<Item>,
    log: Arc<Log>,
    acker: Arc<dyn Acknowledger<Item>>,
}

impl Producer<Item> for Script {
    async fn produce(&mut self, demand: &mut Demand<Item>) -> Produced {
        while !demand.is_filled() {
            let Some(item) = self.items.next() else {
                return Produced::Exhausted;
            };
            let now = self.log.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.log.max_in_flight.fetch_max(now, Ordering::SeqCst);
            let mut msg = Message::with_acker(item, self.acker.clone());
            msg.put_batch_key(msg.data.key as u64);
            if msg.data.fan_out {
                msg.put_batchers(Arc::from(vec![BatcherName::from("a"), "b".into()]));
            }
            if demand.push(msg).is_err() {
                unreachable!("checked is_filled");
            }
        }
        Produced::More
    }
}

fn judge(item: &Item, msg_attempts: u32) -> Result<(), Failure> {
    if item.permanent {
        return Err(Failure::permanent("scripted permanent failure"));
    }
    if msg_attempts <= item.fail_processor_until {
        return Err(Failure::retryable(format!(
            "scripted failure {msg_attempts}"
        )));
    }
    Ok(())
}

struct AsyncWork(Arc<Log>);

impl Processor<Item> for AsyncWork {
    async fn handle_message(&self, msg: &mut Message<Item>) -> Result<(), Failure> {
        if msg.attempts() == 1 {
            self.0
                .handled
                .lock()
                .unwrap()
                .push((msg.data.key, msg.data.id));
        }
        tokio::task::yield_now().await;
        judge(&msg.data, msg.attempts())
    }
}

struct CpuWork(Arc<Log>);

impl CpuProcessor<Item> for CpuWork {
    fn handle_message(&self, msg: &mut Message<Item>) -> Result<(), Failure> {
        if msg.attempts() == 1 {
            self.0
                .handled
                .lock()
                .unwrap()
                .push((msg.data.key, msg.data.id));
        }
        judge(&msg.data, msg.attempts())
    }
}

struct Sink {
    name: &'static str,
    bit: u8,
    log: Arc<Log>,
    batch_size: usize,
}

impl BatchSink<Item> for Sink {
    async fn handle_batch(
        &self,
        batch: &BatchInfo,
        msgs: &mut [Message<Item>],
    ) -> Result<(), Failure> {
        assert!(
            msgs.len() <= self.batch_size,
            "batch of {} over {}",
            msgs.len(),
            self.batch_size
        );
        assert_eq!(batch.size, msgs.len());
        self.log.batch_sizes.lock().unwrap().push(msgs.len());
        for m in msgs.iter_mut() {
            assert_eq!(
                *m.batch_key(),
                BatchKey::Int(m.data.key as u64),
                "batch mixes keys"
            );
            if m.attempts() == 1 {
                self.log
                    .sunk
                    .lock()
                    .unwrap()
                    .push((self.name.to_owned(), m.data.key, m.data.id));
            }
            if m.attempts() <= m.data.fail_sink_until && m.data.fail_sink_in & self.bit != 0 {
                m.fail(Failure::retryable("scripted sink failure"));
            }
        }
        tokio::task::yield_now().await;
        Ok(())
    }
}

struct Dead(Arc<Log>);

impl DeadLetterSink<Item> for Dead {
    async fn dead_letter(&self, _stage: &str, msgs: &mut [Message<Item>]) {
        let mut dead = self.0.dead.lock().unwrap();
        dead.extend(msgs.iter().map(|m| m.data.id));
    }
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(
        attempts,
        Duration::from_millis(10),
        2.0,
        Duration::from_millis(80),
    )
}

/// What each item should end as: ok, and whether it should be dead-lettered (in how many copies).
fn expected(item: &Item, shape: &Shape) -> (bool, usize) {
    if item.permanent {
        return (false, 0);
    }
    if item.fail_processor_until >= shape.processor_attempts {
        return (false, 1);
    }
    if item.fail_sink_until >= shape.sink_attempts {
        let visited = if item.fan_out { 0b11 } else { 0b01 };
        let exhausted = (item.fail_sink_in & visited).count_ones() as usize;
        return (exhausted == 0, exhausted);
    }
    (true, 0)
}

async fn run_case(items: Vec<Item>, shape: Shape) -> (Arc<Log>, PipelineStats) {
    let log = Arc::new(Log::default());
    let acker: Arc<dyn Acknowledger<Item>> = Arc::new(Acker(log.clone()));
    let producer = Script {
        items: items.clone().into_iter(),
        log: log.clone(),
        acker,
    };
    let config = ProcessorConfig::default()
        .concurrency(shape.processors)
        .demand(shape.max_demand, shape.min_demand)
        .retry(fast_retry(shape.processor_attempts));
    let mut builder = Pipeline::builder("props").producer(producer);
    builder = if shape.cpu_bound {
        builder.cpu_processor(CpuWork(log.clone()), config)
    } else {
        builder.processor(AsyncWork(log.clone()), config)
    };
    if shape.partitioned {
        builder = builder.partition_by(|m: &Message<Item>| m.data.key as u64);
    }
    if let Some(bound) = shape.in_flight_bound {
        builder = builder.in_flight_bound(bound);
    }
    for (name, bit) in [("a", 1), ("b", 2)] {
        builder = builder.batcher(
            BatcherConfig::new(name)
                .batch_size(shape.batch_size)
                .batch_timeout(Duration::from_millis(50))
                .concurrency(shape.sink_concurrency)
                .retry(fast_retry(shape.sink_attempts)),
            Sink {
                name,
                bit,
                log: log.clone(),
                batch_size: shape.batch_size,
            },
        );
    }
    let pipeline = builder
        .dead_letter(Dead(log.clone()))
        .start()
        .expect("valid shape");
    let stats = pipeline.join().await.expect("the pipeline ends by itself");
    (log, stats)
}

fn check(
    items: &[Item],
    shape: &Shape,
    log: &Log,
    stats: &PipelineStats,
) -> Result<(), TestCaseError> {
    let acks = log.acks.lock().unwrap();
    prop_assert_eq!(acks.len(), items.len(), "every message acknowledged");
    let mut dead_expected: Vec<u32> = Vec::new();
    for item in items {
        let got = acks.get(&item.id).cloned().unwrap_or_default();
        prop_assert_eq!(
            got.len(),
            1,
            "message {} acknowledged {} times",
            item.id,
            got.len()
        );
        let (ok, dead_copies) = expected(item, shape);
        prop_assert_eq!(got[0], ok, "message {} status", item.id);
        dead_expected.extend(std::iter::repeat_n(item.id, dead_copies));
    }
    let mut dead = log.dead.lock().unwrap().clone();
    dead.sort_unstable();
    dead_expected.sort_unstable();
    prop_assert_eq!(
        dead,
        dead_expected,
        "dead letters are exactly the exhausted messages"
    );
    let early = log.early_acks.lock().unwrap();
    prop_assert!(
        early.is_empty(),
        "acknowledged before every sink had them: {:?}",
        *early
    );

    prop_assert_eq!(stats.produced, items.len() as u64);
    prop_assert_eq!(stats.successful + stats.failed, items.len() as u64);
    prop_assert_eq!(stats.in_flight, 0);
    prop_assert!(stats.max_in_flight <= stats.in_flight_bound);
    prop_assert!(log.max_in_flight.load(Ordering::SeqCst) <= stats.in_flight_bound);
    prop_assert!(
        log.batch_sizes
            .lock()
            .unwrap()
            .iter()
            .all(|&s| s <= shape.batch_size)
    );

    // Order per key: the processor handles one key's messages in the order they were produced
    // when partitioned; sinks see them in that order too with one batch processor and no sink
    // retries to reorder them.
    if shape.partitioned {
        let handled = log.handled.lock().unwrap();
        let mut last: HashMap<u8, u32> = HashMap::new();
        for &(key, id) in handled.iter() {
            if let Some(prev) = last.insert(key, id) {
                prop_assert!(prev < id, "key {key}: {id} handled after {prev}");
            }
        }
        let sink_retries = items.iter().any(|i| i.fail_sink_until > 0);
        if shape.sink_concurrency == 1 && !sink_retries {
            let sunk = log.sunk.lock().unwrap();
            let mut last: HashMap<(String, u8), u32> = HashMap::new();
            for (batcher, key, id) in sunk.iter() {
                if let Some(prev) = last.insert((batcher.clone(), *key), *id) {
                    prop_assert!(prev < *id, "{batcher}/{key}: {id} sunk after {prev}");
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// On tokio's paused clock: retries and batch timeouts run in virtual time.
    #[test]
    fn every_message_is_acknowledged_once_with_its_status(items in items_strategy(), shape in shape_strategy()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (log, stats) = runtime.block_on(run_case(items.clone(), shape.clone()));
        check(&items, &shape, &log, &stats)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The same invariants with real threads racing each other.
    #[test]
    fn invariants_hold_on_a_multi_threaded_runtime(items in items_strategy(), shape in shape_strategy()) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let (log, stats) = runtime.block_on(run_case(items.clone(), shape.clone()));
        check(&items, &shape, &log, &stats)?;
    }
}

/// Pushes through an in-memory producer, then shuts down mid-stream.
async fn drain_case(
    total: usize,
    shutdown_after: usize,
    shape: Shape,
) -> Result<(), TestCaseError> {
    let log = Arc::new(Log::default());
    let acker: Arc<dyn Acknowledger<Item>> = Arc::new(Acker(log.clone()));
    let (producer, push) = in_memory::<Item>(8);
    let mut builder = Pipeline::builder("drain")
        .producer(producer)
        .processor(
            AsyncWork(log.clone()),
            ProcessorConfig::default()
                .concurrency(shape.processors)
                .demand(shape.max_demand, shape.min_demand),
        )
        .batcher(
            BatcherConfig::new("a")
                .batch_size(shape.batch_size)
                // Longer than the test: only the drain can flush partial batches.
                .batch_timeout(Duration::from_secs(3600)),
            Sink {
                name: "a",
                bit: 1,
                log: log.clone(),
                batch_size: shape.batch_size,
            },
        );
    if let Some(bound) = shape.in_flight_bound {
        builder = builder.in_flight_bound(bound);
    }
    let pipeline = builder.start().expect("valid shape");
    let pusher = tokio::spawn(async move {
        let mut accepted = Vec::new();
        let mut refused = Vec::new();
        for id in 0..total as u32 {
            let item = Item {
                id,
                key: (id % 3) as u8,
                fail_processor_until: 0,
                permanent: false,
                fail_sink_until: 0,
                fail_sink_in: 0,
                fan_out: false,
            };
            let mut msg = Message::with_acker(item, acker.clone());
            msg.put_batch_key((id % 3) as u64);
            match push.push(msg).await {
                Ok(()) => accepted.push(id),
                Err(PushError::Closed(m)) => refused.push(m.data.id),
                Err(PushError::Full(_)) => unreachable!("push waits instead"),
            }
        }
        (accepted, refused)
    });
    // Shut down once `shutdown_after` messages are in, or after a second (a tight in-flight
    // bound can hold messages in partial batches until the drain flushes them).
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while (pipeline.stats().produced as usize) < shutdown_after.min(total) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let stats = pipeline.shutdown_within(Duration::from_secs(600)).await;
    prop_assert!(stats.is_ok(), "drain failed: {:?}", stats.err());
    let (accepted, refused) = pusher.await.unwrap();
    prop_assert_eq!(
        accepted.len() + refused.len(),
        total,
        "every push was answered"
    );
    let acks = log.acks.lock().unwrap();
    for id in &accepted {
        prop_assert_eq!(
            acks.get(id).map(Vec::len),
            Some(1),
            "accepted message {} acked once",
            id
        );
    }
    for id in &refused {
        prop_assert!(
            !acks.contains_key(id),
            "refused message {} must not be acked",
            id
        );
    }
    prop_assert_eq!(acks.len(), accepted.len());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn drain_loses_nothing(total in 0usize..400, cut in 0usize..400, shape in shape_strategy()) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(drain_case(total, cut, shape))?;
    }
}

/// Fails every attempt retryably, noting when each ran.
struct AlwaysFails(Arc<Mutex<Vec<tokio::time::Instant>>>);

impl Processor<u32> for AlwaysFails {
    async fn handle_message(&self, _m: &mut Message<u32>) -> Result<(), Failure> {
        self.0.lock().unwrap().push(tokio::time::Instant::now());
        Err(Failure::retryable("always"))
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Attempt k+1 starts within the k-th cap after attempt k (exactly at it without jitter),
    /// and there are exactly `max_attempts` attempts.
    #[test]
    fn retries_follow_the_configured_backoff(
        attempts in 1u32..8,
        initial_ms in 1u64..500,
        multiplier in 1.0f32..4.0,
        max_ms in 500u64..5_000,
        jitter in any::<bool>(),
    ) {
        let policy = RetryPolicy::exponential(
            attempts,
            Duration::from_millis(initial_ms),
            multiplier,
            Duration::from_millis(max_ms),
        )
        .with_jitter(if jitter { Jitter::Full } else { Jitter::None });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let times = Arc::new(Mutex::new(Vec::new()));
        let stats = runtime.block_on(async {
            let (producer, push) = in_memory(1);
            let pipeline = Pipeline::builder("backoff")
                .producer(producer)
                .processor(
                    AlwaysFails(times.clone()),
                    ProcessorConfig::default().concurrency(1).retry(policy.clone()),
                )
                .start()
                .unwrap();
            push.push(Message::new(0u32)).await.unwrap();
            drop(push);
            pipeline.join().await.unwrap()
        });
        prop_assert_eq!(stats.failed, 1);
        let times = times.lock().unwrap();
        prop_assert_eq!(times.len(), attempts as usize);
        for (n, pair) in times.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let cap = policy.cap(n as u32);
            // The paused clock fires timers on whole milliseconds.
            let slack = Duration::from_millis(1);
            prop_assert!(gap <= cap + slack, "wait {} was {:?}, cap {:?}", n, gap, cap);
            if !jitter {
                prop_assert!(gap + slack >= cap, "wait {} was {:?}, expected {:?}", n, gap, cap);
            }
        }
    }

    /// A batch with fewer than `batch_size` messages leaves exactly `batch_timeout` after its
    /// first message, whatever arrives in between.
    #[test]
    fn a_partial_batch_leaves_at_its_timeout(
        batch_size in 2usize..50,
        timeout_ms in 1u64..10_000,
        gaps_ms in prop::collection::vec(0u64..200, 1..20),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let left = Arc::new(Mutex::new(Vec::new()));
        struct When(Arc<Mutex<Vec<(usize, Trigger, tokio::time::Instant)>>>);
        impl BatchSink<u32> for When {
            async fn handle_batch(&self, b: &BatchInfo, m: &mut [Message<u32>]) -> Result<(), Failure> {
                self.0.lock().unwrap().push((m.len(), b.trigger, tokio::time::Instant::now()));
                Ok(())
            }
        }
        let n = gaps_ms.len().min(batch_size - 1);
        let first = runtime.block_on(async {
            let (producer, push) = in_memory(100);
            let pipeline = Pipeline::builder("timer")
                .producer(producer)
                .processor(Pass, ProcessorConfig::default().concurrency(1))
                .batcher(
                    BatcherConfig::new("b")
                        .batch_size(batch_size)
                        .batch_timeout(Duration::from_millis(timeout_ms)),
                    When(left.clone()),
                )
                .start()
                .unwrap();
            let first = tokio::time::Instant::now();
            for (i, gap) in gaps_ms.iter().take(n).enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(*gap)).await;
                }
                push.push(Message::new(i as u32)).await.unwrap();
            }
            tokio::time::sleep(Duration::from_millis(timeout_ms + 250 * 20)).await;
            pipeline.shutdown().await.unwrap();
            first
        });
        let left = left.lock().unwrap();
        let sent_before_timeout: u64 = gaps_ms.iter().take(n).skip(1).sum();
        if sent_before_timeout < timeout_ms {
            let (size, trigger, at) = left[0];
            prop_assert_eq!(trigger, Trigger::Timeout);
            prop_assert_eq!(at - first, Duration::from_millis(timeout_ms));
            prop_assert!(size <= n);
        }
        prop_assert_eq!(left.iter().map(|b| b.0).sum::<usize>(), n);
        prop_assert!(left.iter().all(|b| b.0 < batch_size));
    }
}

struct Pass;

impl Processor<u32> for Pass {
    async fn handle_message(&self, _m: &mut Message<u32>) -> Result<(), Failure> {
        Ok(())
    }
}

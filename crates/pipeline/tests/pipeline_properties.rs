//! Property tests of the engine's contract (lib.rs, ack.rs) over random workloads,
//! failure patterns and shapes, with one to three producers at once: every message acknowledged
//! exactly once with the status it earned, in groups (one call per acknowledger per chunk or
//! batch); nothing lost, drains included, on both runtimes and across resizes at random points;
//! order kept per partition key through processors and sinks, retries included; in-flight never
//! above its bound; no batch above `batch_size`; dead letters exactly the messages whose attempts
//! ran out (and permanent failures with `dead_letter_permanent`), counted once per message.
//!
//! Nothing is asserted inside a handler or an acknowledger: the engine turns a panicking handler
//! into a failed message, so an assertion there would only fail a message. They note what they
//! saw, and anything wrong, in a `Log` that the test checks after the run.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

/// `cases` cases, after the ones that failed before (kept beside this file: proptest cannot find
/// it by itself from a workspace member's directory).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/pipeline_properties.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}
use thunderline_pipeline::*;

/// The batchers every test pipeline has, and each one's bit in `Item::fail_sink_in`.
const BATCHERS: [(&str, u8); 2] = [("a", 1), ("b", 2)];

/// One test message: what it is, and how it is scripted to fail.
#[derive(Clone, Debug)]
struct Item {
    /// Its index in the workload: producers hand items out in id order.
    id: u32,
    key: u8,
    /// Which producer hands it out (modulo the shape's producers).
    lane: u8,
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

impl Item {
    /// The batchers it goes to, as bits.
    fn visited(&self) -> u8 {
        if self.fan_out { 0b11 } else { 0b01 }
    }

    fn batchers(&self) -> impl Iterator<Item = &'static str> + '_ {
        BATCHERS
            .iter()
            .filter(|(_, bit)| self.visited() & bit != 0)
            .map(|(name, _)| *name)
    }

    fn producer(&self, shape: &Shape) -> usize {
        usize::from(self.lane) % shape.producers
    }

    /// Whether anything on its path is scripted to fail: when a drain cuts retries short, only
    /// such an item may end failed.
    fn may_fail(&self) -> bool {
        self.permanent
            || self.fail_processor_until > 0
            || (self.fail_sink_until > 0 && self.fail_sink_in & self.visited() != 0)
    }
}

#[derive(Clone, Debug)]
struct Shape {
    producers: usize,
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
    dead_letter_permanent: bool,
}

fn items_strategy() -> impl Strategy<Value = Vec<Item>> {
    let item = (
        0u8..6,
        0u8..3,
        prop_oneof![6 => Just(0u32), 2 => 1u32..3, 1 => 3u32..6],
        prop::bool::weighted(0.05),
        (prop_oneof![8 => Just(0u32), 1 => 1u32..4], 1u8..4),
        prop::bool::weighted(0.2),
    );
    prop::collection::vec(item, 0..300).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(
                |(i, (key, lane, fail_processor_until, permanent, sink, fan_out))| Item {
                    id: i as u32,
                    key,
                    lane,
                    fail_processor_until,
                    permanent,
                    fail_sink_until: sink.0,
                    fail_sink_in: sink.1,
                    fan_out,
                },
            )
            .collect()
    })
}

fn shape_strategy() -> impl Strategy<Value = Shape> {
    (
        (1usize..4, 1usize..5),
        1usize..24,
        1usize..30,
        1usize..3,
        1u32..5,
        1u32..4,
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0usize..64),
        any::<bool>(),
    )
        .prop_flat_map(
            |(
                (producers, processors),
                max_demand,
                batch_size,
                sink_concurrency,
                processor_attempts,
                sink_attempts,
                partitioned,
                cpu_bound,
                in_flight_bound,
                dead_letter_permanent,
            )| {
                (0..max_demand).prop_map(move |min_demand| Shape {
                    producers,
                    processors,
                    max_demand,
                    min_demand,
                    batch_size,
                    sink_concurrency,
                    processor_attempts,
                    sink_attempts,
                    partitioned,
                    cpu_bound,
                    // A bound below batch_size, or below one permit per producer, is refused at
                    // start (tested in pipeline_faults.rs), so the tightest bound drawn is the
                    // larger of the two.
                    in_flight_bound: in_flight_bound.map(|extra| batch_size.max(producers) + extra),
                    dead_letter_permanent,
                })
            },
        )
}

/// One `handle_batch` call.
#[derive(Debug)]
struct Delivery {
    batcher: &'static str,
    /// The batch's first attempt (the whole batch); otherwise a retry of part of it.
    first: bool,
    ids: Vec<u32>,
}

/// How an acknowledged message ended: None when successful, else whether its failure is
/// retryable.
type Ending = Option<bool>;

/// Everything the pipeline did, as the test saw it.
#[derive(Default)]
struct Log {
    /// Every acknowledgement call, in order, with each of its messages.
    acks: Mutex<Vec<Vec<(u32, Ending)>>>,
    /// Every processor attempt, in the order they ran: (id, attempt).
    attempts: Mutex<Vec<(u32, u32)>>,
    /// Every chunk, as `prepare_messages` saw it.
    chunks: Mutex<Vec<Vec<u32>>>,
    deliveries: Mutex<Vec<Delivery>>,
    /// (batcher, id) of every first attempt at a sink.
    delivered: Mutex<HashSet<(&'static str, u32)>>,
    /// (stage, id) of every copy the dead-letter sink received.
    dead: Mutex<Vec<(String, u32)>>,
    /// What handlers and the acknowledger saw go wrong.
    violations: Mutex<Vec<String>>,
    /// Messages handed out and not yet acknowledged, counted from outside the engine (by
    /// `Script` producers only).
    in_flight: AtomicI64,
    max_in_flight: AtomicI64,
}

impl Log {
    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
}

struct Acker(Arc<Log>);

impl Acknowledger<Item> for Acker {
    fn ack(&self, successful: Vec<Message<Item>>, failed: Vec<Message<Item>>) {
        let log = &self.0;
        let n = successful.len() + failed.len();
        log.in_flight.fetch_sub(n as i64, Ordering::SeqCst);
        {
            let delivered = log.delivered.lock().unwrap();
            for m in &successful {
                for b in m.data.batchers() {
                    if !delivered.contains(&(b, m.data.id)) {
                        log.violation(format!(
                            "message {} acknowledged before sink {b} had it",
                            m.data.id
                        ));
                    }
                }
            }
        }
        let call = successful
            .iter()
            .map(|m| (m.data.id, None))
            .chain(
                failed
                    .iter()
                    .map(|m| (m.data.id, m.failure().map(Failure::is_retryable))),
            )
            .collect();
        log.acks.lock().unwrap().push(call);
    }
}

/// The message for an item, acknowledged to `acker`: batched by its key, and sent to both
/// batchers when it fans out.
fn message(item: Item, acker: &Arc<dyn Acknowledger<Item>>) -> Message<Item> {
    let mut msg = Message::with_acker(item, acker.clone());
    msg.put_batch_key(u64::from(msg.data.key));
    if msg.data.fan_out {
        msg.put_batchers(Arc::from(vec![BatcherName::from("a"), "b".into()]));
    }
    msg
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
            if demand.push(message(item, &self.acker)).is_err() {
                unreachable!("checked is_filled");
            }
        }
        Produced::More
    }
}

fn note_chunk(log: &Log, msgs: &[Message<Item>]) {
    let ids = msgs.iter().map(|m| m.data.id).collect();
    log.chunks.lock().unwrap().push(ids);
}

/// Notes the attempt; the scripted outcome.
fn attempt(log: &Log, msg: &Message<Item>) -> Result<(), Failure> {
    let item = &msg.data;
    log.attempts.lock().unwrap().push((item.id, msg.attempts()));
    if item.permanent {
        return Err(Failure::permanent("scripted permanent failure"));
    }
    if msg.attempts() <= item.fail_processor_until {
        return Err(Failure::retryable("scripted processor failure"));
    }
    Ok(())
}

struct AsyncWork(Arc<Log>);

impl Processor<Item> for AsyncWork {
    async fn prepare_messages(&self, msgs: &mut [Message<Item>]) {
        note_chunk(&self.0, msgs);
    }

    async fn handle_message(&self, msg: &mut Message<Item>) -> Result<(), Failure> {
        let outcome = attempt(&self.0, msg);
        tokio::task::yield_now().await;
        outcome
    }
}

struct CpuWork(Arc<Log>);

impl CpuProcessor<Item> for CpuWork {
    fn prepare_messages(&self, msgs: &mut [Message<Item>]) {
        note_chunk(&self.0, msgs);
    }

    fn handle_message(&self, msg: &mut Message<Item>) -> Result<(), Failure> {
        attempt(&self.0, msg)
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
        let log = &self.log;
        let ids: Vec<u32> = msgs.iter().map(|m| m.data.id).collect();
        if msgs.len() > self.batch_size || batch.size != msgs.len() || msgs.is_empty() {
            log.violation(format!(
                "{}: batch {ids:?} of {} messages, info says {}, batch_size {}",
                self.name,
                msgs.len(),
                batch.size,
                self.batch_size
            ));
        }
        if &*batch.batcher != self.name {
            log.violation(format!("{}: a batch of {}", self.name, batch.batcher));
        }
        let first = msgs.first().is_some_and(|m| m.attempts() == 1);
        for m in msgs.iter_mut() {
            if *m.batch_key() != BatchKey::Int(u64::from(m.data.key))
                || *m.batch_key() != batch.batch_key
            {
                log.violation(format!("{}: batch {ids:?} mixes keys", self.name));
            }
            if (m.attempts() == 1) != first {
                log.violation(format!("{}: batch {ids:?} mixes attempts", self.name));
            }
            if m.attempts() <= m.data.fail_sink_until && m.data.fail_sink_in & self.bit != 0 {
                m.fail(Failure::retryable("scripted sink failure"));
            }
        }
        if first {
            let mut delivered = log.delivered.lock().unwrap();
            delivered.extend(ids.iter().map(|&id| (self.name, id)));
        }
        log.deliveries.lock().unwrap().push(Delivery {
            batcher: self.name,
            first,
            ids,
        });
        tokio::task::yield_now().await;
        Ok(())
    }
}

struct Dead(Arc<Log>);

impl DeadLetterSink<Item> for Dead {
    async fn dead_letter(&self, stage: &str, msgs: &mut [Message<Item>]) {
        let mut dead = self.0.dead.lock().unwrap();
        dead.extend(msgs.iter().map(|m| (stage.to_owned(), m.data.id)));
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

/// Everything but the producers: the processor, partitioning, the bound, both batchers, the
/// dead-letter sink, all as the shape says.
fn configure(
    mut builder: PipelineBuilder<Item>,
    shape: &Shape,
    log: &Arc<Log>,
    batch_timeout: Duration,
) -> PipelineBuilder<Item> {
    let config = ProcessorConfig::default()
        .concurrency(shape.processors)
        .demand(shape.max_demand, shape.min_demand)
        .retry(fast_retry(shape.processor_attempts));
    builder = if shape.cpu_bound {
        builder.cpu_processor(CpuWork(log.clone()), config)
    } else {
        builder.processor(AsyncWork(log.clone()), config)
    };
    if shape.partitioned {
        builder = builder.partition_by(|m: &Message<Item>| u64::from(m.data.key));
    }
    if let Some(bound) = shape.in_flight_bound {
        builder = builder.in_flight_bound(bound);
    }
    for (name, bit) in BATCHERS {
        builder = builder.batcher(
            BatcherConfig::new(name)
                .batch_size(shape.batch_size)
                .batch_timeout(batch_timeout)
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
    builder
        .dead_letter(Dead(log.clone()))
        .dead_letter_permanent(shape.dead_letter_permanent)
}

/// One in-memory producer per lane of the shape; their push handles.
fn in_memory_producers(
    mut builder: PipelineBuilder<Item>,
    shape: &Shape,
    capacity: usize,
) -> (PipelineBuilder<Item>, Vec<PushHandle<Item>>) {
    let mut pushes = Vec::new();
    for _ in 0..shape.producers {
        let (producer, push) = in_memory(capacity);
        builder = builder.producer(producer);
        pushes.push(push);
    }
    (builder, pushes)
}

/// What a run did, for `check`.
struct Outcome {
    log: Arc<Log>,
    stats: PipelineStats,
    /// The messages the pipeline took.
    accepted: Vec<u32>,
    /// Nothing cut attempts short (no drain): every item ends exactly as `expected` says.
    exact: bool,
    /// Batchers whose sink had one worker throughout: batches reach it in order.
    ordered_sinks: Vec<&'static str>,
    /// The highest in-flight bound the pipeline had.
    max_bound: usize,
}

/// Runs the items through scripted producers until they are exhausted.
async fn run_case(items: &[Item], shape: &Shape) -> Outcome {
    let log = Arc::new(Log::default());
    let acker: Arc<dyn Acknowledger<Item>> = Arc::new(Acker(log.clone()));
    let mut builder = Pipeline::builder("props");
    for lane in 0..shape.producers {
        let mine: Vec<Item> = items
            .iter()
            .filter(|i| i.producer(shape) == lane)
            .cloned()
            .collect();
        builder = builder.producer(Script {
            items: mine.into_iter(),
            log: log.clone(),
            acker: acker.clone(),
        });
    }
    let pipeline = configure(builder, shape, &log, Duration::from_millis(50))
        .start()
        .expect("valid shape");
    let stats = pipeline.join().await.expect("the pipeline ends by itself");
    Outcome {
        log,
        stats,
        accepted: items.iter().map(|i| i.id).collect(),
        exact: true,
        ordered_sinks: ordered_sinks(shape),
        max_bound: stats.in_flight_bound,
    }
}

fn ordered_sinks(shape: &Shape) -> Vec<&'static str> {
    if shape.sink_concurrency == 1 {
        BATCHERS.iter().map(|(name, _)| *name).collect()
    } else {
        Vec::new()
    }
}

/// How an item ends when nothing cuts its attempts short: successful or not, and the stages
/// where its copies are dead-lettered.
fn expected(item: &Item, shape: &Shape) -> (bool, Vec<String>) {
    if item.permanent {
        let dead = shape.dead_letter_permanent.then(|| "processor".to_owned());
        return (false, dead.into_iter().collect());
    }
    if item.fail_processor_until >= shape.processor_attempts {
        return (false, vec!["processor".to_owned()]);
    }
    let mut dead = Vec::new();
    if item.fail_sink_until >= shape.sink_attempts {
        for (name, bit) in BATCHERS {
            if item.visited() & item.fail_sink_in & bit != 0 {
                dead.push(format!("sink:{name}"));
            }
        }
    }
    (dead.is_empty(), dead)
}

/// Whether the processor lets the item through when nothing cuts its attempts short.
fn passes_processor(item: &Item, shape: &Shape) -> bool {
    !item.permanent && item.fail_processor_until < shape.processor_attempts
}

fn check(items: &[Item], shape: &Shape, out: &Outcome) -> Result<(), TestCaseError> {
    let violations = out.log.violations.lock().unwrap().clone();
    prop_assert!(
        violations.is_empty(),
        "seen in the pipeline: {:?}",
        violations
    );
    let ended = check_acks(items, shape, out)?;
    check_stats(out, &ended)?;
    check_dead_letters(items, shape, out, &ended)?;
    check_deliveries(items, shape, out)?;
    check_ack_groups(items, shape, out, &ended)?;
    if shape.partitioned {
        check_order(items, shape, out)?;
    }
    Ok(())
}

/// Every accepted message acknowledged exactly once, nothing else, each with the status it
/// earned; returns how each ended.
fn check_acks(
    items: &[Item],
    shape: &Shape,
    out: &Outcome,
) -> Result<HashMap<u32, Ending>, TestCaseError> {
    let mut ended = HashMap::new();
    for call in out.log.acks.lock().unwrap().iter() {
        for &(id, end) in call {
            prop_assert!(
                ended.insert(id, end).is_none(),
                "message {} acknowledged twice",
                id
            );
        }
    }
    let mut acked: Vec<u32> = ended.keys().copied().collect();
    acked.sort_unstable();
    let mut accepted = out.accepted.clone();
    accepted.sort_unstable();
    prop_assert_eq!(
        acked,
        accepted,
        "exactly the accepted messages acknowledged"
    );
    for (&id, &end) in &ended {
        let item = &items[id as usize];
        let (ok, _) = expected(item, shape);
        if out.exact {
            prop_assert_eq!(end.is_none(), ok, "message {} status", id);
        } else {
            // A drain only cuts attempts short.
            prop_assert!(ok || end.is_some(), "message {} succeeded: it cannot", id);
            prop_assert!(
                item.may_fail() || end.is_none(),
                "message {} failed: nothing fails it",
                id
            );
        }
        if let Some(retryable) = end {
            prop_assert_eq!(retryable, !item.permanent, "message {} failure kind", id);
        }
    }
    Ok(ended)
}

fn check_stats(out: &Outcome, ended: &HashMap<u32, Ending>) -> Result<(), TestCaseError> {
    let stats = &out.stats;
    let successful = ended.values().filter(|e| e.is_none()).count() as u64;
    prop_assert_eq!(stats.produced, out.accepted.len() as u64);
    prop_assert_eq!(stats.successful, successful);
    prop_assert_eq!(stats.failed, ended.len() as u64 - successful);
    prop_assert_eq!(stats.abandoned, 0);
    prop_assert_eq!(stats.in_flight, 0);
    prop_assert!(
        stats.max_in_flight <= out.max_bound,
        "in flight {} over bound {}",
        stats.max_in_flight,
        out.max_bound
    );
    let outside = out.log.max_in_flight.load(Ordering::SeqCst);
    prop_assert!(
        outside <= out.max_bound as i64,
        "{} in flight seen from outside, over bound {}",
        outside,
        out.max_bound
    );
    Ok(())
}

/// The dead-letter sink gets exactly the copies whose attempts ran out (and permanent failures
/// when asked), each once, and `dead_lettered` counts messages, not copies.
fn check_dead_letters(
    items: &[Item],
    shape: &Shape,
    out: &Outcome,
    ended: &HashMap<u32, Ending>,
) -> Result<(), TestCaseError> {
    let mut dead = out.log.dead.lock().unwrap().clone();
    dead.sort();
    let messages: HashSet<u32> = dead.iter().map(|(_, id)| *id).collect();
    prop_assert_eq!(
        out.stats.dead_lettered,
        messages.len() as u64,
        "dead_lettered counts messages"
    );
    let delivered = out.log.delivered.lock().unwrap();
    for pair in dead.windows(2) {
        prop_assert!(pair[0] != pair[1], "{:?} dead-lettered twice", pair[0]);
    }
    for (stage, id) in &dead {
        prop_assert!(
            ended.get(id).is_some_and(Option::is_some),
            "dead-lettered message {} not acknowledged as failed",
            id
        );
        // Where it gave up: the processor, or a sink that had it.
        let at_sink = stage
            .strip_prefix("sink:")
            .is_some_and(|b| delivered.iter().any(|&(d, i)| d == b && i == *id));
        prop_assert!(
            at_sink || stage == "processor",
            "message {} dead-lettered at {}",
            id,
            stage
        );
    }
    for (&id, &end) in ended {
        if let Some(retryable) = end {
            let wanted = retryable || shape.dead_letter_permanent;
            prop_assert_eq!(
                messages.contains(&id),
                wanted,
                "failed message {} (retryable: {}) dead-lettered",
                id,
                retryable
            );
        }
    }
    if out.exact {
        let mut want: Vec<(String, u32)> = items
            .iter()
            .flat_map(|i| expected(i, shape).1.into_iter().map(|s| (s, i.id)))
            .collect();
        want.sort();
        prop_assert_eq!(dead, want, "dead letters are exactly the exhausted copies");
    }
    Ok(())
}

/// Each copy reaches its sink once (a retry is part of its batch, not a new delivery); without a
/// drain, exactly the copies of the messages the processor let through.
fn check_deliveries(items: &[Item], shape: &Shape, out: &Outcome) -> Result<(), TestCaseError> {
    let deliveries = out.log.deliveries.lock().unwrap();
    let mut seen = HashSet::new();
    for d in deliveries.iter().filter(|d| d.first) {
        for &id in &d.ids {
            prop_assert!(
                seen.insert((d.batcher, id)),
                "message {} delivered to {} twice",
                id,
                d.batcher
            );
        }
    }
    if out.exact {
        let want: HashSet<(&str, u32)> = items
            .iter()
            .filter(|i| passes_processor(i, shape))
            .flat_map(|i| i.batchers().map(move |b| (b, i.id)))
            .collect();
        prop_assert_eq!(
            seen,
            want,
            "every copy the processor passed reached its sink"
        );
    }
    Ok(())
}

/// Messages sharing an acknowledger are acknowledged together, one call per chunk or batch
/// (ack.rs). Where that comes from: the processor settles what a chunk's run failed in one go
/// (with partition_by, retries run inline, so every failure of the chunk; otherwise the chunk's
/// failures on their first attempt, and the failures of each round of out-of-line retries
/// together), and a sink settles a batch in one go, retried messages included; a fan-out
/// message is acknowledged with the batch its last copy finished in. So every call is part of
/// one chunk or one batch (or is a retry round's failures), and no chunk's or batch's
/// settlement is split over several calls, as acknowledging one message at a time would.
fn check_ack_groups(
    items: &[Item],
    shape: &Shape,
    out: &Outcome,
    ended: &HashMap<u32, Ending>,
) -> Result<(), TestCaseError> {
    let log = &out.log;
    let calls = log.acks.lock().unwrap();
    let chunks = log.chunks.lock().unwrap();
    let deliveries = log.deliveries.lock().unwrap();
    let delivered = log.delivered.lock().unwrap();
    let attempts = log.attempts.lock().unwrap();
    let batches: Vec<&Vec<u32>> = deliveries
        .iter()
        .filter(|d| d.first)
        .map(|d| &d.ids)
        .collect();
    let mut tries: HashMap<u32, u32> = HashMap::new();
    for &(id, n) in attempts.iter() {
        let t = tries.entry(id).or_default();
        *t = (*t).max(n);
    }
    let reached_sink: HashSet<u32> = delivered.iter().map(|&(_, id)| id).collect();
    let failed_in_processor = |id: u32| ended[&id].is_some() && !reached_sink.contains(&id);
    let retried_in_processor = |id: u32| failed_in_processor(id) && tries[&id] >= 2;

    // The groups (batches, then chunks) each message travelled in.
    let mut groups: HashMap<u32, Vec<usize>> = HashMap::new();
    for (g, ids) in batches.iter().copied().chain(chunks.iter()).enumerate() {
        for &id in ids {
            groups.entry(id).or_default().push(g);
        }
    }
    let mut call_of = HashMap::new();
    for (c, call) in calls.iter().enumerate() {
        prop_assert!(!call.is_empty(), "an acknowledgement call with no message");
        let mut common = groups.get(&call[0].0).cloned().unwrap_or_default();
        for (id, _) in call {
            call_of.insert(*id, c);
            let mine = groups.get(id).map(Vec::as_slice).unwrap_or_default();
            common.retain(|g| mine.contains(g));
        }
        let retry_round =
            !shape.partitioned && call.iter().all(|&(id, _)| retried_in_processor(id));
        prop_assert!(
            !common.is_empty() || retry_round,
            "acknowledged together, never in one chunk or batch: {:?}",
            call
        );
    }
    let one_call = |what: &str, ids: Vec<u32>| -> Result<(), TestCaseError> {
        let used: HashSet<usize> = ids.iter().map(|id| call_of[id]).collect();
        prop_assert!(
            used.len() <= 1,
            "{} {:?} acknowledged in {} calls",
            what,
            ids,
            used.len()
        );
        Ok(())
    };
    for ids in &batches {
        // A fan-out message may finish with its other copy's batch instead.
        let own = ids.iter().filter(|&&id| !items[id as usize].fan_out);
        one_call("batch", own.copied().collect())?;
    }
    for ids in chunks.iter() {
        let settled = ids
            .iter()
            .filter(|&&id| failed_in_processor(id) && (shape.partitioned || tries[&id] == 1));
        one_call("the failures of chunk", settled.copied().collect())?;
    }
    let rounds = if shape.partitioned {
        0
    } else {
        attempts.iter().filter(|&&(_, n)| n >= 2).count()
    };
    prop_assert!(
        calls.len() <= chunks.len() + batches.len() + rounds,
        "{} acknowledgement calls for {} chunks, {} batches and at most {} retry rounds",
        calls.len(),
        chunks.len(),
        batches.len(),
        rounds
    );
    Ok(())
}

/// With partition_by, a producer's messages with one key keep their order: the processor tries
/// them one after another (every attempt of one before the first of the next), batches hold them
/// in order and never interleave, and a sink with one worker gets its batches in order and
/// retries a batch before it takes the next. Checked per producer: producers race each other.
fn check_order(items: &[Item], shape: &Shape, out: &Outcome) -> Result<(), TestCaseError> {
    // What order is kept within: one producer's messages with one key.
    type Stream = (usize, u8);
    let stream = |id: u32| -> Stream {
        let item = &items[id as usize];
        (item.producer(shape), item.key)
    };
    let mut last: HashMap<Stream, (u32, u32)> = HashMap::new();
    for &(id, n) in out.log.attempts.lock().unwrap().iter() {
        if let Some((prev, prev_n)) = last.insert(stream(id), (id, n)) {
            let next = if prev == id { prev_n + 1 } else { 1 };
            prop_assert!(
                prev <= id && n == next,
                "producer {} key {}: message {} (attempt {}) after message {} (attempt {})",
                stream(id).0,
                stream(id).1,
                id,
                n,
                prev,
                prev_n
            );
        }
    }
    let deliveries = out.log.deliveries.lock().unwrap();
    // Each batch's messages (and each retry's) in order, per producer.
    for d in deliveries.iter() {
        let mut last: HashMap<Stream, u32> = HashMap::new();
        for &id in &d.ids {
            if let Some(prev) = last.insert(stream(id), id) {
                prop_assert!(prev < id, "{}: {:?} out of order", d.batcher, d.ids);
            }
        }
    }
    // Batches of one stream never interleave.
    let mut spans: HashMap<(&str, Stream), Vec<(u32, u32)>> = HashMap::new();
    for d in deliveries.iter().filter(|d| d.first) {
        let mut mine: HashMap<Stream, (u32, u32)> = HashMap::new();
        for &id in &d.ids {
            let span = mine.entry(stream(id)).or_insert((id, id));
            span.0 = span.0.min(id);
            span.1 = span.1.max(id);
        }
        for (s, span) in mine {
            spans.entry((d.batcher, s)).or_default().push(span);
        }
    }
    for (at, mut spans) in spans {
        spans.sort_unstable();
        for pair in spans.windows(2) {
            prop_assert!(
                pair[0].1 < pair[1].0,
                "{:?}: batches {:?} and {:?} interleave",
                at,
                pair[0],
                pair[1]
            );
        }
    }
    // One sink worker: deliveries in order, a batch's retries before the next batch.
    for &batcher in &out.ordered_sinks {
        let mut current: &[u32] = &[];
        let mut last: HashMap<Stream, u32> = HashMap::new();
        for d in deliveries.iter().filter(|d| d.batcher == batcher) {
            if d.first {
                for &id in &d.ids {
                    if let Some(prev) = last.insert(stream(id), id) {
                        prop_assert!(prev < id, "{}: {} delivered after {}", batcher, id, prev);
                    }
                }
                current = &d.ids;
            } else {
                prop_assert!(
                    d.ids.iter().all(|id| current.contains(id)),
                    "{}: retry {:?} is not of the last batch {:?}",
                    batcher,
                    d.ids,
                    current
                );
            }
        }
    }
    Ok(())
}

/// Pushes every item from a task per producer, and shuts down once `cut` messages are in (or
/// after `patience`).
async fn drain_case(
    items: &[Item],
    cut: usize,
    shape: &Shape,
    batch_timeout: Duration,
    patience: Duration,
) -> Result<Outcome, TestCaseError> {
    let log = Arc::new(Log::default());
    let acker: Arc<dyn Acknowledger<Item>> = Arc::new(Acker(log.clone()));
    let (builder, pushes) = in_memory_producers(Pipeline::builder("drain"), shape, 8);
    let pipeline = configure(builder, shape, &log, batch_timeout)
        .start()
        .expect("valid shape");
    let mut pushers = Vec::new();
    for (lane, push) in pushes.into_iter().enumerate() {
        let mine: Vec<Item> = items
            .iter()
            .filter(|i| i.producer(shape) == lane)
            .cloned()
            .collect();
        let acker = acker.clone();
        pushers.push(tokio::spawn(async move {
            let (mut accepted, mut refused) = (Vec::new(), Vec::new());
            for item in mine {
                let id = item.id;
                match push.push(message(item, &acker)).await {
                    Ok(()) => accepted.push(id),
                    Err(PushError::Closed(m)) => refused.push(m.data.id),
                    Err(PushError::Full(_)) => unreachable!("push waits instead"),
                }
            }
            (accepted, refused)
        }));
    }
    let _ = tokio::time::timeout(patience, async {
        while (pipeline.stats().produced as usize) < cut.min(items.len()) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await;
    let stats = pipeline
        .shutdown_within(Duration::from_secs(60))
        .await
        .map_err(|e| TestCaseError::fail(format!("drain failed: {e}")))?;
    let mut accepted = Vec::new();
    let mut answered = 0;
    for pusher in pushers {
        let (a, r) = pusher.await.unwrap();
        answered += a.len() + r.len();
        accepted.extend(a);
    }
    prop_assert_eq!(answered, items.len(), "every push was answered");
    Ok(Outcome {
        log,
        stats,
        accepted,
        exact: false,
        ordered_sinks: ordered_sinks(shape),
        max_bound: stats.in_flight_bound,
    })
}

/// A change to a running pipeline's concurrency.
#[derive(Clone, Debug)]
enum Resize {
    Processors(usize),
    Batcher(&'static str, usize),
}

/// Resizes, each applied after so many pushes and a pause (in paused time).
fn resizes_strategy() -> impl Strategy<Value = Vec<(usize, u64, Resize)>> {
    let resize = prop_oneof![
        (1usize..=4).prop_map(Resize::Processors),
        (prop::sample::select(vec!["a", "b"]), 1usize..=3)
            .prop_map(|(name, n)| Resize::Batcher(name, n)),
    ];
    prop::collection::vec((0usize..300, 0u64..40, resize), 1..8).prop_map(|mut v| {
        v.sort_by_key(|r| r.0);
        v
    })
}

fn concurrency(topology: &Topology, stage: &str) -> usize {
    let stage = topology.stages.iter().find(|s| s.name == stage);
    stage.expect("the stage exists").concurrency
}

/// Pushes every item in id order, applying each resize after its number of pushes; checks the
/// topology shows the last concurrency set, then lets the pipeline end by itself.
async fn resize_case(
    items: &[Item],
    shape: &Shape,
    resizes: &[(usize, u64, Resize)],
) -> Result<Outcome, TestCaseError> {
    let log = Arc::new(Log::default());
    let acker: Arc<dyn Acknowledger<Item>> = Arc::new(Acker(log.clone()));
    // Small queues: pushes wait for the pipeline, so resizes land while it works.
    let (builder, pushes) = in_memory_producers(Pipeline::builder("resize"), shape, 4);
    let pipeline = configure(builder, shape, &log, Duration::from_millis(50))
        .start()
        .expect("valid shape");
    let mut max_bound = pipeline.topology().in_flight_bound;
    let mut processors = shape.processors;
    let mut sinks = HashMap::from(BATCHERS.map(|(name, _)| (name, shape.sink_concurrency)));
    let mut ordered = ordered_sinks(shape);
    let mut pending = resizes.iter().peekable();
    for pushed in 0..=items.len() {
        while let Some((_, pause, resize)) =
            pending.next_if(|r| r.0 <= pushed || pushed == items.len())
        {
            tokio::time::sleep(Duration::from_millis(*pause)).await;
            let done = match *resize {
                Resize::Processors(n) => {
                    processors = n;
                    pipeline.resize_processors(n)
                }
                Resize::Batcher(name, n) => {
                    sinks.insert(name, n);
                    ordered.retain(|b| *b != name || n == 1);
                    pipeline.resize_batcher(name, n)
                }
            };
            prop_assert!(done.is_ok(), "{:?} refused: {:?}", resize, done);
            // The default bound follows the pool's size: remember the highest.
            max_bound = max_bound.max(pipeline.topology().in_flight_bound);
        }
        if let Some(item) = items.get(pushed) {
            let push = &pushes[item.producer(shape)];
            let accepted = push.push(message(item.clone(), &acker)).await;
            prop_assert!(accepted.is_ok(), "push {} refused", item.id);
        }
    }
    let topology = pipeline.topology();
    prop_assert_eq!(concurrency(&topology, "processor"), processors);
    for (name, n) in &sinks {
        prop_assert_eq!(concurrency(&topology, &format!("sink:{name}")), *n);
    }
    drop(pushes);
    let stats = pipeline.join().await.expect("the pipeline ends by itself");
    prop_assert_eq!(stats.in_flight_bound, topology.in_flight_bound);
    Ok(Outcome {
        log,
        stats,
        accepted: items.iter().map(|i| i.id).collect(),
        exact: true,
        ordered_sinks: ordered,
        max_bound,
    })
}

/// tokio's paused clock: retries, batch timeouts and pauses run in virtual time.
fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

/// Real threads racing each other, on the real clock.
fn threaded_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(config(96))]

    /// The whole contract, on the paused clock, where retries and batch timeouts cost nothing.
    #[test]
    fn every_message_is_acknowledged_once_with_its_status(items in items_strategy(), shape in shape_strategy()) {
        let out = paused_runtime().block_on(run_case(&items, &shape));
        check(&items, &shape, &out)?;
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// The same contract with real threads racing each other.
    #[test]
    fn invariants_hold_on_a_multi_threaded_runtime(items in items_strategy(), shape in shape_strategy()) {
        let out = threaded_runtime().block_on(run_case(&items, &shape));
        check(&items, &shape, &out)?;
    }
}

proptest! {
    #![proptest_config(config(48))]

    /// A drain mid-stream loses nothing and keeps the contract: what was taken is finished and
    /// acknowledged once, what was refused is not. Batches never time out here: only the drain
    /// can flush partial ones.
    #[test]
    fn drain_loses_nothing(items in items_strategy(), cut in 0usize..300, shape in shape_strategy()) {
        // Not on rayon: the paused clock jumps ahead while the runtime waits for another
        // thread, and would reach the drain's deadline. The multi-threaded drain runs it.
        let shape = Shape { cpu_bound: false, ..shape };
        let out = paused_runtime().block_on(drain_case(
            &items,
            cut,
            &shape,
            Duration::from_secs(3600),
            Duration::from_secs(1),
        ))?;
        check(&items, &shape, &out)?;
    }

    /// Resizes of the processor pool and of the sink pools at random points lose nothing, keep
    /// order per key and the in-flight bound, and show in the topology.
    #[test]
    fn resizes_at_random_points_keep_the_contract(
        items in items_strategy(),
        shape in shape_strategy(),
        resizes in resizes_strategy(),
    ) {
        // The default bound, the one resizes move. An explicit one could starve this test's
        // busiest producer: an in-memory producer waiting for messages keeps the in-flight
        // permits it took (an engine bug; pushes here are one at a time, so the other
        // producers wait with their permits).
        let shape = Shape { in_flight_bound: None, ..shape };
        let out = paused_runtime().block_on(resize_case(&items, &shape, &resizes))?;
        check(&items, &shape, &out)?;
    }
}

proptest! {
    #![proptest_config(config(24))]

    /// A drain on real threads, with failures, partitioning and fan-out: the drain's races
    /// (retries cut short, partial batches flushed, producers handing over what they hold) are
    /// real ones here.
    #[test]
    fn drain_on_a_multi_threaded_runtime_loses_nothing(
        items in items_strategy(),
        cut in 0usize..300,
        shape in shape_strategy(),
    ) {
        let shape = Shape { partitioned: true, ..shape };
        let out = threaded_runtime().block_on(drain_case(
            &items,
            cut,
            &shape,
            Duration::from_millis(30),
            Duration::from_millis(200),
        ))?;
        check(&items, &shape, &out)?;
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
    #![proptest_config(config(64))]

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
        let times = Arc::new(Mutex::new(Vec::new()));
        let stats = paused_runtime().block_on(async {
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
        let left = Arc::new(Mutex::new(Vec::new()));
        struct When(Arc<Mutex<Vec<(usize, Trigger, tokio::time::Instant)>>>);
        impl BatchSink<u32> for When {
            async fn handle_batch(&self, b: &BatchInfo, m: &mut [Message<u32>]) -> Result<(), Failure> {
                self.0.lock().unwrap().push((m.len(), b.trigger, tokio::time::Instant::now()));
                Ok(())
            }
        }
        let n = gaps_ms.len().min(batch_size - 1);
        let first = paused_runtime().block_on(async {
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

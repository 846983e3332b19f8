//! The engine's failure paths, one reported defect at a time: whatever user code does (panics,
//! hangs, never-ending retries, a source with nothing to give), every message is acknowledged
//! exactly once and the pipeline goes on. Time-dependent cases run on tokio's paused clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thunderline_pipeline::testing::{Discard, Pass};
use thunderline_pipeline::*;
use tokio::time::Instant;

/// How a message ended: `Ok(())` or the failure's reason, and when.
type Ending = (Result<(), String>, Instant);

/// How each message ended, by its data.
#[derive(Default)]
struct Acks {
    ended: Mutex<HashMap<u32, Vec<Ending>>>,
    calls: AtomicUsize,
}

impl Acknowledger<u32> for Acks {
    fn ack(&self, successful: Vec<Message<u32>>, failed: Vec<Message<u32>>) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut ended = self.ended.lock().unwrap();
        for m in successful {
            ended.entry(m.data).or_default().push((Ok(()), now));
        }
        for m in failed {
            let reason = m.failure().unwrap().reason().to_owned();
            ended.entry(m.data).or_default().push((Err(reason), now));
        }
    }
}

impl Acks {
    /// Every message in `ids` acknowledged exactly once; returns how each ended.
    fn once(&self, ids: impl IntoIterator<Item = u32>) -> HashMap<u32, Result<(), String>> {
        let ended = self.ended.lock().unwrap();
        ids.into_iter()
            .map(|id| {
                let e = ended.get(&id).map(Vec::as_slice).unwrap_or_default();
                assert_eq!(e.len(), 1, "message {id} acknowledged {} times", e.len());
                (id, e[0].0.clone())
            })
            .collect()
    }

    fn count(&self) -> usize {
        self.ended.lock().unwrap().values().map(Vec::len).sum()
    }

    fn at(&self, id: u32) -> Instant {
        self.ended.lock().unwrap()[&id][0].1
    }
}

fn msg(acks: &Arc<Acks>, data: u32) -> Message<u32> {
    Message::with_acker(data, acks.clone())
}

fn one_worker() -> ProcessorConfig {
    ProcessorConfig::default().concurrency(1)
}

#[tokio::test(start_paused = true)]
async fn a_batch_timeout_of_duration_max_means_never() {
    let acks = Arc::new(Acks::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("never")
        .producer(producer)
        .processor(Pass, one_worker())
        .batcher(
            BatcherConfig::new("b")
                .batch_size(4)
                .batch_timeout(Duration::MAX),
            Discard,
        )
        .start()
        .unwrap();
    for i in 0..10 {
        push.push(msg(&acks, i)).await.unwrap();
    }
    // Two batches leave by size; the last two wait, whatever the time.
    tokio::time::sleep(Duration::from_secs(365 * 24 * 3600)).await;
    assert_eq!(acks.count(), 8);
    // ... and leave on shutdown.
    let stats = pipeline.shutdown().await.unwrap();
    assert!(acks.once(0..10).values().all(Result::is_ok));
    assert_eq!(stats.successful, 10);
}

#[tokio::test(start_paused = true)]
async fn a_partition_function_that_panics_fails_only_its_message() {
    let acks = Arc::new(Acks::default());
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("partition-panic")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default().concurrency(2))
        .partition_by(|m: &Message<u32>| {
            assert!(m.data % 97 != 13, "no partition for {}", m.data);
            u64::from(m.data % 7)
        })
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    for i in 0..500 {
        push.push(msg(&acks, i)).await.unwrap();
    }
    let stats = pipeline.shutdown().await.unwrap();
    let ended = acks.once(0..500);
    for (id, end) in ended {
        if id % 97 == 13 {
            let reason = end.unwrap_err();
            assert!(reason.contains("no partition for"), "{reason}");
        } else {
            assert_eq!(end, Ok(()), "message {id}");
        }
    }
    // 13, 110, 207, 304, 401 and 498.
    assert_eq!(stats.failed, 6);
    assert_eq!(stats.successful, 494);
}

/// Produces `0..n`, panicking on its `panic_on`-th call, and in `drain` after handing over
/// what is left.
struct Flaky {
    acks: Arc<Acks>,
    next: u32,
    n: u32,
    calls: usize,
    panic_on: usize,
    drain_panics: bool,
}

impl Producer<u32> for Flaky {
    async fn produce(&mut self, demand: &mut Demand<u32>) -> Produced {
        self.calls += 1;
        if self.next >= self.n {
            return Produced::Exhausted;
        }
        let _ = demand.push(msg(&self.acks, self.next));
        self.next += 1;
        assert!(self.calls != self.panic_on, "produce failed");
        Produced::More
    }

    async fn drain(&mut self, held: &mut Vec<Message<u32>>) {
        while self.next < self.n {
            held.push(msg(&self.acks, self.next));
            self.next += 1;
        }
        assert!(!self.drain_panics, "drain failed");
    }
}

#[tokio::test(start_paused = true)]
async fn a_producer_that_panics_keeps_what_it_handed_out_and_goes_on() {
    let acks = Arc::new(Acks::default());
    let pipeline = Pipeline::builder("produce-panic")
        .producer(Flaky {
            acks: acks.clone(),
            next: 0,
            n: 50,
            calls: 0,
            panic_on: 5,
            drain_panics: false,
        })
        .processor(Pass, one_worker())
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(60), pipeline.join())
        .await
        .expect("the pipeline ends when its source is exhausted")
        .unwrap();
    assert!(acks.once(0..50).values().all(Result::is_ok));
    assert_eq!(stats.successful, 50);
}

#[tokio::test(start_paused = true)]
async fn a_drain_that_panics_keeps_what_it_handed_over() {
    let acks = Arc::new(Acks::default());
    let pipeline = Pipeline::builder("drain-panic")
        .producer(Flaky {
            acks: acks.clone(),
            next: 0,
            n: 30,
            calls: 0,
            panic_on: 0,
            drain_panics: true,
        })
        .rate_limit(1, Duration::from_secs(1))
        .processor(Pass, one_worker())
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let stats = pipeline.shutdown().await.unwrap();
    assert!(acks.once(0..30).values().all(Result::is_ok));
    assert_eq!(stats.successful, 30);
}

/// Never finishes a message.
struct Hang;

impl Processor<u32> for Hang {
    async fn handle_message(&self, _: &mut Message<u32>) -> Result<(), Failure> {
        std::future::pending().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_drain_cut_short_acknowledges_what_it_abandons_as_failed() {
    let acks = Arc::new(Acks::default());
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("abandon")
        .producer(producer)
        .processor(Hang, one_worker())
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    for i in 0..5 {
        push.push(msg(&acks, i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    let err = pipeline
        .shutdown_within(Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ShutdownError::Deadline { left: 5, .. }),
        "{err}"
    );
    for (id, end) in acks.once(0..5) {
        let reason = end.unwrap_err();
        assert!(reason.contains("abandoned"), "message {id}: {reason}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_in_memory_drain_waits_for_pushes_already_given_room() {
    let acks = Arc::new(Acks::default());
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("reserved")
        .producer(producer)
        .processor(Pass, one_worker())
        .start()
        .unwrap();
    let acks2 = acks.clone();
    let (reserved_tx, reserved) = tokio::sync::oneshot::channel();
    let late = tokio::spawn(async move {
        let permit = push.reserve().await.unwrap();
        reserved_tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        permit.push(msg(&acks2, 7));
    });
    reserved.await.unwrap();
    // The handle's room was given before the drain: what goes into it is taken, not lost.
    let stats = pipeline.shutdown().await.unwrap();
    late.await.unwrap();
    assert_eq!(acks.once([7])[&7], Ok(()));
    assert_eq!(stats.successful, 1);
}

/// Says there may be more, and never has any.
struct Empty(Arc<AtomicUsize>);

impl Producer<u32> for Empty {
    async fn produce(&mut self, _: &mut Demand<u32>) -> Produced {
        self.0.fetch_add(1, Ordering::Relaxed);
        Produced::More
    }
}

#[test]
fn a_producer_with_nothing_to_hand_out_suspends() {
    let calls = Arc::new(AtomicUsize::new(0));
    let ran = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (c, r) = (calls.clone(), ran.clone());
    // On a current-thread runtime a producer that never suspends starves every other task:
    // run it on a thread of its own and watch from here.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let pipeline = Pipeline::builder("empty")
                .producer(Empty(c))
                .processor(Pass, one_worker())
                .start()
                .unwrap();
            tokio::spawn(async move { r.store(true, Ordering::Relaxed) })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(500)).await;
            pipeline.shutdown().await.unwrap();
        });
        let _ = done_tx.send(());
    });
    let finished = done_rx.recv_timeout(Duration::from_secs(20)).is_ok();
    assert!(
        ran.load(Ordering::Relaxed),
        "another task never ran: the producer spun"
    );
    assert!(finished, "the pipeline never shut down");
    let calls = calls.load(Ordering::Relaxed);
    assert!(
        calls < 2_000,
        "produce called {calls} times in half a second"
    );
}

/// Fails retryably on message 0 always; passes the rest.
struct FailZero;

impl Processor<u32> for FailZero {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        if m.data == 0 {
            return Err(Failure::retryable("not yet"));
        }
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_waiting_to_retry_does_not_hold_back_the_ones_behind_it() {
    let acks = Arc::new(Acks::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("out-of-line")
        .producer(producer)
        .processor(
            FailZero,
            one_worker().max_demand(20).retry(
                RetryPolicy::exponential(3, Duration::from_secs(10), 2.0, Duration::from_secs(60))
                    .with_jitter(Jitter::None),
            ),
        )
        .start()
        .unwrap();
    let start = Instant::now();
    for i in 0..10 {
        push.push(msg(&acks, i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(40)).await;
    let ended = acks.once(0..10);
    for i in 1..10 {
        assert_eq!(ended[&i], Ok(()));
        assert!(
            acks.at(i) - start < Duration::from_secs(1),
            "message {i} waited {:?} behind a retry",
            acks.at(i) - start
        );
    }
    assert!(ended[&0].is_err());
    assert_eq!(
        acks.at(0) - start,
        Duration::from_secs(30),
        "two waits: 10 s then 20 s"
    );
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_drain_cuts_backoff_short_and_unlimited_attempts_cannot_hold_it() {
    let acks = Arc::new(Acks::default());
    let dead = Arc::new(Mutex::new(Vec::new()));
    struct Dead(Arc<Mutex<Vec<u32>>>);
    impl DeadLetterSink<u32> for Dead {
        async fn dead_letter(&self, _: &str, ms: &mut [Message<u32>]) {
            self.0.lock().unwrap().extend(ms.iter().map(|m| m.data));
        }
    }
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("cut-backoff")
        .producer(producer)
        .processor(
            FailZero,
            one_worker().retry(RetryPolicy::exponential(
                u32::MAX,
                Duration::from_secs(60),
                2.0,
                Duration::from_secs(3600),
            )),
        )
        .dead_letter(Dead(dead.clone()))
        .start()
        .unwrap();
    for i in 0..3 {
        push.push(msg(&acks, i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let stats = pipeline
        .shutdown_within(Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the drain waited {:?}",
        started.elapsed()
    );
    let ended = acks.once(0..3);
    assert_eq!(ended[&0], Err("not yet".into()));
    assert_eq!(*dead.lock().unwrap(), vec![0]);
    assert_eq!(
        (stats.successful, stats.failed, stats.dead_lettered),
        (2, 1, 1)
    );
}

/// Every hook hangs: `prepare_messages` on message 1's chunk, `handle_failed`, the dead-letter
/// sink, the batch sink's `handle_failed`.
struct HangingHooks;

impl Processor<u32> for HangingHooks {
    async fn prepare_messages(&self, ms: &mut [Message<u32>]) {
        if ms.iter().any(|m| m.data == 1) {
            std::future::pending::<()>().await;
        }
    }

    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        match m.data {
            2 => Err(Failure::permanent("bad input")),
            3 => Err(Failure::retryable("down")),
            _ => Ok(()),
        }
    }

    async fn handle_failed(&self, _: &mut [Message<u32>]) {
        std::future::pending::<()>().await
    }
}

struct HangingSink;

impl BatchSink<u32> for HangingSink {
    async fn handle_batch(&self, _: &BatchInfo, ms: &mut [Message<u32>]) -> Result<(), Failure> {
        for m in ms.iter_mut().filter(|m| m.data == 4) {
            m.fail(Failure::retryable("sink down"));
        }
        Ok(())
    }

    async fn handle_failed(&self, _: &BatchInfo, _: &mut [Message<u32>]) {
        std::future::pending::<()>().await
    }
}

struct HangingDeadLetters(Arc<AtomicUsize>);

impl DeadLetterSink<u32> for HangingDeadLetters {
    async fn dead_letter(&self, _: &str, ms: &mut [Message<u32>]) {
        self.0.fetch_add(ms.len(), Ordering::Relaxed);
        std::future::pending::<()>().await
    }
}

#[tokio::test(start_paused = true)]
async fn every_hook_runs_under_its_stage_timeout() {
    let acks = Arc::new(Acks::default());
    let dead = Arc::new(AtomicUsize::new(0));
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("hooks")
        .producer(producer)
        .processor(
            HangingHooks,
            one_worker().demand(1, 0).timeout(Duration::from_secs(1)),
        )
        .batcher(
            BatcherConfig::new("b")
                .batch_size(1)
                .timeout(Duration::from_secs(2)),
            HangingSink,
        )
        .dead_letter(HangingDeadLetters(dead.clone()))
        .start()
        .unwrap();
    let start = Instant::now();
    for i in 0..6 {
        push.push(msg(&acks, i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let ended = acks.once(0..6);
    assert_eq!(ended[&0], Ok(()));
    assert!(
        ended[&1]
            .as_ref()
            .unwrap_err()
            .contains("prepare_messages timed out")
    );
    assert_eq!(ended[&2], Err("bad input".into()));
    assert_eq!(ended[&3], Err("down".into()));
    assert_eq!(ended[&4], Err("sink down".into()));
    assert_eq!(ended[&5], Ok(()));
    // 1 and 3 (retryable, out of attempts) and 4 went to the hanging dead-letter sink.
    assert_eq!(dead.load(Ordering::Relaxed), 3);
    assert!(acks.at(5) - start < Duration::from_secs(30));
    let stats = pipeline.shutdown().await.unwrap();
    assert_eq!(
        (stats.successful, stats.failed, stats.dead_lettered),
        (2, 4, 3)
    );
}

struct Record(Arc<Mutex<Vec<(String, u32)>>>);

impl DeadLetterSink<u32> for Record {
    async fn dead_letter(&self, stage: &str, ms: &mut [Message<u32>]) {
        let mut dead = self.0.lock().unwrap();
        dead.extend(ms.iter().map(|m| (stage.to_owned(), m.data)));
    }
}

/// Sends everything to both batchers.
struct Both;

impl Processor<u32> for Both {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        if m.data == 9 {
            return Err(Failure::permanent("poison"));
        }
        m.put_batchers(Arc::from(vec![BatcherName::from("a"), "b".into()]));
        Ok(())
    }
}

struct FailAll;

impl BatchSink<u32> for FailAll {
    async fn handle_batch(&self, _: &BatchInfo, _: &mut [Message<u32>]) -> Result<(), Failure> {
        Err(Failure::retryable("down"))
    }
}

#[tokio::test(start_paused = true)]
async fn dead_letters_count_messages_and_can_take_permanent_failures() {
    for permanent in [false, true] {
        let acks = Arc::new(Acks::default());
        let dead = Arc::new(Mutex::new(Vec::new()));
        let (producer, push) = in_memory(100);
        let pipeline = Pipeline::builder("dead")
            .producer(producer)
            .processor(Both, one_worker())
            .batcher(BatcherConfig::new("a").batch_size(1), FailAll)
            .batcher(BatcherConfig::new("b").batch_size(1), FailAll)
            .dead_letter(Record(dead.clone()))
            .dead_letter_permanent(permanent)
            .start()
            .unwrap();
        for i in [1, 2, 9] {
            push.push(msg(&acks, i)).await.unwrap();
        }
        let stats = pipeline.shutdown().await.unwrap();
        let ended = acks.once([1, 2, 9]);
        assert_eq!(ended[&9], Err("poison".into()));
        let mut dead = dead.lock().unwrap().clone();
        dead.sort();
        // Each copy of a fan-out message is dead-lettered where it gave up...
        let mut expected = vec![
            ("sink:a".to_owned(), 1),
            ("sink:a".to_owned(), 2),
            ("sink:b".to_owned(), 1),
            ("sink:b".to_owned(), 2),
        ];
        if permanent {
            expected.insert(0, ("processor".to_owned(), 9));
        }
        assert_eq!(dead, expected);
        // ... but counted once per message.
        let n = if permanent { 3 } else { 2 };
        assert_eq!((stats.failed, stats.dead_lettered), (3, n));
    }
}

struct PanickingAcker(Arc<Acks>);

impl Acknowledger<u32> for PanickingAcker {
    fn ack(&self, successful: Vec<Message<u32>>, failed: Vec<Message<u32>>) {
        if successful.iter().chain(&failed).any(|m| m.data == 3) {
            panic!("the acknowledger broke");
        }
        self.0.ack(successful, failed);
    }
}

#[tokio::test(start_paused = true)]
async fn a_panicking_acknowledger_or_sink_fails_only_its_own_messages() {
    struct PanicOn7;
    impl BatchSink<u32> for PanicOn7 {
        async fn handle_batch(
            &self,
            _: &BatchInfo,
            ms: &mut [Message<u32>],
        ) -> Result<(), Failure> {
            assert!(ms.iter().all(|m| m.data != 7), "the sink broke");
            Ok(())
        }
    }
    let acks = Arc::new(Acks::default());
    let acker: Arc<dyn Acknowledger<u32>> = Arc::new(PanickingAcker(acks.clone()));
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("panics")
        .producer(producer)
        .processor(Pass, one_worker())
        .batcher(BatcherConfig::new("b").batch_size(1), PanicOn7)
        .start()
        .unwrap();
    for i in 0..10 {
        push.push(Message::with_acker(i, acker.clone()))
            .await
            .unwrap();
    }
    let stats = pipeline.shutdown().await.unwrap();
    let ids: Vec<u32> = (0..10).filter(|&i| i != 3).collect();
    let ended = acks.once(ids);
    assert!(ended[&7].as_ref().unwrap_err().contains("the sink broke"));
    assert_eq!(ended.values().filter(|e| e.is_ok()).count(), 8);
    assert_eq!(stats.produced, 10);
    assert_eq!(stats.in_flight, 0);
}

/// Found by the property tests: a producer waiting for input held the permits it had taken for
/// it, so with an explicit bound an idle producer could keep a busy one from ever handing out.
#[tokio::test(start_paused = true)]
async fn an_idle_producer_does_not_starve_a_busy_one() {
    let (idle, _idle_push) = in_memory::<u32>(10);
    let (busy, push) = in_memory::<u32>(10);
    let pipeline = Pipeline::builder("starve")
        .producer(idle)
        .producer(busy)
        .processor(Pass, ProcessorConfig::default().concurrency(1))
        .in_flight_bound(4)
        .start()
        .unwrap();
    for i in 0..8 {
        push.push(Message::new(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        pipeline.stats().produced,
        8,
        "the busy producer's messages were taken"
    );
    pipeline.shutdown().await.unwrap();

    // Fewer permits than producers could never be shared out: refused at the start.
    let (a, _a) = in_memory::<u32>(10);
    let (b, _b) = in_memory::<u32>(10);
    let refused = Pipeline::builder("too-few")
        .producer(a)
        .producer(b)
        .processor(Pass, ProcessorConfig::default())
        .in_flight_bound(1)
        .start();
    assert!(matches!(refused, Err(ConfigError::Invalid { .. })));
}

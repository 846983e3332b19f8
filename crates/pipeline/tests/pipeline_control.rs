//! Run-time control of a running pipeline: resizing its processor pool and its batchers' sink
//! pools under load, with nothing lost, nothing twice, and order per partition key kept across
//! the change; changing its rate limit; draining it through a shutdown handle. On tokio's
//! paused clock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thunderline_pipeline::testing::{Discard, Pass};
use thunderline_pipeline::*;

#[derive(Default)]
struct Seen {
    acked: Mutex<Vec<(u32, bool)>>,
    /// Messages in the order the processors handled them.
    handled: Mutex<Vec<u32>>,
    busy: AtomicUsize,
    /// The most handlers (or sinks) running at once since the last reset.
    peak: AtomicUsize,
}

impl Acknowledger<u32> for Seen {
    fn ack(&self, successful: Vec<Message<u32>>, failed: Vec<Message<u32>>) {
        let mut acked = self.acked.lock().unwrap();
        acked.extend(successful.iter().map(|m| (m.data, true)));
        acked.extend(failed.iter().map(|m| (m.data, false)));
    }
}

impl Seen {
    fn enter(&self) {
        let now = self.busy.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }

    fn leave(&self) {
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    fn take_peak(&self) -> usize {
        self.peak.swap(0, Ordering::SeqCst)
    }

    fn exactly_once_ok(&self, n: u32) {
        let mut acked = self.acked.lock().unwrap().clone();
        acked.sort_unstable();
        let expected: Vec<(u32, bool)> = (0..n).map(|i| (i, true)).collect();
        assert_eq!(
            acked, expected,
            "every message acknowledged once, successfully"
        );
    }
}

/// Takes 10 ms per message.
struct Slow(Arc<Seen>);

impl Processor<u32> for Slow {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        self.0.enter();
        self.0.handled.lock().unwrap().push(m.data);
        tokio::time::sleep(Duration::from_millis(10)).await;
        self.0.leave();
        Ok(())
    }
}

/// Takes 50 ms per batch.
struct SlowSink(Arc<Seen>);

impl BatchSink<u32> for SlowSink {
    async fn handle_batch(&self, _: &BatchInfo, _: &mut [Message<u32>]) -> Result<(), Failure> {
        self.0.enter();
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.0.leave();
        Ok(())
    }
}

/// Pushes `0..n` from a task of its own, acknowledged to `seen`.
fn feed(push: PushHandle<u32>, seen: &Arc<Seen>, n: u32) -> tokio::task::JoinHandle<()> {
    let seen = seen.clone();
    tokio::spawn(async move {
        for i in 0..n {
            push.push(Message::with_acker(i, seen.clone()))
                .await
                .unwrap();
        }
    })
}

/// The most handlers (or sinks) at once in a window that starts `settle` after a change.
async fn peak_after(seen: &Seen, settle: Duration, window: Duration) -> usize {
    tokio::time::sleep(settle).await;
    seen.take_peak();
    tokio::time::sleep(window).await;
    seen.take_peak()
}

fn concurrency(p: &Pipeline<u32>, stage: &str) -> usize {
    let topology = p.topology();
    let stage = topology.stages.iter().find(|s| s.name == stage).unwrap();
    stage.concurrency
}

#[tokio::test(start_paused = true)]
async fn resizing_processors_under_load_keeps_order_per_key_and_loses_nothing() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("resize-partitioned")
        .producer(producer)
        .processor(
            Slow(seen.clone()),
            ProcessorConfig::default().concurrency(2),
        )
        .partition_by(|m: &Message<u32>| u64::from(m.data % 7))
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    let feeder = feed(push, &seen, 2000);
    for n in [4, 1, 3, 7, 2] {
        pipeline.resize_processors(n).unwrap();
        assert_eq!(concurrency(&pipeline, "processor"), n);
        // The previous workers finish what they hold (at most 10 messages of 10 ms each), then
        // seven keys keep every one of n ≤ 7 workers busy, and no more run.
        let peak = peak_after(
            &seen,
            Duration::from_millis(200),
            Duration::from_millis(300),
        )
        .await;
        assert_eq!(peak, n, "handlers at once with {n} workers");
    }
    feeder.await.unwrap();
    pipeline.shutdown().await.unwrap();
    seen.exactly_once_ok(2000);
    let handled = seen.handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 2000, "each message handled once");
    let mut last: HashMap<u32, u32> = HashMap::new();
    for m in handled {
        if let Some(prev) = last.insert(m % 7, m) {
            assert!(prev < m, "key {}: {m} handled after {prev}", m % 7);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn resizing_an_unpartitioned_pool_takes_effect_at_once() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("resize")
        .producer(producer)
        .processor(
            Slow(seen.clone()),
            ProcessorConfig::default().concurrency(1),
        )
        .start()
        .unwrap();
    let feeder = feed(push, &seen, 3000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(seen.take_peak(), 1);
    let (settle, window) = (Duration::from_millis(200), Duration::from_millis(200));
    pipeline.resize_processors(6).unwrap();
    assert_eq!(peak_after(&seen, settle, window).await, 6);
    pipeline.resize_processors(2).unwrap();
    assert_eq!(peak_after(&seen, settle, window).await, 2);
    feeder.await.unwrap();
    let stats = pipeline.shutdown().await.unwrap();
    seen.exactly_once_ok(3000);
    // The default bound follows the pool: 10 per worker, so at most 60 at 6 workers, 20 now.
    assert_eq!(stats.in_flight_bound, 20);
    assert!(stats.max_in_flight <= 60, "{stats:?}");
}

#[tokio::test(start_paused = true)]
async fn resizing_a_batcher_under_load_changes_its_sink_workers() {
    let seen = Arc::new(Seen::default());
    let sinks = Arc::new(Seen::default());
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("resize-batcher")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default().concurrency(2))
        .batcher(
            BatcherConfig::new("b").batch_size(5),
            SlowSink(sinks.clone()),
        )
        .start()
        .unwrap();
    let feeder = feed(push, &seen, 3000);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(sinks.take_peak(), 1);
    pipeline.resize_batcher("b", 4).unwrap();
    assert_eq!(concurrency(&pipeline, "sink:b"), 4);
    let (settle, window) = (Duration::from_millis(200), Duration::from_millis(500));
    assert_eq!(peak_after(&sinks, settle, window).await, 4);
    pipeline.resize_batcher("b", 2).unwrap();
    assert_eq!(peak_after(&sinks, settle, window).await, 2);
    feeder.await.unwrap();
    pipeline.shutdown().await.unwrap();
    seen.exactly_once_ok(3000);
}

#[tokio::test(start_paused = true)]
async fn resizes_to_nothing_unknown_batchers_and_resizes_while_draining_are_refused() {
    let (producer, push) = in_memory::<u32>(10);
    let pipeline = Pipeline::builder("refuse")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default().concurrency(2))
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    assert!(matches!(
        pipeline.resize_processors(0),
        Err(ConfigError::Invalid { .. })
    ));
    assert!(matches!(
        pipeline.resize_batcher("b", 0),
        Err(ConfigError::Invalid { .. })
    ));
    let err = pipeline.resize_batcher("nope", 2).unwrap_err();
    assert!(matches!(err, ConfigError::UnknownBatcher(_)), "{err}");
    assert!(err.to_string().contains("nope"), "{err}");
    assert_eq!(concurrency(&pipeline, "processor"), 2);
    assert_eq!(concurrency(&pipeline, "sink:b"), 1);
    drop(push);
    // Once its source is exhausted the pipeline ends: a resize then is refused, not a hang.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert!(matches!(
        pipeline.resize_processors(3),
        Err(ConfigError::Draining)
    ));
    pipeline.join().await.unwrap();
}

/// A handle goes anywhere: into a signal handler's task, a supervisor, a static.
const _: fn() = || {
    fn shareable<H: Clone + Send + Sync + 'static>() {}
    shareable::<ShutdownHandle>();
};

#[tokio::test(start_paused = true)]
async fn a_shutdown_handle_drains_from_another_task_and_every_join_gets_the_answer() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(10);
    let pipeline = Pipeline::builder("handle")
        .producer(producer)
        .processor(
            Slow(seen.clone()),
            ProcessorConfig::default().concurrency(2),
        )
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    let handle = pipeline.shutdown_handle();
    let watcher = tokio::spawn(handle.clone().join());
    let stopper = handle.clone();
    // A "signal" arrives while messages are still being handled.
    let signal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        stopper.shutdown();
        stopper.shutdown();
        assert!(stopper.is_draining());
    });
    let mut accepted = 0;
    for i in 0..500 {
        if push
            .push(Message::with_acker(i, seen.clone()))
            .await
            .is_err()
        {
            break;
        }
        accepted += 1;
    }
    signal.await.unwrap();
    assert!(accepted < 500, "the drain stopped taking messages");
    let stats = handle.join().await.unwrap();
    assert_eq!(watcher.await.unwrap().unwrap(), stats);
    assert!(pipeline.is_draining());
    assert!(matches!(
        pipeline.resize_batcher("b", 2),
        Err(ConfigError::Draining)
    ));
    assert_eq!(stats.successful, u64::from(accepted));
    seen.exactly_once_ok(accepted);
    // The pipeline itself answers the same, and a late shutdown is harmless.
    pipeline.shutdown_handle().shutdown();
    assert_eq!(pipeline.join().await.unwrap(), stats);
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_handle_joins_a_pipeline_whose_source_ends_by_itself() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("handle-exhausted")
        .producer(producer)
        .processor(Slow(seen.clone()), ProcessorConfig::default())
        .start()
        .unwrap();
    let handle = pipeline.shutdown_handle();
    feed(push, &seen, 50).await.unwrap();
    // The push handle is gone: the source is exhausted, and the pipeline ends without a
    // shutdown.
    let stats = tokio::time::timeout(Duration::from_secs(60), handle.join())
        .await
        .expect("the pipeline ends by itself")
        .unwrap();
    assert_eq!(stats.successful, 50);
    seen.exactly_once_ok(50);
    drop(pipeline);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_pipeline_drains_it() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("dropped")
        .producer(producer)
        .processor(Slow(seen.clone()), ProcessorConfig::default())
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    let handle = pipeline.shutdown_handle();
    for i in 0..30 {
        push.push(Message::with_acker(i, seen.clone()))
            .await
            .unwrap();
    }
    drop(pipeline);
    assert!(handle.is_draining());
    let stats = handle.join().await.unwrap();
    assert_eq!(stats.successful, 30);
    seen.exactly_once_ok(30);
    assert!(push.push(Message::new(99)).await.is_err());
}

#[tokio::test(start_paused = true)]
async fn a_new_rate_limit_takes_effect_at_once_without_waiting_out_the_old_interval() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("rate")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default())
        .rate_limit(2, Duration::from_secs(3600))
        .start()
        .unwrap();
    assert_eq!(pipeline.rate_limit(), Some((2, Duration::from_secs(3600))));
    feed(push, &seen, 10).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(seen.acked.lock().unwrap().len(), 2, "two per hour");

    pipeline
        .set_rate_limit(3, Duration::from_millis(100))
        .unwrap();
    assert_eq!(pipeline.rate_limit(), Some((3, Duration::from_millis(100))));
    // Three at once, three more each 100 ms: the hour is not waited out.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(seen.acked.lock().unwrap().len(), 5);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.acked.lock().unwrap().len(), 8);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(seen.acked.lock().unwrap().len(), 10);

    assert!(pipeline.set_rate_limit(0, Duration::from_secs(1)).is_err());
    assert!(pipeline.set_rate_limit(1, Duration::ZERO).is_err());
    assert_eq!(
        pipeline.rate_limit(),
        Some((3, Duration::from_millis(100))),
        "a refused change changes nothing"
    );
    pipeline.shutdown().await.unwrap();
    seen.exactly_once_ok(10);
}

#[tokio::test(start_paused = true)]
async fn a_pipeline_started_without_a_rate_limit_can_be_given_one() {
    let seen = Arc::new(Seen::default());
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("rate-later")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default())
        .start()
        .unwrap();
    assert_eq!(pipeline.rate_limit(), None);
    pipeline.set_rate_limit(4, Duration::from_secs(1)).unwrap();
    feed(push, &seen, 10).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(seen.acked.lock().unwrap().len(), 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(seen.acked.lock().unwrap().len(), 8);
    pipeline.shutdown().await.unwrap();
    seen.exactly_once_ok(10);
}

#[tokio::test(start_paused = true)]
async fn metrics_show_concurrency_and_the_rate_limit_as_they_change() {
    let (producer, _push) = in_memory::<u32>(10);
    let pipeline = Pipeline::builder("metered")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default().concurrency(2))
        .batcher(BatcherConfig::new("b"), Discard)
        .start()
        .unwrap();
    let gauge = |name: &str, stage: Option<&str>| -> f64 {
        let families = pipeline.registry().gather();
        let family = families.iter().find(|f| f.name() == name).unwrap();
        family
            .get_metric()
            .iter()
            .find(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "pipeline" && l.value() == "metered")
                    && stage.is_none_or(|s| {
                        m.get_label()
                            .iter()
                            .any(|l| l.name() == "stage" && l.value() == s)
                    })
            })
            .unwrap()
            .get_gauge()
            .get_value()
    };
    let concurrency = "thunderline_pipeline_concurrency";
    assert_eq!(gauge(concurrency, Some("processor")), 2.0);
    assert_eq!(gauge(concurrency, Some("sink:b")), 1.0);
    assert_eq!(gauge("thunderline_pipeline_rate_limit_allowed", None), 0.0);
    pipeline.resize_processors(5).unwrap();
    pipeline.resize_batcher("b", 3).unwrap();
    pipeline
        .set_rate_limit(7, Duration::from_millis(1500))
        .unwrap();
    assert_eq!(gauge(concurrency, Some("processor")), 5.0);
    assert_eq!(gauge(concurrency, Some("sink:b")), 3.0);
    assert_eq!(gauge("thunderline_pipeline_rate_limit_allowed", None), 7.0);
    assert_eq!(
        gauge("thunderline_pipeline_rate_limit_interval_seconds", None),
        1.5
    );
    pipeline.shutdown().await.unwrap();
}

/// Records the order messages are handled in, 10 ms each.
struct InOrder(Arc<Mutex<Vec<u32>>>);

impl Processor<u32> for InOrder {
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        self.0.lock().unwrap().push(m.data);
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn two_resizes_before_a_producer_hears_the_first_keep_order_per_key() {
    let handled = Arc::new(Mutex::new(Vec::new()));
    let (producer, push) = in_memory(100);
    let pipeline = Pipeline::builder("two-resizes")
        .producer(producer)
        .processor(
            InOrder(handled.clone()),
            ProcessorConfig::default().concurrency(1),
        )
        // One key: everything in order.
        .partition_by(|_: &Message<u32>| 0)
        .start()
        .unwrap();
    for i in 0..10 {
        push.push(Message::new(i)).await.unwrap();
    }
    // The first worker is busy with 0..10 when the pool changes twice in a row: the producer
    // must wait for that worker, not for the generation in between, which it never fed.
    tokio::time::sleep(Duration::from_millis(1)).await;
    pipeline.resize_processors(2).unwrap();
    pipeline.resize_processors(3).unwrap();
    for i in 10..20 {
        push.push(Message::new(i)).await.unwrap();
    }
    drop(push);
    pipeline.join().await.unwrap();
    assert_eq!(*handled.lock().unwrap(), (0..20).collect::<Vec<_>>());
}

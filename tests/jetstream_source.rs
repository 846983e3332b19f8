//! The JetStream source against a real NATS server (127.0.0.1:4222, with JetStream): messages
//! are settled once the pipeline is done with them, failures are retried in process (never
//! delivered again by the server) and then dead-lettered once with their reason and attempts,
//! and a conflicting consumer is refused at start.
//!
//! Each test uses streams and subjects of its own, deleted at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use thunderline::daemon::config::PipelineFile;
use thunderline::pipeline::{
    BatchInfo, BatchSink, BatcherConfig, Failure, Jitter, Message, Pipeline, Processor,
    ProcessorConfig, RetryPolicy,
};
use thunderline::sources::jetstream::{JetStreamConfig, JetStreamError, JetStreamSource};
use thunderline::sources::{ATTEMPTS_HEADER, Delivery, REASON_HEADER};

const URL: &str = "nats://127.0.0.1:4222";

struct Names {
    stream: String,
    dead_stream: String,
    prefix: String,
}

fn names() -> Names {
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    Names {
        stream: format!("T_{tag}"),
        dead_stream: format!("T_{tag}_DEAD"),
        prefix: format!("t{tag}"),
    }
}

/// `base` reading and dead-lettering the test's own streams.
fn named(base: JetStreamConfig, n: &Names) -> JetStreamConfig {
    base.stream(n.stream.clone())
        .subjects(vec![format!("{}.commands.>", n.prefix)])
        .dead_stream(n.dead_stream.clone())
        .dead_subject(format!("{}.dead", n.prefix))
        .max_ack_pending(1000)
}

fn config(n: &Names) -> JetStreamConfig {
    named(JetStreamConfig::new(URL), n)
}

/// Three attempts in all, quickly.
fn three_attempts() -> RetryPolicy {
    RetryPolicy::exponential(3, Duration::from_millis(10), 2.0, Duration::from_millis(50))
        .with_jitter(Jitter::None)
}

async fn context() -> jetstream::Context {
    let client = async_nats::connect(URL)
        .await
        .expect("NATS with JetStream runs at 127.0.0.1:4222 (see the README)");
    jetstream::new(client)
}

async fn cleanup(js: &jetstream::Context, n: &Names) {
    let _ = js.delete_stream(&n.stream).await;
    let _ = js.delete_stream(&n.dead_stream).await;
}

async fn publish(js: &jetstream::Context, n: &Names, count: usize) {
    let mut acks = Vec::new();
    for i in 0..count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("m{i}").as_str());
        let subject = format!("{}.commands.z{}", n.prefix, i % 3);
        acks.push(
            js.publish_with_headers(subject, headers, i.to_string().into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

fn decode(d: &Delivery<'_>) -> Result<u64, Failure> {
    let text = std::str::from_utf8(d.payload)?;
    Ok(text.parse()?)
}

/// Fails what the test says: by value, permanently or retryably.
#[derive(Clone, Default)]
struct Judge {
    permanent: Arc<Vec<u64>>,
    retryable: Arc<Vec<u64>>,
    seen: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Processor<u64> for Judge {
    async fn handle_message(&self, m: &mut Message<u64>) -> Result<(), Failure> {
        *self.seen.lock().unwrap().entry(m.data).or_default() += 1;
        if self.permanent.contains(&m.data) {
            return Err(Failure::permanent(format!("{} is refused", m.data)));
        }
        if self.retryable.contains(&m.data) {
            return Err(Failure::retryable(format!("{} failed for now", m.data)));
        }
        Ok(())
    }
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u64>>>);

impl BatchSink<u64> for Sink {
    async fn handle_batch(&self, _: &BatchInfo, ms: &mut [Message<u64>]) -> Result<(), Failure> {
        self.0.lock().unwrap().extend(ms.iter().map(|m| m.data));
        Ok(())
    }
}

fn pipeline(source: JetStreamSource<u64>, judge: Judge, sink: Sink) -> Pipeline<u64> {
    Pipeline::builder("jetstream-test")
        .producer(source)
        .processor(
            judge,
            ProcessorConfig::default()
                .concurrency(2)
                .retry(three_attempts()),
        )
        .batcher(
            BatcherConfig::new("out")
                .batch_size(50)
                .batch_timeout(Duration::from_millis(20)),
            sink,
        )
        .start()
        .unwrap()
}

async fn consumer_state(js: &jetstream::Context, n: &Names) -> (u64, usize, u64) {
    let stream = js.get_stream(&n.stream).await.unwrap();
    let info = stream.consumer_info("thunderline").await.unwrap();
    (
        info.ack_floor.stream_sequence,
        info.num_ack_pending,
        info.num_pending,
    )
}

/// Waits (at most 30 s) until `check` holds.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn dead_letters(js: &jetstream::Context, n: &Names) -> Vec<(String, String, String, String)> {
    let stream = js.get_stream(&n.dead_stream).await.unwrap();
    let consumer: jetstream::consumer::Consumer<pull::Config> = stream
        .create_consumer(pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(1000)
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        let h = m.headers.clone().unwrap_or_default();
        let get = |k: &str| h.get(k).map(|v| v.as_str().to_owned()).unwrap_or_default();
        out.push((
            String::from_utf8_lossy(&m.payload).into_owned(),
            get(REASON_HEADER),
            get(ATTEMPTS_HEADER),
            m.subject.to_string(),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_acked_once_after_its_sink() {
    let js = context().await;
    let n = names();
    let source = JetStreamSource::connect(config(&n), decode).await.unwrap();
    let metrics = source.metrics().clone();
    publish(&js, &n, 500).await;
    let sink = Sink::default();
    let p = pipeline(source, Judge::default(), sink.clone());
    eventually("500 in the sink", || async {
        sink.0.lock().unwrap().len() >= 500
    })
    .await;
    eventually("every message acked", || async {
        let (floor, pending, left) = consumer_state(&js, &n).await;
        floor == 500 && pending == 0 && left == 0
    })
    .await;
    p.shutdown().await.unwrap();
    let mut got = sink.0.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (0..500).collect::<Vec<_>>(), "each message once");
    assert_eq!(metrics.messages("acked"), 500);
    assert_eq!(metrics.messages("received"), 500);
    cleanup(&js, &n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_retried_in_process_then_dead_lettered_once_with_their_reason() {
    let js = context().await;
    let n = names();
    let source = JetStreamSource::connect(config(&n), decode).await.unwrap();
    let metrics = source.metrics().clone();
    publish(&js, &n, 100).await;
    // Not a number: refused by the decoder.
    js.publish(format!("{}.commands.z9", n.prefix), "not a number".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let judge = Judge {
        permanent: Arc::new(vec![7, 8]),
        retryable: Arc::new(vec![9]),
        ..Judge::default()
    };
    let sink = Sink::default();
    let p = pipeline(source, judge.clone(), sink.clone());
    eventually("every message settled", || async {
        let (floor, pending, left) = consumer_state(&js, &n).await;
        floor == 101 && pending == 0 && left == 0
    })
    .await;
    p.shutdown().await.unwrap();
    assert_eq!(sink.0.lock().unwrap().len(), 97);
    // The retryable one was attempted 3 times in process (the stage's max_attempts), the
    // permanent ones once; the server delivered each once.
    assert_eq!(judge.seen.lock().unwrap()[&9], 3);
    assert_eq!(judge.seen.lock().unwrap()[&7], 1);
    let mut dead = dead_letters(&js, &n).await;
    dead.sort();
    assert_eq!(dead.len(), 4, "{dead:?}");
    let by_payload: HashMap<_, _> = dead.iter().map(|d| (d.0.as_str(), d)).collect();
    assert_eq!(by_payload["7"].1, "7 is refused");
    assert_eq!(by_payload["7"].2, "1");
    assert_eq!(by_payload["7"].3, format!("{}.dead.z1", n.prefix));
    assert_eq!(by_payload["9"].1, "9 failed for now");
    assert_eq!(by_payload["9"].2, "3");
    assert!(
        by_payload["not a number"].1.contains("invalid digit"),
        "{dead:?}"
    );
    assert_eq!(
        by_payload["not a number"].2, "",
        "no attempts: it never entered the pipeline"
    );
    assert_eq!(metrics.messages("dead_lettered"), 3);
    assert_eq!(metrics.messages("undecodable"), 1);
    assert_eq!(metrics.messages("retried"), 0);
    assert_eq!(metrics.messages("redelivered"), 0);
    cleanup(&js, &n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_consumer_is_refused_at_start() {
    let js = context().await;
    let n = names();
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: n.stream.clone(),
            subjects: vec![format!("{}.commands.>", n.prefix)],
            ..Default::default()
        })
        .await
        .unwrap();
    stream
        .create_consumer(jetstream::consumer::push::Config {
            durable_name: Some("thunderline".into()),
            deliver_subject: format!("{}.push", n.prefix),
            ..Default::default()
        })
        .await
        .unwrap();
    let refused = JetStreamSource::<u64>::connect(config(&n), decode).await;
    let Err(e @ JetStreamError::ConsumerConflict { .. }) = refused else {
        panic!("a push consumer of the same name must be refused");
    };
    assert!(e.to_string().contains("push consumer"), "{e}");
    cleanup(&js, &n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_gets_progress_acks_and_is_not_redelivered() {
    let js = context().await;
    let n = names();
    let cfg = config(&n).ack_wait(Duration::from_secs(2));
    let source = JetStreamSource::connect(cfg, decode).await.unwrap();
    let metrics = source.metrics().clone();
    publish(&js, &n, 1).await;
    struct Slow(Arc<Mutex<u32>>);
    impl Processor<u64> for Slow {
        async fn handle_message(&self, _: &mut Message<u64>) -> Result<(), Failure> {
            *self.0.lock().unwrap() += 1;
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        }
    }
    let calls = Arc::new(Mutex::new(0));
    let p = Pipeline::builder("slow")
        .producer(source)
        .processor(
            Slow(calls.clone()),
            ProcessorConfig::default().timeout(Duration::from_secs(10)),
        )
        .start()
        .unwrap();
    eventually("the slow message acked", || async {
        consumer_state(&js, &n).await.0 == 1
    })
    .await;
    p.shutdown().await.unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        1,
        "held 5 s with a 2 s ack wait, delivered once"
    );
    assert!(metrics.events("progress_ack") >= 2);
    assert_eq!(metrics.messages("redelivered"), 0);
    cleanup(&js, &n).await;
}

/// Fails, in the sink, the batches holding certain values: retryably the first time each is
/// seen, or permanently every time.
#[derive(Clone, Default)]
struct FlakySink {
    retryable_once: Arc<Vec<u64>>,
    permanent: Arc<Vec<u64>>,
    failed_once: Arc<Mutex<Vec<u64>>>,
    stored: Arc<Mutex<Vec<u64>>>,
}

impl BatchSink<u64> for FlakySink {
    async fn handle_batch(&self, _: &BatchInfo, ms: &mut [Message<u64>]) -> Result<(), Failure> {
        for m in ms.iter_mut() {
            if self.permanent.contains(&m.data) {
                m.fail(Failure::permanent(format!("the sink refuses {}", m.data)));
                continue;
            }
            if self.retryable_once.contains(&m.data) {
                let mut failed = self.failed_once.lock().unwrap();
                if !failed.contains(&m.data) {
                    failed.push(m.data);
                    m.fail(Failure::retryable(format!(
                        "the sink is busy with {}",
                        m.data
                    )));
                    continue;
                }
            }
            self.stored.lock().unwrap().push(m.data);
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_failures_are_retried_in_process_when_retryable_and_dead_lettered_when_permanent() {
    let js = context().await;
    let n = names();
    let source = JetStreamSource::connect(config(&n), decode).await.unwrap();
    let metrics = source.metrics().clone();
    publish(&js, &n, 200).await;
    let sink = FlakySink {
        retryable_once: Arc::new(vec![3, 50, 150]),
        permanent: Arc::new(vec![4, 99]),
        ..FlakySink::default()
    };
    let p = Pipeline::builder("jetstream-sink-faults")
        .producer(source)
        .processor(Judge::default(), ProcessorConfig::default().concurrency(2))
        .batcher(
            BatcherConfig::new("out")
                .batch_size(20)
                .batch_timeout(Duration::from_millis(20))
                .retry(three_attempts()),
            sink.clone(),
        )
        .start()
        .unwrap();
    eventually("every message settled", || async {
        let (floor, pending, left) = consumer_state(&js, &n).await;
        floor == 200 && pending == 0 && left == 0
    })
    .await;
    p.shutdown().await.unwrap();
    let mut stored = sink.stored.lock().unwrap().clone();
    stored.sort_unstable();
    let expected: Vec<u64> = (0..200).filter(|v| ![4, 99].contains(v)).collect();
    assert_eq!(
        stored, expected,
        "each stored once; the busy ones on their second attempt"
    );
    let dead = dead_letters(&js, &n).await;
    let mut dead_payloads: Vec<&str> = dead.iter().map(|d| d.0.as_str()).collect();
    dead_payloads.sort_unstable();
    assert_eq!(dead_payloads, ["4", "99"]);
    assert!(
        dead.iter().all(|d| d.1.starts_with("the sink refuses")),
        "{dead:?}"
    );
    assert_eq!(metrics.messages("retried"), 0);
    assert_eq!(metrics.messages("redelivered"), 0);
    cleanup(&js, &n).await;
}

/// The contract the README states: a command failing retryably every time is attempted exactly
/// `[processors.retry] max_attempts` times (5 in the shipped pipelines/nats.toml), in process,
/// then dead-lettered once with that many attempts, and the server does not deliver it again.
/// The source and the zone writers' stage are the daemon's, as the shipped file declares them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_failing_retryably_gets_the_documented_attempts_then_one_dead_letter() {
    let js = context().await;
    let n = names();
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nats.toml");
    let file = PipelineFile::load(&path).unwrap();
    let processors = file.processors.config.clone();
    let documented = processors.get_retry().max_attempts();
    assert_eq!(documented, 5, "the README says 5 attempts by default");
    let source_config = named(file.sources.nats.clone().expect("[sources.nats]"), &n);
    let source = JetStreamSource::connect(source_config, decode)
        .await
        .unwrap();
    let metrics = source.metrics().clone();
    publish(&js, &n, 10).await;
    let judge = Judge {
        retryable: Arc::new(vec![4]),
        ..Judge::default()
    };
    let sink = Sink::default();
    let p = Pipeline::builder("jetstream-documented-attempts")
        .producer(source)
        .processor(judge.clone(), processors)
        // As the daemon: one key's messages to one worker, in order.
        .partition_by(|m: &Message<u64>| m.data % 3)
        .batcher(
            BatcherConfig::new("out")
                .batch_size(50)
                .batch_timeout(Duration::from_millis(20)),
            sink.clone(),
        )
        .start()
        .unwrap();
    eventually("every message settled", || async {
        let (floor, pending, left) = consumer_state(&js, &n).await;
        floor == 10 && pending == 0 && left == 0
    })
    .await;
    eventually("one dead letter", || async {
        metrics.messages("dead_lettered") == 1
    })
    .await;
    p.shutdown().await.unwrap();
    assert_eq!(
        judge.seen.lock().unwrap()[&4],
        documented,
        "attempted exactly max_attempts times"
    );
    assert_eq!(sink.0.lock().unwrap().len(), 9);
    let dead = dead_letters(&js, &n).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].0, "4");
    assert_eq!(dead[0].1, "4 failed for now");
    assert_eq!(dead[0].2, documented.to_string());
    // Terminated: never delivered again, never given back.
    assert_eq!(metrics.messages("redelivered"), 0);
    assert_eq!(metrics.messages("retried"), 0);
    assert_eq!(metrics.messages("received"), 10);
    cleanup(&js, &n).await;
}

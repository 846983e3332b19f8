//! The RabbitMQ source against a real broker: messages through a pipeline and acknowledged once,
//! failures and undecodable messages in the dead-letter queue with their reason, a conflicting
//! queue refused at start, a connection killed mid-stream that loses nothing, and a drain that
//! settles what it took and leaves the rest in the queue.
//!
//! The broker is at `THUNDERLINE_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Without one the tests are skipped, loudly; under `CI=true`, or when the variable is set, an
//! unreachable broker fails them instead. Each test has queues and an exchange of its own, and
//! deletes them. They need `rabbitmqctl` for the broker (run with the right to use it): they count
//! queued messages and consumers' prefetch with it, and one of them closes every connection to
//! the broker with it, which is why they run one at a time.

use std::collections::HashMap;
use std::future::Future;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use thunderline::pipeline::{
    BatchInfo, BatchSink, BatcherConfig, Failure, Jitter, Message, Pipeline, Processor,
    ProcessorConfig, RetryPolicy,
};
use thunderline::sources::rabbitmq::{
    MESSAGE_ID, ROUTING_KEY, RabbitMqConfig, RabbitMqError, RabbitMqSource,
};
use thunderline::sources::{ATTEMPTS_HEADER, Delivery, REASON_HEADER, SourceMetrics};

const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const DEADLINE: Duration = Duration::from_secs(30);

/// One test at a time: the outage test closes every connection, the other tests' included.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn url() -> String {
    std::env::var("THUNDERLINE_TEST_AMQP_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

async fn open() -> lapin::Result<(Connection, Channel)> {
    let connection = Connection::connect(&url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

/// A test's own queue, dead-letter exchange and dead-letter queue, or None (after saying so)
/// when no broker answers and none is required.
async fn test_config() -> Option<RabbitMqConfig> {
    let must = std::env::var("THUNDERLINE_TEST_AMQP_URL").is_ok()
        || std::env::var("CI").is_ok_and(|v| v == "true");
    match tokio::time::timeout(Duration::from_secs(5), open()).await {
        Ok(Ok((connection, _))) => {
            let _ = connection.close(200, "OK".into()).await;
        }
        Ok(Err(e)) if must => panic!("RabbitMQ at {} is required here and failed: {e}", url()),
        Err(_) if must => panic!("RabbitMQ at {} is required here and did not answer", url()),
        _ => {
            eprintln!(
                "\n*** SKIPPED: no RabbitMQ answers at {}.\n\
                 *** Start one or set THUNDERLINE_TEST_AMQP_URL; CI=true makes this a failure.\n",
                url()
            );
            return None;
        }
    }
    let id = uuid::Uuid::new_v4().simple();
    let config = RabbitMqConfig::new(url())
        .queue(format!("thunderline.test.{id}"))
        .dead_exchange(format!("thunderline.test.{id}.dead"))
        .dead_queue(format!("thunderline.test.{id}.dead"))
        .consumer_tag(format!("thunderline-test-{id}"))
        .prefetch(50)
        .reconnect(RetryPolicy::unlimited(
            Duration::from_millis(50),
            2.0,
            Duration::from_secs(1),
        ));
    Some(config)
}

/// Publishes `(message_id, body)` pairs to the queue, through the default exchange, and waits
/// for the broker's confirms.
async fn publish(config: &RabbitMqConfig, messages: impl IntoIterator<Item = (String, String)>) {
    let (connection, channel) = open().await.expect("connect to publish");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm mode");
    for (id, body) in messages {
        let properties = BasicProperties::default()
            .with_message_id(id.into())
            .with_content_type("text/plain".into())
            .with_delivery_mode(2);
        channel
            .basic_publish(
                "".into(),
                config.get_queue().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .expect("publish");
    }
    let returned = channel.wait_for_confirms().await.expect("confirms");
    assert!(returned.is_empty(), "{} messages came back", returned.len());
    let _ = connection.close(200, "OK".into()).await;
}

/// Declares the topology, as a publisher would before any source starts, and publishes.
async fn publish_after_declare(
    config: &RabbitMqConfig,
    messages: impl IntoIterator<Item = (String, String)>,
) {
    RabbitMqSource::declare(config).await.expect("declare");
    publish(config, messages).await;
}

/// Takes `n` messages off the dead-letter queue, waiting for them up to the deadline.
async fn dead_letters(config: &RabbitMqConfig, n: usize) -> Vec<AmqpDelivery> {
    let (connection, channel) = open().await.expect("connect to read dead letters");
    let no_ack = BasicGetOptions { no_ack: true };
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while got.len() < n {
        match channel
            .basic_get(config.get_dead_queue().into(), no_ack)
            .await
            .expect("basic.get")
        {
            Some(message) => got.push(message.delivery),
            None if tokio::time::Instant::now() > deadline => {
                panic!("{} dead letters of {n} after {DEADLINE:?}", got.len())
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let extra = channel
        .basic_get(config.get_dead_queue().into(), no_ack)
        .await
        .expect("basic.get");
    assert!(extra.is_none(), "more than {n} dead letters");
    let _ = connection.close(200, "OK".into()).await;
    got
}

/// Runs `rabbitmqctl` (off the runtime's threads) and returns what it printed.
async fn rabbitmqctl(args: &'static [&'static str]) -> String {
    let out = tokio::task::spawn_blocking(move || Command::new("rabbitmqctl").args(args).output())
        .await
        .expect("the rabbitmqctl task")
        .expect("run rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// In a `rabbitmqctl list_…` listing of two columns, the number next to `name`.
fn column(listing: &str, name: &str) -> Option<u64> {
    listing.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(name)).then(|| fields.next()?.parse().ok())?
    })
}

/// Messages in a queue, ready and unacknowledged, as the broker counts them.
async fn queued(queue: &str) -> u64 {
    let listing = rabbitmqctl(&[
        "list_queues",
        "-q",
        "--no-table-headers",
        "name",
        "messages",
    ]);
    let listing = listing.await;
    column(&listing, queue).unwrap_or_else(|| panic!("no queue {queue} in {listing}"))
}

/// The prefetch of the queue's consumer, as the broker has it (None while it has none).
async fn consumer_prefetch(queue: &str) -> Option<u64> {
    let args = &[
        "list_consumers",
        "-q",
        "--no-table-headers",
        "queue_name",
        "prefetch_count",
    ];
    column(&rabbitmqctl(args).await, queue)
}

async fn cleanup(config: &RabbitMqConfig) {
    let (connection, channel) = open().await.expect("connect to clean up");
    for queue in [config.get_queue(), config.get_dead_queue()] {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = channel
        .exchange_delete(
            config.get_dead_exchange().into(),
            ExchangeDeleteOptions::default(),
        )
        .await;
    let _ = connection.close(200, "OK".into()).await;
}

/// Polls `done` until it holds, failing the test at the deadline.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not after {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls an async check (one that asks the broker) until it holds.
async fn wait_until_async<F: Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not after {DEADLINE:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Commands are numbers; anything else does not decode.
fn decode(delivery: &Delivery<'_>) -> Result<u32, Failure> {
    let text = String::from_utf8_lossy(delivery.payload);
    text.parse()
        .map_err(|_| Failure::permanent(format!("not a command: {text:?}")))
}

fn numbered(range: std::ops::Range<u32>) -> impl Iterator<Item = (String, String)> {
    range.map(|n| (format!("cmd-{n}"), n.to_string()))
}

/// How many times the sink saw each command.
type Seen = Arc<Mutex<HashMap<u32, u32>>>;

struct Record(Seen);

impl BatchSink<u32> for Record {
    async fn handle_batch(&self, _: &BatchInfo, ms: &mut [Message<u32>]) -> Result<(), Failure> {
        let mut seen = self.0.lock().unwrap();
        for m in ms.iter() {
            *seen.entry(m.data).or_default() += 1;
        }
        Ok(())
    }
}

/// A processor that works `pause` on each message, then gives a closure's verdict on it; it
/// also checks the metadata the source set.
struct Handle<F> {
    verdict: F,
    pause: Duration,
}

impl<F> Processor<u32> for Handle<F>
where
    F: Fn(&Message<u32>) -> Result<(), Failure> + Send + Sync + 'static,
{
    async fn handle_message(&self, m: &mut Message<u32>) -> Result<(), Failure> {
        let id = format!("cmd-{}", m.data);
        assert_eq!(m.metadata().get(MESSAGE_ID), Some(id.as_str()));
        // Published through the default exchange: the routing key is the queue's name.
        let key = m.metadata().get(ROUTING_KEY).unwrap_or_default();
        assert!(key.starts_with("thunderline.test."), "{key}");
        if !self.pause.is_zero() {
            tokio::time::sleep(self.pause).await;
        }
        (self.verdict)(m)
    }
}

/// Source → processor (two workers, two attempts) → one batcher recording what it saw.
fn pipeline<F>(source: RabbitMqSource<u32>, verdict: F, seen: &Seen) -> Pipeline<u32>
where
    F: Fn(&Message<u32>) -> Result<(), Failure> + Send + Sync + 'static,
{
    paced_pipeline(source, verdict, Duration::ZERO, seen)
}

fn paced_pipeline<F>(
    source: RabbitMqSource<u32>,
    verdict: F,
    pause: Duration,
    seen: &Seen,
) -> Pipeline<u32>
where
    F: Fn(&Message<u32>) -> Result<(), Failure> + Send + Sync + 'static,
{
    let retry =
        RetryPolicy::exponential(2, Duration::from_millis(1), 2.0, Duration::from_millis(5))
            .with_jitter(Jitter::None);
    Pipeline::builder("rabbitmq-test")
        .producer(source)
        .processor(
            Handle { verdict, pause },
            ProcessorConfig::default()
                .concurrency(2)
                .demand(20, 10)
                .retry(retry),
        )
        .batcher(
            BatcherConfig::new("record")
                .batch_size(20)
                .batch_timeout(Duration::from_millis(20)),
            Record(seen.clone()),
        )
        .start()
        .expect("a valid pipeline")
}

/// Shuts the pipeline down, then waits until the queue holds nothing (the source's connection
/// is gone once its acknowledger is: anything it left unacknowledged would be back).
async fn finish(pipeline: Pipeline<u32>, config: &RabbitMqConfig) {
    pipeline.shutdown().await.expect("a clean drain");
    let queue = config.get_queue();
    wait_until_async(
        "the queue is empty",
        || async move { queued(queue).await == 0 },
    )
    .await;
}

fn header<'a>(delivery: &'a AmqpDelivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

fn reason(delivery: &AmqpDelivery) -> String {
    match header(delivery, REASON_HEADER) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("no reason header: {other:?}"),
    }
}

fn message_id(delivery: &AmqpDelivery) -> &str {
    delivery
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
        .expect("a message id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_processed_and_acked_once() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    publish_after_declare(&config, numbered(0..500)).await;
    let metrics: SourceMetrics = config.get_metrics().clone();
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .expect("connect");
    let seen = Seen::default();
    let pipeline = pipeline(source, |_| Ok(()), &seen);

    wait_until("500 acks", || metrics.messages("acked") == 500).await;
    assert_eq!(consumer_prefetch(config.get_queue()).await, Some(50));
    finish(pipeline, &config).await;

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 500);
    assert!(seen.values().all(|&n| n == 1), "a command seen twice");
    assert_eq!(metrics.messages("received"), 500);
    assert_eq!(metrics.messages("acked"), 500);
    for outcome in [
        "redelivered",
        "dead_lettered",
        "undecodable",
        "settle_failed",
    ] {
        assert_eq!(metrics.messages(outcome), 0, "{outcome}");
    }
    assert_eq!(queued(config.get_dead_queue()).await, 0);
    cleanup(&config).await;
}

/// The lag gauge follows the queue's depth while a slow pipeline works through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_follows_the_queue_depth() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    publish_after_declare(&config, numbered(0..300)).await;
    let metrics: SourceMetrics = config.get_metrics().clone();
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .expect("connect");
    let seen = Seen::default();
    let pipeline = paced_pipeline(source, |_| Ok(()), Duration::from_millis(5), &seen);
    // 300 queued, at most 50 delivered ahead: the rest waits in the queue.
    wait_until("a lag of the queue's depth", || metrics.lag() >= 100).await;
    wait_until("300 acks", || metrics.messages("acked") == 300).await;
    wait_until("no lag", || metrics.lag() == 0).await;
    finish(pipeline, &config).await;
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_messages_are_dead_lettered_with_their_reason_and_attempts() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    publish_after_declare(&config, numbered(0..100)).await;
    let metrics = config.get_metrics().clone();
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .expect("connect");
    let seen = Seen::default();
    // Ending in 3: refused for good. In 7: failing on every attempt. In 5: failing once.
    let pipeline = pipeline(
        source,
        |m| match m.data % 10 {
            3 => Err(Failure::permanent(format!("command {} is refused", m.data))),
            7 => Err(Failure::retryable(format!("command {} times out", m.data))),
            5 if m.attempts() == 1 => Err(Failure::retryable("a hiccup")),
            _ => Ok(()),
        },
        &seen,
    );

    let mut dead = dead_letters(&config, 20).await;
    wait_until("80 acks and 20 dead letters", || {
        metrics.messages("acked") == 80 && metrics.messages("dead_lettered") == 20
    })
    .await;
    finish(pipeline, &config).await;

    dead.sort_by_key(|d| message_id(d).to_owned());
    for d in &dead {
        let n: u32 = String::from_utf8_lossy(&d.data)
            .parse()
            .expect("the body kept");
        assert_eq!(message_id(d), format!("cmd-{n}"));
        assert_eq!(
            d.properties.content_type().as_ref().map(|c| c.as_str()),
            Some("text/plain")
        );
        assert_eq!(
            d.routing_key.as_str(),
            config.get_queue(),
            "the original routing key"
        );
        let (why, attempts) = match n % 10 {
            3 => (format!("command {n} is refused"), 1),
            7 => (format!("command {n} times out"), 2),
            _ => panic!("command {n} was dead-lettered"),
        };
        assert_eq!(reason(d), why);
        assert_eq!(
            header(d, ATTEMPTS_HEADER),
            Some(&AMQPValue::LongLongInt(attempts))
        );
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.len(), 80);
    assert!(seen.keys().all(|n| n % 10 != 3 && n % 10 != 7));
    assert_eq!(metrics.messages("settle_failed"), 0);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_messages_are_dead_lettered_at_once() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    let garbage = (0..5).map(|n| (format!("junk-{n}"), format!("junk {n}")));
    publish_after_declare(&config, numbered(0..20).chain(garbage)).await;
    let metrics = config.get_metrics().clone();
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .expect("connect");
    let seen = Seen::default();
    let pipeline = pipeline(source, |_| Ok(()), &seen);

    let mut dead = dead_letters(&config, 5).await;
    wait_until("20 acks and 5 undecodable", || {
        metrics.messages("acked") == 20 && metrics.messages("undecodable") == 5
    })
    .await;
    let stats = pipeline.stats();
    finish(pipeline, &config).await;

    assert_eq!(
        stats.produced, 20,
        "undecodable messages never enter the pipeline"
    );
    dead.sort_by_key(|d| message_id(d).to_owned());
    for (n, d) in dead.iter().enumerate() {
        assert_eq!(message_id(d), format!("junk-{n}"));
        assert_eq!(d.data, format!("junk {n}").into_bytes());
        assert_eq!(reason(d), format!("not a command: \"junk {n}\""));
        assert_eq!(header(d, ATTEMPTS_HEADER), None);
    }
    assert_eq!(metrics.messages("dead_lettered"), 0);
    assert_eq!(seen.lock().unwrap().len(), 20);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_declared_with_other_arguments_is_refused_at_start() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    let (connection, channel) = open().await.expect("connect");
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(10));
    channel
        .queue_declare(
            config.get_queue().into(),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .expect("declare the conflicting queue");
    let _ = connection.close(200, "OK".into()).await;

    let refused = RabbitMqSource::<u32>::connect(config.clone(), decode).await;
    match refused {
        Err(RabbitMqError::QueueConflict { ref queue, .. }) => {
            assert_eq!(*queue, config.get_queue())
        }
        Err(other) => panic!("another error: {other}"),
        Ok(_) => panic!("a conflicting queue was accepted"),
    }
    let text = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(text.contains(config.get_queue()), "{text}");
    assert!(text.contains("x-dead-letter-exchange"), "{text}");
    assert!(text.contains("rabbitmqctl delete_queue"), "{text}");
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_killed_mid_stream_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    publish_after_declare(&config, numbered(0..2000)).await;
    let metrics = config.get_metrics().clone();
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .expect("connect");
    let seen = Seen::default();
    // A little work per message, so that the kill lands while most are still to come.
    let pipeline = paced_pipeline(source, |_| Ok(()), Duration::from_millis(1), &seen);

    wait_until("300 acks", || metrics.messages("acked") >= 300).await;
    rabbitmqctl(&["close_all_connections", "test"]).await;
    assert!(
        metrics.messages("acked") < 2000,
        "the kill came after the last ack"
    );

    wait_until("a reconnect", || metrics.events("reconnected") >= 1).await;
    // The prefetch belongs to the channel, lost with the connection: it is set again.
    assert_eq!(consumer_prefetch(config.get_queue()).await, Some(50));
    wait_until("every command seen", || seen.lock().unwrap().len() == 2000).await;
    let queue = config.get_queue();
    wait_until_async(
        "every command acked",
        || async move { queued(queue).await == 0 },
    )
    .await;
    finish(pipeline, &config).await;

    assert_eq!(metrics.events("disconnected"), 1);
    assert_eq!(metrics.events("reconnected"), 1);
    assert!(metrics.messages("acked") >= 2000);
    // Whatever was in flight at the kill came back, and counts as redelivered when it did.
    let received = metrics.messages("received");
    assert_eq!(
        received,
        metrics.messages("acked") + metrics.messages("settle_failed")
    );
    assert!(metrics.messages("redelivered") > 0);
    assert_eq!(metrics.messages("dead_lettered"), 0);
    cleanup(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_settles_what_was_received_and_leaves_the_rest_queued() {
    let _serial = SERIAL.lock().await;
    let Some(config) = test_config().await else {
        return;
    };
    publish_after_declare(&config, numbered(0..300)).await;
    let metrics = config.get_metrics().clone();
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .expect("connect");
    let seen = Seen::default();
    let pipeline = paced_pipeline(source, |_| Ok(()), Duration::from_millis(5), &seen);

    wait_until("20 acks", || metrics.messages("acked") >= 20).await;
    // Everything the broker delivered before the cancel is handed over, processed, and acked
    // after the drain; what it did not deliver stays in the queue.
    pipeline.shutdown().await.expect("a clean drain");
    let received = metrics.messages("received");
    wait_until("every message received is acked", || {
        metrics.messages("acked") == received
    })
    .await;
    assert!(received < 300, "the drain came after the last delivery");
    let queue = config.get_queue();
    wait_until_async("the rest is back in the queue", || async move {
        queued(queue).await == 300 - received
    })
    .await;
    assert_eq!(seen.lock().unwrap().len() as u64, received);
    assert_eq!(metrics.messages("settle_failed"), 0);
    cleanup(&config).await;
}

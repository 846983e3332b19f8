//! The broker restarted mid-stream loses nothing: a pipeline fed by a broker source goes on after
//! the broker comes back, and every message published is processed and settled.
//!
//! These tests stop the machine's broker and start it again (with the commands of the machine
//! notes, the same `.ci/run` uses), whatever happens in the test: a guard starts it again when
//! the test ends, even by a panic. They run one at a time.

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use thunderline::pipeline::{
    BatchInfo, BatchSink, BatcherConfig, Failure, Message, Pipeline, Processor, ProcessorConfig,
    Producer,
};
use thunderline::sources::Delivery;
use thunderline::sources::jetstream::{JetStreamConfig, JetStreamSource};
use thunderline::sources::rabbitmq::{RabbitMqConfig, RabbitMqSource};
use tokio::time::Instant;

mod common;
use common::services::{NatsBack, listening, start_nats, stop_nats, wait_until};

/// One broker restart at a time, across the tests of this file.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<u64>>>);

impl Processor<u64> for Seen {
    async fn handle_message(&self, _: &mut Message<u64>) -> Result<(), Failure> {
        Ok(())
    }
}

impl BatchSink<u64> for Seen {
    async fn handle_batch(&self, _: &BatchInfo, ms: &mut [Message<u64>]) -> Result<(), Failure> {
        self.0.lock().unwrap().extend(ms.iter().map(|m| m.data));
        Ok(())
    }
}

/// A pipeline that records every message it is given.
fn collecting(name: &str, source: impl Producer<u64>, seen: &Seen) -> Pipeline<u64> {
    Pipeline::builder(name)
        .producer(source)
        .processor(seen.clone(), ProcessorConfig::default())
        .batcher(
            BatcherConfig::new("out")
                .batch_size(50)
                .batch_timeout(Duration::from_millis(10)),
            seen.clone(),
        )
        .start()
        .unwrap()
}

fn decode(d: &Delivery<'_>) -> Result<u64, Failure> {
    Ok(std::str::from_utf8(d.payload)?.parse()?)
}

const COUNT: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _back = NatsBack;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let config = JetStreamConfig::default()
        .stream(format!("R_{tag}"))
        .subjects(vec![format!("r{tag}.commands.>")])
        .dead_stream(format!("R_{tag}_DEAD"))
        .dead_subject(format!("r{tag}.dead"))
        .ack_wait(Duration::from_secs(3));
    let client = async_nats::connect("nats://127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(client);
    let source = JetStreamSource::connect(config.clone(), decode)
        .await
        .unwrap();
    let metrics = source.metrics().clone();
    let seen = Seen::default();
    let pipeline = collecting("nats-restart", source, &seen);

    // Published over about 2 s, each retried until the stream has it; the server is stopped
    // and started again about 0.7 s in.
    let publisher = {
        let js = js.clone();
        let subject = format!("r{tag}.commands.z");
        tokio::spawn(async move {
            for i in 0..COUNT {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", format!("{tag}-{i}").as_str());
                loop {
                    let sent = js
                        .publish_with_headers(
                            subject.clone(),
                            headers.clone(),
                            i.to_string().into(),
                        )
                        .await;
                    if let Ok(ack) = sent
                        && ack.await.is_ok()
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = seen.0.lock().unwrap().len();
    tokio::task::spawn_blocking(|| {
        stop_nats();
        std::thread::sleep(Duration::from_secs(1));
        start_nats();
    })
    .await
    .unwrap();
    publisher.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        if let Ok(stream) = js.get_stream(config.get_stream()).await {
            break stream;
        }
        assert!(Instant::now() < deadline, "the stream is back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    loop {
        let distinct: HashSet<u64> = seen.0.lock().unwrap().iter().copied().collect();
        let info = stream.consumer_info(config.get_consumer()).await.ok();
        let settled = info
            .as_ref()
            .is_some_and(|i| i.num_ack_pending == 0 && i.num_pending == 0);
        if distinct.len() == COUNT as usize && settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {COUNT} processed after the restart; consumer: {:?}",
            distinct.len(),
            info.map(|i| (i.num_ack_pending, i.num_pending))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pipeline.shutdown().await.unwrap();
    eprintln!(
        "{before} processed before the restart; {} deliveries in all for {COUNT} messages; {} reconnects",
        seen.0.lock().unwrap().len(),
        metrics.events("reconnected")
    );
    assert!(
        before > 0 && before < COUNT as usize,
        "the restart came mid-stream"
    );
    assert!(metrics.events("disconnected") >= 1);
    let _ = js.delete_stream(config.get_stream()).await;
    let _ = js.delete_stream(config.get_dead_stream()).await;
}

const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn start_rabbitmq() {
    if !listening(5672) {
        let _ = Command::new("rabbitmq-server").arg("-detached").status();
    }
    wait_until("RabbitMQ listens again", 90, || listening(5672));
    let _ = Command::new("rabbitmqctl")
        .args(["await_startup", "--timeout", "60"])
        .status();
}

fn stop_rabbitmq() {
    let stopped = Command::new("rabbitmqctl")
        .arg("stop")
        .status()
        .expect("rabbitmqctl runs");
    assert!(stopped.success());
    wait_until("RabbitMQ stops listening", 60, || !listening(5672));
}

/// Starts RabbitMQ again when dropped, whatever happened.
struct RabbitBack;

impl Drop for RabbitBack {
    fn drop(&mut self) {
        start_rabbitmq();
    }
}

/// Publishes message `i` until the broker confirms it, reconnecting as needed.
async fn publish_confirmed(link: &mut Option<(Connection, lapin::Channel)>, queue: &str, i: u64) {
    loop {
        if link.is_none() {
            if let Ok(connection) =
                Connection::connect(AMQP_URL, ConnectionProperties::default()).await
                && let Ok(channel) = connection.create_channel().await
                && channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .is_ok()
            {
                *link = Some((connection, channel));
            } else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let (_, channel) = link.as_ref().expect("connected above");
        let properties = BasicProperties::default()
            .with_message_id(i.to_string().into())
            .with_delivery_mode(2);
        let sent = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                properties,
            )
            .await;
        match sent {
            Ok(confirm) => match confirm.await {
                Ok(c) if c.is_ack() => return,
                _ => {}
            },
            Err(_) => *link = None,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_mid_stream_loses_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let _back = RabbitBack;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let config = RabbitMqConfig::new(AMQP_URL)
        .queue(format!("r.{tag}.commands"))
        .dead_exchange(format!("r.{tag}.dead"))
        .dead_queue(format!("r.{tag}.commands.dead"))
        .prefetch(100);
    RabbitMqSource::declare(&config)
        .await
        .expect("RabbitMQ runs at 127.0.0.1:5672");
    let source = RabbitMqSource::connect(config.clone(), decode)
        .await
        .unwrap();
    let metrics = source.metrics().clone();
    let seen = Seen::default();
    let pipeline = collecting("rabbitmq-restart", source, &seen);

    let publisher = {
        let queue = config.get_queue().to_owned();
        tokio::spawn(async move {
            let mut link = None;
            for i in 0..COUNT {
                publish_confirmed(&mut link, &queue, i).await;
                if i % 100 == 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let before = seen.0.lock().unwrap().len();
    tokio::task::spawn_blocking(|| {
        stop_rabbitmq();
        start_rabbitmq();
    })
    .await
    .unwrap();
    publisher.await.unwrap();

    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let distinct: HashSet<u64> = seen.0.lock().unwrap().iter().copied().collect();
        let acked = metrics.messages("acked");
        if distinct.len() == COUNT as usize && acked >= COUNT {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {COUNT} processed, {acked} acked after the restart",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pipeline.shutdown().await.unwrap();
    eprintln!(
        "{before} processed before the restart; {} deliveries in all for {COUNT} messages; {} reconnects, {} settlements refused",
        seen.0.lock().unwrap().len(),
        metrics.events("reconnected"),
        metrics.messages("settle_failed")
    );
    assert!(
        before > 0 && before < COUNT as usize,
        "the restart came mid-stream"
    );
    assert!(metrics.events("reconnected") >= 1);
    let (connection, channel) = {
        let c = Connection::connect(AMQP_URL, ConnectionProperties::default())
            .await
            .unwrap();
        let ch = c.create_channel().await.unwrap();
        (c, ch)
    };
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

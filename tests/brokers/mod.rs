//! The brokers as the tests see them: a publisher, the dead letters, and a pipeline file whose
//! source reads streams or queues of the test's own; the commands the ingest tests publish.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions,
    QueueDeleteOptions,
};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::json;
use sqlx::Connection as _;
use thunderline::daemon::config::{PipelineFile, SourceSections};
use thunderline::sources::jetstream::JetStreamConfig;
use thunderline::sources::rabbitmq::{RabbitMqConfig, RabbitMqSource};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nats,
    Rabbitmq,
}

pub const NATS_URL: &str = "nats://127.0.0.1:4222";
pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// One test's broker objects, named with a tag of its own.
#[derive(Clone)]
pub struct Broker {
    pub kind: Kind,
    pub tag: String,
    js: jetstream::Context,
    amqp: Option<(Arc<Connection>, Channel)>,
    /// Dead letters taken off the dead-letter queue so far (RabbitMQ).
    taken: Arc<Mutex<HashMap<Uuid, String>>>,
}

impl Broker {
    pub async fn new(kind: Kind) -> Self {
        let tag = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let client = async_nats::connect(NATS_URL)
            .await
            .expect("NATS with JetStream runs at 127.0.0.1:4222 (see the README)");
        let mut broker = Self {
            kind,
            tag,
            js: jetstream::new(client),
            amqp: None,
            taken: Arc::default(),
        };
        if kind == Kind::Rabbitmq {
            RabbitMqSource::declare(&broker.rabbit())
                .await
                .expect("RabbitMQ runs at 127.0.0.1:5672 (see the README)");
            let connection = Connection::connect(AMQP_URL, ConnectionProperties::default())
                .await
                .unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            broker.amqp = Some((Arc::new(connection), channel));
        }
        broker
    }

    fn rabbit(&self) -> RabbitMqConfig {
        RabbitMqConfig::default()
            .queue(format!("t.{}.commands", self.tag))
            .dead_exchange(format!("t.{}.dead", self.tag))
            .dead_queue(format!("t.{}.commands.dead", self.tag))
    }

    fn nats(&self) -> JetStreamConfig {
        JetStreamConfig::default()
            .stream(format!("T_{}", self.tag))
            .subjects(vec![format!("t{}.commands.>", self.tag)])
            .dead_stream(format!("T_{}_DEAD", self.tag))
            .dead_subject(format!("t{}.dead", self.tag))
            // Short, so that what the killed daemon held comes back soon after the restart.
            .ack_wait(Duration::from_secs(3))
    }

    /// The default zone pipeline with this broker's source.
    pub fn pipeline_file(&self) -> String {
        let sources = match self.kind {
            Kind::Nats => SourceSections {
                nats: Some(self.nats()),
                ..SourceSections::default()
            },
            Kind::Rabbitmq => SourceSections {
                rabbitmq: Some(self.rabbit()),
                ..SourceSections::default()
            },
        };
        let file = PipelineFile {
            sources,
            ..PipelineFile::default()
        };
        toml::to_string(&file).unwrap()
    }

    /// Publishes a command for `zone` with `id` as its message id, once the broker has it.
    pub async fn publish(&self, zone: &str, id: Uuid, body: &[u8]) {
        if let Some((_, channel)) = &self.amqp {
            let properties = BasicProperties::default()
                .with_message_id(id.to_string().into())
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    self.rabbit().get_queue().into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(confirm.is_ack(), "the broker took the command");
            return;
        }
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.to_string().as_str());
        let subject = format!("t{}.commands.{zone}", self.tag);
        self.js
            .publish_with_headers(subject, headers, body.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The dead letters so far: message id → reason.
    pub async fn dead_letters(&self) -> HashMap<Uuid, String> {
        if let Some((_, channel)) = &self.amqp {
            let rabbit = self.rabbit();
            while let Some(m) = channel
                .basic_get(
                    rabbit.get_dead_queue().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                let p = &m.delivery.properties;
                let id = p
                    .message_id()
                    .as_ref()
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok());
                let reason = p
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(thunderline::sources::REASON_HEADER).cloned());
                let reason = match reason {
                    Some(AMQPValue::LongString(s)) => s.to_string(),
                    Some(other) => format!("{other:?}"),
                    None => String::new(),
                };
                if let Some(id) = id {
                    self.taken.lock().unwrap().insert(id, reason);
                }
            }
            return self.taken.lock().unwrap().clone();
        }
        let nats = self.nats();
        let Ok(stream) = self.js.get_stream(nats.get_dead_stream()).await else {
            return HashMap::new();
        };
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .create_consumer(pull::Config {
                inactive_threshold: Duration::from_secs(10),
                ..pull::Config::default()
            })
            .await
            .unwrap();
        let mut out = HashMap::new();
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .messages()
                .await
                .unwrap();
            let mut got = 0;
            while let Some(Ok(m)) = batch.next().await {
                got += 1;
                let h = m.headers.clone().unwrap_or_default();
                let id = h
                    .get("Nats-Msg-Id")
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok());
                let reason = h
                    .get(thunderline::sources::REASON_HEADER)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                if let Some(id) = id {
                    out.insert(id, reason);
                }
            }
            if got == 0 {
                return out;
            }
        }
    }

    /// Nothing is left unsettled or undelivered (waiting a while for the last settlements).
    pub async fn assert_settled(&self) {
        if let Err(Some(left)) =
            crate::common::read_until(10, || self.unsettled(), Option::is_none).await
        {
            panic!("{left}");
        }
    }

    /// What the broker still holds for the consumer, unsettled or undelivered; None when
    /// nothing.
    pub async fn unsettled(&self) -> Option<String> {
        if self.amqp.is_some() {
            let rabbit = self.rabbit();
            let queue = rabbit.get_queue();
            let out = std::process::Command::new("rabbitmqctl")
                .args([
                    "list_queues",
                    "-q",
                    "--no-table-headers",
                    "name",
                    "messages",
                ])
                .output()
                .expect("rabbitmqctl runs");
            let listing = String::from_utf8_lossy(&out.stdout).into_owned();
            let left = listing.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some(queue)).then(|| f.next()?.parse::<u64>().ok())?
            });
            return (left != Some(0))
                .then(|| format!("queue {queue} still holds {left:?} messages"));
        }
        let nats = self.nats();
        let stream = self.js.get_stream(nats.get_stream()).await.unwrap();
        let info = stream.consumer_info(nats.get_consumer()).await.unwrap();
        (info.num_ack_pending != 0 || info.num_pending != 0).then(|| {
            format!(
                "the consumer still has {} unacknowledged and {} undelivered messages",
                info.num_ack_pending, info.num_pending
            )
        })
    }

    pub async fn cleanup(&self) {
        if let Some((connection, channel)) = &self.amqp {
            let r = self.rabbit();
            for queue in [r.get_queue(), r.get_dead_queue()] {
                let _ = channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(
                    r.get_dead_exchange().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
            let _ = connection.close(200, "OK".into()).await;
            return;
        }
        let nats = self.nats();
        let _ = self.js.delete_stream(nats.get_stream()).await;
        let _ = self.js.delete_stream(nats.get_dead_stream()).await;
    }
}

/// What the test published: command id → poisoned or not.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sent {
    Valid,
    InvalidPayload,
    NotJson,
}

/// Command `i`: 1 in 50 is poisoned, half of those with an invalid payload (refused by the
/// decoder, a position that is not one, and by the zone, an amount below 1, in turn), half not
/// JSON.
pub fn command(i: usize, zone: &str) -> (Uuid, Vec<u8>, Sent) {
    let id = Uuid::now_v7();
    let agent = format!("npc-{}", i % 7);
    let (body, sent) = match (i % 50, i % 200) {
        (0, 0) => (
            json!({"id": id, "zone_id": zone, "agent_id": agent, "type": "agent_move", "payload": {"position": "nowhere"}}),
            Sent::InvalidPayload,
        ),
        (0, 100) => (
            json!({"id": id, "zone_id": zone, "agent_id": agent, "type": "consume_resource", "payload": {"resource_type": "stone", "amount": 0}}),
            Sent::InvalidPayload,
        ),
        (0, _) => return (id, format!("garbage {i} {{").into_bytes(), Sent::NotJson),
        _ => (
            json!({"id": id, "zone_id": zone, "agent_id": agent, "type": "agent_move", "payload": {"position": {"x": i, "y": 0, "z": 0}}}),
            Sent::Valid,
        ),
    };
    (id, body.to_string().into_bytes(), sent)
}

pub async fn audited(db: &str) -> HashMap<Uuid, i64> {
    let mut c = sqlx::PgConnection::connect(db).await.unwrap();
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT command_id, COUNT(*) FROM audit_events WHERE command_id IS NOT NULL AND event_type = 'agent_moved' GROUP BY command_id",
    )
    .fetch_all(&mut c)
    .await
    .unwrap();
    rows.into_iter().collect()
}

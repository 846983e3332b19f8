//! RabbitMQ: a durable queue consumed with a prefetch the pipeline's demand sets.
//!
//! # Topology
//!
//! [`RabbitMqSource::connect`] declares, before it consumes (and again after every reconnect,
//! declarations being idempotent):
//!
//! - the dead-letter exchange `thunderline.dead`, a durable fanout exchange;
//! - the dead-letter queue `thunderline.commands.dead`, durable, bound to it;
//! - the queue `thunderline.commands`, durable, with `x-dead-letter-exchange =
//!   thunderline.dead`, so that what the broker dead-letters on its own (a message past its TTL,
//!   one rejected by another consumer) lands in the same place.
//!
//! A queue or exchange that already exists with other arguments is a
//! [`RabbitMqError::QueueConflict`] or [`RabbitMqError::ExchangeConflict`]: the broker refuses
//! the declaration (`PRECONDITION_FAILED`) and the error says what to change.
//!
//! # Consuming
//!
//! One consumer on one channel, with `basic.qos` prefetch = [`RabbitMqConfig::prefetch`] (per
//! consumer): the broker never has more unacknowledged deliveries out than that, so the
//! deliveries waiting for the pipeline's demand are bounded by it. Each delivery is decoded by
//! the [`Decoder`] when `produce` hands it out; one the decoder refuses is dead-lettered at once
//! and never enters the pipeline.
//!
//! A message carries in its metadata [`ROUTING_KEY`] and [`MESSAGE_ID`] (when the publisher
//! gave one). Each delivery keeps its own acker, bound to the channel it came on, so a delivery
//! of a lost channel is never acknowledged on its successor: it fails to settle, and the broker
//! delivers it again.
//!
//! # Settlement
//!
//! The settlement is the sources' shared one (the [module](super) table); this source brings its
//! I/O, on a task of its own (the acknowledger runs on the pipeline's stage tasks and must not
//! block):
//!
//! - a successful message is `basic.ack`ed;
//! - a failed one is dead-lettered, whatever the failure: the stage already retried it in process
//!   under its retry policy, so a failure here means its attempts are used up or it was
//!   permanent. A copy (same body, same properties, message id and content type included, plus
//!   the headers [`REASON_HEADER`], the failure's reason, and [`ATTEMPTS_HEADER`], the
//!   message's [`attempts`](Message::attempts) as a signed 64-bit integer) is published to the
//!   dead-letter exchange with the original routing key, on a channel in confirm mode; once the
//!   broker confirms it (routed and stored), the original is `basic.ack`ed. A copy the broker
//!   does not confirm, or cannot route, is not a dead letter: the original is `basic.nack`ed
//!   with requeue instead, and nothing is lost.
//!
//! Why publish a copy rather than `basic.reject(requeue=false)` and let the queue's
//! `x-dead-letter-exchange` do it: a reject cannot carry a header, so the dead letter would
//! not say why it died, and the reason is what someone replaying dead letters needs first (the
//! broker's own `x-death` header only says "rejected"). The cost: publishing and acknowledging
//! are two steps, not one. A crash, or a lost connection, between the confirm and the ack
//! leaves the dead letter in place and the original unacknowledged; the broker delivers the
//! original again, it fails again, and the dead-letter queue ends up with two copies with the
//! same `message_id`. Whoever replays dead letters deduplicates on it, as the pipeline's
//! handlers do.
//!
//! The copy keeps every property but `expiration` (a dead letter must not expire on the way to
//! someone who looks at it; the broker's own dead-lettering drops it too) and `user_id` (the
//! broker checks it against the publishing connection's user, which need not be the original
//! publisher's).
//!
//! An ack, nack or dead letter the broker does not take (the connection was lost, the delivery
//! belongs to a channel lost since) is counted `settle_failed`: the broker delivers such a
//! message again.
//!
//! # Outages
//!
//! When the connection or the consumer goes away, the source reconnects under its
//! [`reconnect`](RabbitMqConfig::reconnect) policy (at once, then with growing, jittered
//! waits; a policy with limited attempts gives up once they are used, and the source ends),
//! declares the topology again, sets the prefetch
//! again on the new channel (it belongs to the channel, which is gone) and consumes again;
//! `disconnected` and `reconnected` are counted. Meanwhile `produce` simply waits. Deliveries of
//! the lost channel are dropped without being handed out, and those already handed out fail to
//! settle: the broker delivers them all again, marked redelivered.
//!
//! [`Producer::drain`] cancels the consumer and hands over everything the broker delivered
//! before the cancel took effect. The connection stays open until the acknowledger (shared by
//! the source and its messages) is dropped, so that messages still in the pipeline can be
//! settled after the drain; [`RabbitMqSource::settled`] waits for that at shutdown, so that a
//! process that exits does not take the last acks with it (the broker would deliver those
//! messages again, or, with no consumer left, keep them).
//!
//! Outcomes counted in [`SourceMetrics`]: `received` and `redelivered` for each delivery
//! `produce` (or the drain) takes, then one of `acked`, `dead_lettered`, `undecodable`,
//! `given_back` (failed with [`Redeliver`](super::Redeliver): requeued), `retried` (a dead
//! letter that was not confirmed: requeued instead) or `settle_failed` (a
//! delivery of a lost channel, dropped without being handed out, included).
//!
//! [`SourceMetrics`]: super::SourceMetrics

use std::fmt;
use std::num::NonZeroU16;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ErrorKind, ExchangeKind,
};
use serde::{Deserialize, Deserializer, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use super::settlement::{BrokerIo, DeadLetter, Settler, decode};
use super::{
    ATTEMPTS_HEADER, Counted, Decoder, Delivery, InvalidConfig, NoRetry, REASON_HEADER,
    SourceMetrics, check_name, default_reconnect,
};
use crate::pipeline::{Acknowledger, Demand, Message, Produced, Producer, RetryPolicy};
use crate::redact::redact_url;

/// Metadata key: the routing key the message was published with.
pub const ROUTING_KEY: &str = "amqp.routing_key";
/// Metadata key: the publisher's `message_id`, when it gave one.
pub const MESSAGE_ID: &str = "amqp.message_id";

/// The header quorum queues count deliveries in (classic queues only say `redelivered`).
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// How long a connection attempt (TCP, handshake, declarations, consume) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to confirm a cancel on drain, or a dead letter, or a close.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the queue's depth is read for the lag gauge.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Where and how to consume, and how to reconnect.
///
/// In a pipeline file (`[sources.rabbitmq]`) the keys are `url`, `queue`, `dead_exchange`,
/// `dead_queue`, `prefetch`, `consumer_tag` and a `reconnect` table (a [`RetryPolicy`]); an
/// omitted key takes the default. Its `Debug` shows the URL without credentials.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(from = "RabbitMqFile", into = "RabbitMqFile")]
pub struct RabbitMqConfig {
    url: String,
    queue: String,
    dead_exchange: String,
    dead_queue: String,
    prefetch: Option<u16>,
    consumer_tag: String,
    reconnect: RetryPolicy,
    metrics: Counted,
}

/// The prefetch when none is given.
const DEFAULT_PREFETCH: u16 = 100;

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue: "thunderline.commands".into(),
            dead_exchange: "thunderline.dead".into(),
            dead_queue: "thunderline.commands.dead".into(),
            prefetch: None,
            consumer_tag: "thunderline".into(),
            reconnect: default_reconnect(),
            metrics: Counted(SourceMetrics::unregistered("rabbitmq")),
        }
    }
}

impl RabbitMqConfig {
    /// The defaults, at another broker (`amqp://user:password@host:port/vhost`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Default: `thunderline.commands`.
    pub fn queue(mut self, name: impl Into<String>) -> Self {
        self.queue = name.into();
        self
    }

    /// Default: `thunderline.dead`.
    pub fn dead_exchange(mut self, name: impl Into<String>) -> Self {
        self.dead_exchange = name.into();
        self
    }

    /// Default: `thunderline.commands.dead`.
    pub fn dead_queue(mut self, name: impl Into<String>) -> Self {
        self.dead_queue = name.into();
        self
    }

    /// Unacknowledged deliveries the broker may have out at once (`basic.qos`); the daemon
    /// passes what the processors can ask for. At least 1 (0 would mean no limit). Default: 100.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = Some(n);
        self
    }

    /// Default: `thunderline`. Empty lets the broker choose one.
    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }

    /// The waits between reconnection attempts (the first is made at once). A policy with
    /// limited attempts gives up once they are used: the source then ends. Default: unlimited,
    /// 100 ms doubling to 10 s, full jitter.
    pub fn reconnect(mut self, policy: RetryPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Where the source counts. Default: counters nobody scrapes.
    pub fn metrics(mut self, metrics: SourceMetrics) -> Self {
        self.metrics = Counted(metrics);
        self
    }

    pub fn get_url(&self) -> &str {
        &self.url
    }

    pub fn get_queue(&self) -> &str {
        &self.queue
    }

    pub fn get_dead_exchange(&self) -> &str {
        &self.dead_exchange
    }

    pub fn get_dead_queue(&self) -> &str {
        &self.dead_queue
    }

    /// The prefetch set, if any (the default applies otherwise).
    pub fn get_prefetch(&self) -> Option<u16> {
        self.prefetch
    }

    pub fn get_reconnect(&self) -> &RetryPolicy {
        &self.reconnect
    }

    pub fn get_metrics(&self) -> &SourceMetrics {
        &self.metrics.0
    }

    /// Whether the settings can be used: [`RabbitMqSource::connect`] checks them first, and the
    /// daemon while it reads a pipeline file.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        Settings::new(self).map(drop)
    }
}

impl fmt::Debug for RabbitMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConfig")
            .field("url", &redact_url(&self.url))
            .field("queue", &self.queue)
            .field("dead_exchange", &self.dead_exchange)
            .field("dead_queue", &self.dead_queue)
            .field("prefetch", &self.prefetch)
            .field("consumer_tag", &self.consumer_tag)
            .field("reconnect", &self.reconnect)
            .finish_non_exhaustive()
    }
}

/// `[sources.rabbitmq]` as a file writes it. An omitted `prefetch` is left to whoever builds
/// the source (the daemon sizes it to its processors).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RabbitMqFile {
    url: String,
    queue: String,
    dead_exchange: String,
    dead_queue: String,
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "nonzero_prefetch"
    )]
    prefetch: Option<u16>,
    consumer_tag: String,
    reconnect: RetryPolicy,
    /// Gone: refused with where retries went.
    #[serde(skip_serializing)]
    retry: Option<NoRetry>,
}

/// A prefetch of 0 is refused where it is written.
fn nonzero_prefetch<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    NonZeroU16::deserialize(d).map(|n| Some(n.get()))
}

impl Default for RabbitMqFile {
    fn default() -> Self {
        RabbitMqConfig::default().into()
    }
}

impl From<RabbitMqConfig> for RabbitMqFile {
    fn from(c: RabbitMqConfig) -> Self {
        Self {
            url: c.url,
            queue: c.queue,
            dead_exchange: c.dead_exchange,
            dead_queue: c.dead_queue,
            prefetch: c.prefetch,
            consumer_tag: c.consumer_tag,
            reconnect: c.reconnect,
            retry: None,
        }
    }
}

impl From<RabbitMqFile> for RabbitMqConfig {
    fn from(f: RabbitMqFile) -> Self {
        Self {
            url: f.url,
            queue: f.queue,
            dead_exchange: f.dead_exchange,
            dead_queue: f.dead_queue,
            prefetch: f.prefetch,
            consumer_tag: f.consumer_tag,
            reconnect: f.reconnect,
            ..Self::default()
        }
    }
}

/// Why the source could not start (later outages are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum RabbitMqError {
    #[error("invalid RabbitMQ source configuration: {0}")]
    Config(#[from] InvalidConfig),
    #[error("cannot connect to RabbitMQ at {url}: {source}")]
    Connect { url: String, source: lapin::Error },
    #[error("RabbitMQ at {url} did not answer within {after:?}")]
    Unreachable { url: String, after: Duration },
    #[error(
        "the queue {queue:?} already exists with other arguments than thunderline declares \
         (durable, x-dead-letter-exchange = {dead_exchange:?} for the main queue, none for the \
         dead-letter queue); the broker said: {broker}. Move its messages away and delete it \
         (`rabbitmqctl delete_queue {queue}`), or configure another queue name"
    )]
    QueueConflict {
        queue: String,
        dead_exchange: String,
        broker: String,
    },
    #[error(
        "the exchange {exchange:?} already exists with another type or other arguments than \
         thunderline declares (a durable fanout exchange); the broker said: {broker}. Delete it \
         (`rabbitmqadmin delete exchange name={exchange}`), or configure another dead-letter \
         exchange name"
    )]
    ExchangeConflict { exchange: String, broker: String },
    #[error("RabbitMQ refused to {action}: {source}")]
    Broker {
        action: String,
        source: lapin::Error,
    },
}

/// A RabbitMQ queue as a [`Producer`]: see the [module](self) documentation.
pub struct RabbitMqSource<T> {
    deliveries: mpsc::UnboundedReceiver<Incoming>,
    /// Reused by each `produce`; always empty between calls.
    buf: Vec<Incoming>,
    decoder: Box<dyn Decoder<T>>,
    settler: Arc<Settler<T, Pending>>,
    generation: Arc<AtomicU64>,
    /// Tells the consuming task to cancel the consumer; dropped (the same) with the source.
    stop: Option<oneshot::Sender<()>>,
    /// Told by the consuming task once everything is settled (or nothing more can be).
    all_settled: Option<oneshot::Receiver<()>>,
    metrics: SourceMetrics,
}

/// Waits for a source's last settlements to reach the broker, once its pipeline has finished.
pub struct Settled {
    all_settled: Option<oneshot::Receiver<()>>,
}

impl Settled {
    /// Waits (at most `timeout`) until every settlement has been sent. Call it after the
    /// pipeline's `join`, which drops the source and its messages.
    pub async fn wait(self, timeout: Duration) {
        let Some(all_settled) = self.all_settled else {
            return;
        };
        if tokio::time::timeout(timeout, all_settled).await.is_err() {
            tracing::warn!(
                "RabbitMQ settlements were still being sent at shutdown: the broker delivers those messages again"
            );
        }
    }
}

impl RabbitMqSource<()> {
    /// Declares the topology (see the [module](self) documentation) and disconnects, without
    /// consuming: for tests and benchmarks that publish before a source starts.
    pub async fn declare(config: &RabbitMqConfig) -> Result<(), RabbitMqError> {
        let settings = Settings::new(config)?;
        let connection = within(&settings.url, connect(&settings)).await?;
        let declared = async {
            let channel = connection
                .create_channel()
                .await
                .map_err(broker("open a channel"))?;
            declare_topology(&channel, &settings).await
        };
        let result = within(&settings.url, declared).await;
        close(&connection).await;
        result
    }
}

impl<T: Send + 'static> RabbitMqSource<T> {
    /// Connects, declares the topology and starts consuming; fails if any of it fails.
    pub async fn connect(
        config: RabbitMqConfig,
        decoder: impl Decoder<T>,
    ) -> Result<Self, RabbitMqError> {
        let settings = Arc::new(Settings::new(&config)?);
        let link = within(&settings.url, open(&settings, 1)).await?;

        let metrics = config.metrics.0;
        let (connection_tx, connection_rx) = watch::channel(Some(link.connection.clone()));
        let io = Rabbit {
            publisher: Publisher {
                connection: connection_rx,
                settings: settings.clone(),
                channel: None,
            },
        };
        // A requeue carries no delay: the backoff is unused on RabbitMQ.
        let (settler, settled) = Settler::start(io, settings.reconnect.clone(), metrics.clone());
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let (all_settled_tx, all_settled) = oneshot::channel();
        let generation = Arc::new(AtomicU64::new(link.generation));
        let driver = Driver {
            settings,
            metrics: metrics.clone(),
            generation: generation.clone(),
            connection: connection_tx,
            deliveries: Some(deliveries_tx),
            stop: stop_rx,
            settled,
            all_settled: Some(all_settled_tx),
        };
        tokio::spawn(driver.run(link));
        Ok(Self {
            deliveries,
            buf: Vec::new(),
            decoder: Box::new(decoder),
            settler,
            generation,
            stop: Some(stop),
            all_settled: Some(all_settled),
            metrics,
        })
    }

    pub fn metrics(&self) -> &SourceMetrics {
        &self.metrics
    }

    /// What to wait on at shutdown, after the pipeline has finished: see [`Settled::wait`].
    pub fn settled(&mut self) -> Settled {
        Settled {
            all_settled: self.all_settled.take(),
        }
    }

    /// Has `acker` told how each message ended, after the broker's settlement is decided: how a
    /// user keeps bookkeeping of their own (the daemon's zones do). Set once; later calls are
    /// ignored.
    pub fn then_acknowledge(self, acker: Arc<dyn Acknowledger<T>>) -> Self {
        self.settler.then_acknowledge(acker);
        self
    }

    /// Turns a delivery into a message, or settles it at once: a delivery of a lost channel is
    /// dropped (the broker delivers it again), one the decoder refuses is dead-lettered.
    fn accept(
        &self,
        Incoming {
            generation,
            delivery,
        }: Incoming,
    ) -> Option<Message<T>> {
        let attempt = attempt(&delivery);
        self.settler.received(attempt);
        if generation != self.generation.load(Ordering::Acquire) || !delivery.acker.usable() {
            self.metrics.message("settle_failed", 1);
            return None;
        }
        let AmqpDelivery {
            routing_key,
            properties,
            data,
            acker,
            ..
        } = delivery;
        let message_id = properties.message_id().as_ref().map(ShortString::as_str);
        let view = Delivery {
            payload: &data,
            content_type: properties.content_type().as_ref().map(ShortString::as_str),
            message_id,
            subject: routing_key.as_str(),
            attempt,
        };
        let decoded = decode(&*self.decoder, &view);
        let (message_id, routing) = (message_id.map(str::to_owned), routing_key.to_string());
        let pending = Pending {
            acker,
            routing_key,
            properties,
            body: data,
        };
        match decoded {
            Ok(data) => {
                let mut msg = self.settler.message(data, pending, attempt);
                let metadata = msg.metadata_mut();
                metadata.insert(ROUTING_KEY, routing);
                if let Some(id) = message_id {
                    metadata.insert(MESSAGE_ID, id);
                }
                Some(msg)
            }
            Err(failure) => {
                tracing::warn!(
                    routing_key = %routing, message_id = ?message_id,
                    "undecodable message, dead-lettered: {failure}"
                );
                self.settler.undecodable(pending, attempt, &failure);
                None
            }
        }
    }
}

impl<T: Send + 'static> Producer<T> for RabbitMqSource<T> {
    async fn produce(&mut self, demand: &mut Demand<T>) -> Produced {
        loop {
            let limit = demand.remaining();
            if limit == 0 {
                return Produced::More;
            }
            // `recv_many` is cancel-safe, and nothing below awaits: a delivery is either still
            // in the channel or handed out (or settled).
            if self.deliveries.recv_many(&mut self.buf, limit).await == 0 {
                tracing::error!("the RabbitMQ consuming task is gone: nothing more will come");
                return Produced::Exhausted;
            }
            let mut buf = std::mem::take(&mut self.buf);
            for incoming in buf.drain(..) {
                if let Some(msg) = self.accept(incoming) {
                    // At most `limit` deliveries, at most one message each: there is room.
                    let _ = demand.push(msg);
                }
            }
            self.buf = buf;
            if demand.remaining() < limit {
                return Produced::More;
            }
        }
    }

    async fn drain(&mut self, held: &mut Vec<Message<T>>) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // The consuming task closes the channel once the broker has confirmed the cancel (or
        // could not), with everything delivered before it in the channel.
        while let Some(incoming) = self.deliveries.recv().await {
            held.extend(self.accept(incoming));
        }
    }
}

/// A delivery on its way from the consuming task to `produce`.
struct Incoming {
    generation: u64,
    delivery: AmqpDelivery,
}

/// Which delivery of the message this is: quorum queues count, classic queues only say
/// whether it was delivered before.
fn attempt(delivery: &AmqpDelivery) -> u32 {
    let count = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(DELIVERY_COUNT_HEADER))
        .and_then(count);
    match count {
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX).saturating_add(1),
        None if delivery.redelivered => 2,
        None => 1,
    }
}

fn count(value: &AMQPValue) -> Option<u64> {
    let n: i128 = match *value {
        AMQPValue::ShortShortInt(n) => n.into(),
        AMQPValue::ShortShortUInt(n) => n.into(),
        AMQPValue::ShortInt(n) => n.into(),
        AMQPValue::ShortUInt(n) => n.into(),
        AMQPValue::LongInt(n) => n.into(),
        AMQPValue::LongUInt(n) => n.into(),
        AMQPValue::LongLongInt(n) => n.into(),
        _ => return None,
    };
    u64::try_from(n).ok()
}

/// A delivery handed out, kept until its message is settled: the acker for its channel, and
/// what a dead letter needs.
struct Pending {
    acker: Acker,
    routing_key: ShortString,
    properties: BasicProperties,
    body: Vec<u8>,
}

async fn ack(acker: &Acker) -> bool {
    // `Ok(false)`: the channel is gone, and the delivery with it. Bounded: an ack on a channel
    // whose connection died without telling must not hold up every settlement behind it (the
    // broker delivers such a message again once the channel is closed).
    matches!(
        timeout(BROKER_TIMEOUT, acker.ack(BasicAckOptions::default())).await,
        Ok(Ok(true))
    )
}

/// RabbitMQ's side of the settlement: acks on each delivery's channel, dead letters published
/// with confirms on a channel of their own.
struct Rabbit {
    publisher: Publisher,
}

impl BrokerIo for Rabbit {
    type Held = Pending;

    async fn ack(&mut self, held: Vec<Pending>) -> u64 {
        let acked = join_all(held.iter().map(|p| ack(&p.acker))).await;
        acked.into_iter().filter(|&ok| ok).count() as u64
    }

    /// Publishes every copy before waiting for any confirm.
    async fn store(&mut self, dead: Vec<(Pending, DeadLetter)>) -> Vec<(Pending, bool)> {
        let mut published = Vec::with_capacity(dead.len());
        for (pending, letter) in dead {
            if !pending.acker.usable() {
                // Its channel is gone: the broker delivers it again, and a copy now would be a
                // duplicate then.
                published.push((pending, None));
                continue;
            }
            let properties =
                dead_letter_properties(&pending.properties, &letter.reason, letter.attempts);
            let confirm = self
                .publisher
                .publish(&pending.routing_key, &pending.body, properties)
                .await;
            published.push((pending, confirm));
        }
        let mut stored = Vec::with_capacity(published.len());
        for (pending, confirm) in published {
            let confirmed = match confirm {
                Some(confirm) => match timeout(BROKER_TIMEOUT, confirm).await {
                    // `Ack(Some(_))` is a copy the exchange could not route anywhere: no dead
                    // letter.
                    Ok(Ok(Confirmation::Ack(None))) => true,
                    Ok(Ok(other)) => {
                        tracing::warn!("a dead letter was not confirmed ({other:?})");
                        false
                    }
                    Ok(Err(e)) => {
                        tracing::warn!("a dead letter was not confirmed ({e})");
                        false
                    }
                    Err(_) => {
                        tracing::warn!("a dead letter was not confirmed in {BROKER_TIMEOUT:?}");
                        false
                    }
                },
                None => false,
            };
            if !confirmed {
                // Whatever went wrong (the exchange or the dead-letter queue deleted, say), the
                // next dead letter starts again from a fresh channel and a declared topology.
                self.publisher.channel = None;
            }
            stored.push((pending, confirmed));
        }
        stored
    }

    async fn finish(&mut self, held: Pending) -> bool {
        // A dead letter in place whose original is not acknowledged comes back: see the module
        // documentation.
        ack(&held.acker).await
    }

    async fn give_back(&mut self, held: Pending, _delay: Duration) -> bool {
        let requeue = BasicNackOptions {
            multiple: false,
            requeue: true,
        };
        matches!(
            timeout(BROKER_TIMEOUT, held.acker.nack(requeue)).await,
            Ok(Ok(true))
        )
    }
}

/// The same properties but `expiration` and `user_id` (see the module docs), plus the reason
/// and the attempts.
fn dead_letter_properties(
    original: &BasicProperties,
    reason: &str,
    attempts: Option<u32>,
) -> BasicProperties {
    let mut headers = original.headers().clone().unwrap_or_default();
    headers.insert(
        REASON_HEADER.into(),
        AMQPValue::LongString(LongString::from(reason)),
    );
    if let Some(attempts) = attempts {
        headers.insert(
            ATTEMPTS_HEADER.into(),
            AMQPValue::LongLongInt(attempts.into()),
        );
    }
    let mut copy = BasicProperties::default().with_headers(headers);
    macro_rules! keep {
        ($($get:ident => $with:ident),* $(,)?) => {$(
            if let Some(value) = original.$get() {
                copy = copy.$with(value.clone());
            }
        )*};
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    copy
}

/// The channel dead letters are published on, in confirm mode, opened on the current
/// connection (and the topology declared on it) when first needed, and again whenever it is
/// gone or a dead letter was not confirmed.
struct Publisher {
    connection: watch::Receiver<Option<Arc<Connection>>>,
    settings: Arc<Settings>,
    channel: Option<Channel>,
}

impl Publisher {
    /// Publishes one message; None if it could not be sent at all.
    async fn publish(
        &mut self,
        routing_key: &ShortString,
        body: &[u8],
        properties: BasicProperties,
    ) -> Option<lapin::PublisherConfirm> {
        let channel = self.channel().await?.clone();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        match channel
            .basic_publish(
                self.settings.dead_exchange.clone(),
                routing_key.clone(),
                options,
                body,
                properties,
            )
            .await
        {
            Ok(confirm) => Some(confirm),
            Err(e) => {
                tracing::warn!("cannot publish a dead letter: {e}");
                None
            }
        }
    }

    async fn channel(&mut self) -> Option<&Channel> {
        if self
            .channel
            .as_ref()
            .is_none_or(|c| !c.status().connected())
        {
            self.channel = None;
            let connection = self.connection.borrow().clone()?;
            let opened = async {
                let channel = connection
                    .create_channel()
                    .await
                    .map_err(broker("open a channel"))?;
                declare_topology(&channel, &self.settings).await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(broker("put a channel in confirm mode"))?;
                Ok::<_, RabbitMqError>(channel)
            };
            match timeout(BROKER_TIMEOUT, opened).await {
                Ok(Ok(channel)) => self.channel = Some(channel),
                Ok(Err(e)) => tracing::warn!("cannot open a channel for dead letters: {e}"),
                Err(_) => tracing::warn!("cannot open a channel for dead letters: no answer"),
            }
        }
        self.channel.as_ref()
    }
}

/// The configuration, checked, in the broker's types.
struct Settings {
    url: String,
    queue: ShortString,
    dead_exchange: ShortString,
    dead_queue: ShortString,
    consumer_tag: ShortString,
    prefetch: u16,
    reconnect: RetryPolicy,
}

impl Settings {
    fn new(config: &RabbitMqConfig) -> Result<Self, InvalidConfig> {
        if !(config.url.starts_with("amqp://") || config.url.starts_with("amqps://")) {
            return Err(InvalidConfig(format!(
                "url {:?} must start with amqp:// (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)",
                redact_url(&config.url)
            )));
        }
        let name = |what: &str, value: &str, may_be_empty: bool| {
            if !(may_be_empty && value.is_empty()) {
                check_name(what, value, true)?;
            }
            ShortString::try_new(value).map_err(|e| InvalidConfig(format!("{what} {value:?}: {e}")))
        };
        if config.queue == config.dead_queue {
            return Err(InvalidConfig("queue and dead_queue must differ".into()));
        }
        if config.prefetch == Some(0) {
            return Err(InvalidConfig(
                "prefetch must be at least 1 (0 would let the broker deliver without limit)".into(),
            ));
        }
        config
            .reconnect
            .validate()
            .map_err(|e| InvalidConfig(format!("reconnect: {e}")))?;
        Ok(Self {
            url: config.url.clone(),
            queue: name("queue", &config.queue, false)?,
            dead_exchange: name("dead_exchange", &config.dead_exchange, false)?,
            dead_queue: name("dead_queue", &config.dead_queue, false)?,
            consumer_tag: name("consumer_tag", &config.consumer_tag, true)?,
            prefetch: config.prefetch.unwrap_or(DEFAULT_PREFETCH),
            reconnect: config.reconnect.clone(),
        })
    }
}

/// One connection and what consumes on it.
struct Link {
    generation: u64,
    connection: Arc<Connection>,
    channel: Channel,
    consumer: Consumer,
}

async fn connect(settings: &Settings) -> Result<Connection, RabbitMqError> {
    let properties =
        ConnectionProperties::default().with_connection_name("thunderline rabbitmq source".into());
    Connection::connect(&settings.url, properties)
        .await
        .map_err(|source| RabbitMqError::Connect {
            url: redact_url(&settings.url),
            source,
        })
}

/// Connects, declares the topology, sets the prefetch and consumes.
async fn open(settings: &Settings, generation: u64) -> Result<Link, RabbitMqError> {
    let connection = connect(settings).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(broker("open a channel"))?;
    declare_topology(&channel, settings).await?;
    channel
        .basic_qos(settings.prefetch, BasicQosOptions { global: false })
        .await
        .map_err(broker("set the prefetch (basic.qos)"))?;
    let consumer = channel
        .basic_consume(
            settings.queue.clone(),
            settings.consumer_tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker(&format!(
            "consume from {:?}",
            settings.queue.as_str()
        )))?;
    Ok(Link {
        generation,
        connection: Arc::new(connection),
        channel,
        consumer,
    })
}

async fn declare_topology(channel: &Channel, settings: &Settings) -> Result<(), RabbitMqError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let exchange = settings.dead_exchange.as_str();
    channel
        .exchange_declare(
            settings.dead_exchange.clone(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await
        .map_err(|e| match precondition_failed(&e) {
            Some(broker) => RabbitMqError::ExchangeConflict {
                exchange: exchange.into(),
                broker,
            },
            None => broker(&format!("declare the exchange {exchange:?}"))(e),
        })?;
    declare_queue(
        channel,
        settings,
        &settings.dead_queue,
        FieldTable::default(),
    )
    .await?;
    channel
        .queue_bind(
            settings.dead_queue.clone(),
            settings.dead_exchange.clone(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(broker(&format!(
            "bind the queue {:?} to the exchange {exchange:?}",
            settings.dead_queue.as_str()
        )))?;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(exchange.into()),
    );
    declare_queue(channel, settings, &settings.queue, arguments).await
}

async fn declare_queue(
    channel: &Channel,
    settings: &Settings,
    queue: &ShortString,
    arguments: FieldTable,
) -> Result<(), RabbitMqError> {
    channel
        .queue_declare(queue.clone(), QueueDeclareOptions::durable(), arguments)
        .await
        .map(drop)
        .map_err(|e| match precondition_failed(&e) {
            Some(broker) => RabbitMqError::QueueConflict {
                queue: queue.to_string(),
                dead_exchange: settings.dead_exchange.to_string(),
                broker,
            },
            None => broker(&format!("declare the queue {:?}", queue.as_str()))(e),
        })
}

/// The broker's words when it refused a declaration as inequivalent to what exists.
fn precondition_failed(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        ErrorKind::ProtocolError(e)
            if *e.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
        {
            Some(e.get_message().to_string())
        }
        _ => None,
    }
}

fn broker(action: &str) -> impl FnOnce(lapin::Error) -> RabbitMqError {
    let action = action.to_owned();
    move |source| RabbitMqError::Broker { action, source }
}

async fn within<F: Future<Output = Result<R, RabbitMqError>>, R>(
    url: &str,
    attempt: F,
) -> Result<R, RabbitMqError> {
    timeout(CONNECT_TIMEOUT, attempt).await.unwrap_or_else(|_| {
        Err(RabbitMqError::Unreachable {
            url: redact_url(url),
            after: CONNECT_TIMEOUT,
        })
    })
}

async fn close(connection: &Connection) {
    // Already closed (by the broker, or lost) is as good.
    let _ = timeout(BROKER_TIMEOUT, connection.close(200, "OK".into())).await;
}

/// Why consuming on a connection ended.
enum Ended {
    /// The acknowledger is gone: nothing can be settled any more.
    Settled,
    /// Drained: the consumer is cancelled, but messages in flight may still be settled.
    Stopped,
    Lost(String),
}

/// The consuming task: forwards deliveries to the source, reconnects, and keeps the
/// connection open until nothing can be settled on it any more.
struct Driver {
    settings: Arc<Settings>,
    metrics: SourceMetrics,
    generation: Arc<AtomicU64>,
    /// The current connection, for the settling task's dead letters.
    connection: watch::Sender<Option<Arc<Connection>>>,
    /// Dropped once the consumer is cancelled: the source's drain waits for that.
    deliveries: Option<mpsc::UnboundedSender<Incoming>>,
    stop: oneshot::Receiver<()>,
    /// The settling task, which ends once the acknowledger is gone and all is settled.
    settled: JoinHandle<()>,
    /// Told once it has ended (dropped, should nothing more be settled: the source gave up).
    all_settled: Option<oneshot::Sender<()>>,
}

impl Driver {
    async fn run(mut self, mut link: Link) {
        loop {
            match self.consume(&mut link).await {
                Ended::Settled => break,
                Ended::Stopped => {
                    self.deliveries = None;
                    let _ = (&mut self.settled).await;
                    break;
                }
                Ended::Lost(why) => {
                    self.metrics.event("disconnected");
                    tracing::warn!(
                        queue = %self.settings.queue,
                        "lost the RabbitMQ consumer ({why}); reconnecting"
                    );
                    self.connection.send_replace(None);
                    close(&link.connection).await;
                    match self.reconnect(link.generation + 1).await {
                        Some(next) => link = next,
                        None => return,
                    }
                }
            }
        }
        if let Some(all_settled) = self.all_settled.take() {
            let _ = all_settled.send(());
        }
        close(&link.connection).await;
    }

    async fn consume(&mut self, link: &mut Link) -> Ended {
        let mut lag = tokio::time::interval(LAG_EVERY);
        lag.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                _ = &mut self.settled => return Ended::Settled,
                // Sent by the drain, or dropped with the source: either way, stop consuming.
                _ = &mut self.stop => return self.cancel(link).await,
                _ = lag.tick() => self.measure_lag(link).await,
                next = link.consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let incoming = Incoming { generation: link.generation, delivery };
                        let forwarded = self
                            .deliveries
                            .as_ref()
                            .is_some_and(|tx| tx.send(incoming).is_ok());
                        if !forwarded {
                            // The source is gone without a drain.
                            return self.cancel(link).await;
                        }
                    }
                    Some(Err(e)) => return Ended::Lost(e.to_string()),
                    None => return Ended::Lost("the broker cancelled the consumer".into()),
                },
            }
        }
    }

    /// Reads how many messages wait in the queue (ready, not yet delivered) into the lag gauge.
    /// A failure is left to the consumer's stream to report.
    async fn measure_lag(&self, link: &Link) {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared =
            link.channel
                .queue_declare(self.settings.queue.clone(), passive, FieldTable::default());
        if let Ok(Ok(queue)) = timeout(BROKER_TIMEOUT, declared).await {
            self.metrics.set_lag(u64::from(queue.message_count()));
        }
    }

    /// Cancels the consumer and forwards what the broker delivered before the cancel took
    /// effect: the consumer's stream ends after those.
    async fn cancel(&mut self, link: &mut Link) -> Ended {
        let tag = link.consumer.tag();
        let cancelled = timeout(
            BROKER_TIMEOUT,
            link.channel
                .basic_cancel(tag, BasicCancelOptions::default()),
        )
        .await;
        let failed = match cancelled {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {BROKER_TIMEOUT:?}")),
        };
        if let Some(why) = failed {
            // Whatever it still delivers stays unacknowledged, and goes back to the queue
            // when the connection closes.
            tracing::warn!("cannot cancel the RabbitMQ consumer ({why}); stopped without it");
            return Ended::Stopped;
        }
        while let Ok(Some(Ok(delivery))) = timeout(BROKER_TIMEOUT, link.consumer.next()).await {
            if let Some(tx) = &self.deliveries {
                let _ = tx.send(Incoming {
                    generation: link.generation,
                    delivery,
                });
            }
        }
        Ended::Stopped
    }

    /// Connects again, at once and then with growing delays, until it works; None if the
    /// source stopped or the acknowledger went away first.
    async fn reconnect(&mut self, generation: u64) -> Option<Link> {
        let mut delays = self.settings.reconnect.delays();
        let mut delay = Duration::ZERO;
        loop {
            let settings = &self.settings;
            let attempt = async {
                tokio::time::sleep(delay).await;
                within(&settings.url, open(settings, generation)).await
            };
            let opened = tokio::select! {
                biased;
                _ = &mut self.settled => return None,
                _ = &mut self.stop => return None,
                opened = attempt => opened,
            };
            match opened {
                Ok(link) => {
                    self.generation.store(generation, Ordering::Release);
                    self.connection.send_replace(Some(link.connection.clone()));
                    self.metrics.event("reconnected");
                    tracing::info!(queue = %settings.queue, generation, "reconnected to RabbitMQ");
                    return Some(link);
                }
                Err(e) => {
                    // Jittered: sources that lost the broker together do not all come back at
                    // the same instant.
                    let Some(next) = delays.next() else {
                        tracing::error!(
                            "cannot reconnect to RabbitMQ ({e}); gave up: the source ends"
                        );
                        return None;
                    };
                    delay = next;
                    tracing::warn!("cannot reconnect to RabbitMQ ({e}); next attempt in {delay:?}");
                }
            }
        }
    }
}

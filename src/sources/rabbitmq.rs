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
//! A message carries in its metadata [`ROUTING_KEY`], [`MESSAGE_ID`] (when the publisher gave
//! one), and [`DELIVERY_TAG`] with [`GENERATION`]: how the acknowledger finds the delivery.
//! Delivery tags count from 1 again on every channel; the generation (the connection's number,
//! 1 for the first) keeps a tag of a lost channel from ever being acknowledged on its successor,
//! where it would name another message (or none: the broker then closes the channel). Handlers
//! must leave those two keys alone, or the message cannot be settled (it counts as
//! `settle_failed` and is delivered again).
//!
//! # Settlement
//!
//! The acknowledger hands the broker I/O to a task of its own (it runs on the pipeline's stage
//! tasks and must not block):
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
//! When the connection or the consumer goes away, the source reconnects with exponential
//! backoff ([`RabbitMqConfig::reconnect`]), declares the topology again, sets the prefetch
//! again on the new channel (it belongs to the channel, which is gone) and consumes again;
//! `disconnected` and `reconnected` are counted. Meanwhile `produce` simply waits. Deliveries of
//! the lost channel are dropped without being handed out, and those already handed out fail to
//! settle: the broker delivers them all again, marked redelivered.
//!
//! [`Producer::drain`] cancels the consumer and hands over everything the broker delivered
//! before the cancel took effect. The connection stays open until the acknowledger (shared by
//! the source and its messages) is dropped, so that messages still in the pipeline can be
//! settled after the drain.
//!
//! Outcomes counted in [`SourceMetrics`]: `received` and `redelivered` for each delivery
//! `produce` (or the drain) takes, then one of `acked`, `dead_lettered`, `undecodable`,
//! `retried` (a dead letter that was not confirmed: requeued instead) or `settle_failed` (a
//! delivery of a lost channel, dropped without being handed out, included).

use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
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
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::redact::redact_url;
use super::{ATTEMPTS_HEADER, Decoder, Delivery, REASON_HEADER, SourceMetrics};
use crate::pipeline::{Acknowledger, Demand, Failure, Message, Produced, Producer};

/// Metadata key: the routing key the message was published with.
pub const ROUTING_KEY: &str = "amqp.routing_key";
/// Metadata key: the publisher's `message_id`, when it gave one.
pub const MESSAGE_ID: &str = "amqp.message_id";
/// Metadata key: the delivery tag, on the channel of [`GENERATION`].
pub const DELIVERY_TAG: &str = "amqp.delivery_tag";
/// Metadata key: which connection (1 for the first, then one more per reconnect) delivered it.
pub const GENERATION: &str = "amqp.generation";

/// The header quorum queues count deliveries in (classic queues only say `redelivered`).
const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// How long a connection attempt (TCP, handshake, declarations, consume) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to confirm a cancel on drain, or a dead letter, or a close.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the queue's depth is read for the lag gauge.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Where and how to consume.
#[derive(Clone)]
pub struct RabbitMqConfig {
    /// Default: `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Default: `thunderline.commands`.
    pub queue: String,
    /// Default: `thunderline.dead`.
    pub dead_exchange: String,
    /// Default: `thunderline.commands.dead`.
    pub dead_queue: String,
    /// Unacknowledged deliveries the broker may have out at once; the daemon passes what the
    /// processors can ask for. At least 1 (0 would mean no limit). Default: 100.
    pub prefetch: u16,
    /// Default: `thunderline`. Empty lets the broker choose one.
    pub consumer_tag: String,
    /// Default: [`SourceMetrics::unregistered`]`("rabbitmq")`.
    pub metrics: SourceMetrics,
    pub reconnect: Reconnect,
}

/// The bounds of the exponential backoff between reconnection attempts (the first attempt is
/// made at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reconnect {
    /// Default: 100 ms.
    pub initial_delay: Duration,
    /// Default: 10 s.
    pub max_delay: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Self {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            queue: "thunderline.commands".into(),
            dead_exchange: "thunderline.dead".into(),
            dead_queue: "thunderline.commands.dead".into(),
            prefetch: 100,
            consumer_tag: "thunderline".into(),
            metrics: SourceMetrics::unregistered("rabbitmq"),
            reconnect: Reconnect::default(),
        }
    }
}

impl RabbitMqConfig {
    /// The defaults, at another broker.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
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

/// Why the source could not start (later outages are retried, not returned).
#[derive(Debug, thiserror::Error)]
pub enum RabbitMqError {
    #[error("invalid RabbitMQ source configuration: {0}")]
    Config(String),
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
    settler: Arc<Settler<T>>,
    generation: Arc<AtomicU64>,
    /// Tells the consuming task to cancel the consumer; dropped (the same) with the source.
    stop: Option<oneshot::Sender<()>>,
    metrics: SourceMetrics,
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

        let metrics = config.metrics;
        let (connection_tx, connection_rx) = watch::channel(Some(link.connection.clone()));
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let settled = tokio::spawn(settle(
            jobs_rx,
            connection_rx,
            settings.clone(),
            metrics.clone(),
        ));
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let (stop, stop_rx) = oneshot::channel();
        let generation = Arc::new(AtomicU64::new(link.generation));
        let driver = Driver {
            settings,
            metrics: metrics.clone(),
            generation: generation.clone(),
            connection: connection_tx,
            deliveries: Some(deliveries_tx),
            stop: stop_rx,
            settled,
        };
        tokio::spawn(driver.run(link));
        Ok(Self {
            deliveries,
            buf: Vec::new(),
            decoder: Box::new(decoder),
            settler: Arc::new(Settler {
                pending: Mutex::new(HashMap::new()),
                then: OnceLock::new(),
                jobs: jobs_tx,
                metrics: metrics.clone(),
            }),
            generation,
            stop: Some(stop),
            metrics,
        })
    }

    pub fn metrics(&self) -> &SourceMetrics {
        &self.metrics
    }

    /// Has `acker` told how each message ended, after the broker's settlement is queued: how a
    /// user keeps bookkeeping of their own (the daemon's zones do). Set once; later calls are
    /// ignored.
    pub fn then_acknowledge(self, acker: Arc<dyn Acknowledger<T>>) -> Self {
        let _ = self.settler.then.set(acker);
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
        self.metrics.message("received", 1);
        if attempt > 1 {
            self.metrics.message("redelivered", 1);
        }
        if generation != self.generation.load(Ordering::Acquire) || !delivery.acker.usable() {
            self.metrics.message("settle_failed", 1);
            return None;
        }
        let AmqpDelivery {
            delivery_tag,
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
        let decoded =
            catch_unwind(AssertUnwindSafe(|| self.decoder.decode(&view))).unwrap_or_else(|panic| {
                Err(Failure::permanent(format!(
                    "the decoder panicked: {}",
                    panic_message(&*panic)
                )))
            });
        let (message_id, routing) = (message_id.map(str::to_owned), routing_key.to_string());
        let pending = Pending {
            acker,
            routing_key,
            properties,
            body: data,
        };
        match decoded {
            Ok(data) => {
                let mut msg = Message::with_acker(data, self.settler.clone());
                let metadata = msg.metadata_mut();
                metadata.insert(ROUTING_KEY, routing);
                if let Some(id) = message_id {
                    metadata.insert(MESSAGE_ID, id);
                }
                metadata.insert(DELIVERY_TAG, delivery_tag.to_string());
                metadata.insert(GENERATION, generation.to_string());
                self.settler
                    .lock()
                    .insert((generation, delivery_tag), pending);
                Some(msg)
            }
            Err(failure) => {
                tracing::warn!(
                    routing_key = %routing, message_id = ?message_id,
                    "undecodable message, dead-lettered: {failure}"
                );
                let dead = DeadLetter {
                    reason: failure.reason().to_owned(),
                    attempts: None,
                    outcome: "undecodable",
                };
                self.settler
                    .send(vec![Settlement::DeadLetter(pending, dead)]);
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

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// A delivery handed out, kept until its message is settled: the acker for its channel, and
/// what a dead letter needs.
struct Pending {
    acker: Acker,
    routing_key: ShortString,
    properties: BasicProperties,
    body: Vec<u8>,
}

enum Settlement {
    Ack(Pending),
    DeadLetter(Pending, DeadLetter),
}

/// Why a message is dead-lettered, and how that is counted once done.
struct DeadLetter {
    reason: String,
    /// The pipeline's attempts; none for a message the decoder refused.
    attempts: Option<u32>,
    outcome: &'static str,
}

/// The acknowledger: finds each message's delivery and queues its settlement for the settling
/// task. One per source, shared by all its messages.
struct Settler<T> {
    pending: Mutex<HashMap<(u64, u64), Pending>>,
    /// The user's acknowledger, told after the settlement is queued.
    then: OnceLock<Arc<dyn Acknowledger<T>>>,
    jobs: mpsc::UnboundedSender<Vec<Settlement>>,
    metrics: SourceMetrics,
}

impl<T> Settler<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(u64, u64), Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn send(&self, job: Vec<Settlement>) {
        let n = job.len() as u64;
        if let Err(lost) = self.jobs.send(job) {
            // Only if the settling task panicked: the broker delivers these again.
            tracing::error!("the RabbitMQ settling task is gone; {n} messages not settled");
            self.metrics.message("settle_failed", lost.0.len() as u64);
        }
    }
}

impl<T: Send + 'static> Acknowledger<T> for Settler<T> {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) {
        let mut job = Vec::with_capacity(successful.len() + failed.len());
        let mut unknown = 0;
        {
            let mut pending = self.lock();
            let mut take = |msg: &Message<T>| {
                let key = key(msg).and_then(|k| pending.remove(&k));
                unknown += u64::from(key.is_none());
                key
            };
            job.extend(successful.iter().filter_map(&mut take).map(Settlement::Ack));
            for msg in &failed {
                if let Some(pending) = take(msg) {
                    let dead = DeadLetter {
                        reason: msg.failure().map_or("failed", Failure::reason).to_owned(),
                        attempts: Some(msg.attempts()),
                        outcome: "dead_lettered",
                    };
                    job.push(Settlement::DeadLetter(pending, dead));
                }
            }
        }
        if unknown > 0 {
            tracing::error!(
                "{unknown} RabbitMQ messages without their {DELIVERY_TAG} and {GENERATION} \
                 metadata cannot be settled; the broker delivers them again"
            );
            self.metrics.message("settle_failed", unknown);
        }
        if !job.is_empty() {
            self.send(job);
        }
        if let Some(then) = self.then.get() {
            then.ack(successful, failed);
        }
    }
}

fn key<T>(msg: &Message<T>) -> Option<(u64, u64)> {
    let metadata = msg.metadata();
    let generation = metadata.get(GENERATION)?.parse().ok()?;
    let tag = metadata.get(DELIVERY_TAG)?.parse().ok()?;
    Some((generation, tag))
}

/// Settles what the acknowledger queued, until the acknowledger is gone.
async fn settle(
    mut jobs: mpsc::UnboundedReceiver<Vec<Settlement>>,
    connection: watch::Receiver<Option<Arc<Connection>>>,
    settings: Arc<Settings>,
    metrics: SourceMetrics,
) {
    let mut publisher = Publisher {
        connection,
        settings,
        channel: None,
    };
    while let Some(job) = jobs.recv().await {
        let mut acks = Vec::new();
        let mut dead = Vec::new();
        for settlement in job {
            match settlement {
                Settlement::Ack(pending) => acks.push(pending),
                Settlement::DeadLetter(pending, why) => dead.push((pending, why)),
            }
        }
        let acked = join_all(acks.iter().map(|p| ack(&p.acker))).await;
        let n = acked.iter().filter(|&&ok| ok).count() as u64;
        metrics.message("acked", n);
        metrics.message("settle_failed", acks.len() as u64 - n);
        if !dead.is_empty() {
            dead_letter(dead, &mut publisher, &metrics).await;
        }
    }
}

async fn ack(acker: &Acker) -> bool {
    // `Ok(false)`: the channel is gone, and the delivery with it.
    matches!(acker.ack(BasicAckOptions::default()).await, Ok(true))
}

/// Publishes a copy of each message to the dead-letter exchange, all before waiting for any
/// confirm, then acks each original whose copy was confirmed and requeues the others.
async fn dead_letter(
    dead: Vec<(Pending, DeadLetter)>,
    publisher: &mut Publisher,
    metrics: &SourceMetrics,
) {
    let mut published = Vec::with_capacity(dead.len());
    for (pending, why) in dead {
        if !pending.acker.usable() {
            // Its channel is gone: the broker delivers it again, and a copy now would be a
            // duplicate then.
            metrics.message("settle_failed", 1);
            continue;
        }
        let DeadLetter {
            reason,
            attempts,
            outcome,
        } = why;
        let properties = dead_letter_properties(&pending.properties, &reason, attempts);
        let confirm = publisher
            .publish(&pending.routing_key, &pending.body, properties)
            .await;
        published.push((pending, confirm, outcome));
    }
    for (pending, confirm, outcome) in published {
        let confirmed = match confirm {
            Some(confirm) => match timeout(BROKER_TIMEOUT, confirm).await {
                // `Ack(Some(_))` is a copy the exchange could not route anywhere: no dead letter.
                Ok(Ok(Confirmation::Ack(None))) => true,
                Ok(Ok(other)) => {
                    tracing::warn!("a dead letter was not confirmed ({other:?}); requeued");
                    false
                }
                Ok(Err(e)) => {
                    tracing::warn!("a dead letter was not confirmed ({e}); requeued");
                    false
                }
                Err(_) => {
                    tracing::warn!("a dead letter was not confirmed in {BROKER_TIMEOUT:?}");
                    false
                }
            },
            None => false,
        };
        let outcome = if !confirmed {
            // Whatever went wrong (the exchange or the dead-letter queue deleted, say), the
            // next dead letter starts again from a fresh channel and a declared topology.
            publisher.channel = None;
            let requeue = BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            match pending.acker.nack(requeue).await {
                Ok(true) => "retried",
                _ => "settle_failed",
            }
        } else if ack(&pending.acker).await {
            outcome
        } else {
            // The dead letter is in place and the original comes back: see the module docs.
            "settle_failed"
        };
        metrics.message(outcome, 1);
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
    reconnect: Reconnect,
}

impl Settings {
    fn new(config: &RabbitMqConfig) -> Result<Self, RabbitMqError> {
        let name = |what: &str, value: &str, may_be_empty: bool| {
            if value.is_empty() && !may_be_empty {
                return Err(RabbitMqError::Config(format!("{what} must not be empty")));
            }
            ShortString::try_new(value)
                .map_err(|e| RabbitMqError::Config(format!("{what} {value:?}: {e}")))
        };
        if config.prefetch == 0 {
            return Err(RabbitMqError::Config(
                "prefetch must be at least 1 (0 would let the broker deliver without limit)".into(),
            ));
        }
        let Reconnect {
            initial_delay,
            max_delay,
        } = config.reconnect;
        if initial_delay.is_zero() || initial_delay > max_delay {
            return Err(RabbitMqError::Config(format!(
                "reconnect delays: initial_delay ({initial_delay:?}) must be above zero and \
                 not above max_delay ({max_delay:?})"
            )));
        }
        Ok(Self {
            url: config.url.clone(),
            queue: name("queue", &config.queue, false)?,
            dead_exchange: name("dead_exchange", &config.dead_exchange, false)?,
            dead_queue: name("dead_queue", &config.dead_queue, false)?,
            consumer_tag: name("consumer_tag", &config.consumer_tag, true)?,
            prefetch: config.prefetch,
            reconnect: config.reconnect,
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
        let Reconnect {
            initial_delay,
            max_delay,
        } = self.settings.reconnect;
        let mut delays = ExponentialBuilder::new()
            .with_min_delay(initial_delay)
            .with_max_delay(max_delay)
            .without_max_times()
            .build();
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
                    let cap = delays.next().unwrap_or(max_delay);
                    // Equal jitter: sources that lost the broker together do not all come back
                    // at the same instant.
                    delay = cap / 2 + cap.mul_f64(fastrand::f64() / 2.0);
                    tracing::warn!("cannot reconnect to RabbitMQ ({e}); next attempt in {delay:?}");
                }
            }
        }
    }
}

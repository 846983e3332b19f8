//! Broker sources: producers that take messages from NATS JetStream or RabbitMQ and settle each
//! one with its broker once the pipeline has finished with it.
//!
//! A source is a [`Producer`](crate::pipeline::Producer) like any other. What it adds is the
//! settlement: every message it hands out carries the source's acknowledger, which the engine
//! calls once the message's last stage is done (after every sink it went to has it), and which
//! then tells the broker:
//!
//! | how the message ended | JetStream | RabbitMQ |
//! |---|---|---|
//! | succeeded | `+ACK` | `basic.ack` |
//! | failed (permanently, or retryably with its attempts used up) | dead-letter stream, then `+TERM` | dead-letter exchange, then `basic.ack` |
//! | failed with [`Redeliver`] (it could not be decided there and then), or abandoned by a pipeline that stopped before finishing it | `-NAK` after the source's backoff | `basic.nack` with requeue |
//! | failed, and its dead letter could not be stored | `-NAK` after the source's backoff | `basic.nack` with requeue |
//!
//! Retries happen in one place: in process, under the pipeline stage's
//! [`RetryPolicy`](crate::pipeline::RetryPolicy) (the daemon's `[processors.retry]`). A message
//! that reaches the acknowledger failed has used its attempts, and is dead-lettered once, with
//! its reason ([`REASON_HEADER`]) and its [`attempts`](crate::pipeline::Message::attempts)
//! ([`ATTEMPTS_HEADER`]). The give-backs of the last two rows are the only redeliveries a source
//! asks for, so that nothing is lost: a message that is not at fault, and that this node could
//! not decide (in a cluster, its zone's lease moved on before its events were logged, or the
//! zone's owner did not answer), goes back to the broker rather than to the dead letters. The
//! settlement is one piece of code for both brokers: each brings only its I/O.
//!
//! A message the [`Decoder`] refuses never enters the pipeline: it is dead-lettered at once,
//! with its reason and without an attempts header. Sources know messages, not what is in them:
//! the decoder, given by the user, turns broker bytes into the pipeline's payload (the daemon's
//! makes zone commands).
//!
//! Both sources reconnect (and JetStream re-opens its pull) under a [`RetryPolicy`] of their
//! own (`reconnect`, default: unlimited, 100 ms doubling to 10 s, full jitter), which also
//! paces JetStream's give-backs.
//!
//! What a source does not do: deduplicate. A broker delivers at least once (after a crash,
//! a lost connection, or an ack that never arrived, it delivers again), so the pipeline's
//! handlers must be idempotent on the message id ([`Delivery::message_id`]).
//!
//! [`RetryPolicy`]: crate::pipeline::RetryPolicy

pub mod jetstream;
pub mod rabbitmq;
mod settlement;

pub use settlement::{Redeliver, redelivers};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::pipeline::Failure;

/// One message as its broker delivered it, before decoding.
#[derive(Clone, Copy, Debug)]
pub struct Delivery<'a> {
    pub payload: &'a [u8],
    /// The content type the publisher gave (`application/json`, `application/msgpack`), if any.
    pub content_type: Option<&'a str>,
    /// The publisher's id for the message (`Nats-Msg-Id`, AMQP `message_id`), if any.
    pub message_id: Option<&'a str>,
    /// Where it was published: a NATS subject, an AMQP routing key.
    pub subject: &'a str,
    /// Which delivery of the message this is: 1 for the first.
    pub attempt: u32,
}

/// Turns a broker message into the pipeline's payload, or says why it cannot: such a message is
/// dead-lettered with the failure's reason, whether the failure says retryable or not (the same
/// bytes will not decode better later).
pub trait Decoder<T>: Send + Sync + 'static {
    fn decode(&self, delivery: &Delivery<'_>) -> Result<T, Failure>;
}

impl<T, F> Decoder<T> for F
where
    F: Fn(&Delivery<'_>) -> Result<T, Failure> + Send + Sync + 'static,
{
    fn decode(&self, delivery: &Delivery<'_>) -> Result<T, Failure> {
        self(delivery)
    }
}

/// What happened to a source's messages, counted per source (`jetstream`, `rabbitmq`).
///
/// `thunderline_source_messages_total{source, outcome}` counts each settlement once, with
/// outcome `received`, `redelivered` (received again: the broker's delivery count was above
/// 1), `acked`, `given_back` (failed with [`Redeliver`], and given back to the broker),
/// `retried` (given back to the broker because its dead letter could not be stored),
/// `dead_lettered`, `undecodable` (refused by the decoder, and dead-lettered instead
/// of entering the pipeline) and `settle_failed` (the broker did not take an ack, nak or dead
/// letter: it will deliver the message again);
/// `thunderline_source_events_total{source, event}` counts connection events (`reconnected`,
/// `disconnected`, `slow_consumer`, `missed_heartbeat`, `progress_ack`);
/// `thunderline_source_lag{source}` is how many messages the broker still holds for the
/// consumer, as of the last delivery that said (JetStream's deliveries do).
#[derive(Clone)]
pub struct SourceMetrics {
    source: &'static str,
    messages: IntCounterVec,
    events: IntCounterVec,
    lag: IntGaugeVec,
}

impl SourceMetrics {
    /// The counter families, registered in `registry` (once: sources of several kinds share
    /// them through [`SourceMetrics::for_source`]), labelled `source`.
    pub fn new(source: &'static str, registry: &Registry) -> Result<Self, prometheus::Error> {
        let messages = IntCounterVec::new(
            Opts::new(
                "thunderline_source_messages_total",
                "Broker messages by source and by what became of them.",
            ),
            &["source", "outcome"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "thunderline_source_events_total",
                "Broker connection events by source.",
            ),
            &["source", "event"],
        )?;
        let lag = IntGaugeVec::new(
            Opts::new(
                "thunderline_source_lag",
                "Messages the broker still holds for the consumer, as of its last delivery.",
            ),
            &["source"],
        )?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        Ok(Self {
            source,
            messages,
            events,
            lag,
        })
    }

    /// The same counters, labelled for another source, whose main series show at zero from now
    /// on.
    pub fn for_source(&self, source: &'static str) -> Self {
        Self {
            source,
            ..self.clone()
        }
        .shown()
    }

    /// Makes the source's main series exist at zero, so that a source that has received
    /// nothing yet still shows in `/metrics` and the console.
    fn shown(self) -> Self {
        for outcome in [
            "received",
            "acked",
            "redelivered",
            "given_back",
            "retried",
            "dead_lettered",
        ] {
            self.messages.with_label_values(&[self.source, outcome]);
        }
        self.lag.with_label_values(&[self.source]);
        self
    }

    /// Counters that go nowhere, for a source nobody scrapes.
    pub fn unregistered(source: &'static str) -> Self {
        Self::new(source, &Registry::new()).expect("a fresh registry takes the counters")
    }

    pub fn message(&self, outcome: &str, n: u64) {
        if n > 0 {
            self.messages
                .with_label_values(&[self.source, outcome])
                .inc_by(n);
        }
    }

    pub fn set_lag(&self, pending: u64) {
        self.lag
            .with_label_values(&[self.source])
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// The lag last set.
    pub fn lag(&self) -> u64 {
        u64::try_from(self.lag.with_label_values(&[self.source]).get()).unwrap_or(0)
    }

    pub fn event(&self, event: &str) {
        self.events.with_label_values(&[self.source, event]).inc();
    }

    /// What has been counted for `outcome` (tests and the bench read it).
    pub fn messages(&self, outcome: &str) -> u64 {
        self.messages
            .with_label_values(&[self.source, outcome])
            .get()
    }

    pub fn events(&self, event: &str) -> u64 {
        self.events.with_label_values(&[self.source, event]).get()
    }
}

/// The header a dead letter carries its reason in.
pub const REASON_HEADER: &str = "Thunderline-Reason";
/// The header a dead letter carries the number of attempts made in.
pub const ATTEMPTS_HEADER: &str = "Thunderline-Attempts";

/// Why a source's settings cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidConfig(pub String);

/// A NATS subject or a name of a stream, consumer, queue or exchange: printable, no spaces
/// (and, where `dots` is false, no dots or wildcards).
fn check_name(what: &str, name: &str, dots: bool) -> Result<(), InvalidConfig> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.chars().any(|c| {
            c.is_whitespace() || c.is_control() || (!dots && matches!(c, '.' | '*' | '>'))
        });
    if bad {
        let rule = if dots {
            "a non-empty name without spaces"
        } else {
            "a non-empty name without spaces, dots, * or >"
        };
        return Err(InvalidConfig(format!("{what} {name:?} is not {rule}")));
    }
    Ok(())
}

/// A source's reconnect policy unless told otherwise: without end, from 100 ms doubling to
/// 10 s, with full jitter.
fn default_reconnect() -> crate::pipeline::RetryPolicy {
    crate::pipeline::RetryPolicy::unlimited(
        std::time::Duration::from_millis(100),
        2.0,
        std::time::Duration::from_secs(10),
    )
}

/// The metrics a configuration carries: where a source counts, not a setting, so two
/// configurations compare equal whatever theirs are.
#[derive(Clone)]
struct Counted(SourceMetrics);

impl PartialEq for Counted {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// A `retry` table in a source's settings, which sources no longer have: refused with where
/// retries went, at the line of the table.
struct NoRetry;

impl<'de> serde::Deserialize<'de> for NoRetry {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(serde::de::Error::custom(
            "a source has no retry settings any more: a failed message is retried in process, \
             under the pipeline's [processors.retry] (its max_attempts is every attempt a \
             message gets), then dead-lettered once; remove this table and set the attempts in \
             [processors.retry]",
        ))
    }
}

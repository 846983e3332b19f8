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
//! | succeeded | `Ack` | `basic.ack` |
//! | failed, retryable, attempts left | `Nak` with the policy's delay | (retried in process by the stage) |
//! | failed permanently, or attempts used up | dead-letter stream, then `Term` | dead-letter exchange (reason in a header), then `basic.ack` |
//!
//! A message the [`Decoder`] refuses never enters the pipeline: it is dead-lettered at once.
//! Sources know messages, not what is in them: the decoder, given by the user, turns broker
//! bytes into the pipeline's payload (the daemon's makes zone commands).
//!
//! What a source does not do: deduplicate. A broker delivers at least once (after a crash,
//! a lost connection, or an ack that never arrived, it delivers again), so the pipeline's
//! handlers must be idempotent on the message id ([`Delivery::message_id`]).

pub mod jetstream;
pub mod rabbitmq;

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
/// 1), `acked`, `retried` (given back to the broker for a later attempt), `dead_lettered`,
/// `undecodable` (refused by the decoder, dead-lettered too) and `settle_failed` (the broker
/// did not take an ack, nak or dead letter: it will deliver the message again);
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

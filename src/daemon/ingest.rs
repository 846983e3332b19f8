//! Zone commands from brokers: the decoder that turns a broker message into a zone command, and
//! the broker sources a pipeline file asks for, ready to join the zone pipeline beside the
//! sockets.
//!
//! A broker command is JSON (or MessagePack, with content type `application/msgpack`):
//! `{"id": "<uuid>", "zone_id": "<uuid>", "agent_id": "…", "type": "agent_move", "payload": {…}}`,
//! in the socket's vocabulary. Its sender is a trusted service ([`Actor::Service`]): no token and
//! no session, but the zone's own permission bits apply. The id is the idempotency key (it also
//! travels as `Nats-Msg-Id` or the AMQP `message_id`, which may stand in for a missing `id`):
//! the zone applies it once, across redeliveries and restarts. Its type and payload go through
//! the decoder socket pushes go through ([`CommandKind::from_json`]): the same validation and
//! the same refusals. What cannot become a command is refused here, permanently: the source
//! dead-letters it with the reason, which starts with `not_json`, `not_msgpack`,
//! `invalid_payload` or `unknown_event`.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::config::PipelineFile;
use super::error::DaemonError;
use crate::pipeline::{Acknowledger, Failure};
use crate::runtime::{ZoneAcker, ZoneWork};
use crate::sources::jetstream::{self, JetStreamSource};
use crate::sources::rabbitmq::{self, RabbitMqSource};
use crate::sources::{Delivery, SourceMetrics};
use crate::zone::{Actor, CommandKind, ZoneCommand, ZoneError};

/// A broker command as it travels. JSON keeps its payload as the raw text, parsed once into
/// the command; MessagePack has no raw form and goes through a `Value`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<P> {
    #[serde(default)]
    id: Option<String>,
    zone_id: String,
    #[serde(default)]
    agent_id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default = "Option::default")]
    payload: Option<P>,
}

/// A command's type and payload as the command's kind, by the decoder sockets use too.
trait KindPayload {
    fn into_kind(self, kind: &str) -> Result<CommandKind, ZoneError>;
}

impl KindPayload for &RawValue {
    fn into_kind(self, kind: &str) -> Result<CommandKind, ZoneError> {
        CommandKind::from_json(kind, self.get())
    }
}

impl KindPayload for Value {
    fn into_kind(self, kind: &str) -> Result<CommandKind, ZoneError> {
        CommandKind::from_value(kind, self)
    }
}

fn invalid(reason: impl std::fmt::Display) -> Failure {
    Failure::permanent(format!("invalid_payload: {reason}"))
}

/// Whether a content type names MessagePack.
fn is_msgpack(content_type: Option<&str>) -> bool {
    content_type.is_some_and(|t| {
        let t = t.split(';').next().unwrap_or("").trim();
        t.eq_ignore_ascii_case("application/msgpack")
            || t.eq_ignore_ascii_case("application/x-msgpack")
            || t.eq_ignore_ascii_case("application/vnd.msgpack")
    })
}

/// The nesting serde_json allows (its recursion limit, counted the same way).
const JSON_MAX_DEPTH: usize = 128;

/// A broker message as a zone command, or why it cannot be one.
pub fn decode_command(delivery: &Delivery<'_>) -> Result<ZoneCommand, Failure> {
    if is_msgpack(delivery.content_type) {
        // Held to JSON's nesting limit: the command's events are logged as JSON, and an event
        // nested deeper than serde_json reads back would stop its zone from loading. The limit
        // counts from the payload, as the JSON path's does (its payload is parsed on its own):
        // one more level for the envelope around it.
        let mut decoder = rmp_serde::Deserializer::from_read_ref(delivery.payload);
        decoder.set_max_depth(JSON_MAX_DEPTH + 1);
        let wire = Wire::<Value>::deserialize(&mut decoder).map_err(|e| match e {
            rmp_serde::decode::Error::Syntax(_)
            | rmp_serde::decode::Error::Uncategorized(_)
            | rmp_serde::decode::Error::DepthLimitExceeded => invalid(e),
            e => Failure::permanent(format!("not_msgpack: {e}")),
        })?;
        command(wire, delivery)
    } else {
        // Straight into the command's shape: what is not JSON at all and what is JSON of
        // another shape are told apart by the parser's own classification.
        let wire: Wire<&RawValue> =
            serde_json::from_slice(delivery.payload).map_err(|e| match e.classify() {
                serde_json::error::Category::Data => invalid(e),
                _ => Failure::permanent(format!("not_json: {e}")),
            })?;
        command(wire, delivery)
    }
}

fn command<P: KindPayload>(wire: Wire<P>, delivery: &Delivery<'_>) -> Result<ZoneCommand, Failure> {
    let id = match (wire.id.as_deref(), delivery.message_id) {
        (Some(id), Some(message_id)) if id != message_id => {
            return Err(invalid(format!(
                "the command's id {id:?} is not its message id {message_id:?}"
            )));
        }
        (Some(id), _) | (None, Some(id)) => id,
        (None, None) => return Err(invalid("id is required (a UUID: the idempotency key)")),
    };
    let id = Uuid::parse_str(id).map_err(|_| invalid(format!("id {id:?} is not a UUID")))?;
    let zone_id = Uuid::parse_str(&wire.zone_id)
        .map_err(|_| invalid(format!("zone_id {:?} is not a UUID", wire.zone_id)))?;
    // Refused as a socket push with the same type and payload would be, with the same reason.
    let kind = match wire.payload {
        Some(payload) => payload.into_kind(&wire.kind),
        None => Value::Object(Default::default()).into_kind(&wire.kind),
    }
    .map_err(|refusal| Failure::permanent(format!("{}: {refusal}", refusal.reason())))?;
    Ok(ZoneCommand {
        id,
        zone_id,
        actor: Actor::Service {
            agent_id: wire.agent_id,
        },
        kind,
    })
}

/// The decoder the daemon's sources use.
fn zone_work(delivery: &Delivery<'_>) -> Result<ZoneWork, Failure> {
    decode_command(delivery).map(|command| ZoneWork::command(command, None))
}

/// The broker sources a pipeline file asks for, connected and declared.
pub struct Sources {
    pub jetstream: Option<JetStreamSource<ZoneWork>>,
    pub rabbitmq: Option<RabbitMqSource<ZoneWork>>,
    pub metrics: SourceMetrics,
}

/// Waits for the sources' last settlements at shutdown.
pub struct SourcesSettled {
    jetstream: Option<jetstream::Settled>,
    rabbitmq: Option<rabbitmq::Settled>,
}

impl SourcesSettled {
    /// Waits for both at once, each at most `timeout`.
    pub async fn wait(self, timeout: Duration) {
        let jetstream = async {
            if let Some(settled) = self.jetstream {
                settled.wait(timeout).await;
            }
        };
        let rabbitmq = async {
            if let Some(settled) = self.rabbitmq {
                settled.wait(timeout).await;
            }
        };
        tokio::join!(jetstream, rabbitmq);
    }
}

impl Sources {
    /// How many producers the zone pipeline will have: the sockets' and these.
    pub fn producers(file: &PipelineFile) -> usize {
        1 + usize::from(file.sources.nats.is_some()) + usize::from(file.sources.rabbitmq.is_some())
    }

    /// Connects the sources `file` names; each hands its messages, once settled with the
    /// broker, on to `acker` (the zones' bookkeeping).
    pub async fn connect(
        file: &PipelineFile,
        acker: Arc<ZoneAcker>,
        registry: &prometheus::Registry,
        processors: usize,
    ) -> Result<Self, DaemonError> {
        let metrics = SourceMetrics::new("jetstream", registry)?;
        // A producer may hold its share of the in-flight bound: what a broker may have
        // delivered and not yet seen settled.
        let share = (file.in_flight_bound.get() / Self::producers(file)).max(1);
        let then: Arc<dyn Acknowledger<ZoneWork>> = acker;
        let jetstream = match &file.sources.nats {
            None => None,
            Some(nats) => {
                let config = nats
                    .clone()
                    .max_ack_pending(share)
                    .pull_batch(nats.get_pull_batch().min(share))
                    .metrics(metrics.for_source("jetstream"));
                let source = JetStreamSource::connect(config, zone_work).await?;
                Some(source.then_acknowledge(then.clone()))
            }
        };
        let rabbitmq = match &file.sources.rabbitmq {
            None => None,
            Some(rabbit) => {
                let asked = processors.saturating_mul(file.processors.config.get_max_demand());
                let prefetch = rabbit
                    .get_prefetch()
                    .unwrap_or_else(|| u16::try_from(asked.min(share)).unwrap_or(u16::MAX).max(1));
                let config = rabbit
                    .clone()
                    .prefetch(prefetch)
                    .metrics(metrics.for_source("rabbitmq"));
                let source = RabbitMqSource::connect(config, zone_work).await?;
                Some(source.then_acknowledge(then))
            }
        };
        Ok(Self {
            jetstream,
            rabbitmq,
            metrics,
        })
    }

    /// What to wait on at shutdown, after the pipeline has drained.
    pub fn settled(&mut self) -> SourcesSettled {
        SourcesSettled {
            jetstream: self.jetstream.as_mut().map(JetStreamSource::settled),
            rabbitmq: self.rabbitmq.as_mut().map(RabbitMqSource::settled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery<'a>(payload: &'a [u8], content_type: Option<&'a str>) -> Delivery<'a> {
        Delivery {
            payload,
            content_type,
            message_id: None,
            subject: "thunderline.commands.z",
            attempt: 1,
        }
    }

    const ZONE: &str = "0190f5a0-0000-7000-8000-000000000001";
    const ID: &str = "0190f5a0-0000-7000-8000-0000000000aa";

    fn reason(payload: &[u8]) -> String {
        decode_command(&delivery(payload, None))
            .unwrap_err()
            .reason()
            .to_owned()
    }

    #[test]
    fn json_and_msgpack_decode_to_the_same_command() {
        let json = serde_json::json!({
            "id": ID, "zone_id": ZONE, "agent_id": "npc-1", "type": "agent_move",
            "payload": {"position": {"x": 1.0, "y": 2.0, "z": 0.0}}
        });
        let a = decode_command(&delivery(json.to_string().as_bytes(), None)).unwrap();
        let packed = rmp_serde::to_vec_named(&json).unwrap();
        let b = decode_command(&delivery(&packed, Some("application/msgpack"))).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.id.to_string(), ID);
        assert_eq!(
            a.actor,
            Actor::Service {
                agent_id: Some("npc-1".into())
            }
        );
        assert_eq!(a.kind.name(), "agent_move");
    }

    #[test]
    fn what_is_not_a_command_is_refused_permanently_with_a_reason() {
        assert!(reason(b"{nope").starts_with("not_json: "));
        assert!(reason(b"\xff\xfe").starts_with("not_json: "));
        let r = reason(format!(r#"{{"id":"{ID}","zone_id":"{ZONE}","type":"join"}}"#).as_bytes());
        assert!(
            r.starts_with("unknown_event: \"join\" is not a command"),
            "{r}"
        );
        let r = reason(
            format!(r#"{{"id":"{ID}","zone_id":"{ZONE}","type":"agent_move","payload":{{}}}}"#)
                .as_bytes(),
        );
        assert_eq!(
            r,
            "invalid_payload: the agent_move payload is refused: missing field `position`"
        );
        let r = reason(format!(r#"{{"zone_id":"{ZONE}","type":"tick"}}"#).as_bytes());
        assert!(r.contains("id is required"), "{r}");
        let r = reason(format!(r#"{{"id":"x","zone_id":"{ZONE}","type":"tick"}}"#).as_bytes());
        assert!(r.contains("is not a UUID"), "{r}");
        let r = reason(
            format!(r#"{{"id":"{ID}","zone_id":"{ZONE}","type":"tick","extra":1}}"#).as_bytes(),
        );
        assert!(r.contains("unknown field `extra`"), "{r}");
        let e = decode_command(&delivery(b"\xc1", Some("application/msgpack"))).unwrap_err();
        assert!(e.reason().starts_with("not_msgpack: "));
        assert!(!e.is_retryable());
    }

    #[test]
    fn the_message_id_stands_in_for_a_missing_id_and_must_match_a_given_one() {
        let body = format!(r#"{{"zone_id":"{ZONE}","type":"tick"}}"#);
        let mut d = delivery(body.as_bytes(), None);
        d.message_id = Some(ID);
        assert_eq!(decode_command(&d).unwrap().id.to_string(), ID);
        let body = format!(r#"{{"id":"{ID}","zone_id":"{ZONE}","type":"tick"}}"#);
        let mut d = delivery(body.as_bytes(), None);
        d.message_id = Some("another");
        assert!(
            decode_command(&d)
                .unwrap_err()
                .reason()
                .contains("not its message id")
        );
    }
}

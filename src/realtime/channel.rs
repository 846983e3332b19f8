//! The zone channel: what a client's frames on `zone:<id>` ask for, as work for the pipeline,
//! and the topic sink that broadcasts the resulting events.
//!
//! Client events become [`ZoneWork`]; the daemon's zone processor applies them to the zone (in
//! order per zone), replies to the client, and routes the event it caused to the broadcast and
//! audit batchers. The broadcast batcher's sink is [`TopicSink`].

use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::hub::{Hub, Peer};
use super::protocol;
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::store::Audited;
use crate::zone::{Permissions, Position, ZoneEvent};

/// What a client (or the server's clock) asks of a zone.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    Join,
    /// `reply`: a `phx_leave` to answer (false when the connection dropped).
    Leave {
        reply: bool,
    },
    Move {
        position: Position,
        /// The client's time stamp, echoed in the broadcast.
        sent_at: Option<i64>,
    },
    Interact {
        target_agent_id: String,
        kind: String,
        data: Option<Value>,
    },
    /// Take `amount` (> 0) of a resource.
    Consume {
        resource_type: String,
        amount: i64,
    },
    GetState,
    Tick,
}

/// Why a client's event could not become a command. Replied with this reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: &'static str,
    pub details: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MovePayload {
    position: Position,
    #[serde(default)]
    sent_at: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InteractPayload {
    target_agent_id: String,
    kind: String,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumePayload {
    resource_type: String,
    amount: Value,
}

fn invalid(e: impl std::fmt::Display) -> Refusal {
    Refusal {
        reason: "invalid_payload",
        details: e.to_string(),
    }
}

impl Command {
    /// The command a client event names, with its payload checked.
    pub fn from_event(event: &str, payload: Map<String, Value>) -> Result<Self, Refusal> {
        let payload = Value::Object(payload);
        match event {
            "agent_move" => {
                let p: MovePayload = serde_json::from_value(payload).map_err(invalid)?;
                Ok(Self::Move {
                    position: p.position,
                    sent_at: p.sent_at,
                })
            }
            "agent_interact" => {
                let p: InteractPayload = serde_json::from_value(payload).map_err(invalid)?;
                Ok(Self::Interact {
                    target_agent_id: p.target_agent_id,
                    kind: p.kind,
                    data: p.data,
                })
            }
            "consume_resource" => {
                let p: ConsumePayload = serde_json::from_value(payload).map_err(invalid)?;
                match p.amount.as_i64() {
                    Some(amount) if amount > 0 => Ok(Self::Consume {
                        resource_type: p.resource_type,
                        amount,
                    }),
                    _ => Err(invalid(format!(
                        "amount must be a whole number above 0, not {}",
                        p.amount
                    ))),
                }
            }
            "get_zone_state" => Ok(Self::GetState),
            other => Err(Refusal {
                reason: "unknown_event",
                details: format!(
                    "{other:?} is not an event of this channel (agent_move, agent_interact, \
                     consume_resource, get_zone_state)"
                ),
            }),
        }
    }

    /// The permission the command needs, if any.
    pub fn needs(&self) -> Option<Permissions> {
        match self {
            Self::Move { .. } | Self::Interact { .. } => Some(Permissions::SPAWN_AGENTS),
            Self::Consume { .. } => Some(Permissions::MODIFY_ZONE),
            _ => None,
        }
    }
}

/// The client a command came from and where to answer it.
#[derive(Clone, Debug)]
pub struct Origin {
    pub peer: Peer,
    pub agent_id: String,
    /// The token's bits.
    pub perms: Permissions,
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    /// This connection's joined channels, shared with its socket.
    pub channels: Arc<Mutex<Channels>>,
}

impl Origin {
    pub fn reply_ok(&self, zone: Uuid, response: &impl serde::Serialize) {
        self.peer.send_text(protocol::reply(
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &super::hub::topic_name(zone),
            true,
            response,
        ));
    }

    pub fn reply_error(&self, zone: Uuid, reason: &str, details: &str) {
        self.peer.send_text(protocol::error_reply(
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &super::hub::topic_name(zone),
            reason,
            details,
        ));
    }
}

/// A joined channel, as its socket remembers it.
#[derive(Clone, Debug, PartialEq)]
pub struct Joined {
    pub join_ref: Option<String>,
    pub agent_id: String,
    pub perms: Permissions,
}

/// A connection's channels by zone.
pub type Channels = std::collections::HashMap<Uuid, Joined>;

/// One unit of zone work in the pipeline.
#[derive(Clone, Debug)]
pub struct ZoneWork {
    pub zone_id: Uuid,
    pub command: Command,
    /// None for the server's own commands (ticks).
    pub origin: Option<Origin>,
    /// The event the command caused, once processed.
    pub event: Option<ZoneEvent>,
}

impl Audited for ZoneWork {
    fn audited(&self) -> Option<&ZoneEvent> {
        self.event.as_ref()
    }
}

/// Broadcasts each processed event to its zone's subscribers, serialised once. A batch's events
/// for one zone travel to each subscriber together, so its writer sends them with one system
/// call: per-frame writes to every subscriber were most of the server's CPU under load.
pub struct TopicSink {
    hub: Arc<Hub>,
}

impl TopicSink {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

impl BatchSink<ZoneWork> for TopicSink {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<ZoneWork>],
    ) -> Result<(), Failure> {
        // Zones in the order they first appear; a batch holds few zones, so a scan beats a map.
        let mut by_zone: Vec<(Uuid, Vec<Utf8Bytes>)> = Vec::new();
        for event in messages.iter().filter_map(|m| m.data.event.as_ref()) {
            let frame = Utf8Bytes::from(protocol::encode(
                None,
                None,
                &super::hub::topic_name(event.zone_id),
                event.event_type().as_str(),
                &event.kind,
            ));
            match by_zone.iter_mut().find(|(zone, _)| *zone == event.zone_id) {
                Some((_, frames)) => frames.push(frame),
                None => by_zone.push((event.zone_id, vec![frame])),
            }
        }
        for (zone, frames) in by_zone {
            self.hub.broadcast(zone, Arc::from(frames));
        }
        let now = chrono::Utc::now();
        for event in messages.iter().filter_map(|m| m.data.event.as_ref()) {
            let waited = now - event.occurred_at;
            self.hub
                .metrics
                .broadcast_latency
                .observe(waited.to_std().unwrap_or_default().as_secs_f64());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus::Registry;
    use tokio::sync::watch;

    use super::*;
    use crate::pipeline::{BatchInfo, BatchKey, Trigger};
    use crate::realtime::hub::{HubMetrics, Outbound, outbound_queue};
    use crate::zone::{EventKind, Moved, now};

    fn moved(zone: Uuid, x: f64) -> Message<ZoneWork> {
        let event = ZoneEvent::new(
            zone,
            EventKind::AgentMoved(Moved {
                agent_id: "mover".into(),
                position: Position { x, y: 0.0, z: 0.0 },
                sent_at: None,
            }),
            now(),
        );
        Message::new(ZoneWork {
            zone_id: zone,
            command: Command::Tick,
            origin: None,
            event: Some(event),
        })
    }

    #[tokio::test]
    async fn a_batch_reaches_each_subscriber_as_one_queue_item_per_zone_in_order() {
        let metrics = HubMetrics::register(&Registry::new()).unwrap();
        let hub = Arc::new(Hub::new(metrics.clone()));
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let subscribe = |zone, id| {
            let (tx, rx) = outbound_queue(16);
            let kill = Arc::new(watch::channel(None).0);
            let peer = Peer::new(id, tx, kill, metrics.slow_consumers.clone());
            hub.join(zone, &peer, &format!("agent-{id}"), None);
            rx
        };
        let (mut in_a, mut in_b) = (subscribe(a, 1), subscribe(b, 2));
        // The presence frames of the joins.
        while in_a.try_recv().is_some() {}
        while in_b.try_recv().is_some() {}

        let mut batch = [moved(a, 1.0), moved(b, 2.0), moved(a, 3.0)];
        let info = BatchInfo {
            batcher: "broadcast".into(),
            batch_key: BatchKey::Default,
            size: batch.len(),
            trigger: Trigger::Timeout,
        };
        TopicSink::new(hub.clone())
            .handle_batch(&info, &mut batch)
            .await
            .unwrap();

        let xs = |out: Outbound| -> Vec<f64> {
            let Outbound::Frames(frames) = out else {
                panic!("a broadcast is queued as frames")
            };
            frames
                .iter()
                .map(|f| {
                    let v: Value = serde_json::from_str(f.as_str()).unwrap();
                    assert_eq!(v[3], "agent_moved");
                    v[4]["position"]["x"].as_f64().unwrap()
                })
                .collect()
        };
        assert_eq!(xs(in_a.try_recv().unwrap()), vec![1.0, 3.0]);
        assert_eq!(xs(in_b.try_recv().unwrap()), vec![2.0]);
        assert!(in_a.try_recv().is_none() && in_b.try_recv().is_none());
        assert_eq!(metrics.broadcasts.get(), 3);
        assert_eq!(metrics.deliveries.get(), 3);
    }
}

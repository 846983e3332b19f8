//! Zone events: what happened in a zone, as broadcast to its agents and kept in the audit log.
//!
//! An event is an id (UUID v7, so ids sort in the order events were made), the zone, a type, a
//! JSON payload shaped as in the seed briefing, and a timestamp. On the wire it is
//! `{"id", "zone_id", "type", "payload", "occurred_at"}`, in JSON or MessagePack (the format
//! between processes); parsing checks the type and the payload's shape.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::error::ZoneError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    AgentEntered,
    AgentLeft,
    AgentMoved,
    AgentInteraction,
    ResourceChanged,
    EnvironmentTick,
}

impl EventType {
    pub const ALL: [EventType; 6] = [
        Self::AgentEntered,
        Self::AgentLeft,
        Self::AgentMoved,
        Self::AgentInteraction,
        Self::ResourceChanged,
        Self::EnvironmentTick,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AgentEntered => "agent_entered",
            Self::AgentLeft => "agent_left",
            Self::AgentMoved => "agent_moved",
            Self::AgentInteraction => "agent_interaction",
            Self::ResourceChanged => "resource_changed",
            Self::EnvironmentTick => "environment_tick",
        }
    }
}

impl FromStr for EventType {
    type Err = ZoneError;

    fn from_str(s: &str) -> Result<Self, ZoneError> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| ZoneError::UnknownEventType(s.to_owned()))
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub x: f64,
    pub y: f64,
    pub z: f64,
}

/// `agent_entered` / `agent_left`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub agent_id: String,
    pub session_count: u32,
    pub timestamp: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moved {
    pub agent_id: String,
    pub position: Position,
    /// The client's own time stamp, if it sent one, echoed so it can time the round trip.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interaction {
    pub agent_id: String,
    pub target_agent_id: String,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResourceChange {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// Signed: `{"food": -5}` took five food.
    pub changes: BTreeMap<String, i64>,
    /// Every resource's amount after the change.
    pub new_resources: BTreeMap<String, i64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tick {
    /// How many ticks the zone has had, this one included.
    pub tick: u64,
    pub properties: Value,
    /// Every resource's amount after regeneration.
    pub new_resources: BTreeMap<String, i64>,
    pub timestamp: DateTime<Utc>,
}

/// An event's type and payload.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    AgentEntered(Presence),
    AgentLeft(Presence),
    AgentMoved(Moved),
    AgentInteraction(Interaction),
    ResourceChanged(ResourceChange),
    EnvironmentTick(Tick),
}

impl EventKind {
    pub fn event_type(&self) -> EventType {
        match self {
            Self::AgentEntered(_) => EventType::AgentEntered,
            Self::AgentLeft(_) => EventType::AgentLeft,
            Self::AgentMoved(_) => EventType::AgentMoved,
            Self::AgentInteraction(_) => EventType::AgentInteraction,
            Self::ResourceChanged(_) => EventType::ResourceChanged,
            Self::EnvironmentTick(_) => EventType::EnvironmentTick,
        }
    }

    /// The agent that caused the event, if one did.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            Self::AgentEntered(p) | Self::AgentLeft(p) => Some(&p.agent_id),
            Self::AgentMoved(m) => Some(&m.agent_id),
            Self::AgentInteraction(i) => Some(&i.agent_id),
            Self::ResourceChanged(r) => r.agent_id.as_deref(),
            Self::EnvironmentTick(_) => None,
        }
    }

    /// The payload as a JSON value. To write it out, serialise the `EventKind` itself: it
    /// serialises as its payload, without building a value first.
    pub fn payload(&self) -> Value {
        serde_json::to_value(self).expect("event payloads are plain data")
    }

    /// Checks a type name and a payload against each other.
    pub fn from_parts(event_type: &str, payload: Value) -> Result<Self, ZoneError> {
        let kind: EventType = event_type.parse()?;
        let invalid = |e: serde_json::Error| ZoneError::InvalidPayload {
            event_type: event_type.to_owned(),
            reason: e.to_string(),
        };
        Ok(match kind {
            EventType::AgentEntered => {
                Self::AgentEntered(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::AgentLeft => {
                Self::AgentLeft(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::AgentMoved => {
                Self::AgentMoved(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::AgentInteraction => {
                Self::AgentInteraction(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::ResourceChanged => {
                Self::ResourceChanged(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::EnvironmentTick => {
                Self::EnvironmentTick(serde_json::from_value(payload).map_err(invalid)?)
            }
        })
    }
}

/// An event kind serialises as its payload alone (the type travels beside it).
impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::AgentEntered(p) | Self::AgentLeft(p) => p.serialize(s),
            Self::AgentMoved(m) => m.serialize(s),
            Self::AgentInteraction(i) => i.serialize(s),
            Self::ResourceChanged(r) => r.serialize(s),
            Self::EnvironmentTick(t) => t.serialize(s),
        }
    }
}

/// One thing that happened in one zone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireEvent", into = "WireEvent")]
pub struct ZoneEvent {
    pub id: Uuid,
    pub zone_id: Uuid,
    pub kind: EventKind,
    pub occurred_at: DateTime<Utc>,
}

/// The wire shape: the type as a name, the payload as plain JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireEvent {
    pub id: Uuid,
    pub zone_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
}

impl TryFrom<WireEvent> for ZoneEvent {
    type Error = ZoneError;

    fn try_from(w: WireEvent) -> Result<Self, ZoneError> {
        Ok(Self {
            id: w.id,
            zone_id: w.zone_id,
            kind: EventKind::from_parts(&w.event_type, w.payload)?,
            occurred_at: w.occurred_at,
        })
    }
}

impl From<ZoneEvent> for WireEvent {
    fn from(e: ZoneEvent) -> Self {
        Self {
            id: e.id,
            zone_id: e.zone_id,
            event_type: e.kind.event_type().as_str().to_owned(),
            payload: e.kind.payload(),
            occurred_at: e.occurred_at,
        }
    }
}

/// Why bytes from another process could not be read as an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a MessagePack zone event: {0}")]
    MessagePack(#[from] rmp_serde::decode::Error),
    #[error("not a JSON zone event: {0}")]
    Json(#[from] serde_json::Error),
}

impl ZoneEvent {
    /// A new event happening now in `zone_id`; its id is a fresh UUID v7.
    pub fn new(zone_id: Uuid, kind: EventKind, occurred_at: DateTime<Utc>) -> Self {
        Self {
            id: Uuid::now_v7(),
            zone_id,
            kind,
            occurred_at,
        }
    }

    pub fn event_type(&self) -> EventType {
        self.kind.event_type()
    }

    /// MessagePack with field names, so other languages can read it without our struct order.
    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("events serialise")
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("events serialise")
    }

    pub fn from_json(text: &str) -> Result<Self, DecodeError> {
        Ok(serde_json::from_str(text)?)
    }
}

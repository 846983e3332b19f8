//! Zone events: what happened in a zone, as broadcast to its agents and kept in the audit log.
//!
//! An event is an id (UUID v7, so ids sort in the order events were made), the zone, its `seq`
//! (1, 2, 3… per zone, no gaps), the command that caused it, a type, a JSON payload shaped as in
//! the seed briefing, and a timestamp. On the wire it is
//! `{"id", "zone_id", "seq", "command_id", "type", "payload", "occurred_at"}`, in JSON or
//! MessagePack; parsing checks the type and the payload's shape. Broadcasts carry the payload
//! with `seq` added ([`ZoneEvent::broadcast_payload`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::error::ZoneError;
use super::interest::View;
use super::migration::{Released, Reservation};
use super::model::Resource;
use super::permissions::Permissions;

/// The built-in event types. Custom broadcasts may use any other valid name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventType {
    ZoneCreated,
    AgentEntered,
    AgentLeft,
    AgentMoved,
    AgentInteraction,
    ResourceChanged,
    EnvironmentTick,
    ZoneUpdated,
    ZoneDeleted,
    MigrationReserved,
    MigrationReleased,
}

impl EventType {
    pub const ALL: [EventType; 11] = [
        Self::ZoneCreated,
        Self::AgentEntered,
        Self::AgentLeft,
        Self::AgentMoved,
        Self::AgentInteraction,
        Self::ResourceChanged,
        Self::EnvironmentTick,
        Self::ZoneUpdated,
        Self::ZoneDeleted,
        Self::MigrationReserved,
        Self::MigrationReleased,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ZoneCreated => "zone_created",
            Self::AgentEntered => "agent_entered",
            Self::AgentLeft => "agent_left",
            Self::AgentMoved => "agent_moved",
            Self::AgentInteraction => "agent_interaction",
            Self::ResourceChanged => "resource_changed",
            Self::EnvironmentTick => "environment_tick",
            Self::ZoneUpdated => "zone_updated",
            Self::ZoneDeleted => "zone_deleted",
            Self::MigrationReserved => "migration_reserved",
            Self::MigrationReleased => "migration_released",
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

/// Names Phoenix or this server use for frames of their own; no custom event may take them.
const RESERVED: [&str; 2] = ["presence_state", "presence_diff"];

/// Checks a custom event type: 1 to 64 of `A-Z a-z 0-9 _ . : -`, not a built-in event, not
/// `phx_…`, not a presence frame.
pub fn check_custom_event_type(name: &str) -> Result<(), ZoneError> {
    let refuse = |why: &str| {
        Err(ZoneError::invalid(
            "broadcast_event",
            format!("event_type {name:?} {why}"),
        ))
    };
    if name.is_empty() || name.len() > super::limits::MAX_NAME_BYTES {
        return refuse("must be 1 to 64 characters");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'))
    {
        return refuse("may only use letters, digits and _ . : -");
    }
    if name.parse::<EventType>().is_ok() {
        return refuse("is a built-in event: broadcast another name");
    }
    if name.starts_with("phx_") || RESERVED.contains(&name) {
        return refuse("is reserved by the Phoenix protocol");
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    pub x: f64,
    pub y: f64,
    pub z: f64,
}

/// `agent_entered` / `agent_left`: one session (a connection of an agent) came or went.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct Presence {
    pub agent_id: String,
    /// The connection holding the session; also the presence meta's `phx_ref`. (Events logged
    /// before sessions were kept per connection have none.)
    #[serde(default)]
    pub connection: String,
    /// Sessions in the zone after this event.
    pub session_count: u32,
    pub timestamp: DateTime<Utc>,
    /// Why the session ended, when it ended for a reason besides a leave: `migrated`.
    #[serde(default)]
    pub reason: Option<String>,
    /// The zone a migrated agent left for.
    #[serde(default)]
    pub to: Option<Uuid>,
    /// The zone a migrated agent came from.
    #[serde(default)]
    pub from: Option<Uuid>,
    /// A migrated agent's last position in the zone it came from (none if it had none).
    #[serde(default)]
    pub position: Option<Position>,
    /// The reservation a migrated agent's session was made from.
    #[serde(default)]
    pub reservation: Option<Uuid>,
}

impl Presence {
    /// A session of `agent_id` on `connection`, leaving `session_count` sessions, at `timestamp`.
    pub fn new(
        agent_id: &str,
        connection: &str,
        session_count: u32,
        timestamp: DateTime<Utc>,
    ) -> Self {
        Self {
            agent_id: agent_id.to_owned(),
            connection: connection.to_owned(),
            session_count,
            timestamp,
            reason: None,
            to: None,
            from: None,
            position: None,
            reservation: None,
        }
    }
}

/// The migration fields appear only on a migration's events; an arrival's `position` is there
/// (`null` when the agent had none) whenever its `from` is.
impl Serialize for Presence {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Wire<'a> {
            agent_id: &'a str,
            connection: &'a str,
            session_count: u32,
            timestamp: DateTime<Utc>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reason: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            to: Option<Uuid>,
            #[serde(skip_serializing_if = "Option::is_none")]
            from: Option<Uuid>,
            #[serde(skip_serializing_if = "Option::is_none")]
            position: Option<Option<Position>>,
            #[serde(skip_serializing_if = "Option::is_none")]
            reservation: Option<Uuid>,
        }
        Wire {
            agent_id: &self.agent_id,
            connection: &self.connection,
            session_count: self.session_count,
            timestamp: self.timestamp,
            reason: self.reason.as_deref(),
            to: self.to,
            from: self.from,
            position: if self.from.is_some() {
                Some(self.position)
            } else {
                self.position.map(Some)
            },
            reservation: self.reservation,
        }
        .serialize(s)
    }
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

/// `zone_updated`: the zone's settings that changed, with their new values.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneUpdate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assigned_server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    /// `Some(None)`: the radius was removed (`null`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub interest_radius: Option<Option<f64>>,
}

/// A field that is there, `null` or not: `Some`, so that `null` differs from absent.
pub(crate) fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl ZoneUpdate {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `zone_created`: the first event of every zone (seq 1), with everything it was created with, so
/// that its log alone rebuilds it. Its `epoch` names the history it starts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Created {
    pub name: String,
    pub permissions: Permissions,
    pub assigned_server: String,
    pub capacity: u32,
    pub resources: BTreeMap<String, Resource>,
    pub properties: Value,
    pub epoch: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interest_radius: Option<f64>,
}

/// `zone_deleted`: the zone is gone, and every session in it ended with it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deleted {
    pub timestamp: DateTime<Utc>,
}

/// A custom broadcast (`broadcast_event`): its own type name, who sent it, and free JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Custom {
    #[serde(skip)]
    pub event_type: String,
    /// The agent that broadcast it; none when the admin API did.
    pub agent_id: Option<String>,
    pub payload: Map<String, Value>,
}

/// An event's type and payload.
#[derive(Clone, Debug, PartialEq)]
pub enum EventKind {
    ZoneCreated(Created),
    AgentEntered(Presence),
    AgentLeft(Presence),
    AgentMoved(Moved),
    AgentInteraction(Interaction),
    ResourceChanged(ResourceChange),
    EnvironmentTick(Tick),
    ZoneUpdated(ZoneUpdate),
    ZoneDeleted(Deleted),
    MigrationReserved(Reservation),
    MigrationReleased(Released),
    Custom(Custom),
}

impl EventKind {
    /// The event's type name: a built-in one, or a custom broadcast's own.
    pub fn name(&self) -> &str {
        match self {
            Self::ZoneCreated(_) => EventType::ZoneCreated.as_str(),
            Self::AgentEntered(_) => EventType::AgentEntered.as_str(),
            Self::AgentLeft(_) => EventType::AgentLeft.as_str(),
            Self::AgentMoved(_) => EventType::AgentMoved.as_str(),
            Self::AgentInteraction(_) => EventType::AgentInteraction.as_str(),
            Self::ResourceChanged(_) => EventType::ResourceChanged.as_str(),
            Self::EnvironmentTick(_) => EventType::EnvironmentTick.as_str(),
            Self::ZoneUpdated(_) => EventType::ZoneUpdated.as_str(),
            Self::ZoneDeleted(_) => EventType::ZoneDeleted.as_str(),
            Self::MigrationReserved(_) => EventType::MigrationReserved.as_str(),
            Self::MigrationReleased(_) => EventType::MigrationReleased.as_str(),
            Self::Custom(c) => &c.event_type,
        }
    }

    /// The agent that caused the event, if one did.
    pub fn agent_id(&self) -> Option<&str> {
        match self {
            Self::AgentEntered(p) | Self::AgentLeft(p) => Some(&p.agent_id),
            Self::AgentMoved(m) => Some(&m.agent_id),
            Self::AgentInteraction(i) => Some(&i.agent_id),
            Self::ResourceChanged(r) => r.agent_id.as_deref(),
            Self::Custom(c) => c.agent_id.as_deref(),
            Self::MigrationReserved(r) => Some(&r.agent_id),
            Self::MigrationReleased(r) => Some(&r.agent_id),
            Self::ZoneCreated(_)
            | Self::EnvironmentTick(_)
            | Self::ZoneUpdated(_)
            | Self::ZoneDeleted(_) => None,
        }
    }

    /// The payload as a JSON value. To write it out, serialise the `EventKind` itself: it
    /// serialises as its payload, without building a value first.
    pub fn payload(&self) -> Value {
        serde_json::to_value(self).expect("event payloads are plain data")
    }

    /// Checks a type name and a payload against each other. A name that is not built in is a
    /// custom broadcast, whose payload is `{"agent_id", "payload"}`.
    pub fn from_parts(event_type: &str, payload: Value) -> Result<Self, ZoneError> {
        let invalid = |e: serde_json::Error| ZoneError::invalid(event_type, e.to_string());
        let Ok(kind) = event_type.parse::<EventType>() else {
            check_custom_event_type(event_type)?;
            let mut custom: Custom = serde_json::from_value(payload).map_err(invalid)?;
            custom.event_type = event_type.to_owned();
            return Ok(Self::Custom(custom));
        };
        Ok(match kind {
            EventType::ZoneCreated => {
                Self::ZoneCreated(serde_json::from_value(payload).map_err(invalid)?)
            }
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
            EventType::ZoneUpdated => {
                Self::ZoneUpdated(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::ZoneDeleted => {
                Self::ZoneDeleted(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::MigrationReserved => {
                Self::MigrationReserved(serde_json::from_value(payload).map_err(invalid)?)
            }
            EventType::MigrationReleased => {
                Self::MigrationReleased(serde_json::from_value(payload).map_err(invalid)?)
            }
        })
    }
}

/// An event kind serialises as its payload alone (the type travels beside it).
impl Serialize for EventKind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::ZoneCreated(c) => c.serialize(s),
            Self::AgentEntered(p) | Self::AgentLeft(p) => p.serialize(s),
            Self::AgentMoved(m) => m.serialize(s),
            Self::AgentInteraction(i) => i.serialize(s),
            Self::ResourceChanged(r) => r.serialize(s),
            Self::EnvironmentTick(t) => t.serialize(s),
            Self::ZoneUpdated(u) => u.serialize(s),
            Self::ZoneDeleted(d) => d.serialize(s),
            Self::MigrationReserved(r) => r.serialize(s),
            Self::MigrationReleased(r) => r.serialize(s),
            Self::Custom(c) => c.serialize(s),
        }
    }
}

/// One thing that happened in one zone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireEvent", into = "WireEvent")]
pub struct ZoneEvent {
    pub id: Uuid,
    pub zone_id: Uuid,
    /// The event's place in its zone's history: 1, 2, 3…, no gaps, no repeats.
    pub seq: u64,
    /// The command that caused it, when one did.
    pub command_id: Option<Uuid>,
    pub kind: EventKind,
    pub occurred_at: DateTime<Utc>,
    /// Whom it reaches and whose views it changes, in a zone that filters by interest; none
    /// for an event for everyone that changes no view.
    pub view: Option<Box<View>>,
}

/// The wire shape: the type as a name, the payload as plain JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WireEvent {
    pub id: Uuid,
    pub zone_id: Uuid,
    pub seq: u64,
    #[serde(default)]
    pub command_id: Option<Uuid>,
    #[serde(rename = "type")]
    pub event_type: String,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub view: Option<View>,
}

impl TryFrom<WireEvent> for ZoneEvent {
    type Error = ZoneError;

    fn try_from(w: WireEvent) -> Result<Self, ZoneError> {
        Ok(Self {
            id: w.id,
            zone_id: w.zone_id,
            seq: w.seq,
            command_id: w.command_id,
            kind: EventKind::from_parts(&w.event_type, w.payload)?,
            occurred_at: w.occurred_at,
            view: w.view.map(Box::new),
        })
    }
}

impl From<ZoneEvent> for WireEvent {
    fn from(e: ZoneEvent) -> Self {
        Self {
            id: e.id,
            zone_id: e.zone_id,
            seq: e.seq,
            command_id: e.command_id,
            event_type: e.kind.name().to_owned(),
            payload: e.kind.payload(),
            occurred_at: e.occurred_at,
            view: e.view.map(|v| *v),
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

/// A broadcast's payload: the event's payload with its `seq` beside the other fields.
#[derive(Serialize)]
pub struct BroadcastPayload<'a> {
    #[serde(flatten)]
    kind: &'a EventKind,
    seq: u64,
}

impl ZoneEvent {
    /// Event `id` in `zone_id` at `seq`, caused by no command.
    pub fn new(
        id: Uuid,
        zone_id: Uuid,
        seq: u64,
        kind: EventKind,
        occurred_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            zone_id,
            seq,
            command_id: None,
            kind,
            occurred_at,
            view: None,
        }
    }

    pub fn name(&self) -> &str {
        self.kind.name()
    }

    /// What subscribers receive: the payload, with `seq`.
    pub fn broadcast_payload(&self) -> BroadcastPayload<'_> {
        BroadcastPayload {
            kind: &self.kind,
            seq: self.seq,
        }
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

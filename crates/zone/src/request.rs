//! What clients ask for, decoded one way whoever carries it: a socket push (`event` and
//! `payload`) and a broker message (`type` and `payload`) name a command and give its payload,
//! and [`CommandKind::from_value`] / [`CommandKind::from_json`] turn both into the same
//! [`CommandKind`] or the same refusal. A payload is refused `invalid_payload` when it has
//! another shape, unknown fields included; a name that is no command a client may send is
//! refused `unknown_event`. What the payload's values may be (limits, amounts, permissions) the
//! zone decides, for every command alike.

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::command::CommandKind;
use super::error::ZoneError;
use super::event::Position;

/// The commands a client may name, by the names sockets and brokers use.
pub const CLIENT_COMMANDS: [&str; 7] = [
    "agent_move",
    "agent_interact",
    "consume_resource",
    "broadcast_event",
    "get_zone_state",
    "tick",
    "migrate",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Move {
    position: Position,
    #[serde(default)]
    sent_at: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Interact {
    target_agent_id: String,
    kind: String,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Consume {
    resource_type: String,
    amount: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast {
    event_type: String,
    #[serde(default)]
    payload: Map<String, Value>,
}

/// `{"to": "<zone id>"}`: where a service's agent moves. (A socket's `migrate` also carries
/// the join token for it, and is checked by the socket.)
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Migrate {
    to: uuid::Uuid,
}

/// `{}`: the commands that take nothing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Nothing {}

impl CommandKind {
    /// The command a client names, with `payload` (a JSON object) checked against its shape.
    pub fn from_value(name: &str, payload: Value) -> Result<Self, ZoneError> {
        decode(name, Payload::Value(payload))
    }

    /// As [`from_value`](Self::from_value), from the payload's JSON text, without building a
    /// value first. Its answer is always the one `from_value` gives for the same payload.
    pub fn from_json(name: &str, payload: &str) -> Result<Self, ZoneError> {
        decode(name, Payload::Json(payload)).or_else(|refusal| {
            // The text parser says where in the text it stopped, and refuses a repeated key that
            // a value keeps the last of: what the value says is what every front door says.
            match (&refusal, serde_json::from_str::<Value>(payload)) {
                (ZoneError::InvalidPayload { .. }, Ok(value)) => Self::from_value(name, value),
                _ => Err(refusal),
            }
        })
    }
}

/// A payload, as a value or as JSON text.
enum Payload<'a> {
    Value(Value),
    Json(&'a str),
}

impl Payload<'_> {
    fn read<T: DeserializeOwned>(self) -> Result<T, String> {
        match self {
            Self::Value(value) => T::deserialize(value).map_err(|e| e.to_string()),
            Self::Json(text) => serde_json::from_str(text).map_err(|e| e.to_string()),
        }
    }
}

fn decode(name: &str, payload: Payload<'_>) -> Result<CommandKind, ZoneError> {
    let kind = match name {
        "agent_move" => payload.read().map(|p: Move| CommandKind::AgentMove {
            position: p.position,
            sent_at: p.sent_at,
        }),
        "agent_interact" => payload
            .read()
            .map(|p: Interact| CommandKind::AgentInteract {
                target_agent_id: p.target_agent_id,
                kind: p.kind,
                data: p.data,
            }),
        "consume_resource" => payload
            .read()
            .map(|p: Consume| CommandKind::ConsumeResource {
                resource_type: p.resource_type,
                amount: p.amount,
            }),
        "broadcast_event" => payload
            .read()
            .map(|p: Broadcast| CommandKind::BroadcastEvent {
                event_type: p.event_type,
                payload: p.payload,
            }),
        "get_zone_state" => payload.read().map(|Nothing {}| CommandKind::GetZoneState),
        "tick" => payload.read().map(|Nothing {}| CommandKind::Tick),
        "migrate" => payload
            .read()
            .map(|m: Migrate| CommandKind::Migrate { to: m.to }),
        _ => return Err(ZoneError::UnknownCommand(name.to_owned())),
    };
    kind.map_err(|reason| ZoneError::invalid(name, reason))
}

//! Why a zone operation was refused. Every refusal changes nothing.

use uuid::Uuid;

use super::permissions::Permissions;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ZoneError {
    #[error("no zone has id {0}")]
    ZoneNotFound(Uuid),
    #[error("{0:?} is not a UUID (expected e.g. 123e4567-e89b-12d3-a456-426614174000)")]
    MalformedId(String),
    #[error("the zone is full: {capacity} agent session(s) is its capacity")]
    ZoneFull { capacity: u32 },
    #[error("agent {agent_id} has no session in this zone to leave")]
    NotPresent { agent_id: String },
    #[error("this needs the {needed} permission, which {holder} does not hold")]
    Forbidden {
        needed: Permissions,
        holder: &'static str,
    },
    #[error("the zone has no resource {0:?}")]
    UnknownResource(String),
    #[error("the change to {resource:?} must be a whole number, not {value}")]
    NonIntegerAmount { resource: String, value: String },
    #[error(
        "not enough {resource}: {available} available, a change of {change} would leave {result}"
    )]
    InsufficientResources {
        resource: String,
        available: i64,
        change: i64,
        result: i64,
    },
    #[error(
        "{resource} cannot exceed its maximum of {max}: a change of {change} would make it {result}"
    )]
    OverMaximum {
        resource: String,
        max: i64,
        change: i64,
        result: i64,
    },
    #[error(
        "unknown event type {0:?} (expected one of agent_entered, agent_left, agent_moved, agent_interaction, resource_changed, environment_tick)"
    )]
    UnknownEventType(String),
    #[error("the {event_type} payload has the wrong shape: {reason}")]
    InvalidPayload { event_type: String, reason: String },
    #[error(
        "unknown permission {0:?} (expected spawn_agents, modify_zone, broadcast_events, admin_zone or their bits 0x01..0x0f)"
    )]
    UnknownPermission(String),
    #[error("invalid zone: {0}")]
    InvalidZone(String),
    #[error("event {event} belongs to zone {event_zone}, not {zone}")]
    WrongZone {
        event: Uuid,
        event_zone: Uuid,
        zone: Uuid,
    },
}

/// Parses a zone id, with an error that says what was expected.
pub fn parse_zone_id(s: &str) -> Result<Uuid, ZoneError> {
    Uuid::parse_str(s.trim()).map_err(|_| ZoneError::MalformedId(s.to_owned()))
}

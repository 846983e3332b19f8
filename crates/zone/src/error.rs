//! Why a zone command was refused. Every refusal changes nothing; each has a short reason a
//! client can act on ([`ZoneError::reason`]) and a sentence for a person. Refusals serialise, so
//! that a broker or another node can carry them back to whoever asked.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::permissions::Permissions;

/// Who lacked a permission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Holder {
    Token,
    Zone,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Token => "the agent's token",
            Self::Zone => "the zone",
        })
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", content = "details", rename_all = "snake_case")]
pub enum ZoneError {
    #[error("no zone has id {0}")]
    ZoneNotFound(Uuid),
    #[error("{0:?} is not a UUID (expected e.g. 123e4567-e89b-12d3-a456-426614174000)")]
    MalformedId(String),
    #[error("the zone is full: {capacity} agent session(s) is its capacity")]
    ZoneFull { capacity: u32 },
    #[error(
        "agent {agent_id} already has {max} session(s) in this zone, the most one agent may have"
    )]
    TooManySessions { agent_id: String, max: u32 },
    #[error("agent {agent_id} has no session on this connection in this zone: join it first")]
    NotJoined { agent_id: String },
    #[error("agent {agent_id} has no session in this zone to move")]
    NotInZone { agent_id: String },
    #[error("an agent moves to another zone, not to the zone it is in")]
    SameZone,
    #[error("a migration of this session is already under way")]
    MigrationPending,
    #[error("the ticket is refused: {0}")]
    InvalidTicket(String),
    #[error("this needs the {needed} permission, which {holder} does not hold")]
    Forbidden { needed: Permissions, holder: Holder },
    #[error("the zone has no resource {0:?}")]
    UnknownResource(String),
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
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error(
        "{0:?} is not a command (agent_move, agent_interact, consume_resource, broadcast_event, get_zone_state, tick, migrate)"
    )]
    UnknownCommand(String),
    #[error("the {event_type} payload is refused: {reason}")]
    InvalidPayload { event_type: String, reason: String },
    #[error(
        "unknown permission {0:?} (expected spawn_agents, modify_zone, broadcast_events, admin_zone or their bits 0x01..0x0f)"
    )]
    UnknownPermission(String),
    #[error("invalid zone: {0}")]
    InvalidZone(String),
    #[error("{0}")]
    Conflict(String),
    #[error("too many broadcasts in this zone: at most {allowed} per {interval_ms} ms")]
    RateLimited { allowed: u32, interval_ms: u64 },
    #[error("{command} is not something {actor} may ask of a zone")]
    NotAllowed { command: String, actor: String },
    /// The command could not be carried out now (its zone could not be loaded, the server is
    /// shutting down); it may have been applied only if the reason says so.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("event {event} belongs to zone {event_zone}, not {zone}")]
    WrongZone {
        event: Uuid,
        event_zone: Uuid,
        zone: Uuid,
    },
    #[error("event seq {seq} cannot follow seq {current}: the log is out of order")]
    OutOfOrder { seq: u64, current: u64 },
    #[error(
        "{event} cannot apply to zone {zone}: a zone's log starts with its zone_created, and only there"
    )]
    OutOfLife { event: String, zone: Uuid },
}

impl ZoneError {
    /// The short, stable reason a client sees (`{"reason": …}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ZoneNotFound(_) => "zone_not_found",
            Self::MalformedId(_) => "zone_not_found",
            Self::ZoneFull { .. } => "zone_full",
            Self::TooManySessions { .. } => "too_many_sessions",
            // Phoenix's own reason for a push to a channel the connection has not joined.
            Self::NotJoined { .. } => "unmatched topic",
            Self::NotInZone { .. } => "not_joined",
            Self::SameZone => "same_zone",
            Self::MigrationPending => "migration_pending",
            Self::InvalidTicket(_) => "invalid_ticket",
            Self::Forbidden { .. } | Self::NotAllowed { .. } => "forbidden",
            Self::UnknownResource(_) => "unknown_resource",
            Self::InsufficientResources { .. } => "insufficient_resources",
            Self::OverMaximum { .. } => "over_maximum",
            Self::RateLimited { .. } => "rate_limited",
            Self::Conflict(_) => "conflict",
            Self::UnknownCommand(_) => "unknown_event",
            Self::Unavailable(_) => "unavailable",
            Self::UnknownEventType(_)
            | Self::InvalidPayload { .. }
            | Self::UnknownPermission(_)
            | Self::InvalidZone(_)
            | Self::WrongZone { .. }
            | Self::OutOfOrder { .. }
            | Self::OutOfLife { .. } => "invalid_payload",
        }
    }

    pub(crate) fn invalid(event_type: &str, reason: impl Into<String>) -> Self {
        Self::InvalidPayload {
            event_type: event_type.to_owned(),
            reason: reason.into(),
        }
    }
}

/// Parses a zone id, with an error that says what was expected.
pub fn parse_zone_id(s: &str) -> Result<Uuid, ZoneError> {
    Uuid::parse_str(s.trim()).map_err(|_| ZoneError::MalformedId(s.to_owned()))
}

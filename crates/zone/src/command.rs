//! Zone commands: what someone asks of a zone. A command carries an id (its idempotency key: a
//! zone that remembers the id answers it again instead of applying it again), the zone, who
//! asks, and what. Commands serialise, in JSON
//! or MessagePack, in the same vocabulary as the socket's events, so that a broker message or
//! another node can carry them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::event::Position;
use super::migration::Reservation;
use super::model::NewZone;
use super::permissions::Permissions;

/// Who asks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Actor {
    /// An agent on a connection, with its token's permission bits.
    Agent {
        agent_id: String,
        connection: String,
        permissions: Permissions,
    },
    /// The admin API.
    Admin,
    /// A trusted service (a game server, an NPC brain) sending commands through a broker: it
    /// needs no token and no session, but the zone's own permission bits apply. It acts for
    /// `agent_id`, which agent events name (a tick needs none).
    Service {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent_id: Option<String>,
    },
    /// The server itself: ticks, expiring the sessions of a previous run.
    System,
}

impl Actor {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Agent { .. } => "an agent",
            Self::Admin => "the admin API",
            Self::Service { .. } => "a service",
            Self::System => "the server",
        }
    }
}

/// Changes to a zone's settings; what is absent stays as it is.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ZonePatch {
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200))]
    pub name: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2_147_483_647))]
    pub capacity: Option<u32>,
    #[serde(default)]
    /// A JSON object, at most 64 KiB.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub properties: Option<Value>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200))]
    pub assigned_server: Option<String>,
    /// Above 0 sets it; `null` removes it (every move reaches everyone again).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "super::event::present"
    )]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<f64>, exclusive_minimum = 0))]
    pub interest_radius: Option<Option<f64>>,
}

/// What is asked. The names are the socket's event names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum CommandKind {
    /// Bring the zone into being (its `zone_created`, seq 1): only a zone that does not exist
    /// yet takes it.
    CreateZone(Box<NewZone>),
    /// Enter the zone: a session for the actor's (connection, agent).
    Join,
    /// End the actor's session, if it has one.
    Leave,
    AgentMove {
        position: Position,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent_at: Option<i64>,
    },
    AgentInteract {
        target_agent_id: String,
        kind: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<Value>,
    },
    /// Take `amount` (> 0) of a resource.
    ConsumeResource {
        resource_type: String,
        amount: i64,
    },
    /// A custom event to every subscriber of the zone.
    BroadcastEvent {
        event_type: String,
        payload: Map<String, Value>,
    },
    /// The zone as it is now; changes nothing.
    GetZoneState,
    /// The zone's sessions now, each with its agent and connection (the admin API's view, from
    /// whichever node writes the zone); changes nothing.
    GetAgents,
    /// Regenerate resources and advance the environment.
    Tick,
    UpdateZone(ZonePatch),
    ChangePermissions {
        grant: Permissions,
        revoke: Permissions,
    },
    DeleteZone,
    /// End every session (they belong to connections of a previous run).
    ExpireSessions,
    /// End the sessions of the connections whose names start with `prefix`: those of a node
    /// of a cluster that died.
    EndConnections {
        prefix: String,
    },
    /// Where `agent_id` is in the zone (its sessions and last position): a migration's first
    /// look. Changes nothing.
    Locate {
        agent_id: String,
    },
    /// The reservation with this id, if the zone holds it. Changes nothing.
    GetReservation {
        reservation: Uuid,
    },
    /// Whether the zone applied command `command` (and remembers it). Changes nothing.
    Applied {
        command: Uuid,
    },
    /// Hold places for an agent coming from another zone: a migration's first step.
    Reserve(Box<Reservation>),
    /// End the agent's sessions here (the actor's own, or a service's agent's `connections`):
    /// it moves to zone `to`, where `reservation` holds its place. A migration's second step.
    Depart {
        agent_id: String,
        to: Uuid,
        reservation: Uuid,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        connections: Vec<String>,
        /// When the place held in `to` runs out: a departure after it is refused (the agent
        /// would leave for a place that is gone).
        until: chrono::DateTime<chrono::Utc>,
    },
    /// Turn a reservation into the agent's session: a ticket's join (the actor's connection),
    /// or a service's agent's arrival (the reservation's connections). A migration's last step.
    Arrive {
        reservation: Uuid,
        /// For the runtime: which of the reservation's connections arrive (all when empty).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        connections: Vec<String>,
    },
    /// Give a reservation's places back: its migration did not happen.
    Release {
        reservation: Uuid,
    },
    /// Move the service's agent (every session it has here) to zone `to`: carried out by the
    /// runtime, step by step ([`Migration`](crate::Migration)), never decided by one zone.
    Migrate {
        to: Uuid,
    },
}

impl CommandKind {
    /// The command's name, as a metric label and in messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CreateZone(_) => "create_zone",
            Self::Join => "join",
            Self::Leave => "leave",
            Self::AgentMove { .. } => "agent_move",
            Self::AgentInteract { .. } => "agent_interact",
            Self::ConsumeResource { .. } => "consume_resource",
            Self::BroadcastEvent { .. } => "broadcast_event",
            Self::GetZoneState => "get_zone_state",
            Self::GetAgents => "get_agents",
            Self::Tick => "tick",
            Self::UpdateZone(_) => "update_zone",
            Self::ChangePermissions { .. } => "change_permissions",
            Self::DeleteZone => "delete_zone",
            Self::ExpireSessions => "expire_sessions",
            Self::EndConnections { .. } => "end_connections",
            Self::Locate { .. } => "locate",
            Self::GetReservation { .. } => "get_reservation",
            Self::Applied { .. } => "applied",
            Self::Reserve(_) => "reserve",
            Self::Depart { .. } => "depart",
            Self::Arrive { .. } => "arrive",
            Self::Release { .. } => "release",
            Self::Migrate { .. } => "migrate",
        }
    }

    /// Whether the command only reads: it is never remembered and never causes an event.
    pub fn is_query(&self) -> bool {
        matches!(
            self,
            Self::GetZoneState
                | Self::GetAgents
                | Self::Locate { .. }
                | Self::GetReservation { .. }
                | Self::Applied { .. }
        )
    }

    /// Whether the command makes a session for the agent that asks: a join, or a ticket's.
    pub fn is_join(&self) -> bool {
        matches!(self, Self::Join | Self::Arrive { .. })
    }
}

/// One command for one zone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoneCommand {
    /// The idempotency key: a zone does not apply an id it remembers again.
    pub id: Uuid,
    pub zone_id: Uuid,
    pub actor: Actor,
    #[serde(flatten)]
    pub kind: CommandKind,
}

impl ZoneCommand {
    /// Command `id` (its idempotency key, minted by whoever asks) for `zone_id`.
    pub fn new(id: Uuid, zone_id: Uuid, actor: Actor, kind: CommandKind) -> Self {
        Self {
            id,
            zone_id,
            actor,
            kind,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("commands serialise")
    }

    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    pub fn to_msgpack(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("commands serialise")
    }

    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, rmp_serde::decode::Error> {
        rmp_serde::from_slice(bytes)
    }
}

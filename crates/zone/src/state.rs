//! A zone's whole state, and the only way it changes: a command is *decided* against the state
//! (a refusal, or the events it causes) and the events are *applied*.
//!
//! [`ZoneState::decide`] changes nothing, so a retry or a timeout can always call it again.
//! [`ZoneState::apply`] changes the state by one event and cannot fail for an event `decide`
//! produced; replaying the audit log after a restart is the same `apply`, so the live state and
//! the replayed one are equal by construction. [`ZoneState::execute`] is the writer's one call:
//! it decides, numbers the events (`seq`: the state's last plus one, no gaps), applies them, and
//! remembers the command's id so that a command retried or redelivered while the zone
//! remembers it (its last [`REMEMBERED_COMMANDS`], those of events replayed from the log
//! included) is not applied twice.
//!
//! Nothing here reads a clock or draws a random number: the time, the ids of the events a
//! command causes and the epoch of a zone it creates come with the [`Context`] the writer passes,
//! so the same commands in the same contexts give the same events.
//!
//! A zone's life is in its log: `zone_created` (seq 1) brings it into being, `zone_deleted` ends
//! it, and replaying the log from seq 1 onto [`ZoneState::absent`] rebuilds it
//! ([`ZoneState::replay`]).
//!
//! Sessions are part of the state: a set of (connection, agent), whose size is the zone's
//! `active_session_count`. A join is a command whose event adds a session; a leave of a session
//! that does not exist decides to nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::command::{Actor, CommandKind, ZoneCommand, ZonePatch};
use super::error::ZoneError;
use super::event::{
    Created, Custom, Deleted, EventKind, Interaction, Moved, Position, Presence, ResourceChange,
    Tick, ZoneEvent, ZoneUpdate, check_custom_event_type,
};
use super::interest::{Grid, Regrid, Seen, Unseen, View};
use super::limits;
use super::migration::{Located, Released, Reservation};
use super::model::{
    Zone, check_capacity, check_interest_radius, check_name, check_properties, check_server,
};
use super::permissions::Permissions;

/// One session: an agent on a connection.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SessionKey {
    pub connection: String,
    pub agent_id: String,
}

/// A session as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub connection: String,
    pub agent_id: String,
    pub joined_at: DateTime<Utc>,
}

/// At most `allowed` custom broadcasts per `interval_ms` in one zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastLimit {
    pub allowed: u32,
    pub interval_ms: u64,
}

/// The ids of the events one command causes: the first is given, each next one is one more, so
/// UUID v7 ids stay in the order the events were made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventIds(Uuid);

impl EventIds {
    /// Ids from `first` on. Its lowest 32 bits are cleared, so that counting up from it never
    /// carries into the version or variant bits (a UUID v7 keeps 42 random bits besides).
    pub fn starting_at(first: Uuid) -> Self {
        Self(Uuid::from_u128(first.as_u128() & !u128::from(u32::MAX)))
    }

    /// The id of event number `n` (0 for the first).
    pub fn nth(self, n: usize) -> Uuid {
        Uuid::from_u128(self.0.as_u128() | (n as u128 & u128::from(u32::MAX)))
    }
}

/// What a decision may depend on besides the state and the command; the writer passes it.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    /// When the command is applied: the events' `occurred_at`.
    pub now: DateTime<Utc>,
    /// The ids of the events the command causes. The first also names the history of a zone the
    /// command creates (its epoch).
    pub ids: EventIds,
    pub broadcast_limit: Option<BroadcastLimit>,
    /// The most sessions one agent may hold in a zone (a join past it is refused), so that one
    /// agent's token cannot fill a zone.
    pub max_sessions_per_agent: Option<u32>,
}

impl Context {
    /// A command applied at `now`, its events numbered from `first_event_id`, without limits.
    pub fn new(now: DateTime<Utc>, first_event_id: Uuid) -> Self {
        Self {
            now,
            ids: EventIds::starting_at(first_event_id),
            broadcast_limit: None,
            max_sessions_per_agent: None,
        }
    }
}

/// The zone as a client sees it: its settings and amounts, who is present, and the last `seq`
/// the view reflects, in its `epoch`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoneView {
    pub zone: Zone,
    pub agents: Vec<String>,
    pub seq: u64,
    pub epoch: String,
    /// A join's answer in a zone with an interest radius: the agents within the radius of the
    /// joining agent's position, in agent order (none when it has none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_view: Option<Vec<InView>>,
}

/// An agent in view, and where it is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InView {
    pub agent_id: String,
    pub position: Position,
}

/// The answer to an accepted command, beside the events it caused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Answer {
    /// Nothing to tell but that it was done.
    Done,
    /// The zone after the command (`get_zone_state`, creation, settings changes).
    State(Box<ZoneView>),
    /// The zone after a join.
    Joined(Box<ZoneView>),
    /// Every resource's amount after a consume.
    Resources(BTreeMap<String, i64>),
    /// The zone's sessions as of `seq` (`get_agents`).
    Sessions { seq: u64, sessions: Vec<Session> },
    /// Where an agent is (`locate`), or what a departure ended (`depart`).
    Located(Located),
    /// A reservation the zone holds (`reserve`, `get_reservation`), if it still does.
    Reservation(Option<Box<Reservation>>),
    /// Whether the zone applied a command (`applied`).
    Applied(bool),
}

/// An accepted command: the events it caused (each with its seq) and its answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Accepted {
    pub events: Vec<ZoneEvent>,
    pub answer: Answer,
    /// The command's id had been applied before: nothing was applied this time.
    pub duplicate: bool,
}

/// What became of a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub command_id: Uuid,
    pub result: Result<Accepted, ZoneError>,
}

/// The ids of recent commands and what became of them, so a redelivered command gets its first
/// outcome again instead of a second application. Bounded: the oldest are forgotten first.
#[derive(Clone, Debug, Default)]
struct Recent {
    outcomes: HashMap<Uuid, Result<u64, ZoneError>>,
    /// The first answers that said more than `Done` (a consume's amounts then), for a
    /// redelivery to get the same. Not in the log: one remembered from it is answered as the
    /// zone is now.
    answers: HashMap<Uuid, Answer>,
    order: VecDeque<Uuid>,
}

/// How many command ids a zone remembers.
pub const REMEMBERED_COMMANDS: usize = 4096;

impl Recent {
    fn get(&self, id: &Uuid) -> Option<&Result<u64, ZoneError>> {
        self.outcomes.get(id)
    }

    fn remember(&mut self, id: Uuid, outcome: Result<u64, ZoneError>) {
        if self.outcomes.insert(id, outcome).is_none() {
            self.order.push_back(id);
            if self.order.len() > REMEMBERED_COMMANDS
                && let Some(old) = self.order.pop_front()
            {
                self.outcomes.remove(&old);
                self.answers.remove(&old);
            }
        }
    }
}

/// A zone's state as it is written down: enough to rebuild it exactly. The snapshot of a deleted
/// zone says so: writing it removes the zone's row.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ZoneSnapshot {
    pub zone: Zone,
    pub seq: u64,
    pub epoch: String,
    pub sessions: Vec<Session>,
    #[serde(default)]
    pub deleted: bool,
    /// Each agent's last position here (kept after it leaves).
    #[serde(default)]
    pub positions: BTreeMap<String, Position>,
    /// Places held for agents on their way in.
    #[serde(default)]
    pub reservations: Vec<Reservation>,
}

/// Where a zone is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lifecycle {
    /// Before its `zone_created`: only a creation is accepted.
    Absent,
    Live,
    /// After its `zone_deleted`: nothing is accepted.
    Deleted,
}

/// Why an event could not be applied (a log out of order, or for another zone).
pub type ApplyError = ZoneError;

/// A zone, its sessions, its place in its history, and the commands it has applied.
#[derive(Clone, Debug)]
pub struct ZoneState {
    zone: Zone,
    seq: u64,
    epoch: String,
    sessions: BTreeMap<SessionKey, DateTime<Utc>>,
    /// Each agent's last position here, kept after it leaves (a migration carries it on).
    positions: BTreeMap<String, Position>,
    /// Places held for agents on their way in from other zones, by id; an expired one is
    /// forgotten by the next event.
    reservations: BTreeMap<Uuid, Reservation>,
    /// The agents in the zone with a position, by place: derived from the sessions, positions
    /// and radius, never stored.
    grid: Grid,
    lifecycle: Lifecycle,
    recent: Recent,
    /// The current broadcast window: when it started and how many it has allowed.
    broadcasts: Option<(DateTime<Utc>, u32)>,
}

/// Two states are equal when their zones, histories and sessions are; what commands they
/// remember and how their rate windows stand are not part of what replay rebuilds.
impl PartialEq for ZoneState {
    fn eq(&self, other: &Self) -> bool {
        self.zone == other.zone
            && self.seq == other.seq
            && self.epoch == other.epoch
            && self.sessions == other.sessions
            && self.positions == other.positions
            && self.reservations == other.reservations
            && self.lifecycle == other.lifecycle
    }
}

fn permission_needed(kind: &CommandKind) -> Option<Permissions> {
    match kind {
        CommandKind::AgentMove { .. } | CommandKind::AgentInteract { .. } => {
            Some(Permissions::SPAWN_AGENTS)
        }
        CommandKind::ConsumeResource { .. } => Some(Permissions::MODIFY_ZONE),
        CommandKind::BroadcastEvent { .. } => Some(Permissions::BROADCAST_EVENTS),
        _ => None,
    }
}

/// Whether `actor` may ask for `kind` at all.
fn allowed(actor: &Actor, kind: &CommandKind) -> bool {
    use CommandKind as K;
    match actor {
        Actor::Agent { .. } => matches!(
            kind,
            K::Join
                | K::Leave
                | K::AgentMove { .. }
                | K::AgentInteract { .. }
                | K::ConsumeResource { .. }
                | K::BroadcastEvent { .. }
                | K::GetZoneState
                | K::Depart { .. }
                | K::Arrive { .. }
        ),
        Actor::Admin => matches!(
            kind,
            K::CreateZone(_)
                | K::UpdateZone(_)
                | K::ChangePermissions { .. }
                | K::DeleteZone
                | K::BroadcastEvent { .. }
                | K::GetZoneState
                | K::GetAgents
        ),
        Actor::Service { .. } => matches!(
            kind,
            K::AgentMove { .. }
                | K::AgentInteract { .. }
                | K::ConsumeResource { .. }
                | K::BroadcastEvent { .. }
                | K::Tick
                | K::GetZoneState
        ),
        // The runtime, for itself or carrying out a migration it has authorised.
        Actor::System => matches!(
            kind,
            K::Tick
                | K::ExpireSessions
                | K::EndConnections { .. }
                | K::GetZoneState
                | K::GetAgents
                | K::Locate { .. }
                | K::GetReservation { .. }
                | K::Applied { .. }
                | K::Reserve(_)
                | K::Depart { .. }
                | K::Arrive { .. }
                | K::Release { .. }
        ),
    }
}

impl ZoneState {
    /// Zone `id` before its creation: seq 0, nothing in it. A creation command makes it a zone;
    /// its log replayed onto it rebuilds it.
    pub fn absent(id: Uuid) -> Self {
        Self {
            zone: Zone {
                id,
                name: String::new(),
                permissions: Permissions::empty(),
                assigned_server: String::new(),
                active_session_count: 0,
                capacity: 0,
                resources: BTreeMap::new(),
                properties: serde_json::Value::Object(serde_json::Map::new()),
                interest_radius: None,
                tick: 0,
                inserted_at: DateTime::<Utc>::UNIX_EPOCH,
                updated_at: DateTime::<Utc>::UNIX_EPOCH,
            },
            seq: 0,
            epoch: String::new(),
            sessions: BTreeMap::new(),
            positions: BTreeMap::new(),
            reservations: BTreeMap::new(),
            grid: Grid::default(),
            lifecycle: Lifecycle::Absent,
            recent: Recent::default(),
            broadcasts: None,
        }
    }

    /// Zone `id` rebuilt from its whole log, `zone_created` first: the state those events left.
    pub fn replay<'a>(
        id: Uuid,
        events: impl IntoIterator<Item = &'a ZoneEvent>,
    ) -> Result<Self, ApplyError> {
        let mut state = Self::absent(id);
        for event in events {
            state.apply(event)?;
        }
        Ok(state)
    }

    pub fn from_snapshot(snapshot: ZoneSnapshot) -> Self {
        let sessions: BTreeMap<SessionKey, DateTime<Utc>> = snapshot
            .sessions
            .into_iter()
            .map(|s| {
                (
                    SessionKey {
                        connection: s.connection,
                        agent_id: s.agent_id,
                    },
                    s.joined_at,
                )
            })
            .collect();
        let mut zone = snapshot.zone;
        zone.active_session_count = sessions.len() as u32;
        let mut grid = Grid::default();
        grid.set_radius(zone.interest_radius);
        for key in sessions.keys() {
            if let Some(p) = snapshot.positions.get(&key.agent_id) {
                grid.place(&key.agent_id, *p);
            }
        }
        Self {
            zone,
            seq: snapshot.seq,
            epoch: snapshot.epoch,
            sessions,
            grid,
            positions: snapshot.positions,
            reservations: snapshot
                .reservations
                .into_iter()
                .map(|r| (r.reservation, r))
                .collect(),
            lifecycle: if snapshot.deleted {
                Lifecycle::Deleted
            } else {
                Lifecycle::Live
            },
            recent: Recent::default(),
            broadcasts: None,
        }
    }

    pub fn snapshot(&self) -> ZoneSnapshot {
        ZoneSnapshot {
            zone: self.zone.clone(),
            seq: self.seq,
            epoch: self.epoch.clone(),
            sessions: self
                .sessions
                .iter()
                .map(|(k, at)| Session {
                    connection: k.connection.clone(),
                    agent_id: k.agent_id.clone(),
                    joined_at: *at,
                })
                .collect(),
            deleted: self.lifecycle == Lifecycle::Deleted,
            positions: self.positions.clone(),
            reservations: self.reservations.values().cloned().collect(),
        }
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    pub fn id(&self) -> Uuid {
        self.zone.id
    }

    /// The seq of the last event applied (0 before any).
    pub fn seq(&self) -> u64 {
        self.seq
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Starts a new history, named `epoch`: what came before can no longer be replayed to a
    /// client.
    pub fn reset_epoch(&mut self, epoch: String) {
        self.epoch = epoch;
    }

    pub fn is_deleted(&self) -> bool {
        self.lifecycle == Lifecycle::Deleted
    }

    /// Whether the zone has been created and not deleted.
    pub fn exists(&self) -> bool {
        self.lifecycle == Lifecycle::Live
    }

    pub fn sessions(&self) -> impl Iterator<Item = (&SessionKey, &DateTime<Utc>)> {
        self.sessions.iter()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The places taken at `now`: sessions, and the places reservations hold until they expire.
    pub fn places_taken(&self, now: DateTime<Utc>) -> usize {
        self.sessions.len()
            + self
                .reservations
                .values()
                .filter(|r| r.live_at(now))
                .map(Reservation::places)
                .sum::<usize>()
    }

    /// The reservations held (an expired one until the next event).
    pub fn reservations(&self) -> impl Iterator<Item = &Reservation> {
        self.reservations.values()
    }

    /// An agent's last position here, if it has moved (or arrived with one).
    pub fn position(&self, agent_id: &str) -> Option<Position> {
        self.positions.get(agent_id).copied()
    }

    /// The agents present, each once, in order.
    pub fn agents(&self) -> Vec<String> {
        let agents: BTreeSet<&str> = self.sessions.keys().map(|k| k.agent_id.as_str()).collect();
        agents.into_iter().map(str::to_owned).collect()
    }

    pub fn view(&self) -> ZoneView {
        ZoneView {
            zone: self.zone.clone(),
            agents: self.agents(),
            seq: self.seq,
            epoch: self.epoch.clone(),
            in_view: None,
        }
    }

    /// Whether `agent` holds a session here.
    fn present(&self, agent: &str) -> bool {
        self.grid.position(agent).is_some() || self.sessions.keys().any(|k| k.agent_id == agent)
    }

    /// The agents within the radius of `agent` (none if it has no position), or `None` in a zone
    /// without a radius.
    pub fn in_view(&self, agent: &str) -> Option<Vec<InView>> {
        self.zone.interest_radius?;
        let Some(position) = self.grid.position(agent) else {
            return Some(Vec::new());
        };
        Some(
            self.grid
                .near(position, agent)
                .into_iter()
                .map(|(a, p)| InView {
                    agent_id: a.to_owned(),
                    position: p,
                })
                .collect(),
        )
    }

    /// Whom `kind` reaches and whose views it changes, decided on the state before it applies;
    /// `None` when it is for everyone and changes no view.
    fn view_of(&self, kind: &EventKind) -> Option<View> {
        let radius = self.zone.interest_radius;
        let names = |near: &[(&str, Position)]| near.iter().map(|(a, _)| (*a).to_owned()).collect();
        match kind {
            EventKind::ZoneUpdated(u) => {
                let to = u.interest_radius?;
                Some(View {
                    regrid: Some(Regrid {
                        from: radius,
                        to,
                        placed: self.grid.placed(),
                    }),
                    ..View::default()
                })
            }
            _ if radius.is_none() => None,
            EventKind::AgentMoved(m) => {
                let x = m.agent_id.as_str();
                let after = self.grid.near(m.position, x);
                let mut view = View {
                    audience: Some(names(&after)),
                    ..View::default()
                };
                if self.present(x) {
                    let before = match self.grid.position(x) {
                        Some(old) => self.grid.near(old, x),
                        None => Vec::new(),
                    };
                    let was: BTreeSet<&str> = before.iter().map(|(a, _)| *a).collect();
                    let is: BTreeSet<&str> = after.iter().map(|(a, _)| *a).collect();
                    for (y, at) in after.iter().filter(|(y, _)| !was.contains(y)) {
                        view.entered.push(Seen {
                            watcher: x.to_owned(),
                            agent_id: (*y).to_owned(),
                            position: *at,
                        });
                        view.entered.push(Seen {
                            watcher: (*y).to_owned(),
                            agent_id: x.to_owned(),
                            position: m.position,
                        });
                    }
                    for (y, _) in before.iter().filter(|(y, _)| !is.contains(y)) {
                        view.left.push(Unseen {
                            watcher: x.to_owned(),
                            agent_id: (*y).to_owned(),
                        });
                        view.left.push(Unseen {
                            watcher: (*y).to_owned(),
                            agent_id: x.to_owned(),
                        });
                    }
                }
                Some(view)
            }
            EventKind::AgentInteraction(i) => {
                let near = match self.grid.position(&i.agent_id) {
                    Some(p) => self.grid.near(p, &i.agent_id),
                    None => Vec::new(),
                };
                Some(View {
                    audience: Some(names(&near)),
                    ..View::default()
                })
            }
            EventKind::AgentEntered(p) => {
                if self.grid.position(&p.agent_id).is_some() {
                    // Another session of an agent already seen.
                    return None;
                }
                let position = p.position.or_else(|| self.position(&p.agent_id))?;
                let near = self.grid.near(position, &p.agent_id);
                if near.is_empty() {
                    return None;
                }
                Some(View {
                    entered: near
                        .iter()
                        .map(|(y, _)| Seen {
                            watcher: (*y).to_owned(),
                            agent_id: p.agent_id.clone(),
                            position,
                        })
                        .collect(),
                    ..View::default()
                })
            }
            _ => None,
        }
    }

    /// The events `command` would cause, or why it is refused. Changes nothing.
    pub fn decide(
        &self,
        command: &ZoneCommand,
        ctx: &Context,
    ) -> Result<Vec<EventKind>, ZoneError> {
        let kind = &command.kind;
        let creation = matches!(kind, CommandKind::CreateZone(_));
        if command.zone_id != self.zone.id
            || self.lifecycle == Lifecycle::Deleted
            || (self.lifecycle == Lifecycle::Absent && !creation)
        {
            return Err(ZoneError::ZoneNotFound(command.zone_id));
        }
        if !allowed(&command.actor, kind) {
            return Err(ZoneError::NotAllowed {
                command: kind.name().to_owned(),
                actor: command.actor.label().to_owned(),
            });
        }
        if creation && self.lifecycle != Lifecycle::Absent {
            return Err(ZoneError::Conflict(format!(
                "zone {} already exists",
                self.zone.id
            )));
        }
        let agent = match &command.actor {
            Actor::Agent {
                agent_id,
                connection,
                permissions,
            } => {
                limits::text(
                    kind.name(),
                    "agent_id",
                    agent_id,
                    limits::MAX_AGENT_ID_BYTES,
                )?;
                limits::text(
                    kind.name(),
                    "connection",
                    connection,
                    limits::MAX_CONNECTION_BYTES,
                )?;
                let key = SessionKey {
                    connection: connection.clone(),
                    agent_id: agent_id.clone(),
                };
                if !matches!(
                    kind,
                    CommandKind::Join
                        | CommandKind::Leave
                        | CommandKind::Arrive { .. }
                        | CommandKind::Depart { .. }
                ) {
                    // No event, and no answer, for an agent without a session here.
                    if !self.sessions.contains_key(&key) {
                        return Err(ZoneError::NotJoined {
                            agent_id: agent_id.clone(),
                        });
                    }
                }
                if let Some(needed) = permission_needed(kind) {
                    self.zone.authorize(*permissions, needed)?;
                }
                Some(key)
            }
            Actor::Admin => {
                if let Some(needed) = permission_needed(kind) {
                    self.zone.authorize_zone(needed)?;
                }
                None
            }
            Actor::Service { agent_id } => {
                if let Some(agent_id) = agent_id {
                    limits::text(
                        kind.name(),
                        "agent_id",
                        agent_id,
                        limits::MAX_AGENT_ID_BYTES,
                    )?;
                } else if matches!(
                    kind,
                    CommandKind::AgentMove { .. } | CommandKind::AgentInteract { .. }
                ) {
                    return Err(ZoneError::invalid(
                        kind.name(),
                        "agent_id is required: the agent the service acts for",
                    ));
                }
                if let Some(needed) = permission_needed(kind) {
                    self.zone.authorize_zone(needed)?;
                }
                None
            }
            Actor::System => None,
        };
        let agent_id = match &command.actor {
            Actor::Service { agent_id } => agent_id.clone(),
            _ => agent.as_ref().map(|k| k.agent_id.clone()),
        };
        let now = ctx.now;
        let presence = |key: &SessionKey, session_count: usize| {
            Presence::new(&key.agent_id, &key.connection, session_count as u32, now)
        };
        Ok(match kind {
            CommandKind::CreateZone(spec) => {
                let zone = Zone::create(self.zone.id, (**spec).clone(), now)?;
                vec![EventKind::ZoneCreated(Created {
                    name: zone.name,
                    permissions: zone.permissions,
                    assigned_server: zone.assigned_server,
                    capacity: zone.capacity,
                    resources: zone.resources,
                    properties: zone.properties,
                    // The history it starts is named after its first event.
                    epoch: ctx.ids.nth(0).simple().to_string(),
                    interest_radius: zone.interest_radius,
                })]
            }
            CommandKind::Join => {
                let key = agent.expect("joins come from agents");
                let held = |max: u32| {
                    self.sessions
                        .keys()
                        .filter(|k| k.agent_id == key.agent_id)
                        .count()
                        >= max as usize
                };
                if self.sessions.contains_key(&key) {
                    Vec::new()
                } else if let Some(max) = ctx.max_sessions_per_agent.filter(|&m| held(m)) {
                    return Err(ZoneError::TooManySessions {
                        agent_id: key.agent_id.clone(),
                        max,
                    });
                } else if self.places_taken(now) >= self.zone.capacity as usize {
                    return Err(ZoneError::ZoneFull {
                        capacity: self.zone.capacity,
                    });
                } else {
                    vec![EventKind::AgentEntered(presence(
                        &key,
                        self.sessions.len() + 1,
                    ))]
                }
            }
            CommandKind::Leave => {
                let key = agent.expect("leaves come from agents");
                if self.sessions.contains_key(&key) {
                    vec![EventKind::AgentLeft(presence(
                        &key,
                        self.sessions.len() - 1,
                    ))]
                } else {
                    Vec::new()
                }
            }
            CommandKind::AgentMove { position, sent_at } => {
                if ![position.x, position.y, position.z]
                    .iter()
                    .all(|c| c.is_finite())
                {
                    return Err(ZoneError::invalid(
                        "agent_move",
                        "position coordinates must be finite numbers",
                    ));
                }
                vec![EventKind::AgentMoved(Moved {
                    agent_id: agent_id.unwrap_or_default(),
                    position: *position,
                    sent_at: *sent_at,
                })]
            }
            CommandKind::AgentInteract {
                target_agent_id,
                kind: what,
                data,
            } => {
                let e = "agent_interact";
                limits::text(
                    e,
                    "target_agent_id",
                    target_agent_id,
                    limits::MAX_AGENT_ID_BYTES,
                )?;
                limits::text(e, "kind", what, limits::MAX_NAME_BYTES)?;
                if let Some(data) = data {
                    limits::json(e, "data", data, limits::MAX_DATA_BYTES)?;
                }
                vec![EventKind::AgentInteraction(Interaction {
                    agent_id: agent_id.unwrap_or_default(),
                    target_agent_id: target_agent_id.clone(),
                    kind: what.clone(),
                    data: data.clone(),
                })]
            }
            CommandKind::ConsumeResource {
                resource_type,
                amount,
            } => vec![EventKind::ResourceChanged(self.consume(
                agent_id,
                resource_type,
                *amount,
            )?)],
            CommandKind::BroadcastEvent {
                event_type,
                payload,
            } => {
                check_custom_event_type(event_type)?;
                let payload_json = serde_json::Value::Object(payload.clone());
                limits::json(
                    "broadcast_event",
                    "payload",
                    &payload_json,
                    limits::MAX_DATA_BYTES,
                )?;
                if let Some(limit) = ctx.broadcast_limit
                    && !self.broadcast_allowed(limit, now)
                {
                    return Err(ZoneError::RateLimited {
                        allowed: limit.allowed,
                        interval_ms: limit.interval_ms,
                    });
                }
                vec![EventKind::Custom(Custom {
                    event_type: event_type.clone(),
                    agent_id,
                    payload: payload.clone(),
                })]
            }
            CommandKind::GetZoneState | CommandKind::GetAgents => Vec::new(),
            CommandKind::Tick => {
                let new_resources = self
                    .zone
                    .resources
                    .iter()
                    .map(|(n, r)| (n.clone(), r.amount.saturating_add(r.regen).min(r.max)))
                    .collect();
                vec![EventKind::EnvironmentTick(Tick {
                    tick: self.zone.tick + 1,
                    properties: self.zone.properties.clone(),
                    new_resources,
                    timestamp: now,
                })]
            }
            CommandKind::UpdateZone(patch) => {
                let update = self.patch(patch, now)?;
                if update.is_empty() {
                    Vec::new()
                } else {
                    vec![EventKind::ZoneUpdated(update)]
                }
            }
            CommandKind::ChangePermissions { grant, revoke } => {
                let next = (self.zone.permissions | *grant) - *revoke;
                if next == self.zone.permissions {
                    Vec::new()
                } else {
                    vec![EventKind::ZoneUpdated(ZoneUpdate {
                        permissions: Some(next),
                        ..ZoneUpdate::default()
                    })]
                }
            }
            // Its sessions end with it: one event, which clients see as their channel closing.
            CommandKind::DeleteZone => vec![EventKind::ZoneDeleted(Deleted { timestamp: now })],
            CommandKind::ExpireSessions => self.leave_all(now, ""),
            CommandKind::EndConnections { prefix } => self.leave_all(now, prefix),
            CommandKind::Locate { .. }
            | CommandKind::GetReservation { .. }
            | CommandKind::Applied { .. } => Vec::new(),
            CommandKind::Reserve(reservation) => self.reserve(reservation, now)?,
            CommandKind::Depart {
                agent_id,
                to,
                connections,
                until,
                ..
            } => {
                if now >= *until {
                    return Err(ZoneError::Unavailable(
                        "the place held in the other zone ran out before the agent could leave: ask again".to_owned(),
                    ));
                }
                self.depart(agent.as_ref(), agent_id, *to, connections, now)?
            }
            CommandKind::Arrive {
                reservation,
                connections,
            } => self.arrive(agent.as_ref(), *reservation, connections, ctx)?,
            // The runtime carries a migration out step by step; no zone decides it whole.
            CommandKind::Migrate { .. } => {
                return Err(ZoneError::NotAllowed {
                    command: kind.name().to_owned(),
                    actor: "one zone".to_owned(),
                });
            }
            CommandKind::Release { reservation } => match self.reservations.get(reservation) {
                Some(r) => vec![EventKind::MigrationReleased(Released {
                    reservation: r.reservation,
                    agent_id: r.agent_id.clone(),
                })],
                None => Vec::new(),
            },
        })
    }

    /// Holds places for an agent on its way in, if the zone has them free at `now`.
    fn reserve(
        &self,
        reservation: &Reservation,
        now: DateTime<Utc>,
    ) -> Result<Vec<EventKind>, ZoneError> {
        let e = "reserve";
        limits::text(
            e,
            "agent_id",
            &reservation.agent_id,
            limits::MAX_AGENT_ID_BYTES,
        )?;
        for connection in &reservation.connections {
            limits::text(e, "connection", connection, limits::MAX_CONNECTION_BYTES)?;
        }
        if reservation.from == self.zone.id {
            return Err(ZoneError::SameZone);
        }
        if reservation
            .position
            .is_some_and(|p| ![p.x, p.y, p.z].iter().all(|c| c.is_finite()))
        {
            return Err(ZoneError::invalid(
                e,
                "position coordinates must be finite numbers",
            ));
        }
        if !reservation.live_at(now) {
            return Err(ZoneError::invalid(e, "the reservation has expired already"));
        }
        if self.reservations.contains_key(&reservation.reservation) {
            return Ok(Vec::new());
        }
        if self.places_taken(now) + reservation.places() > self.zone.capacity as usize {
            return Err(ZoneError::ZoneFull {
                capacity: self.zone.capacity,
            });
        }
        Ok(vec![EventKind::MigrationReserved(reservation.clone())])
    }

    /// Ends an agent's sessions for a move to zone `to`: the acting agent's own session, or
    /// the runtime's pick among `agent_id`'s (every one when `connections` is empty).
    fn depart(
        &self,
        actor: Option<&SessionKey>,
        agent_id: &str,
        to: Uuid,
        connections: &[String],
        now: DateTime<Utc>,
    ) -> Result<Vec<EventKind>, ZoneError> {
        if to == self.zone.id {
            return Err(ZoneError::SameZone);
        }
        let leaving: Vec<&SessionKey> = match actor {
            Some(key) if key.agent_id == agent_id && self.sessions.contains_key(key) => vec![key],
            Some(_) => Vec::new(),
            None => self
                .sessions
                .keys()
                .filter(|k| {
                    k.agent_id == agent_id
                        && (connections.is_empty() || connections.contains(&k.connection))
                })
                .collect(),
        };
        if leaving.is_empty() {
            return Err(ZoneError::NotInZone {
                agent_id: agent_id.to_owned(),
            });
        }
        let mut left = self.sessions.len();
        Ok(leaving
            .into_iter()
            .map(|key| {
                left -= 1;
                EventKind::AgentLeft(Presence {
                    reason: Some("migrated".to_owned()),
                    to: Some(to),
                    ..Presence::new(&key.agent_id, &key.connection, left as u32, now)
                })
            })
            .collect())
    }

    /// Turns a live reservation into sessions: the acting agent's (a ticket's join), or the
    /// reservation's connections (a service's agent, moved by the runtime).
    fn arrive(
        &self,
        actor: Option<&SessionKey>,
        id: Uuid,
        only: &[String],
        ctx: &Context,
    ) -> Result<Vec<EventKind>, ZoneError> {
        let invalid = |why: &str| Err(ZoneError::InvalidTicket(why.to_owned()));
        let Some(reservation) = self.reservations.get(&id) else {
            return invalid("no place is held for it here (used, released or never made)");
        };
        if !reservation.live_at(ctx.now) {
            return invalid("it has expired");
        }
        let keys: Vec<SessionKey> = match actor {
            Some(key) => {
                if key.agent_id != reservation.agent_id {
                    return invalid("it was issued to another agent");
                }
                if !reservation.connections.is_empty() {
                    return invalid("the place is held for a service's agent");
                }
                if self.sessions.contains_key(key) {
                    return invalid("this connection has a session here already");
                }
                if let Some(max) = ctx.max_sessions_per_agent {
                    let held = self.sessions.keys().filter(|k| k.agent_id == key.agent_id);
                    if held.count() >= max as usize {
                        return Err(ZoneError::TooManySessions {
                            agent_id: key.agent_id.clone(),
                            max,
                        });
                    }
                }
                vec![key.clone()]
            }
            None => reservation
                .connections
                .iter()
                .filter(|connection| only.is_empty() || only.contains(connection))
                .map(|connection| SessionKey {
                    connection: connection.clone(),
                    agent_id: reservation.agent_id.clone(),
                })
                .filter(|key| !self.sessions.contains_key(key))
                .collect(),
        };
        // Nothing left to arrive (its sessions are here already): the place goes back now.
        if keys.is_empty() {
            return Ok(vec![EventKind::MigrationReleased(Released {
                reservation: reservation.reservation,
                agent_id: reservation.agent_id.clone(),
            })]);
        }
        let mut count = self.sessions.len();
        Ok(keys
            .into_iter()
            .map(|key| {
                count += 1;
                EventKind::AgentEntered(Presence {
                    from: Some(reservation.from),
                    position: reservation.position,
                    reservation: Some(reservation.reservation),
                    ..Presence::new(&key.agent_id, &key.connection, count as u32, ctx.now)
                })
            })
            .collect())
    }

    fn consume(
        &self,
        agent_id: Option<String>,
        resource_type: &str,
        amount: i64,
    ) -> Result<ResourceChange, ZoneError> {
        if amount <= 0 {
            return Err(ZoneError::invalid(
                "consume_resource",
                format!("amount must be a whole number above 0, not {amount}"),
            ));
        }
        let resource = self
            .zone
            .resources
            .get(resource_type)
            .ok_or_else(|| ZoneError::UnknownResource(resource_type.to_owned()))?;
        let result = resource.amount.saturating_sub(amount);
        if result < 0 {
            return Err(ZoneError::InsufficientResources {
                resource: resource_type.to_owned(),
                available: resource.amount,
                change: -amount,
                result,
            });
        }
        let mut new_resources = self.zone.amounts();
        new_resources.insert(resource_type.to_owned(), result);
        Ok(ResourceChange {
            agent_id,
            changes: BTreeMap::from([(resource_type.to_owned(), -amount)]),
            new_resources,
        })
    }

    fn patch(&self, patch: &ZonePatch, now: DateTime<Utc>) -> Result<ZoneUpdate, ZoneError> {
        let mut update = ZoneUpdate::default();
        if let Some(name) = &patch.name {
            let name = check_name(name)?;
            if name != self.zone.name {
                update.name = Some(name);
            }
        }
        if let Some(capacity) = patch.capacity {
            check_capacity(capacity)?;
            // Sessions and the places held for agents on their way in.
            let taken = self.places_taken(now);
            if (capacity as usize) < taken {
                return Err(ZoneError::Conflict(format!(
                    "{taken} places are taken (sessions and reservations): capacity cannot go below that"
                )));
            }
            if capacity != self.zone.capacity {
                update.capacity = Some(capacity);
            }
        }
        if let Some(properties) = &patch.properties {
            check_properties(properties)?;
            if *properties != self.zone.properties {
                update.properties = Some(properties.clone());
            }
        }
        if let Some(server) = &patch.assigned_server {
            let server = check_server(server)?;
            if server != self.zone.assigned_server {
                update.assigned_server = Some(server);
            }
        }
        if let Some(radius) = patch.interest_radius {
            check_interest_radius(radius)?;
            if radius != self.zone.interest_radius {
                update.interest_radius = Some(radius);
            }
        }
        Ok(update)
    }

    /// Ends the sessions of the connections whose names start with `prefix`.
    fn leave_all(&self, now: DateTime<Utc>, prefix: &str) -> Vec<EventKind> {
        let mut left = self.sessions.len();
        self.sessions
            .keys()
            .filter(|key| key.connection.starts_with(prefix))
            .map(|key| {
                left -= 1;
                EventKind::AgentLeft(Presence::new(
                    &key.agent_id,
                    &key.connection,
                    left as u32,
                    now,
                ))
            })
            .collect()
    }

    fn broadcast_allowed(&self, limit: BroadcastLimit, now: DateTime<Utc>) -> bool {
        match self.broadcasts {
            Some((start, used)) if !window_over(start, limit, now) => used < limit.allowed,
            _ => limit.allowed > 0,
        }
    }

    fn count_broadcast(&mut self, limit: BroadcastLimit, now: DateTime<Utc>) {
        self.broadcasts = match self.broadcasts {
            Some((start, used)) if !window_over(start, limit, now) => Some((start, used + 1)),
            _ => Some((now, 1)),
        };
    }

    /// Applies one event: the state it leaves is the state the event left live. Refuses events
    /// for another zone and events that do not come after the current seq (a log replayed out
    /// of order); a seq further ahead is taken as it is (events lost in a crash leave a gap).
    pub fn apply(&mut self, event: &ZoneEvent) -> Result<(), ApplyError> {
        if event.zone_id != self.zone.id {
            return Err(ZoneError::WrongZone {
                event: event.id,
                event_zone: event.zone_id,
                zone: self.zone.id,
            });
        }
        if event.seq <= self.seq {
            return Err(ZoneError::OutOfOrder {
                seq: event.seq,
                current: self.seq,
            });
        }
        let creation = matches!(event.kind, EventKind::ZoneCreated(_));
        if creation != (self.lifecycle == Lifecycle::Absent) {
            return Err(ZoneError::OutOfLife {
                event: event.kind.name().to_owned(),
                zone: self.zone.id,
            });
        }
        let amounts = match &event.kind {
            EventKind::ResourceChanged(c) => Some(&c.new_resources),
            EventKind::EnvironmentTick(t) => Some(&t.new_resources),
            _ => None,
        };
        if let Some(unknown) =
            amounts.and_then(|a| a.keys().find(|n| !self.zone.resources.contains_key(*n)))
        {
            return Err(ZoneError::UnknownResource(unknown.clone()));
        }
        // Checked above: nothing below can fail, so an event is applied whole or not at all.
        match &event.kind {
            EventKind::ZoneCreated(c) => {
                self.zone = Zone {
                    id: self.zone.id,
                    name: c.name.clone(),
                    permissions: c.permissions,
                    assigned_server: c.assigned_server.clone(),
                    active_session_count: 0,
                    capacity: c.capacity,
                    resources: c.resources.clone(),
                    properties: c.properties.clone(),
                    interest_radius: c.interest_radius,
                    tick: 0,
                    inserted_at: event.occurred_at,
                    updated_at: event.occurred_at,
                };
                self.epoch.clone_from(&c.epoch);
                self.grid.set_radius(c.interest_radius);
                self.lifecycle = Lifecycle::Live;
            }
            EventKind::AgentEntered(p) => {
                self.sessions.insert(
                    SessionKey {
                        connection: p.connection.clone(),
                        agent_id: p.agent_id.clone(),
                    },
                    p.timestamp,
                );
                if let Some(id) = p.reservation {
                    self.reservations.remove(&id);
                }
                if let Some(position) = p.position {
                    self.positions.insert(p.agent_id.clone(), position);
                }
                if let Some(position) = self.position(&p.agent_id) {
                    self.grid.place(&p.agent_id, position);
                }
            }
            EventKind::AgentLeft(p) => {
                self.sessions.remove(&SessionKey {
                    connection: p.connection.clone(),
                    agent_id: p.agent_id.clone(),
                });
                if !self.sessions.keys().any(|k| k.agent_id == p.agent_id) {
                    self.grid.remove(&p.agent_id);
                }
            }
            EventKind::ResourceChanged(c) => self.set_amounts(&c.new_resources),
            EventKind::EnvironmentTick(t) => {
                self.set_amounts(&t.new_resources);
                self.zone.tick = t.tick;
            }
            EventKind::ZoneUpdated(u) => {
                let z = &mut self.zone;
                if let Some(name) = &u.name {
                    z.name.clone_from(name);
                }
                if let Some(capacity) = u.capacity {
                    z.capacity = capacity;
                }
                if let Some(properties) = &u.properties {
                    z.properties.clone_from(properties);
                }
                if let Some(server) = &u.assigned_server {
                    z.assigned_server.clone_from(server);
                }
                if let Some(permissions) = u.permissions {
                    z.permissions = permissions;
                }
                if let Some(radius) = u.interest_radius {
                    z.interest_radius = radius;
                    self.grid.set_radius(radius);
                }
            }
            EventKind::ZoneDeleted(_) => {
                self.grid.clear();
                self.sessions.clear();
                self.reservations.clear();
                self.lifecycle = Lifecycle::Deleted;
            }
            EventKind::AgentMoved(m) => {
                self.positions.insert(m.agent_id.clone(), m.position);
                if self.present(&m.agent_id) {
                    self.grid.place(&m.agent_id, m.position);
                }
            }
            EventKind::MigrationReserved(r) => {
                self.reservations.insert(r.reservation, r.clone());
            }
            EventKind::MigrationReleased(r) => {
                self.reservations.remove(&r.reservation);
            }
            EventKind::AgentInteraction(_) | EventKind::Custom(_) => {}
        }
        // Expired reservations hold nothing: forgotten at the first event after their expiry,
        // live and in replay alike.
        self.reservations
            .retain(|_, r| r.live_at(event.occurred_at));
        self.zone.active_session_count = self.sessions.len() as u32;
        self.zone.updated_at = event.occurred_at;
        self.seq = event.seq;
        if let Some(id) = event.command_id {
            self.recent.remember(id, Ok(event.seq));
        }
        Ok(())
    }

    fn set_amounts(&mut self, amounts: &BTreeMap<String, i64>) {
        for (name, amount) in amounts {
            if let Some(r) = self.zone.resources.get_mut(name) {
                r.amount = *amount;
            }
        }
    }

    /// Remembers a command the log shows applied (its last event at `seq`) before the snapshot
    /// this state was loaded from: delivered again after a restart, it is answered, not applied.
    pub fn remember_applied(&mut self, command_id: Uuid, seq: u64) {
        self.recent.remember(command_id, Ok(seq));
    }

    /// The seq the zone was at once command `id` was applied (its last event's), if it
    /// remembers the command applied.
    pub fn applied_at(&self, id: &Uuid) -> Option<u64> {
        match self.recent.get(id) {
            Some(Ok(seq)) => Some(*seq),
            _ => None,
        }
    }

    /// Decides `command`, numbers and applies the events it causes, and remembers its id. A
    /// command whose id was seen before gets its first outcome again and changes nothing.
    pub fn execute(&mut self, command: &ZoneCommand, ctx: &Context) -> Outcome {
        let remembered = if command.kind.is_query() {
            None
        } else {
            self.recent.get(&command.id).cloned()
        };
        let result = match remembered {
            Some(Err(refusal)) => Err(refusal),
            Some(Ok(_)) => Ok(Accepted {
                events: Vec::new(),
                answer: self.with_in_view(
                    self.recent
                        .answers
                        .get(&command.id)
                        .cloned()
                        .unwrap_or_else(|| self.answer(&command.kind, ctx.now)),
                    &command.actor,
                ),
                duplicate: true,
            }),
            None => match self.decide(command, ctx) {
                Err(refusal) => {
                    // Rate limits pass with time: a later redelivery may be accepted.
                    if !matches!(
                        refusal,
                        ZoneError::RateLimited { .. } | ZoneError::NotJoined { .. }
                    ) {
                        self.recent.remember(command.id, Err(refusal.clone()));
                    }
                    Err(refusal)
                }
                Ok(kinds) => {
                    let mut events: Vec<ZoneEvent> = Vec::with_capacity(kinds.len());
                    for (i, kind) in kinds.into_iter().enumerate() {
                        // Each event's audience is decided on the state the events before it
                        // left.
                        let event = ZoneEvent {
                            id: ctx.ids.nth(i),
                            zone_id: self.zone.id,
                            seq: self.seq + 1,
                            command_id: Some(command.id),
                            view: self.view_of(&kind).map(Box::new),
                            kind,
                            occurred_at: ctx.now,
                        };
                        self.apply(&event)
                            .expect("decide only produces events that apply accepts");
                        events.push(event);
                    }
                    if let (CommandKind::BroadcastEvent { .. }, Some(limit)) =
                        (&command.kind, ctx.broadcast_limit)
                    {
                        self.count_broadcast(limit, ctx.now);
                    }
                    // A command that changed nothing is remembered too: a leave delivered again
                    // after a new join must not end the new session.
                    if events.is_empty() && !command.kind.is_query() {
                        self.recent.remember(command.id, Ok(self.seq));
                    }
                    let answer = match &command.kind {
                        // What it ended, for a retry to be told the same.
                        CommandKind::Depart { agent_id, .. } => Answer::Located(Located {
                            connections: events
                                .iter()
                                .filter_map(|e| match &e.kind {
                                    EventKind::AgentLeft(p) => Some(p.connection.clone()),
                                    _ => None,
                                })
                                .collect(),
                            position: self.position(agent_id),
                        }),
                        kind => self.answer(kind, ctx.now),
                    };
                    let answer = self.with_in_view(answer, &command.actor);
                    if matches!(answer, Answer::Resources(_) | Answer::Located(_)) {
                        self.recent.answers.insert(command.id, answer.clone());
                    }
                    Ok(Accepted {
                        events,
                        answer,
                        duplicate: false,
                    })
                }
            },
        };
        Outcome {
            command_id: command.id,
            result,
        }
    }

    /// A join's answer with what its agent sees.
    fn with_in_view(&self, answer: Answer, actor: &Actor) -> Answer {
        match (answer, actor) {
            (Answer::Joined(mut view), Actor::Agent { agent_id, .. }) => {
                view.in_view = self.in_view(agent_id);
                Answer::Joined(view)
            }
            (answer, _) => answer,
        }
    }

    /// What an accepted `kind` is answered, at `now` (a reservation expired by then is no
    /// longer held, even before an event forgets it).
    fn answer(&self, kind: &CommandKind, now: DateTime<Utc>) -> Answer {
        let held = |id: &Uuid| {
            self.reservations
                .get(id)
                .filter(|r| r.live_at(now))
                .cloned()
                .map(Box::new)
        };
        match kind {
            CommandKind::Join | CommandKind::Arrive { .. } => Answer::Joined(Box::new(self.view())),
            // A departure remembered from the log: what it ended is in its reservation.
            CommandKind::Depart { agent_id, .. } => Answer::Located(Located {
                connections: Vec::new(),
                position: self.position(agent_id),
            }),
            CommandKind::Locate { agent_id } => Answer::Located(Located {
                connections: self
                    .sessions
                    .keys()
                    .filter(|k| &k.agent_id == agent_id)
                    .map(|k| k.connection.clone())
                    .collect(),
                position: self.position(agent_id),
            }),
            CommandKind::GetReservation { reservation } => Answer::Reservation(held(reservation)),
            CommandKind::Reserve(r) => Answer::Reservation(held(&r.reservation)),
            CommandKind::Applied { command } => Answer::Applied(self.applied_at(command).is_some()),
            CommandKind::GetZoneState
            | CommandKind::CreateZone(_)
            | CommandKind::UpdateZone(_)
            | CommandKind::ChangePermissions { .. } => Answer::State(Box::new(self.view())),
            CommandKind::ConsumeResource { .. } => Answer::Resources(self.zone.amounts()),
            CommandKind::GetAgents => Answer::Sessions {
                seq: self.seq,
                sessions: self.snapshot().sessions,
            },
            _ => Answer::Done,
        }
    }
}

fn window_over(start: DateTime<Utc>, limit: BroadcastLimit, now: DateTime<Utc>) -> bool {
    let interval =
        chrono::Duration::milliseconds(i64::try_from(limit.interval_ms).unwrap_or(i64::MAX));
    now.signed_duration_since(start) >= interval
}

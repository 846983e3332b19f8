//! The zone: a living space that agents enter and leave, with permissions, resources that are
//! consumed and regenerate on a tick, and free-form properties.
//!
//! Every operation either returns the event it caused, having changed the zone, or returns a
//! [`ZoneError`] and changes nothing. [`Zone::apply`] replays an event onto a zone, which is how
//! the audit log rebuilds the state that was live.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::error::ZoneError;
use super::event::{
    EventKind, Interaction, Moved, Position, Presence, ResourceChange, Tick, ZoneEvent,
};
use super::permissions::Permissions;

/// One resource's stock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    pub amount: i64,
    pub max: i64,
    /// Added each tick, up to `max`.
    pub regen: i64,
}

/// A zone, as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Zone {
    pub id: Uuid,
    pub name: String,
    pub permissions: Permissions,
    /// The node that owns the zone.
    pub assigned_server: String,
    pub active_session_count: u32,
    pub capacity: u32,
    pub resources: BTreeMap<String, Resource>,
    /// Free JSON (always an object).
    pub properties: Value,
    /// Environment ticks so far.
    #[serde(skip)]
    pub tick: u64,
    pub inserted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a new zone is made from; everything but the name has a default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewZone {
    pub name: String,
    #[serde(default)]
    pub capacity: Option<u32>,
    #[serde(default)]
    pub permissions: Option<Permissions>,
    #[serde(default)]
    pub resources: BTreeMap<String, Resource>,
    #[serde(default)]
    pub properties: Option<Value>,
    #[serde(default)]
    pub assigned_server: Option<String>,
}

/// The current time at the precision every store keeps (microseconds), so that what is stored
/// is exactly what comes back.
pub fn now() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// A zone holds this many sessions unless told otherwise.
pub const DEFAULT_CAPACITY: u32 = 100;
/// New zones let agents in and move, and nothing more, unless told otherwise.
pub const DEFAULT_PERMISSIONS: Permissions = Permissions::SPAWN_AGENTS;

fn check_resources(resources: &BTreeMap<String, Resource>) -> Result<(), ZoneError> {
    for (name, r) in resources {
        if name.is_empty() || name.len() > 64 {
            return Err(ZoneError::InvalidZone(format!(
                "resource names must be 1 to 64 characters, not {name:?}"
            )));
        }
        if r.max < 0 || r.amount < 0 || r.amount > r.max || r.regen < 0 {
            return Err(ZoneError::InvalidZone(format!(
                "resource {name:?} needs 0 <= amount <= max and regen >= 0, got amount {}, max {}, regen {}",
                r.amount, r.max, r.regen
            )));
        }
    }
    Ok(())
}

impl Zone {
    /// A new, empty zone on `server`.
    pub fn create(spec: NewZone, server: &str, now: DateTime<Utc>) -> Result<Self, ZoneError> {
        let name = spec.name.trim();
        if name.is_empty() || name.chars().count() > 200 {
            return Err(ZoneError::InvalidZone(
                "the name must be 1 to 200 characters".into(),
            ));
        }
        let capacity = spec.capacity.unwrap_or(DEFAULT_CAPACITY);
        if capacity == 0 {
            return Err(ZoneError::InvalidZone("capacity must be at least 1".into()));
        }
        check_resources(&spec.resources)?;
        let properties = spec.properties.unwrap_or_else(|| Value::Object(Map::new()));
        if !properties.is_object() {
            return Err(ZoneError::InvalidZone(
                "properties must be a JSON object".into(),
            ));
        }
        Ok(Self {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            permissions: spec.permissions.unwrap_or(DEFAULT_PERMISSIONS),
            assigned_server: spec.assigned_server.unwrap_or_else(|| server.to_owned()),
            active_session_count: 0,
            capacity,
            resources: spec.resources,
            properties,
            tick: 0,
            inserted_at: now,
            updated_at: now,
        })
    }

    pub fn has_permission(&self, needed: Permissions) -> bool {
        self.permissions.allows(needed)
    }

    pub fn grant_permission(&mut self, bits: Permissions, now: DateTime<Utc>) -> Permissions {
        self.permissions |= bits;
        self.updated_at = now;
        self.permissions
    }

    pub fn revoke_permission(&mut self, bits: Permissions, now: DateTime<Utc>) -> Permissions {
        self.permissions -= bits;
        self.updated_at = now;
        self.permissions
    }

    /// An agent holding `token` bits may do what needs `needed` here only if both its token and
    /// the zone allow it.
    pub fn authorize(&self, token: Permissions, needed: Permissions) -> Result<(), ZoneError> {
        if !token.allows(needed) {
            return Err(ZoneError::Forbidden {
                needed,
                holder: "the agent's token",
            });
        }
        if !self.permissions.allows(needed) {
            return Err(ZoneError::Forbidden {
                needed,
                holder: "the zone",
            });
        }
        Ok(())
    }

    fn event(&mut self, kind: EventKind, now: DateTime<Utc>) -> ZoneEvent {
        self.updated_at = now;
        ZoneEvent::new(self.id, kind, now)
    }

    pub fn agent_entered(
        &mut self,
        agent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ZoneEvent, ZoneError> {
        if self.active_session_count >= self.capacity {
            return Err(ZoneError::ZoneFull {
                capacity: self.capacity,
            });
        }
        self.active_session_count += 1;
        let presence = Presence {
            agent_id: agent_id.to_owned(),
            session_count: self.active_session_count,
            timestamp: now,
        };
        Ok(self.event(EventKind::AgentEntered(presence), now))
    }

    pub fn agent_left(
        &mut self,
        agent_id: &str,
        now: DateTime<Utc>,
    ) -> Result<ZoneEvent, ZoneError> {
        if self.active_session_count == 0 {
            return Err(ZoneError::NotPresent {
                agent_id: agent_id.to_owned(),
            });
        }
        self.active_session_count -= 1;
        let presence = Presence {
            agent_id: agent_id.to_owned(),
            session_count: self.active_session_count,
            timestamp: now,
        };
        Ok(self.event(EventKind::AgentLeft(presence), now))
    }

    pub fn agent_moved(
        &mut self,
        agent_id: &str,
        position: Position,
        now: DateTime<Utc>,
    ) -> Result<ZoneEvent, ZoneError> {
        self.agent_moved_stamped(agent_id, position, None, now)
    }

    /// As [`agent_moved`](Self::agent_moved), echoing the client's time stamp in the event.
    pub fn agent_moved_stamped(
        &mut self,
        agent_id: &str,
        position: Position,
        sent_at: Option<i64>,
        now: DateTime<Utc>,
    ) -> Result<ZoneEvent, ZoneError> {
        if ![position.x, position.y, position.z]
            .iter()
            .all(|c| c.is_finite())
        {
            return Err(ZoneError::InvalidPayload {
                event_type: "agent_moved".into(),
                reason: "position coordinates must be finite numbers".into(),
            });
        }
        let moved = Moved {
            agent_id: agent_id.to_owned(),
            position,
            sent_at,
        };
        Ok(self.event(EventKind::AgentMoved(moved), now))
    }

    pub fn agent_interaction(
        &mut self,
        agent_id: &str,
        target_agent_id: &str,
        kind: &str,
        data: Option<Value>,
        now: DateTime<Utc>,
    ) -> Result<ZoneEvent, ZoneError> {
        if target_agent_id.is_empty() || kind.is_empty() {
            return Err(ZoneError::InvalidPayload {
                event_type: "agent_interaction".into(),
                reason: "target_agent_id and kind must not be empty".into(),
            });
        }
        let interaction = Interaction {
            agent_id: agent_id.to_owned(),
            target_agent_id: target_agent_id.to_owned(),
            kind: kind.to_owned(),
            data,
        };
        Ok(self.event(EventKind::AgentInteraction(interaction), now))
    }

    /// Applies signed changes (`{"food": -10}` takes ten food), all or nothing: an unknown
    /// resource, a non-integer amount, or a result below 0 or above max refuses the lot.
    pub fn consume_resources(
        &mut self,
        agent_id: Option<&str>,
        changes: &Map<String, Value>,
        now: DateTime<Utc>,
    ) -> Result<ZoneEvent, ZoneError> {
        let mut parsed = BTreeMap::new();
        let mut after = BTreeMap::new();
        for (name, value) in changes {
            let resource = self
                .resources
                .get(name)
                .ok_or_else(|| ZoneError::UnknownResource(name.clone()))?;
            let change = value.as_i64().ok_or_else(|| ZoneError::NonIntegerAmount {
                resource: name.clone(),
                value: value.to_string(),
            })?;
            let current = *after.get(name).unwrap_or(&resource.amount);
            let result =
                current
                    .checked_add(change)
                    .unwrap_or(if change < 0 { i64::MIN } else { i64::MAX });
            if result < 0 {
                return Err(ZoneError::InsufficientResources {
                    resource: name.clone(),
                    available: current,
                    change,
                    result,
                });
            }
            if result > resource.max {
                return Err(ZoneError::OverMaximum {
                    resource: name.clone(),
                    max: resource.max,
                    change,
                    result,
                });
            }
            parsed.insert(name.clone(), change);
            after.insert(name.clone(), result);
        }
        if parsed.is_empty() {
            return Err(ZoneError::InvalidPayload {
                event_type: "resource_changed".into(),
                reason: "no resource changes given".into(),
            });
        }
        for (name, amount) in &after {
            if let Some(r) = self.resources.get_mut(name) {
                r.amount = *amount;
            }
        }
        let change = ResourceChange {
            agent_id: agent_id.map(str::to_owned),
            changes: parsed,
            new_resources: self.amounts(),
        };
        Ok(self.event(EventKind::ResourceChanged(change), now))
    }

    /// Regenerates every resource up to its maximum and advances the environment by one tick.
    pub fn tick(&mut self, now: DateTime<Utc>) -> ZoneEvent {
        for r in self.resources.values_mut() {
            r.amount = r.amount.saturating_add(r.regen).min(r.max);
        }
        self.tick += 1;
        let tick = Tick {
            tick: self.tick,
            properties: self.properties.clone(),
            new_resources: self.amounts(),
            timestamp: now,
        };
        self.event(EventKind::EnvironmentTick(tick), now)
    }

    /// Every resource's current amount.
    pub fn amounts(&self) -> BTreeMap<String, i64> {
        self.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.amount))
            .collect()
    }

    /// Replays an event onto the zone: the state it leaves is the state the event left live.
    pub fn apply(&mut self, event: &ZoneEvent) -> Result<(), ZoneError> {
        if event.zone_id != self.id {
            return Err(ZoneError::WrongZone {
                event: event.id,
                event_zone: event.zone_id,
                zone: self.id,
            });
        }
        match &event.kind {
            EventKind::AgentEntered(p) | EventKind::AgentLeft(p) => {
                self.active_session_count = p.session_count;
            }
            EventKind::ResourceChanged(c) => self.set_amounts(&c.new_resources)?,
            EventKind::EnvironmentTick(t) => {
                self.set_amounts(&t.new_resources)?;
                self.tick = t.tick;
            }
            EventKind::AgentMoved(_) | EventKind::AgentInteraction(_) => {}
        }
        self.updated_at = event.occurred_at;
        Ok(())
    }

    fn set_amounts(&mut self, amounts: &BTreeMap<String, i64>) -> Result<(), ZoneError> {
        if let Some(unknown) = amounts.keys().find(|n| !self.resources.contains_key(*n)) {
            return Err(ZoneError::UnknownResource(unknown.clone()));
        }
        for (name, amount) in amounts {
            if let Some(r) = self.resources.get_mut(name) {
                r.amount = *amount;
            }
        }
        Ok(())
    }
}

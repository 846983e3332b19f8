//! The zone: a living space that agents enter and leave, with permissions, resources that are
//! consumed and regenerate on a tick, and free-form properties. This is the zone's data as the
//! admin API shows it; what changes it, and how, is [`ZoneState`](super::ZoneState)'s business.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::error::{Holder, ZoneError};
use super::limits;
use super::permissions::Permissions;

/// One resource's stock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Resource {
    pub amount: i64,
    pub max: i64,
    /// Added each tick, up to `max`.
    pub regen: i64,
}

/// A zone, as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Set: each agent hears only the moves within this distance of it (see
    /// [`interest`](crate::View)); `null`: every move reaches everyone.
    pub interest_radius: Option<f64>,
    /// Environment ticks so far.
    #[serde(skip)]
    pub tick: u64,
    pub inserted_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a new zone is made from; everything but the name and the server has a default (the
/// admin API fills in its own server when none is given).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewZone {
    /// 1 to 200 characters (trimmed), without NUL.
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200))]
    pub name: String,
    /// How many sessions it holds (100 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 2_147_483_647))]
    pub capacity: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, Resource>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// A JSON object, at most 64 KiB.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub properties: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200))]
    pub assigned_server: Option<String>,
    /// Above 0: each agent hears only the moves within this distance (absent: every move
    /// reaches everyone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0))]
    pub interest_radius: Option<f64>,
}

/// A zone holds this many sessions unless told otherwise.
pub const DEFAULT_CAPACITY: u32 = 100;
/// New zones let agents in and move, and nothing more, unless told otherwise.
pub const DEFAULT_PERMISSIONS: Permissions = Permissions::SPAWN_AGENTS;

fn check_resources(resources: &BTreeMap<String, Resource>) -> Result<(), ZoneError> {
    for (name, r) in resources {
        if name.is_empty() || name.len() > limits::MAX_NAME_BYTES || name.contains('\0') {
            return Err(ZoneError::InvalidZone(format!(
                "resource names must be 1 to 64 characters without NUL, not {name:?}"
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

/// A zone name or server, trimmed: 1 to 200 characters, no NUL. An empty one is an invalid
/// zone; one past the limits, like any string that is, an invalid payload.
fn check_text(field: &str, value: &str) -> Result<String, ZoneError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ZoneError::InvalidZone(format!(
            "{field} must be 1 to 200 characters, without NUL"
        )));
    }
    if value.chars().count() > limits::MAX_ZONE_NAME_CHARS || value.contains('\0') {
        return Err(ZoneError::invalid(
            "zone",
            format!("{field} must be 1 to 200 characters, without NUL"),
        ));
    }
    Ok(value.to_owned())
}

pub(crate) fn check_name(name: &str) -> Result<String, ZoneError> {
    check_text("the name", name)
}

pub(crate) fn check_server(server: &str) -> Result<String, ZoneError> {
    check_text("assigned_server", server)
}

pub(crate) fn check_capacity(capacity: u32) -> Result<(), ZoneError> {
    if capacity == 0 || i32::try_from(capacity).is_err() {
        return Err(ZoneError::InvalidZone(format!(
            "capacity must be 1 to {}",
            i32::MAX
        )));
    }
    Ok(())
}

pub(crate) fn check_interest_radius(radius: Option<f64>) -> Result<(), ZoneError> {
    match radius {
        Some(r) => super::interest::check_radius(r).map_err(ZoneError::InvalidZone),
        None => Ok(()),
    }
}

pub(crate) fn check_properties(properties: &Value) -> Result<(), ZoneError> {
    if !properties.is_object() {
        return Err(ZoneError::InvalidZone(
            "properties must be a JSON object".into(),
        ));
    }
    limits::json(
        "zone",
        "properties",
        properties,
        limits::MAX_PROPERTIES_BYTES,
    )
}

impl Zone {
    /// Zone `id` as `spec` makes it, checked, created at `now`.
    pub fn create(id: Uuid, spec: NewZone, now: DateTime<Utc>) -> Result<Self, ZoneError> {
        let name = check_name(&spec.name)?;
        let capacity = spec.capacity.unwrap_or(DEFAULT_CAPACITY);
        check_capacity(capacity)?;
        check_resources(&spec.resources)?;
        let properties = spec.properties.unwrap_or_else(|| Value::Object(Map::new()));
        check_properties(&properties)?;
        let assigned_server = check_server(spec.assigned_server.as_deref().unwrap_or_default())?;
        check_interest_radius(spec.interest_radius)?;
        Ok(Self {
            id,
            name,
            permissions: spec.permissions.unwrap_or(DEFAULT_PERMISSIONS),
            assigned_server,
            active_session_count: 0,
            capacity,
            resources: spec.resources,
            properties,
            interest_radius: spec.interest_radius,
            tick: 0,
            inserted_at: now,
            updated_at: now,
        })
    }

    pub fn has_permission(&self, needed: Permissions) -> bool {
        self.permissions.allows(needed)
    }

    /// An agent holding `token` bits may do what needs `needed` here only if both its token and
    /// the zone allow it.
    pub fn authorize(&self, token: Permissions, needed: Permissions) -> Result<(), ZoneError> {
        if !token.allows(needed) {
            return Err(ZoneError::Forbidden {
                needed,
                holder: Holder::Token,
            });
        }
        self.authorize_zone(needed)
    }

    /// Whether the zone itself allows `needed` (the admin API holds every bit).
    pub fn authorize_zone(&self, needed: Permissions) -> Result<(), ZoneError> {
        if !self.permissions.allows(needed) {
            return Err(ZoneError::Forbidden {
                needed,
                holder: Holder::Zone,
            });
        }
        Ok(())
    }

    /// Every resource's current amount.
    pub fn amounts(&self) -> BTreeMap<String, i64> {
        self.resources
            .iter()
            .map(|(n, r)| (n.clone(), r.amount))
            .collect()
    }
}

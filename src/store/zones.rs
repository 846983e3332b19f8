//! Zones in the database: what was committed is what comes back after a restart.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError, on_pool};
use crate::zone::{Permissions, Resource, Zone, ZoneError};

#[derive(sqlx::FromRow)]
struct ZoneRow {
    id: Uuid,
    name: String,
    permissions: i32,
    assigned_server: String,
    active_session_count: i32,
    capacity: i32,
    resources: Json<BTreeMap<String, Resource>>,
    properties: Json<Value>,
    tick: i64,
    inserted_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<ZoneRow> for Zone {
    type Error = StoreError;

    fn try_from(r: ZoneRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("zone {}: {what}", r.id));
        Ok(Zone {
            id: r.id,
            name: r.name.clone(),
            permissions: Permissions::from_bits(
                u32::try_from(r.permissions).map_err(|_| corrupt("negative permissions"))?,
            )
            .ok_or_else(|| corrupt("unknown permission bits"))?,
            assigned_server: r.assigned_server.clone(),
            active_session_count: u32::try_from(r.active_session_count)
                .map_err(|_| corrupt("negative session count"))?,
            capacity: u32::try_from(r.capacity).map_err(|_| corrupt("negative capacity"))?,
            resources: r.resources.0,
            properties: r.properties.0,
            tick: u64::try_from(r.tick).map_err(|_| corrupt("negative tick"))?,
            inserted_at: r.inserted_at,
            updated_at: r.updated_at,
        })
    }
}

/// Integers as the schema stores them (INTEGER columns; the zone's values fit by construction).
fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

const COLUMNS: &str = "id, name, permissions, assigned_server, active_session_count, capacity, \
                       resources, properties, tick, inserted_at, updated_at";

/// Binds the zone's id and stored fields, in column order, up to `tick`.
macro_rules! bind_zone {
    ($query:expr, $zone:expr) => {
        $query
            .bind($zone.id)
            .bind(&$zone.name)
            .bind(int($zone.permissions.bits()))
            .bind(&$zone.assigned_server)
            .bind(int($zone.active_session_count))
            .bind(int($zone.capacity))
            .bind(Json(&$zone.resources))
            .bind(Json(&$zone.properties))
            .bind(i64::try_from($zone.tick).unwrap_or(i64::MAX))
    };
}

impl Store {
    pub async fn insert_zone(&self, zone: &Zone) -> Result<(), StoreError> {
        let sql = format!(
            "INSERT INTO zones ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        );
        on_pool!(self.db(), pool => bind_zone!(sqlx::query(&sql), zone)
            .bind(zone.inserted_at)
            .bind(zone.updated_at)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    pub async fn get_zone(&self, id: Uuid) -> Result<Zone, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM zones WHERE id = $1");
        let row: Option<ZoneRow> = on_pool!(self.db(), pool => sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.ok_or(StoreError::Zone(ZoneError::ZoneNotFound(id)))?
            .try_into()
    }

    /// Zones in creation order (their ids are UUID v7), `limit` from `offset`.
    pub async fn list_zones(&self, limit: u32, offset: u64) -> Result<Vec<Zone>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM zones ORDER BY id LIMIT $1 OFFSET $2");
        let rows: Vec<ZoneRow> = on_pool!(self.db(), pool => sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(Zone::try_from).collect()
    }

    /// Writes every field of an existing zone.
    pub async fn save_zone(&self, zone: &Zone) -> Result<(), StoreError> {
        let sql = "UPDATE zones SET name = $2, permissions = $3, assigned_server = $4, \
                   active_session_count = $5, capacity = $6, resources = $7, properties = $8, \
                   tick = $9, updated_at = $10 WHERE id = $1";
        let done = on_pool!(self.db(), pool => bind_zone!(sqlx::query(sql), zone)
            .bind(zone.updated_at)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(ZoneError::ZoneNotFound(zone.id).into());
        }
        Ok(())
    }

    pub async fn delete_zone(&self, id: Uuid) -> Result<(), StoreError> {
        let done = on_pool!(self.db(), pool => sqlx::query("DELETE FROM zones WHERE id = $1")
            .bind(id)
            .execute(pool)
            .await
            .map(|r| r.rows_affected()))?;
        if done == 0 {
            return Err(ZoneError::ZoneNotFound(id).into());
        }
        Ok(())
    }

    pub async fn count_zones(&self) -> Result<u64, StoreError> {
        let n: i64 = on_pool!(self.db(), pool => sqlx::query_scalar("SELECT COUNT(*) FROM zones")
            .fetch_one(pool)
            .await)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

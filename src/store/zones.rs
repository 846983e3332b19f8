//! Zone snapshots: each zone's row holds its state at some `seq` (its settings, resources and
//! sessions), and loading a zone is that snapshot plus the logged events after it.
//!
//! Snapshots only move forward: a write for an older seq than the row's is skipped, so a
//! snapshot retried or delivered late never rolls a zone back.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Backend, Store, StoreError, fence_value, on_pool};
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::zone::{
    Permissions, Position, Reservation, Resource, Session, Zone, ZoneError, ZoneEvent, ZoneSnapshot,
};

#[derive(sqlx::FromRow)]
struct ZoneRow {
    id: Uuid,
    name: String,
    permissions: i32,
    assigned_server: String,
    capacity: i32,
    resources: Json<BTreeMap<String, Resource>>,
    properties: Json<Value>,
    tick: i64,
    inserted_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    seq: i64,
    epoch: String,
    sessions: Json<Vec<Session>>,
    positions: Json<BTreeMap<String, Position>>,
    reservations: Json<Vec<Reservation>>,
    interest_radius: Option<f64>,
}

impl TryFrom<ZoneRow> for ZoneSnapshot {
    type Error = StoreError;

    fn try_from(r: ZoneRow) -> Result<Self, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("zone {}: {what}", r.id));
        let sessions = r.sessions.0;
        Ok(ZoneSnapshot {
            zone: Zone {
                id: r.id,
                name: r.name.clone(),
                permissions: Permissions::from_bits(
                    u32::try_from(r.permissions).map_err(|_| corrupt("negative permissions"))?,
                )
                .ok_or_else(|| corrupt("unknown permission bits"))?,
                assigned_server: r.assigned_server.clone(),
                active_session_count: sessions.len() as u32,
                capacity: u32::try_from(r.capacity).map_err(|_| corrupt("negative capacity"))?,
                resources: r.resources.0,
                properties: r.properties.0,
                interest_radius: r.interest_radius,
                tick: u64::try_from(r.tick).map_err(|_| corrupt("negative tick"))?,
                inserted_at: r.inserted_at,
                updated_at: r.updated_at,
            },
            seq: u64::try_from(r.seq).map_err(|_| corrupt("negative seq"))?,
            epoch: r.epoch,
            sessions,
            deleted: false,
            positions: r.positions.0,
            reservations: r.reservations.0,
        })
    }
}

/// Integers as the schema stores them (the zone's values fit by construction).
fn int(v: u32) -> i32 {
    i32::try_from(v).unwrap_or(i32::MAX)
}

pub(super) fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const COLUMNS: &str = "id, name, permissions, assigned_server, active_session_count, capacity, \
                       resources, properties, tick, seq, epoch, sessions, inserted_at, updated_at, \
                       positions, reservations, interest_radius";

/// Binds a snapshot's columns in `COLUMNS` order, `inserted_at` and `updated_at` excepted.
macro_rules! bind_snapshot {
    ($query:expr, $s:expr) => {
        $query
            .bind($s.zone.id)
            .bind(&$s.zone.name)
            .bind(int($s.zone.permissions.bits()))
            .bind(&$s.zone.assigned_server)
            .bind(int($s.sessions.len() as u32))
            .bind(int($s.zone.capacity))
            .bind(Json(&$s.zone.resources))
            .bind(Json(&$s.zone.properties))
            .bind(big($s.zone.tick))
            .bind(big($s.seq))
            .bind(&$s.epoch)
            .bind(Json(&$s.sessions))
    };
}

impl Store {
    /// Stores a new zone's first snapshot.
    pub async fn insert_zone(&self, snapshot: &ZoneSnapshot) -> Result<(), StoreError> {
        self.create_zone(snapshot, &[]).await
    }

    /// Stores a new zone: its first snapshot and the events that made it (its `zone_created`),
    /// in one transaction, so that the row exists exactly when its creation is in the log.
    pub async fn create_zone(
        &self,
        snapshot: &ZoneSnapshot,
        events: &[ZoneEvent],
    ) -> Result<(), StoreError> {
        self.create_fenced(snapshot, events, None).await
    }

    /// As [`create_zone`](Self::create_zone), by a writer holding the zone's lease with token
    /// `fence`: the row starts with it.
    pub async fn create_fenced(
        &self,
        snapshot: &ZoneSnapshot,
        events: &[ZoneEvent],
        fence: Option<u64>,
    ) -> Result<(), StoreError> {
        let insert = format!(
            "INSERT INTO zones ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        );
        let log = "INSERT INTO audit_events \
                   (id, zone_id, seq, command_id, event_type, payload, occurred_at, recorded_at, view) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING";
        let recorded_at = Utc::now();
        let _turn = self.write_turn().await;
        on_pool!(self.db(), pool => {
            let mut tx = pool.begin().await?;
            bind_snapshot!(sqlx::query(&insert), snapshot)
                .bind(snapshot.zone.inserted_at)
                .bind(snapshot.zone.updated_at)
                .bind(Json(&snapshot.positions))
                .bind(Json(&snapshot.reservations))
                .bind(snapshot.zone.interest_radius)
                .execute(&mut *tx)
                .await?;
            if !events.is_empty() {
                // Created by a writer that holds it from now on.
                sqlx::query("UPDATE zones SET open = TRUE, fence = $2 WHERE id = $1")
                    .bind(snapshot.zone.id)
                    .bind(fence.map_or(0, |f| i64::try_from(f).unwrap_or(i64::MAX)))
                    .execute(&mut *tx)
                    .await?;
            }
            for e in events {
                sqlx::query(log)
                    .bind(e.id)
                    .bind(e.zone_id)
                    .bind(big(e.seq))
                    .bind(e.command_id)
                    .bind(e.name())
                    .bind(Json(&e.kind))
                    .bind(e.occurred_at)
                    .bind(recorded_at)
                    .bind(e.view.as_deref().map(Json))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })?;
        Ok(())
    }

    /// The zone's last snapshot.
    pub async fn get_zone(&self, id: Uuid) -> Result<ZoneSnapshot, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM zones WHERE id = $1");
        let row: Option<ZoneRow> = on_pool!(self.db(), pool => sqlx::query_as(&sql)
            .bind(id)
            .fetch_optional(pool)
            .await)?;
        row.ok_or(StoreError::Zone(ZoneError::ZoneNotFound(id)))?
            .try_into()
    }

    /// Snapshots in creation order (ids are UUID v7), `limit` from `offset`.
    /// A page of zones in id order, those whose name contains `name` (any case) when given.
    pub async fn list_zones(
        &self,
        limit: u32,
        offset: u64,
        name: Option<&str>,
    ) -> Result<Vec<ZoneSnapshot>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM zones WHERE ($3 IS NULL OR lower(name) LIKE $3 ESCAPE '\\') \
             ORDER BY id LIMIT $1 OFFSET $2"
        );
        let rows: Vec<ZoneRow> = on_pool!(self.db(), pool => sqlx::query_as(&sql)
            .bind(i64::from(limit))
            .bind(big(offset))
            .bind(name.map(name_pattern))
            .fetch_all(pool)
            .await)?;
        rows.into_iter().map(ZoneSnapshot::try_from).collect()
    }

    /// Writes snapshots, in one transaction, each unless its row already holds a later one (or
    /// is gone: the zone was deleted). The snapshot of a deleted zone removes its row.
    pub async fn save_snapshots(&self, snapshots: &[&ZoneSnapshot]) -> Result<(), StoreError> {
        let unfenced: Vec<(&ZoneSnapshot, Option<u64>)> =
            snapshots.iter().map(|s| (*s, None)).collect();
        self.save_fenced(&unfenced).await
    }

    /// As [`save_snapshots`](Self::save_snapshots), each snapshot by a writer with the given
    /// fencing token: one whose zone has moved on to a higher token is not written.
    pub async fn save_fenced(
        &self,
        snapshots: &[(&ZoneSnapshot, Option<u64>)],
    ) -> Result<(), StoreError> {
        let update = "UPDATE zones SET name = $2, permissions = $3, assigned_server = $4, \
                      active_session_count = $5, capacity = $6, resources = $7, properties = $8, \
                      tick = $9, seq = $10, epoch = $11, sessions = $12, updated_at = $13, \
                      positions = $15, reservations = $16, interest_radius = $17 \
                      WHERE id = $1 AND (seq < $10 OR (seq = $10 AND epoch <> $11)) AND fence <= $14";
        let remove = "DELETE FROM zones WHERE id = $1 AND fence <= $2";
        let _turn = self.write_turn().await;
        on_pool!(self.db(), pool => {
            let mut tx = pool.begin().await?;
            for (s, fence) in snapshots {
                if s.deleted {
                    sqlx::query(remove)
                        .bind(s.zone.id)
                        .bind(fence_value(*fence))
                        .execute(&mut *tx)
                        .await?;
                } else {
                    bind_snapshot!(sqlx::query(update), s)
                        .bind(s.zone.updated_at)
                        .bind(fence_value(*fence))
                        .bind(Json(&s.positions))
                        .bind(Json(&s.reservations))
                        .bind(s.zone.interest_radius)
                        .execute(&mut *tx)
                        .await?;
                }
            }
            tx.commit().await
        })?;
        Ok(())
    }

    /// Marks zone `id` as held by a writer (until [`close_zones`](Self::close_zones)); says
    /// whether it already was: then the writer before left it without closing it (a crash, or
    /// an owner that lost its lease), and what it broadcast may not all be in the log.
    ///
    /// In a cluster the writer gives its lease's fencing token: the row keeps it, so that every
    /// later write of an earlier holder is refused, and a writer whose token is lower than the
    /// row's is refused itself ([`StoreError::Fenced`]).
    pub async fn open_zone(&self, id: Uuid, fence: Option<u64>) -> Result<bool, StoreError> {
        // The row is locked until the token is in: a former holder's write waits, then fails.
        let read = match self.backend() {
            Backend::Postgres => "SELECT open, fence FROM zones WHERE id = $1 FOR UPDATE",
            Backend::Sqlite => "SELECT open, fence FROM zones WHERE id = $1",
        };
        let _turn = self.write_turn().await;
        let found = on_pool!(self.db(), pool => {
            let mut tx = pool.begin().await?;
            let row: Option<(bool, i64)> = sqlx::query_as(read)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            if let (Some((_, current)), Some(fence)) = (row, fence)
                && u64::try_from(current).unwrap_or(0) > fence
            {
                return Err(StoreError::Fenced {
                    zone: id,
                    fence,
                    current: u64::try_from(current).unwrap_or(0),
                });
            }
            sqlx::query("UPDATE zones SET open = TRUE, fence = CASE WHEN $2 > fence THEN $2 ELSE fence END WHERE id = $1")
                .bind(id)
                .bind(fence.map_or(0, |f| i64::try_from(f).unwrap_or(i64::MAX)))
                .execute(&mut *tx)
                .await?;
            tx.commit().await.map(|()| row)
        })?;
        found
            .map(|(open, _)| open)
            .ok_or(StoreError::Zone(ZoneError::ZoneNotFound(id)))
    }

    /// Marks zones as closed cleanly by their writer: everything it broadcast is in the log.
    /// A writer whose lease has moved on (its token, when given, is lower than the row's)
    /// closes nothing.
    pub async fn close_zones(&self, zones: &[(Uuid, Option<u64>)]) -> Result<(), StoreError> {
        if zones.is_empty() {
            return Ok(());
        }
        let _turn = self.write_turn().await;
        on_pool!(self.db(), pool => {
            let mut tx = pool.begin().await?;
            for (id, fence) in zones {
                sqlx::query("UPDATE zones SET open = FALSE WHERE id = $1 AND fence <= $2")
                    .bind(id)
                    .bind(fence_value(*fence))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        })?;
        Ok(())
    }

    /// Zones whose snapshot holds sessions: after a crash, sessions of connections that are gone.
    pub async fn zones_with_sessions(&self) -> Result<Vec<Uuid>, StoreError> {
        let ids: Vec<Uuid> = on_pool!(self.db(), pool => sqlx::query_scalar(
            "SELECT id FROM zones WHERE active_session_count > 0 ORDER BY id")
            .fetch_all(pool)
            .await)?;
        Ok(ids)
    }

    /// How many zones there are, those whose name contains `name` (any case) when given.
    pub async fn count_zones(&self, name: Option<&str>) -> Result<u64, StoreError> {
        let sql =
            "SELECT COUNT(*) FROM zones WHERE ($1 IS NULL OR lower(name) LIKE $1 ESCAPE '\\')";
        let n: i64 = on_pool!(self.db(), pool => sqlx::query_scalar(sql)
            .bind(name.map(name_pattern))
            .fetch_one(pool)
            .await)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A `LIKE` pattern for names containing `part`, whose own `%`, `_` and `\` match themselves.
fn name_pattern(part: &str) -> String {
    let mut pattern = String::with_capacity(part.len() + 2);
    pattern.push('%');
    for c in part.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

/// A pipeline message carrying a zone snapshot to write.
pub trait Snapshotted: Send + Sync + 'static {
    fn snapshot(&self) -> &ZoneSnapshot;

    /// The fencing token of the writer that took it, in a cluster.
    fn fence(&self) -> Option<u64> {
        None
    }
}

/// The snapshot sink: a batch's snapshots, the newest per zone only, in one transaction.
/// Idempotent: a snapshot older than the row's is skipped.
#[derive(Clone)]
pub struct SnapshotSink {
    store: Store,
}

impl SnapshotSink {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl<T: Snapshotted> BatchSink<T> for SnapshotSink {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<T>],
    ) -> Result<(), Failure> {
        // Coalesced: the newest snapshot of each zone stands for the older ones.
        let mut newest: Vec<(&ZoneSnapshot, Option<u64>)> = Vec::new();
        for m in messages.iter() {
            let s = m.data.snapshot();
            match newest.iter_mut().find(|(n, _)| n.zone.id == s.zone.id) {
                Some(n) if n.0.seq < s.seq => *n = (s, m.data.fence()),
                Some(_) => {}
                None => newest.push((s, m.data.fence())),
            }
        }
        match self.store.save_fenced(&newest).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, zones = newest.len(), "snapshot write failed; will retry");
                Err(Failure::retryable(format!("snapshot write failed: {e}")))
            }
        }
    }
}

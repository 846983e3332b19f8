//! The audit log: every zone event, written a batch per statement, read back in order.
//!
//! Writes are idempotent: an event already in the log (its id) is skipped, so a batch retried
//! after a failure that hid a successful commit never duplicates a row.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::{Db, Store, StoreError, on_pool};
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::zone::{EventKind, ZoneEvent};

#[derive(sqlx::FromRow)]
struct EventRow {
    id: Uuid,
    zone_id: Uuid,
    event_type: String,
    payload: Json<Value>,
    occurred_at: DateTime<Utc>,
}

/// SQLite allows 32,766 bound parameters per statement; six per row.
const SQLITE_ROWS_PER_STATEMENT: usize = 5_000;

impl Store {
    /// Appends events to the audit log in one statement (one transaction), skipping any whose
    /// id is already there. Returns how many rows were new.
    pub async fn append_events(&self, events: &[&ZoneEvent]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        match self.db() {
            Db::Postgres(pool) => {
                let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
                let zones: Vec<Uuid> = events.iter().map(|e| e.zone_id).collect();
                let types: Vec<&str> = events.iter().map(|e| e.event_type().as_str()).collect();
                let payloads: Vec<String> = events
                    .iter()
                    .map(|e| serde_json::to_string(&e.kind).expect("payloads serialise"))
                    .collect();
                let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
                let done = sqlx::query(
                    "INSERT INTO audit_events (id, zone_id, event_type, payload, occurred_at) \
                     SELECT id, zone_id, event_type, payload::jsonb, occurred_at \
                     FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::timestamptz[]) \
                       AS t(id, zone_id, event_type, payload, occurred_at) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(&ids)
                .bind(&zones)
                .bind(&types)
                .bind(&payloads)
                .bind(&times)
                .execute(pool)
                .await?;
                Ok(done.rows_affected())
            }
            Db::Sqlite(pool) => {
                let recorded_at = Utc::now();
                let mut tx = pool.begin().await?;
                let mut inserted = 0;
                for chunk in events.chunks(SQLITE_ROWS_PER_STATEMENT) {
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO audit_events (id, zone_id, event_type, payload, occurred_at, recorded_at) ",
                    );
                    insert.push_values(chunk, |mut row, e| {
                        row.push_bind(e.id)
                            .push_bind(e.zone_id)
                            .push_bind(e.event_type().as_str())
                            .push_bind(Json(&e.kind))
                            .push_bind(e.occurred_at)
                            .push_bind(recorded_at);
                    });
                    insert.push(" ON CONFLICT (id) DO NOTHING");
                    inserted += insert.build().execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                Ok(inserted)
            }
        }
    }

    /// One zone's events in the order they were made: those at or after `since`, after the
    /// event `after` (for paging), at most `limit`.
    pub async fn zone_events(
        &self,
        zone_id: Uuid,
        since: Option<DateTime<Utc>>,
        after: Option<Uuid>,
        limit: Option<u32>,
    ) -> Result<Vec<ZoneEvent>, StoreError> {
        // Built once as text; each backend binds the same values.
        let mut sql = "SELECT id, zone_id, event_type, payload, occurred_at FROM audit_events \
                       WHERE zone_id = $1"
            .to_owned();
        let mut n = 1;
        if since.is_some() {
            n += 1;
            sql.push_str(&format!(" AND occurred_at >= ${n}"));
        }
        if after.is_some() {
            n += 1;
            sql.push_str(&format!(" AND id > ${n}"));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${}", n + 1));
        let limit = limit.map_or(i64::MAX, i64::from);
        let rows: Vec<EventRow> = on_pool!(self.db(), pool => {
            let mut q = sqlx::query_as(&sql).bind(zone_id);
            if let Some(since) = since {
                q = q.bind(since);
            }
            if let Some(after) = after {
                q = q.bind(after);
            }
            q.bind(limit).fetch_all(pool).await
        })?;
        rows.into_iter()
            .map(|r| {
                let kind = EventKind::from_parts(&r.event_type, r.payload.0)
                    .map_err(|e| StoreError::Corrupt(format!("audit event {}: {e}", r.id)))?;
                Ok(ZoneEvent {
                    id: r.id,
                    zone_id: r.zone_id,
                    kind,
                    occurred_at: r.occurred_at,
                })
            })
            .collect()
    }

    /// Rows in the audit log, for one zone or all.
    pub async fn count_events(&self, zone_id: Option<Uuid>) -> Result<u64, StoreError> {
        let n: i64 = match zone_id {
            Some(z) => on_pool!(self.db(), pool => sqlx::query_scalar(
                "SELECT COUNT(*) FROM audit_events WHERE zone_id = $1")
                .bind(z)
                .fetch_one(pool)
                .await)?,
            None => {
                on_pool!(self.db(), pool => sqlx::query_scalar("SELECT COUNT(*) FROM audit_events")
                .fetch_one(pool)
                .await)?
            }
        };
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

/// A pipeline message that may carry a zone event to audit.
pub trait Audited: Send + Sync + 'static {
    fn audited(&self) -> Option<&ZoneEvent>;
}

impl Audited for ZoneEvent {
    fn audited(&self) -> Option<&ZoneEvent> {
        Some(self)
    }
}

/// The audit-log sink: a batcher's batches of zone events, one statement each.
///
/// A failed write fails the whole batch retryably; give its batcher a retry policy with enough
/// attempts to outlast a database restart. Nothing is acknowledged until it is committed.
#[derive(Clone)]
pub struct AuditSink {
    store: Store,
}

impl AuditSink {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl<T: Audited> BatchSink<T> for AuditSink {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<T>],
    ) -> Result<(), Failure> {
        let events: Vec<&ZoneEvent> = messages.iter().filter_map(|m| m.data.audited()).collect();
        match self.store.append_events(&events).await {
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(error = %e, events = events.len(), "audit log write failed; will retry");
                Err(Failure::retryable(format!("audit log write failed: {e}")))
            }
        }
    }
}

//! The audit log: every zone event, written a batch per statement, read back in `seq` order.
//!
//! Writes are idempotent: an event already in the log (its id) is skipped, so a batch retried
//! after a failure that hid a successful commit never duplicates a row. An event the database
//! refuses *as data* (a value it cannot store, a seq already taken by another event) is not
//! retried: its batch is split until that event stands alone, the rest land, and the event goes
//! to `audit_dead_letters` with the database's reason.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use uuid::Uuid;

use super::zones::big;
use super::{Backend, Db, Fence, Store, StoreError, on_pool};
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::sources::Redeliver;
use crate::zone::{EventKind, View, ZoneEvent};

#[derive(sqlx::FromRow)]
struct EventRow {
    id: Uuid,
    zone_id: Uuid,
    seq: i64,
    command_id: Option<Uuid>,
    event_type: String,
    payload: Json<Value>,
    occurred_at: DateTime<Utc>,
    view: Option<Json<View>>,
}

impl TryFrom<EventRow> for ZoneEvent {
    type Error = StoreError;

    fn try_from(r: EventRow) -> Result<Self, StoreError> {
        let corrupt = |e: String| StoreError::Corrupt(format!("audit event {}: {e}", r.id));
        Ok(ZoneEvent {
            id: r.id,
            zone_id: r.zone_id,
            seq: u64::try_from(r.seq).map_err(|_| corrupt("negative seq".into()))?,
            command_id: r.command_id,
            kind: EventKind::from_parts(&r.event_type, r.payload.0)
                .map_err(|e| corrupt(e.to_string()))?,
            occurred_at: r.occurred_at,
            view: r.view.map(|v| Box::new(v.0)),
        })
    }
}

/// An event the log refused as data, kept with the reason.
#[derive(Clone, Debug, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct DeadLetter {
    pub id: Uuid,
    pub zone_id: Uuid,
    pub seq: i64,
    pub event_type: String,
    /// The whole event, as JSON text.
    pub event: String,
    pub reason: String,
    pub failed_at: DateTime<Utc>,
}

/// SQLite allows 32,766 bound parameters per statement; nine per row.
const SQLITE_ROWS_PER_STATEMENT: usize = 3_600;

const EVENT_COLUMNS: &str = "id, zone_id, seq, command_id, event_type, payload, occurred_at, view";

/// The condition on a zone's events (`$1` its id, then `since` and `after_seq` where given), and
/// the number of the last parameter it binds.
fn event_filter(since: Option<DateTime<Utc>>, after_seq: Option<u64>) -> (String, usize) {
    let mut filter = "zone_id = $1".to_owned();
    let mut n = 1;
    if since.is_some() {
        n += 1;
        filter.push_str(&format!(" AND occurred_at >= ${n}"));
    }
    if after_seq.is_some() {
        n += 1;
        filter.push_str(&format!(" AND seq > ${n}"));
    }
    (filter, n)
}

/// Whether the database refused the statement because of the data in it: retrying the same
/// data cannot help.
pub(crate) fn is_data_error(e: &sqlx::Error, backend: Backend) -> bool {
    use sqlx::error::ErrorKind;
    let Some(db) = e.as_database_error() else {
        return matches!(e, sqlx::Error::Encode(_));
    };
    if matches!(
        db.kind(),
        ErrorKind::UniqueViolation
            | ErrorKind::ForeignKeyViolation
            | ErrorKind::NotNullViolation
            | ErrorKind::CheckViolation
    ) {
        return true;
    }
    let Some(code) = db.code() else { return false };
    match backend {
        // SQLSTATE: data exceptions (22…), integrity violations (23…), program limits (54…, a
        // value too large).
        Backend::Postgres => ["22", "23", "54"]
            .iter()
            .any(|class| code.starts_with(class)),
        // SQLite's (extended) result codes: only a value too big or of the wrong type is about
        // the data; I/O, locking and the like are not.
        Backend::Sqlite => code
            .parse::<i32>()
            .is_ok_and(|c| matches!(c & 0xff, 18 | 20)),
    }
}

/// Refuses a write whose claimed token is lower than its zone's row names (a zone whose row is
/// gone was deleted: nothing to check).
fn check_fences(claims: &[Fence], rows: &[(Uuid, i64)]) -> Result<(), StoreError> {
    for (zone, fence) in claims {
        if let Some((_, current)) = rows.iter().find(|(id, _)| id == zone) {
            let current = u64::try_from(*current).unwrap_or(0);
            if current > *fence {
                return Err(StoreError::Fenced {
                    zone: *zone,
                    fence: *fence,
                    current,
                });
            }
        }
    }
    Ok(())
}

/// One multi-row insert of `events` into the SQLite log.
fn sqlite_insert<'a>(
    events: &'a [&'a ZoneEvent],
    recorded_at: DateTime<Utc>,
) -> sqlx::QueryBuilder<'a, sqlx::Sqlite> {
    let mut insert = sqlx::QueryBuilder::new(
        "INSERT INTO audit_events (id, zone_id, seq, command_id, event_type, payload, occurred_at, recorded_at, view) ",
    );
    insert.push_values(events, |mut row, e| {
        row.push_bind(e.id)
            .push_bind(e.zone_id)
            .push_bind(big(e.seq))
            .push_bind(e.command_id)
            .push_bind(e.name())
            .push_bind(Json(&e.kind))
            .push_bind(e.occurred_at)
            .push_bind(recorded_at)
            .push_bind(e.view.as_deref().map(Json));
    });
    insert.push(" ON CONFLICT (id) DO NOTHING");
    insert
}

impl Store {
    /// Appends events to the audit log in one transaction, skipping any whose id is already
    /// there. Returns how many rows were new.
    pub async fn append_events(&self, events: &[&ZoneEvent]) -> Result<u64, StoreError> {
        self.append_fenced(events, &[]).await
    }

    /// As [`append_events`](Self::append_events), by writers holding their zones' leases with
    /// the given fencing tokens: if any of those zones has moved on to a higher token, nothing
    /// is written and the first such zone is named ([`StoreError::Fenced`]). The tokens are
    /// checked in the transaction that inserts, with the zones' rows locked against a new
    /// holder's claim until it commits.
    pub async fn append_fenced(
        &self,
        events: &[&ZoneEvent],
        fences: &[Fence],
    ) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        match self.db() {
            Db::Postgres(pool) => {
                let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
                let zones: Vec<Uuid> = events.iter().map(|e| e.zone_id).collect();
                let seqs: Vec<i64> = events.iter().map(|e| big(e.seq)).collect();
                let commands: Vec<Option<Uuid>> = events.iter().map(|e| e.command_id).collect();
                let types: Vec<&str> = events.iter().map(|e| e.name()).collect();
                let payloads: Vec<String> = events
                    .iter()
                    .map(|e| serde_json::to_string(&e.kind).expect("payloads serialise"))
                    .collect();
                let times: Vec<DateTime<Utc>> = events.iter().map(|e| e.occurred_at).collect();
                let views: Vec<Option<String>> = events
                    .iter()
                    .map(|e| {
                        e.view
                            .as_ref()
                            .map(|v| serde_json::to_string(v).expect("views serialise"))
                    })
                    .collect();
                let insert = sqlx::query(
                    "INSERT INTO audit_events (id, zone_id, seq, command_id, event_type, payload, occurred_at, view) \
                     SELECT id, zone_id, seq, command_id, event_type, payload::jsonb, occurred_at, view::jsonb \
                     FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::uuid[], $5::text[], $6::text[], $7::timestamptz[], $8::text[]) \
                       AS t(id, zone_id, seq, command_id, event_type, payload, occurred_at, view) \
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(&ids)
                .bind(&zones)
                .bind(&seqs)
                .bind(&commands)
                .bind(&types)
                .bind(&payloads)
                .bind(&times)
                .bind(&views);
                if fences.is_empty() {
                    return Ok(insert.execute(pool).await?.rows_affected());
                }
                let mut tx = pool.begin().await?;
                let claimed: Vec<Uuid> = fences.iter().map(|(z, _)| *z).collect();
                let rows: Vec<(Uuid, i64)> =
                    sqlx::query_as("SELECT id, fence FROM zones WHERE id = ANY($1) FOR SHARE")
                        .bind(&claimed)
                        .fetch_all(&mut *tx)
                        .await?;
                check_fences(fences, &rows)?;
                let done = insert.execute(&mut *tx).await?;
                tx.commit().await?;
                Ok(done.rows_affected())
            }
            Db::Sqlite(pool) => {
                let _turn = self.write_turn().await;
                let recorded_at = Utc::now();
                if events.len() <= SQLITE_ROWS_PER_STATEMENT && fences.is_empty() {
                    // One statement is atomic by itself: no BEGIN and COMMIT round trips to the
                    // connection's thread, which cost more than the insert on a busy machine.
                    let done = sqlite_insert(events, recorded_at)
                        .build()
                        .execute(pool)
                        .await?;
                    return Ok(done.rows_affected());
                }
                let mut tx = pool.begin().await?;
                if !fences.is_empty() {
                    let mut read = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                        "SELECT id, fence FROM zones WHERE id IN (",
                    );
                    let mut ids = read.separated(", ");
                    for (zone, _) in fences {
                        ids.push_bind(*zone);
                    }
                    read.push(")");
                    let rows: Vec<(Uuid, i64)> = read.build_query_as().fetch_all(&mut *tx).await?;
                    check_fences(fences, &rows)?;
                }
                let mut inserted = 0;
                for chunk in events.chunks(SQLITE_ROWS_PER_STATEMENT) {
                    inserted += sqlite_insert(chunk, recorded_at)
                        .build()
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                tx.commit().await?;
                Ok(inserted)
            }
        }
    }

    /// Keeps an event the log refused, with the reason. Idempotent on the event's id.
    pub async fn dead_letter(&self, event: &ZoneEvent, reason: &str) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        on_pool!(self.db(), pool => sqlx::query(
            "INSERT INTO audit_dead_letters (id, zone_id, seq, event_type, event, reason, failed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
        )
        .bind(event.id)
        .bind(event.zone_id)
        .bind(big(event.seq))
        .bind(event.name().replace('\0', "\u{FFFD}"))
        .bind(event.to_json())
        .bind(reason.replace('\0', "\u{FFFD}"))
        .bind(Utc::now())
        .execute(pool)
        .await
        .map(|_| ()))?;
        Ok(())
    }

    /// Dead letters, oldest first; one zone's, or all.
    pub async fn dead_letters(
        &self,
        zone_id: Option<Uuid>,
        limit: u32,
        offset: u64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let columns = "id, zone_id, seq, event_type, event, reason, failed_at";
        let rows = match zone_id {
            Some(zone) => on_pool!(self.db(), pool => sqlx::query_as(&format!(
                "SELECT {columns} FROM audit_dead_letters WHERE zone_id = $1 \
                 ORDER BY failed_at, id LIMIT $2 OFFSET $3"))
                .bind(zone)
                .bind(i64::from(limit))
                .bind(big(offset))
                .fetch_all(pool)
                .await)?,
            None => on_pool!(self.db(), pool => sqlx::query_as(&format!(
                "SELECT {columns} FROM audit_dead_letters ORDER BY failed_at, id LIMIT $1 OFFSET $2"))
                .bind(i64::from(limit))
                .bind(big(offset))
                .fetch_all(pool)
                .await)?,
        };
        Ok(rows)
    }

    /// How many dead letters there are: one zone's, or all.
    pub async fn count_dead_letters(&self, zone_id: Option<Uuid>) -> Result<u64, StoreError> {
        self.count_rows("audit_dead_letters", zone_id).await
    }

    /// The rows of `table` (one with a `zone_id` column): one zone's, or all.
    async fn count_rows(&self, table: &str, zone_id: Option<Uuid>) -> Result<u64, StoreError> {
        let filter = if zone_id.is_some() {
            " WHERE zone_id = $1"
        } else {
            ""
        };
        let sql = format!("SELECT COUNT(*) FROM {table}{filter}");
        let n: i64 = on_pool!(self.db(), pool => {
            let mut q = sqlx::query_scalar(&sql);
            if let Some(zone) = zone_id {
                q = q.bind(zone);
            }
            q.fetch_one(pool).await
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// One zone's events in seq order: those at or after `since`, after seq `after_seq`, at
    /// most `limit`.
    pub async fn zone_events(
        &self,
        zone_id: Uuid,
        since: Option<DateTime<Utc>>,
        after_seq: Option<u64>,
        limit: Option<u32>,
    ) -> Result<Vec<ZoneEvent>, StoreError> {
        self.zone_events_from(zone_id, since, after_seq, limit, 0)
            .await
    }

    /// [`zone_events`](Self::zone_events) from the `offset`th of those that match on.
    pub async fn zone_events_from(
        &self,
        zone_id: Uuid,
        since: Option<DateTime<Utc>>,
        after_seq: Option<u64>,
        limit: Option<u32>,
        offset: u64,
    ) -> Result<Vec<ZoneEvent>, StoreError> {
        let (filter, n) = event_filter(since, after_seq);
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM audit_events WHERE {filter} ORDER BY seq LIMIT ${} OFFSET ${}",
            n + 1,
            n + 2
        );
        let limit = limit.map_or(i64::MAX, i64::from);
        let rows: Vec<EventRow> = on_pool!(self.db(), pool => {
            let mut q = sqlx::query_as(&sql).bind(zone_id);
            if let Some(since) = since {
                q = q.bind(since);
            }
            if let Some(after) = after_seq {
                q = q.bind(big(after));
            }
            q.bind(limit).bind(big(offset)).fetch_all(pool).await
        })?;
        rows.into_iter().map(ZoneEvent::try_from).collect()
    }

    /// How many of one zone's events [`zone_events`](Self::zone_events) would page through.
    pub async fn count_zone_events(
        &self,
        zone_id: Uuid,
        since: Option<DateTime<Utc>>,
        after_seq: Option<u64>,
    ) -> Result<u64, StoreError> {
        let (filter, _) = event_filter(since, after_seq);
        let sql = format!("SELECT COUNT(*) FROM audit_events WHERE {filter}");
        let n: i64 = on_pool!(self.db(), pool => {
            let mut q = sqlx::query_scalar(&sql).bind(zone_id);
            if let Some(since) = since {
                q = q.bind(since);
            }
            if let Some(after) = after_seq {
                q = q.bind(big(after));
            }
            q.fetch_one(pool).await
        })?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The ids of the last `limit` commands whose events are logged at or before `seq`, with
    /// the seq of each one's last event, oldest first: what a zone loaded from a snapshot
    /// remembers, so that a command delivered again after a restart is not applied twice.
    pub async fn command_ids_up_to(
        &self,
        zone_id: Uuid,
        seq: u64,
        limit: usize,
    ) -> Result<Vec<(Uuid, u64)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows: Vec<(Uuid, i64)> = on_pool!(self.db(), pool => sqlx::query_as(
            // The newest rows by the (zone, seq) index: a zone's whole log is never read.
            "SELECT command_id, seq FROM audit_events \
             WHERE zone_id = $1 AND seq <= $2 AND command_id IS NOT NULL \
             ORDER BY seq DESC LIMIT $3")
            .bind(zone_id)
            .bind(big(seq))
            .bind(limit)
            .fetch_all(pool)
            .await)?;
        // A command with several events appears once, at its last event.
        let mut seen = std::collections::HashSet::new();
        let mut ids: Vec<(Uuid, u64)> = rows
            .into_iter()
            .filter(|(id, _)| seen.insert(*id))
            .map(|(id, last)| (id, u64::try_from(last).unwrap_or(0)))
            .collect();
        ids.reverse();
        Ok(ids)
    }

    /// Every event of the zone after `seq`, in seq order, the dead-lettered ones included: what
    /// loading a zone replays onto its snapshot.
    pub async fn events_after(
        &self,
        zone_id: Uuid,
        seq: u64,
    ) -> Result<Vec<ZoneEvent>, StoreError> {
        let mut events = self.zone_events(zone_id, None, Some(seq), None).await?;
        let dead: Vec<(String,)> = on_pool!(self.db(), pool => sqlx::query_as(
            "SELECT event FROM audit_dead_letters WHERE zone_id = $1 AND seq > $2 ORDER BY seq")
            .bind(zone_id)
            .bind(big(seq))
            .fetch_all(pool)
            .await)?;
        if !dead.is_empty() {
            for (text,) in dead {
                match ZoneEvent::from_json(&text) {
                    Ok(event) => events.push(event),
                    Err(e) => {
                        tracing::warn!(zone = %zone_id, error = %e, "a dead-lettered event cannot be read back")
                    }
                }
            }
            events.sort_by_key(|e| e.seq);
            events.dedup_by_key(|e| e.seq);
        }
        Ok(events)
    }

    /// Rows in the audit log, for one zone or all.
    pub async fn count_events(&self, zone_id: Option<Uuid>) -> Result<u64, StoreError> {
        self.count_rows("audit_events", zone_id).await
    }

    /// Appends `events`; those the database refuses as data are split out and dead-lettered
    /// while the rest land. A failure that is not about the data is returned as it is.
    pub async fn append_or_dead_letter(
        &self,
        events: &[&ZoneEvent],
    ) -> Result<AppendReport, StoreError> {
        self.append_fenced_or_dead_letter(events, &[]).await
    }

    /// As [`append_or_dead_letter`](Self::append_or_dead_letter), with the writers' fencing
    /// tokens (see [`append_fenced`](Self::append_fenced)).
    pub async fn append_fenced_or_dead_letter(
        &self,
        events: &[&ZoneEvent],
        fences: &[Fence],
    ) -> Result<AppendReport, StoreError> {
        let mut report = AppendReport::default();
        // Halves to try, depth first: a batch with one bad event costs about 2·log2(n) writes.
        let mut pending: Vec<&[&ZoneEvent]> = vec![events];
        while let Some(part) = pending.pop() {
            match self.append_fenced(part, fences).await {
                Ok(n) => report.inserted += n,
                Err(StoreError::Database(e)) if is_data_error(&e, self.backend()) => {
                    if let [event] = part {
                        let reason = e.to_string();
                        tracing::error!(event = %event.id, zone = %event.zone_id, seq = event.seq,
                            %reason, "the audit log refused an event; it is in audit_dead_letters");
                        self.dead_letter(event, &reason).await?;
                        report.dead_lettered += 1;
                    } else {
                        let (a, b) = part.split_at(part.len() / 2);
                        pending.push(b);
                        pending.push(a);
                    }
                }
                Err(other) => return Err(other),
            }
        }
        Ok(report)
    }
}

/// What [`Store::append_or_dead_letter`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AppendReport {
    pub inserted: u64,
    pub dead_lettered: u64,
}

/// A pipeline message that may carry zone events to audit.
pub trait Audited: Send + Sync + 'static {
    fn audited(&self) -> &[ZoneEvent];

    /// The claim of the writer that made the events, in a cluster: its zone and fencing token.
    fn fence(&self) -> Option<Fence> {
        None
    }
}

impl Audited for ZoneEvent {
    fn audited(&self) -> &[ZoneEvent] {
        std::slice::from_ref(self)
    }
}

/// The audit-log sink: a batcher's batches of zone events, one statement each.
///
/// A write that fails for a reason other than the data fails the whole batch retryably; give
/// its batcher a retry policy with enough attempts to outlast a database restart. Events the
/// database refuses as data are dead-lettered, so they never hold their batch-mates back.
/// Events of a writer that has been fenced off (its zone's lease moved on) are not written:
/// their messages fail with [`Redeliver`] (not retried here, where they would be refused again:
/// a broker delivers them again, to be applied by the zone's owner now), and the rest of the
/// batch lands. Nothing is acknowledged until it is committed.
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
        loop {
            let live = |m: &&Message<T>| !m.is_failed();
            let events: Vec<&ZoneEvent> = messages
                .iter()
                .filter(live)
                .flat_map(|m| m.data.audited())
                .collect();
            let mut fences: Vec<Fence> = Vec::new();
            for fence in messages.iter().filter(live).filter_map(|m| m.data.fence()) {
                if !fences.contains(&fence) {
                    fences.push(fence);
                }
            }
            match self
                .store
                .append_fenced_or_dead_letter(&events, &fences)
                .await
            {
                Ok(_) => return Ok(()),
                Err(StoreError::Fenced {
                    zone,
                    fence,
                    current,
                }) => {
                    tracing::warn!(%zone, fence, current, "a fenced-off writer's events are not logged");
                    for m in messages.iter_mut() {
                        if m.data
                            .fence()
                            .is_some_and(|(z, f)| z == zone && f < current)
                        {
                            m.fail(
                                Redeliver(format!(
                                    "fenced: zone {zone}'s lease has moved on to another node"
                                ))
                                .into(),
                            );
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = events.len(), "audit log write failed; will retry");
                    return Err(Failure::retryable(format!("audit log write failed: {e}")));
                }
            }
        }
    }
}

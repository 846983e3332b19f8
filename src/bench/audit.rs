//! `thunderline bench audit`: zone events through the pipeline into the audit log, against a raw
//! bulk load of identical rows (`COPY` on PostgreSQL, one multi-row transaction on SQLite) into
//! a table of the same shape.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use super::BenchError;
use crate::pipeline::{
    Acknowledger, BatcherConfig, Demand, Failure, Message, Pipeline, Processor, ProcessorConfig,
    Produced, Producer, RetryPolicy,
};
use crate::runtime::now;
use crate::store::{AuditSink, Backend, Db, Store};
use crate::zone::{EventKind, Moved, Position, ZoneEvent};

#[derive(Clone, Debug, clap::Args)]
pub struct AuditArgs {
    /// Events to write through each path.
    #[arg(long, default_value_t = 100_000)]
    pub events: u64,
    /// The database to load: postgres://… or sqlite://…
    #[arg(long, env = "THUNDERLINE_DATABASE_URL")]
    pub database: String,
    /// Events per audit batch (one INSERT statement each).
    #[arg(long, default_value_t = 20)]
    pub batch_size: usize,
    /// Batches written at once (database connections in use).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Zones the events are spread over.
    #[arg(long, default_value_t = 100)]
    pub zones: usize,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct AuditReport {
    pub backend: &'static str,
    pub events: u64,
    pub rows_in_db: u64,
    pub acked: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub baseline_rows: u64,
    pub baseline_seconds: f64,
    pub baseline_rows_per_sec: f64,
    pub ratio: f64,
    pub batch_size: usize,
    pub concurrency: usize,
}

struct Events(
    std::vec::IntoIter<ZoneEvent>,
    Arc<dyn Acknowledger<ZoneEvent>>,
);

impl Producer<ZoneEvent> for Events {
    async fn produce(&mut self, demand: &mut Demand<ZoneEvent>) -> Produced {
        while !demand.is_filled() {
            let Some(event) = self.0.next() else {
                return Produced::Exhausted;
            };
            let _ = demand.push(Message::with_acker(event, self.1.clone()));
        }
        Produced::More
    }
}

struct Pass;

impl Processor<ZoneEvent> for Pass {
    async fn handle_message(&self, _m: &mut Message<ZoneEvent>) -> Result<(), Failure> {
        Ok(())
    }
}

fn workload(args: &AuditArgs) -> (Vec<Uuid>, Vec<ZoneEvent>) {
    let zones: Vec<Uuid> = (0..args.zones).map(|_| Uuid::now_v7()).collect();
    let events = (0..args.events)
        .map(|i| {
            let kind = EventKind::AgentMoved(Moved {
                agent_id: format!("agent-{}", i % 1000),
                position: Position {
                    x: i as f64,
                    y: 1.5,
                    z: -2.25,
                },
                sent_at: None,
            });
            // Each zone's events numbered 1, 2, 3… as its writer would.
            let n = zones.len() as u64;
            ZoneEvent::new(
                uuid::Uuid::now_v7(),
                zones[(i % n) as usize],
                i / n + 1,
                kind,
                now(),
            )
        })
        .collect();
    (zones, events)
}

const BASELINE_TABLE: &str = "bench_audit_baseline";

/// The raw load: every row in one bulk statement stream, no pipeline.
async fn baseline(store: &Store, events: &[ZoneEvent]) -> Result<Duration, BenchError> {
    match store.db() {
        Db::Postgres(pool) => {
            // Made afresh each run, so it always has the log's current columns.
            sqlx::query(&format!("DROP TABLE IF EXISTS {BASELINE_TABLE}"))
                .execute(pool)
                .await?;
            sqlx::query(&format!(
                "CREATE TABLE {BASELINE_TABLE} (LIKE audit_events INCLUDING ALL)"
            ))
            .execute(pool)
            .await?;
            sqlx::query(&format!("TRUNCATE {BASELINE_TABLE}"))
                .execute(pool)
                .await?;
            let mut conn = pool.acquire().await?;
            let started = Instant::now();
            let mut csv = String::with_capacity(events.len() * 160);
            for e in events {
                let payload = serde_json::to_string(&e.kind)
                    .expect("payloads serialise")
                    .replace('"', "\"\"");
                csv.push_str(&format!(
                    "{},{},{},{},\"{}\",{}\n",
                    e.id,
                    e.zone_id,
                    e.seq,
                    e.name(),
                    payload,
                    e.occurred_at.to_rfc3339()
                ));
            }
            let mut copy = conn
                .copy_in_raw(&format!(
                    "COPY {BASELINE_TABLE} (id, zone_id, seq, event_type, payload, occurred_at) \
                     FROM STDIN WITH (FORMAT csv)"
                ))
                .await?;
            copy.send(csv.into_bytes()).await?;
            copy.finish().await?;
            Ok(started.elapsed())
        }
        Db::Sqlite(pool) => {
            sqlx::query(&format!("DROP TABLE IF EXISTS {BASELINE_TABLE}"))
                .execute(pool)
                .await?;
            sqlx::query(&format!(
                "CREATE TABLE {BASELINE_TABLE} (id BLOB PRIMARY KEY, zone_id BLOB NOT NULL, \
                 seq INTEGER NOT NULL, event_type TEXT NOT NULL, payload TEXT NOT NULL, \
                 occurred_at TEXT NOT NULL, recorded_at TEXT NOT NULL)"
            ))
            .execute(pool)
            .await?;
            sqlx::query(&format!("DELETE FROM {BASELINE_TABLE}"))
                .execute(pool)
                .await?;
            let started = Instant::now();
            let recorded_at = now();
            let mut tx = pool.begin().await?;
            for chunk in events.chunks(4_000) {
                let mut insert = sqlx::QueryBuilder::new(format!(
                    "INSERT INTO {BASELINE_TABLE} (id, zone_id, seq, event_type, payload, occurred_at, recorded_at) "
                ));
                insert.push_values(chunk, |mut row, e| {
                    row.push_bind(e.id)
                        .push_bind(e.zone_id)
                        .push_bind(e.seq as i64)
                        .push_bind(e.name())
                        .push_bind(sqlx::types::Json(&e.kind))
                        .push_bind(e.occurred_at)
                        .push_bind(recorded_at);
                });
                insert.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
            Ok(started.elapsed())
        }
    }
}

async fn baseline_rows(store: &Store) -> Result<u64, BenchError> {
    let sql = format!("SELECT COUNT(*) FROM {BASELINE_TABLE}");
    let n: i64 = match store.db() {
        Db::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await?,
        Db::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await?,
    };
    Ok(u64::try_from(n).unwrap_or(0))
}

pub async fn run_async(args: &AuditArgs) -> Result<AuditReport, BenchError> {
    if args.events == 0 || args.batch_size == 0 || args.concurrency == 0 || args.zones == 0 {
        return Err(BenchError::Args(
            "--events, --batch-size, --concurrency and --zones must all be at least 1".into(),
        ));
    }
    let store = Store::connect_with(&args.database, args.concurrency as u32 + 2).await?;
    let (zones, events) = workload(args);

    let baseline_time = baseline(&store, &events).await?;
    let baseline_rows = baseline_rows(&store).await?;

    let count = Arc::new(super::AckCounter::default());
    let started = Instant::now();
    let pipeline = Pipeline::builder("bench-audit")
        .producer(Events(events.into_iter(), count.clone()))
        .processor(
            Pass,
            ProcessorConfig::default().concurrency(2).max_demand(1000),
        )
        .batcher(
            BatcherConfig::new("audit")
                .batch_size(args.batch_size)
                .batch_timeout(Duration::from_secs(2))
                .concurrency(args.concurrency)
                .retry(RetryPolicy::exponential(
                    10,
                    Duration::from_millis(50),
                    2.0,
                    Duration::from_secs(2),
                )),
            AuditSink::new(store.clone()),
        )
        .in_flight_bound(args.batch_size * (2 * args.concurrency + 4) + 2000)
        .start()?;
    pipeline.join().await?;
    let elapsed = started.elapsed();

    let mut rows_in_db = 0;
    for zone in &zones {
        rows_in_db += store.count_events(Some(*zone)).await?;
    }
    store.close().await;
    let rate = |n: u64, d: Duration| n as f64 / d.as_secs_f64();
    Ok(AuditReport {
        backend: match store.backend() {
            Backend::Postgres => "postgres",
            Backend::Sqlite => "sqlite",
        },
        events: args.events,
        rows_in_db,
        acked: count.successful.load(Ordering::Relaxed),
        seconds: elapsed.as_secs_f64(),
        events_per_sec: rate(args.events, elapsed),
        baseline_rows,
        baseline_seconds: baseline_time.as_secs_f64(),
        baseline_rows_per_sec: rate(baseline_rows, baseline_time),
        ratio: baseline_time.as_secs_f64() / elapsed.as_secs_f64(),
        batch_size: args.batch_size,
        concurrency: args.concurrency,
    })
}

pub fn run(args: &AuditArgs) -> Result<AuditReport, BenchError> {
    super::runtime()?.block_on(run_async(args))
}

impl AuditReport {
    pub fn table(&self) -> String {
        format!(
            "audit benchmark ({}): {} events, batches of {}, {} at once\n\
             {:<28}{:>14.0} events/s  ({:.3} s)\n\
             {:<28}{:>14.0} rows/s    ({:.3} s)\n\
             {:<28}{:>14.3}\n\
             {:<28}{:>14} of {} ({} acknowledged)\n",
            self.backend,
            self.events,
            self.batch_size,
            self.concurrency,
            "pipeline → audit log",
            self.events_per_sec,
            self.seconds,
            "baseline (raw bulk load)",
            self.baseline_rows_per_sec,
            self.baseline_seconds,
            "ratio",
            self.ratio,
            "rows in the audit log",
            self.rows_in_db,
            self.events,
            self.acked,
        )
    }
}

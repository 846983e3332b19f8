//! `thunderline bench recovery`: how long a client that rejoins with `since` waits, from its
//! `phx_join` to the last event it missed, for a given number of missed events, served from
//! memory and from the audit log; against the same client's plain join (a fresh snapshot, no
//! replay) in the same run.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;
use uuid::Uuid;

use super::BenchError;
use super::admin_client::AdminClient;
use crate::daemon::config::PipelineFile;
use crate::daemon::server::{ServeArgs, Server};
use crate::realtime::TokenSigner;
use crate::runtime::ZoneWork;
use crate::zone::{Actor, CommandKind, Permissions};

#[derive(Clone, Debug, clap::Args)]
pub struct RecoveryArgs {
    /// Missed-event counts to measure (each from memory and from the audit log).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub missed: Vec<u64>,
    /// Rejoins measured per case.
    #[arg(long, default_value_t = 50)]
    pub rejoins: usize,
    /// The audit log's database (postgres://… or sqlite://…); default: a fresh SQLite file.
    #[arg(long, env = "THUNDERLINE_DATABASE_URL")]
    pub database: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Milliseconds from the join to the last missed event (or to the reply, for a plain join).
#[derive(Clone, Debug, Serialize)]
pub struct Times {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Case {
    pub missed: u64,
    /// `memory` or `audit_log`.
    pub from: &'static str,
    pub rejoins: usize,
    /// Rejoins answered `recovered: true` with every missed event, in order, once.
    pub recovered: usize,
    pub recovery: Times,
    /// The same client joining without `since`, in the same server: the baseline.
    pub plain_join: Times,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecoveryReport {
    pub backend: String,
    pub cases: Vec<Case>,
}

impl RecoveryReport {
    pub fn complete(&self) -> bool {
        self.cases.iter().all(|c| c.recovered == c.rejoins)
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "recovery benchmark (audit log on {}): phx_join with since → last missed event\n",
            self.backend
        );
        out.push_str(&format!(
            "{:>8}  {:<10}  {:>9}  {:>9}  {:>9}  {:>9}  {:>14}\n",
            "missed", "from", "p50 ms", "p99 ms", "max ms", "recovered", "plain p99 ms"
        ));
        for c in &self.cases {
            out.push_str(&format!(
                "{:>8}  {:<10}  {:>9.2}  {:>9.2}  {:>9.2}  {:>5}/{:<3}  {:>14.2}\n",
                c.missed,
                c.from,
                c.recovery.p50_ms,
                c.recovery.p99_ms,
                c.recovery.max_ms,
                c.recovered,
                c.rejoins,
                c.plain_join.p99_ms
            ));
        }
        out
    }
}

fn times(h: &Histogram<u64>) -> Times {
    let ms = |us: u64| us as f64 / 1000.0;
    Times {
        p50_ms: ms(h.value_at_quantile(0.5)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Joins `zone` as `agent` (with `since` when given) and reads until `done` says the frames seen
/// are complete; returns the time from the join to then, and the frames' zone events' seqs and
/// the reply.
async fn join(
    url: &str,
    zone: Uuid,
    agent: &str,
    token: &str,
    since: Option<Value>,
    last_missed: Option<u64>,
) -> Result<(Duration, Value, Vec<u64>), BenchError> {
    let (mut socket, _): (Socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| BenchError::Socket(e.to_string()))?;
    let mut params = json!({"agent_id": agent, "token": token});
    if let Some(since) = since {
        params["since"] = since;
    }
    let frame = json!(["1", "1", format!("zone:{zone}"), "phx_join", params]).to_string();
    let started = Instant::now();
    socket
        .send(Ws::text(frame))
        .await
        .map_err(|e| BenchError::Socket(e.to_string()))?;
    let mut reply = Value::Null;
    let mut seqs = Vec::new();
    let deadline = started + Duration::from_secs(30);
    loop {
        let next = tokio::time::timeout_at(deadline.into(), socket.next())
            .await
            .map_err(|_| BenchError::failed("no answer within 30 s"))?;
        let Some(Ok(Ws::Text(text))) = next else {
            return Err(BenchError::failed(
                "the connection ended before the recovery did",
            ));
        };
        let v: Value = serde_json::from_str(&text).map_err(BenchError::failed)?;
        if v[3] == "phx_reply" {
            if v[4]["status"] != "ok" {
                return Err(BenchError::failed(format!("join refused: {}", v[4])));
            }
            reply = v[4]["response"].clone();
            if last_missed.is_none() || reply["recovered"] != true {
                break;
            }
        } else if let Some(seq) = v[4]["seq"].as_u64() {
            seqs.push(seq);
            if Some(seq) == last_missed {
                break;
            }
        }
    }
    let took = started.elapsed();
    let _ = socket.close(None).await;
    Ok((took, reply, seqs))
}

/// Waits until the zone has at least `events` events and all of them are in the audit log.
async fn logged(server: &Server, zone: Uuid, events: u64) -> Result<(), BenchError> {
    let started = Instant::now();
    loop {
        let seq = server
            .zones
            .registry
            .live(zone)
            .map_or(0, |l| l.state().seq());
        let in_log = server
            .zones
            .registry
            .store()
            .count_events(Some(zone))
            .await
            .map_err(BenchError::failed)?;
        if seq >= events && in_log >= seq {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err(BenchError::failed(
                "the events were not all logged within 120 s",
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// One server for one case: `missed` events made, then `rejoins` rejoins with `since` and as
/// many plain joins, alternating.
async fn one_case(
    args: &RecoveryArgs,
    missed: u64,
    from_memory: bool,
) -> Result<(Case, String), BenchError> {
    let tag = Uuid::new_v4().simple().to_string()[..12].to_owned();
    let dir = std::env::temp_dir().join(format!("thunderline-bench-recovery-{tag}"));
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("bench.db").display()));
    let mut serve = ServeArgs::local(Some(database), dir.clone());
    serve.history_max = Some(missed + 1_000);
    let mut file = PipelineFile::default();
    // From memory: all of it kept; from the log: nothing kept in memory.
    file.zones.history_events = if from_memory {
        usize::try_from(missed).unwrap_or(usize::MAX) + 1_000
    } else {
        0
    };
    file.zones.history_ms = 3_600_000;
    let server = Server::start(&serve, &file).await?;
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0", server.addr);
    let mut admin = AdminClient::connect(server.addr, &server.secrets.admin_token).await?;
    let zone = admin
        .call(
            hyper::Method::POST,
            "/api/zones",
            &json!({"name": "recovery", "capacity": 1000, "permissions": 0x03}),
        )
        .await?;
    let zone = zone["id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| BenchError::failed("the admin API returned a zone without an id"))?;
    drop(admin);
    let signer = TokenSigner::new(server.secrets.signing.as_bytes()).map_err(BenchError::failed)?;
    let token = |agent: &str| {
        signer
            .mint(
                agent,
                zone,
                Permissions::SPAWN_AGENTS,
                3600,
                chrono::Utc::now(),
            )
            .map(|(t, _)| t)
            .map_err(BenchError::failed)
    };

    // The events the rejoiners will have missed: environment ticks, as the timers make them.
    for _ in 0..missed {
        let tick = crate::runtime::command(zone, Actor::System, CommandKind::Tick);
        if !server.zones.push(ZoneWork::command(tick, None)).await {
            return Err(BenchError::failed("the server stopped taking commands"));
        }
    }
    logged(&server, zone, missed).await?;

    let mut recovery =
        Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).map_err(BenchError::failed)?;
    let mut plain = recovery.clone();
    let mut recovered = 0;
    for i in 0..args.rejoins {
        // Each rejoin has missed exactly `missed` events: the zone's last seq minus that, every
        // one in the log (with no memory, what is still in an open audit batch could not be
        // recovered).
        logged(&server, zone, missed).await?;
        let (epoch, now_last) = {
            let live = server
                .zones
                .registry
                .live(zone)
                .ok_or_else(|| BenchError::failed("the zone left memory"))?;
            let state = live.state();
            (state.epoch().to_owned(), state.seq())
        };
        let since = json!({"seq": now_last - missed, "epoch": epoch});
        let agent = format!("r{i}");
        let (took, reply, seqs) = join(
            &url,
            zone,
            &agent,
            &token(&agent)?,
            Some(since),
            Some(now_last),
        )
        .await?;
        let expected: Vec<u64> = (now_last - missed + 1..=now_last).collect();
        if reply["recovered"] == true && seqs == expected {
            recovered += 1;
        }
        recovery
            .record(took.as_micros().max(1) as u64)
            .map_err(BenchError::failed)?;
        let agent = format!("p{i}");
        let (took, _, _) = join(&url, zone, &agent, &token(&agent)?, None, None).await?;
        plain
            .record(took.as_micros().max(1) as u64)
            .map_err(BenchError::failed)?;
        // The leaves of both are applied before the next measurement reads the last seq.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let backend = format!("{:?}", server.zones.registry.store().backend()).to_lowercase();
    server.shutdown().await?;
    if args.database.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((
        Case {
            missed,
            from: if from_memory { "memory" } else { "audit_log" },
            rejoins: args.rejoins,
            recovered,
            recovery: times(&recovery),
            plain_join: times(&plain),
        },
        backend,
    ))
}

pub async fn run_async(args: &RecoveryArgs) -> Result<RecoveryReport, BenchError> {
    if args.rejoins == 0 || args.missed.is_empty() || args.missed.contains(&0) {
        return Err(BenchError::failed(
            "--rejoins and every --missed count must be at least 1",
        ));
    }
    let mut cases = Vec::new();
    let mut backend = String::new();
    for &missed in &args.missed {
        for from_memory in [true, false] {
            let (case, b) = one_case(args, missed, from_memory).await?;
            backend = b;
            cases.push(case);
        }
    }
    Ok(RecoveryReport { backend, cases })
}

pub fn run(args: &RecoveryArgs) -> Result<RecoveryReport, BenchError> {
    super::runtime()?.block_on(run_async(args))
}

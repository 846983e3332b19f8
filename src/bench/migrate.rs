//! `thunderline bench migrate`: agents moving between two zones, back and forth, each timed
//! from its `migrate` push to its own `agent_entered` in the zone it moved to (the ticket's
//! join in between); against the same agents doing a plain leave and join (a token for the
//! other zone) in the same run, on the same server. With `--nodes 2` the two zones have
//! different owners, so every step crosses nodes (the clients are on the first).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hyper::Method;
use serde::Serialize;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;

use super::BenchError;
use super::admin_client::AdminClient;
use super::ws::{Daemon, Schema, raise_fd_limit, ready, start_daemon, ws_url_of};

#[derive(Clone, Debug, clap::Args)]
pub struct MigrateArgs {
    /// Agents moving at once, each on a connection of its own.
    #[arg(long, default_value_t = 100)]
    pub agents: usize,
    /// Moves per agent, alternating between the two zones (and as many leave-and-joins).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// 1: one daemon (SQLite); 2: a cluster of two, each zone owned by another node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
    pub nodes: u32,
    /// The NATS server of the cluster (with --nodes 2).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub cluster: String,
    /// The PostgreSQL server the nodes share (with --nodes 2); the run gets a schema of its
    /// own, dropped afterwards.
    #[arg(
        long,
        env = "THUNDERLINE_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database: String,
    #[arg(long)]
    pub json: bool,
}

/// One way of moving, measured.
#[derive(Clone, Debug, Serialize)]
pub struct Moves {
    /// Moves that ended with the agent's own `agent_entered` in the other zone.
    pub completed: u64,
    pub failed: u64,
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct MigrateReport {
    pub nodes: u32,
    pub agents: usize,
    pub rounds: usize,
    /// `migrate`, then a join with the ticket.
    pub migrate: Moves,
    /// The baseline: `phx_leave`, then `phx_join` with a token.
    pub leave_and_join: Moves,
}

impl MigrateReport {
    pub fn complete(&self) -> bool {
        let all = (self.agents * self.rounds) as u64;
        self.migrate.completed == all && self.leave_and_join.completed == all
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "migrate benchmark: {} agents × {} moves between two zones, {}\n",
            self.agents,
            self.rounds,
            if self.nodes > 1 {
                "owned by two nodes"
            } else {
                "one node"
            }
        );
        out.push_str(&format!(
            "{:<16}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>6}\n",
            "", "moves", "moves/s", "p50 ms", "p99 ms", "max ms", "failed"
        ));
        for (name, m) in [
            ("migrate+ticket", &self.migrate),
            ("leave+join", &self.leave_and_join),
        ] {
            out.push_str(&format!(
                "{:<16}  {:>9}  {:>9.0}  {:>9.2}  {:>9.2}  {:>9.2}  {:>6}\n",
                name, m.completed, m.per_sec, m.p50_ms, m.p99_ms, m.max_ms, m.failed
            ));
        }
        out
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One agent's connection, its tokens for both zones, and where it is.
struct Agent {
    socket: Socket,
    id: String,
    zones: [String; 2],
    tokens: [String; 2],
    /// The zone it is in (0 or 1) and that channel's join ref.
    at: usize,
    join_ref: String,
    next_ref: u64,
}

impl Agent {
    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    async fn send(&mut self, frame: Value) -> Result<(), BenchError> {
        self.socket
            .send(Ws::text(frame.to_string()))
            .await
            .map_err(|e| BenchError::Socket(e.to_string()))
    }

    /// Frames until `done` accepts one; it is returned.
    async fn until(&mut self, done: impl Fn(&Value) -> bool) -> Result<Value, BenchError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .map_err(|_| BenchError::failed("no answer within 30 s"))?;
            match next {
                Some(Ok(Ws::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    if done(&frame) {
                        return Ok(frame);
                    }
                }
                Some(Ok(_)) => {}
                _ => return Err(BenchError::failed("the connection closed")),
            }
        }
    }

    /// Joins zone `to` with `params`, and waits for its own `agent_entered` there.
    async fn enter(&mut self, to: usize, params: Value) -> Result<(), BenchError> {
        let r = self.next_ref();
        let topic = format!("zone:{}", self.zones[to]);
        self.send(json!([r, r, topic, "phx_join", params])).await?;
        let reply = self
            .until(|f| f[1] == json!(r) && f[3] == "phx_reply")
            .await?;
        if reply[4]["status"] != "ok" {
            return Err(BenchError::failed(format!("join refused: {}", reply[4])));
        }
        let me = self.id.clone();
        self.until(|f| f[2] == json!(topic) && f[3] == "agent_entered" && f[4]["agent_id"] == me)
            .await?;
        self.at = to;
        self.join_ref = r;
        Ok(())
    }

    /// `migrate` to the other zone, then its ticket's join.
    async fn migrate(&mut self) -> Result<(), BenchError> {
        let to = 1 - self.at;
        let r = self.next_ref();
        let topic = format!("zone:{}", self.zones[self.at]);
        let payload = json!({"to": self.zones[to], "token": self.tokens[to]});
        self.send(json!([self.join_ref, r, topic, "migrate", payload]))
            .await?;
        let reply = self
            .until(|f| f[1] == json!(r) && f[3] == "phx_reply")
            .await?;
        let Some(ticket) = reply[4]["response"]["ticket"].as_str() else {
            return Err(BenchError::failed(format!("migrate refused: {}", reply[4])));
        };
        let params = json!({"agent_id": self.id, "ticket": ticket});
        self.enter(to, params).await
    }

    /// `phx_leave`, then a join of the other zone with a token.
    async fn leave_and_join(&mut self) -> Result<(), BenchError> {
        let to = 1 - self.at;
        let r = self.next_ref();
        let topic = format!("zone:{}", self.zones[self.at]);
        self.send(json!([self.join_ref, r, topic, "phx_leave", {}]))
            .await?;
        self.until(|f| f[1] == json!(r) && f[3] == "phx_reply")
            .await?;
        let params = json!({"agent_id": self.id, "token": self.tokens[to]});
        self.enter(to, params).await
    }
}

pub fn run(args: &MigrateArgs) -> Result<MigrateReport, BenchError> {
    if args.agents == 0 || args.rounds == 0 {
        return Err(BenchError::Args(
            "--agents and --rounds must be above 0".into(),
        ));
    }
    super::runtime()?.block_on(measure(args))
}

/// Two zones (in a cluster, owned by different nodes), created through the first node.
async fn zones(
    admin: &mut AdminClient,
    agents: usize,
    owners: &[String],
) -> Result<[String; 2], BenchError> {
    let mut found: [Option<String>; 2] = [None, None];
    for _ in 0..64 {
        let z = admin
            .call(
                Method::POST,
                "/api/zones",
                &json!({"name": "migrate-bench", "capacity": agents + 1, "permissions": 1}),
            )
            .await?;
        let id = z["id"].as_str().unwrap_or_default().to_owned();
        let owner = z["assigned_server"].as_str().unwrap_or_default();
        let slot = if owners.len() < 2 {
            found.iter().position(Option::is_none)
        } else {
            owners.iter().position(|o| o == owner)
        };
        if let Some(slot) = slot.filter(|&s| found[s].is_none()) {
            found[slot] = Some(id);
        }
        if let [Some(a), Some(b)] = &found {
            return Ok([a.clone(), b.clone()]);
        }
    }
    Err(BenchError::failed("no two zones with different owners"))
}

async fn measure(args: &MigrateArgs) -> Result<MigrateReport, BenchError> {
    raise_fd_limit();
    let admin_token = crate::realtime::random_secret();
    let secret = crate::realtime::random_secret();
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut schema = None;
    if args.nodes > 1 {
        let s = Schema::create(&args.database).await?;
        for n in 0..args.nodes {
            let extra = [
                "--database".to_owned(),
                s.url(),
                "--cluster".to_owned(),
                args.cluster.clone(),
                "--node-id".to_owned(),
                format!("n{n}"),
                "--cluster-name".to_owned(),
                s.name.clone(),
            ];
            daemons.push(start_daemon(&admin_token, &secret, None, &extra)?);
        }
        schema = Some(s);
    } else {
        daemons.push(start_daemon(&admin_token, &secret, None, &[])?);
    }
    for d in &daemons {
        ready(d.addr).await?;
    }
    let result = measure_on(args, &daemons, &admin_token).await;
    drop(daemons);
    if let Some(s) = schema {
        s.drop_now().await;
    }
    result
}

async fn measure_on(
    args: &MigrateArgs,
    daemons: &[Daemon],
    admin_token: &str,
) -> Result<MigrateReport, BenchError> {
    let mut admin = AdminClient::connect(daemons[0].addr, admin_token).await?;
    let owners: Vec<String> = if daemons.len() > 1 {
        (0..daemons.len()).map(|n| format!("n{n}")).collect()
    } else {
        Vec::new()
    };
    let zones = zones(&mut admin, args.agents, &owners).await?;
    let url = ws_url_of(daemons[0].addr);
    let mut agents = Vec::with_capacity(args.agents);
    for i in 0..args.agents {
        let id = format!("mover-{i}");
        let mut tokens = [String::new(), String::new()];
        for (z, token) in tokens.iter_mut().enumerate() {
            let t = admin
                .call(
                    Method::POST,
                    "/api/tokens",
                    &json!({"agent_id": id, "zone_id": zones[z], "permissions": 1, "ttl_seconds": 3600}),
                )
                .await?;
            *token = t["token"].as_str().unwrap_or_default().to_owned();
        }
        let (socket, _) = tokio_tungstenite::connect_async(&url)
            .await
            .map_err(|e| BenchError::Socket(e.to_string()))?;
        let mut agent = Agent {
            socket,
            id: id.clone(),
            zones: zones.clone(),
            tokens,
            at: 0,
            join_ref: String::new(),
            next_ref: 0,
        };
        let params = json!({"agent_id": id, "token": agent.tokens[0]});
        agent.enter(0, params).await?;
        agents.push(agent);
    }
    let (agents, migrate) = phase(agents, args.rounds, true).await;
    let (_, leave_and_join) = phase(agents, args.rounds, false).await;
    Ok(MigrateReport {
        nodes: args.nodes,
        agents: args.agents,
        rounds: args.rounds,
        migrate,
        leave_and_join,
    })
}

/// Every agent moves `rounds` times at once, by migration or by leave and join.
async fn phase(agents: Vec<Agent>, rounds: usize, migrate: bool) -> (Vec<Agent>, Moves) {
    let started = Instant::now();
    let tasks: Vec<_> = agents
        .into_iter()
        .map(|mut agent| {
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(rounds);
                let mut failed = 0u64;
                for _ in 0..rounds {
                    let t = Instant::now();
                    let moved = if migrate {
                        agent.migrate().await
                    } else {
                        agent.leave_and_join().await
                    };
                    match moved {
                        Ok(()) => times.push(t.elapsed()),
                        Err(e) => {
                            tracing::warn!(agent = %agent.id, error = %e, "a move failed");
                            failed += 1;
                            break;
                        }
                    }
                }
                (agent, times, failed)
            })
        })
        .collect();
    let mut histogram = Histogram::<u64>::new(3).expect("a valid histogram");
    let mut failed = 0;
    let mut back = Vec::new();
    for task in tasks {
        match task.await {
            Ok((agent, times, f)) => {
                for t in times {
                    let _ = histogram.record(t.as_micros() as u64);
                }
                failed += f;
                back.push(agent);
            }
            Err(_) => failed += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    let moves = Moves {
        completed: histogram.len(),
        failed,
        per_sec: histogram.len() as f64 / elapsed.max(1e-9),
        p50_ms: ms(histogram.value_at_quantile(0.5)),
        p99_ms: ms(histogram.value_at_quantile(0.99)),
        max_ms: ms(histogram.max()),
    };
    (back, moves)
}

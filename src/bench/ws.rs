//! `thunderline bench ws`: N WebSocket clients over M zones push `agent_move` at a total rate
//! for a while; every client times every broadcast it receives. Then the same clients load a bare
//! tokio-tungstenite broadcast server, so the report states the pipeline's cost as a ratio.
//!
//! Without `--url` the daemon runs as a child process on a free loopback port with a throwaway
//! SQLite store, so that its memory can be measured apart from the clients'. The child is this
//! executable run as `serve`: only the `thunderline` binary can load a server it starts itself. The clients speak
//! the protocol the `phoenix` client speaks, and stay cheap: a broadcast is timed by finding its
//! `sent_at` in the frame text, not by parsing the frame; a push's `phx_reply` is timed by the
//! send time the client wrote into the push's ref (`m<seq>.<µs>`), which the reply echoes, so no
//! client keeps a map of pushes in flight.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hyper::Method;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::BenchError;
use super::admin_client::AdminClient;
use super::batches::{self, BroadcastBatches};
use super::ws_baseline;
use crate::runtime::Replies;

#[derive(Clone, Debug, clap::Args)]
pub struct WsArgs {
    /// WebSocket clients.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Zones the clients are spread over (with --agents-per-zone: 1 unless given).
    #[arg(
        long,
        default_value_t = 10,
        default_value_if("agents_per_zone", clap::builder::ArgPredicate::IsPresent, "1")
    )]
    pub zones: usize,
    /// `agent_move` events per second, all clients together.
    #[arg(long, default_value_t = 2000.0)]
    pub rate: f64,
    /// Seconds of load, after everyone has connected.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Load a running server (ws://host:port) instead of starting one on loopback.
    #[arg(long)]
    pub url: Option<String>,
    /// The running server's admin token (to create zones and mint tokens).
    #[arg(long, env = "THUNDERLINE_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Skip the bare-server baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Print one JSON object on standard output (the progress and table go to standard error).
    #[arg(long)]
    pub json: bool,
    /// Write a self-contained HTML report (latency distribution, throughput over time).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Instead of one run at --rate: one run at each of these rates (events/s, comma-separated)
    /// against the same server, reporting the highest that held p99 under --p99-target-ms with
    /// every broadcast delivered. No baseline.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["rate", "report"])]
    pub sweep: Vec<f64>,
    /// The p99 latency a sweep step must stay under (with --agents-per-zone: 100 unless given).
    #[arg(
        long,
        default_value_t = 25.0,
        default_value_if("agents_per_zone", clap::builder::ArgPredicate::IsPresent, "100")
    )]
    pub p99_target_ms: f64,
    /// Crowds instead of --clients and --rate: this many agents in each zone, spread uniformly
    /// over a --world square, each moving --move-hz times a second in a random walk. Reports
    /// the load with --aoi-radius as each zone's interest radius and, in the same run, the same
    /// load with no radius at the largest agent count whose p99 stays under --p99-target-ms.
    #[arg(long, conflicts_with_all = ["clients", "rate", "sweep", "nodes", "report"])]
    pub agents_per_zone: Option<usize>,
    /// With --agents-per-zone: moves per second of each agent.
    #[arg(long, default_value_t = 5.0)]
    pub move_hz: f64,
    /// With --agents-per-zone: the side of the square the agents walk in.
    #[arg(long, default_value_t = 1000.0)]
    pub world: f64,
    /// With --agents-per-zone: each zone's interest radius (none: every move to everyone).
    #[arg(long)]
    pub aoi_radius: Option<f64>,
    /// When the server answers a push `ok`: once the event is applied, or once it is durable.
    /// Passed to the daemon the harness starts as `THUNDERLINE_REPLIES`; refused with --url.
    #[arg(long, value_enum)]
    pub replies: Option<Replies>,
    /// Run the server as a cluster of this many daemons (child processes sharing --cluster
    /// and the PostgreSQL of --database), clients split across them; the same load runs first
    /// against one daemon on the same database, and the report compares the two.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub nodes: u32,
    /// The NATS server of the cluster (with --nodes above 1).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub cluster: String,
    /// The PostgreSQL server the nodes share (with --nodes above 1); each run gets a schema of
    /// its own, dropped afterwards.
    #[arg(
        long,
        env = "THUNDERLINE_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    pub database: String,
    /// With --nodes above 1: run the cluster's load twice, steady and then while every node in
    /// turn is stopped with SIGTERM and started again (spread over --duration); a client whose
    /// node closes it rejoins another node with `since`. The report compares the two runs.
    #[arg(long)]
    pub rolling_restart: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// What one load run saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunFigures {
    pub connected: usize,
    pub connect_seconds: f64,
    pub sent: u64,
    /// Pushes the server answered `ok` (the rest are in `errors`, or were never answered).
    pub replies: u64,
    /// Of `replies`, those timed into `reply_latency_ms` (all of them, unless a reply's ref was
    /// not one the harness wrote).
    pub replies_timed: u64,
    pub ingress_events_per_sec: f64,
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub delivered_per_sec: f64,
    pub latency_ms: Latency,
    /// `agent_entered_view` and `agent_left_view` frames received (a zone with a radius).
    pub view_frames: u64,
    /// From sending a push to reading its `ok` reply.
    pub reply_latency_ms: Latency,
    /// In a cluster: the broadcast latency seen by clients on the zone owner's node, and by
    /// clients on the other nodes (whose broadcasts cross NATS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub same_node_latency_ms: Option<Latency>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_node_latency_ms: Option<Latency>,
    pub errors: u64,
    pub disconnects: u64,
    pub slow_consumer_disconnects: u64,
    /// With --rolling-restart: rejoins on another node after a close, and of those the ones
    /// answered `recovered: true` (every missed event replayed).
    pub reconnects: u64,
    pub recovered_rejoins: u64,
    /// With --rolling-restart: the nodes restarted while the load ran.
    pub restarted_nodes: u32,
    /// The server's resident memory once every client had joined, before the load.
    pub connected_rss_bytes: Option<u64>,
    /// The daemons' broadcast batches during the load, by what sent each out (none against
    /// `--url`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broadcast_batches: Option<BroadcastBatches>,
    /// (seconds since the load began, events sent, broadcasts delivered), once a second.
    pub timeline: Vec<(f64, u64, u64)>,
    #[serde(skip)]
    pub histogram: Option<Histogram<u64>>,
    #[serde(skip)]
    pub reply_histogram: Option<Histogram<u64>>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WsReport {
    pub clients: usize,
    pub zones: usize,
    pub rate: f64,
    pub duration: f64,
    /// The `--replies` mode the daemon was started with (null: the server's default).
    pub replies_mode: Option<Replies>,
    /// Daemons the load ran against (a cluster above 1).
    pub nodes: u32,
    #[serde(flatten)]
    pub run: RunFigures,
    /// With --nodes above 1: the same load against one daemon on the same database, first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_node: Option<RunFigures>,
    /// The cross-node broadcast p99 over the same-node one (goal: at most 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_to_same_p99: Option<f64>,
    /// With --rolling-restart: the same load on a fresh cluster while each node is restarted
    /// in turn (`run` is then the steady run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolling_restart: Option<RunFigures>,
    pub server_peak_rss_bytes: Option<u64>,
    pub server_idle_rss_bytes: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub baseline_delivered_per_sec: Option<f64>,
    pub baseline_latency_ms: Option<Latency>,
    pub baseline_reply_latency_ms: Option<Latency>,
    pub ratio: Option<f64>,
}

impl RunFigures {
    /// Every client connected, and the server answered every push `ok`.
    pub fn answered_every_push(&self, clients: usize) -> bool {
        self.connected == clients && self.errors == 0 && self.replies == self.sent
    }
}

/// One rate of a sweep.
#[derive(Clone, Debug, Serialize)]
pub struct SweepStep {
    pub rate: f64,
    /// p99 under the target, every push answered and broadcast to all, no errors or disconnects.
    pub within_target: bool,
    #[serde(flatten)]
    pub run: RunFigures,
}

#[derive(Clone, Debug, Serialize)]
pub struct SweepReport {
    pub clients: usize,
    pub zones: usize,
    pub duration: f64,
    pub p99_target_ms: f64,
    /// The `--replies` mode the daemon was started with (null: the server's default).
    pub replies_mode: Option<Replies>,
    pub steps: Vec<SweepStep>,
    /// The highest rate that held the target, with every lower rate holding it too.
    pub highest_rate_within_target: Option<f64>,
    pub server_peak_rss_bytes: Option<u64>,
}

/// The daemon under test, as a child process.
pub(super) struct Daemon {
    child: Child,
    pub(super) addr: SocketAddr,
    dir: PathBuf,
    /// How it was started, to start it again (`--rolling-restart`).
    start: DaemonStart,
}

#[derive(Clone)]
struct DaemonStart {
    admin: String,
    secret: String,
    replies: Option<Replies>,
    extra: Vec<String>,
}

impl Daemon {
    /// SIGTERM (its clients are closed once its zones are handed over), then the same daemon
    /// again on the same address, ready.
    async fn restart(&mut self) -> Result<(), BenchError> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        while self.child.try_wait()?.is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The old one has exited: replacing it (and so dropping it) signals nothing.
        *self = start_daemon_at(&self.start, &self.addr.to_string())?;
        ready(self.addr).await
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rss(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub(super) fn start_daemon(
    admin: &str,
    secret: &str,
    replies: Option<Replies>,
    extra: &[String],
) -> Result<Daemon, BenchError> {
    let start = DaemonStart {
        admin: admin.to_owned(),
        secret: secret.to_owned(),
        replies,
        extra: extra.to_vec(),
    };
    start_daemon_at(&start, "127.0.0.1:0")
}

fn start_daemon_at(start: &DaemonStart, listen: &str) -> Result<Daemon, BenchError> {
    use std::io::{BufRead, BufReader};
    let DaemonStart {
        admin,
        secret,
        replies,
        extra,
    } = start;
    let replies = *replies;
    let dir = std::env::temp_dir().join(format!(
        "thunderline-bench-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .args(["serve", "--listen", listen, "--data-dir"])
        .arg(&dir)
        .args(extra)
        .env_remove("THUNDERLINE_DATABASE_URL")
        .env("THUNDERLINE_ADMIN_TOKEN", admin)
        .env("THUNDERLINE_SECRET", secret)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    // The report records the mode, so the child gets exactly the one asked for, or none.
    match replies {
        Some(mode) => command.env("THUNDERLINE_REPLIES", mode.as_str()),
        None => command.env_remove("THUNDERLINE_REPLIES"),
    };
    let mut child = command.spawn()?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(url) = line.strip_prefix("thunderline listening on http://") {
                    break url
                        .trim()
                        .parse()
                        .map_err(|_| BenchError::Start(line.clone()))?;
                }
            }
            _ => return Err(BenchError::Start("it exited before listening".into())),
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Daemon {
        child,
        addr,
        dir,
        start: start.clone(),
    })
}

/// Lets this process (and the daemon it starts) hold one descriptor per connection.
pub(super) fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Counters every client adds to.
#[derive(Default)]
struct Shared {
    /// Clients in the run.
    clients: usize,
    connected: AtomicUsize,
    /// Clients that will push no more (stopped, failed or disconnected).
    done_pushing: AtomicUsize,
    sent: AtomicU64,
    delivered: AtomicU64,
    replies: AtomicU64,
    replies_timed: AtomicU64,
    errors: AtomicU64,
    disconnects: AtomicU64,
    slow: AtomicU64,
    reconnects: AtomicU64,
    recovered: AtomicU64,
    view_frames: AtomicU64,
    /// `agent_entered` frames received: each client is sent its own join's and those after it.
    entered: AtomicU64,
    /// Broadcast latencies: push → `agent_moved`.
    histogram: Mutex<Option<Histogram<u64>>>,
    /// Reply latencies: push → its `ok` `phx_reply`.
    reply_histogram: Mutex<Option<Histogram<u64>>>,
    /// In a cluster, the broadcast latencies again, by whether the receiving client is on the
    /// zone owner's node.
    same_node: Mutex<Option<Histogram<u64>>>,
    cross_node: Mutex<Option<Histogram<u64>>>,
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 100 s, 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000, 3).expect("valid bounds")
}

/// Latencies a client has measured but not yet handed in.
const FLUSH_EVERY: usize = 64;

/// Hands in a client's measured latencies (µs), and counts them. One shared histogram per
/// measure, fed in small batches: a histogram per client would cost ~200 KiB each and, reset
/// and merged as it filled, a quarter of the harness's CPU in memset (measured with perf).
fn record(histogram: &Mutex<Option<Histogram<u64>>>, count: &AtomicU64, latencies: &mut Vec<u64>) {
    if latencies.is_empty() {
        return;
    }
    {
        let mut global = histogram.lock().unwrap_or_else(|e| e.into_inner());
        let h = global.get_or_insert_with(new_histogram);
        for &l in latencies.iter() {
            let _ = h.record(l.max(1));
        }
    }
    count.fetch_add(latencies.len() as u64, Ordering::Relaxed);
    latencies.clear();
}

impl Shared {
    /// Hands in broadcast latencies, counted as delivered; in a cluster also by whether the
    /// receiver is on the zone owner's node (`remote`: it is not).
    fn record_broadcasts(&self, latencies: &mut Vec<u64>, remote: Option<bool>) {
        if let Some(remote) = remote {
            let split = if remote {
                &self.cross_node
            } else {
                &self.same_node
            };
            let mut h = split.lock().unwrap_or_else(|e| e.into_inner());
            let h = h.get_or_insert_with(new_histogram);
            for &l in latencies.iter() {
                let _ = h.record(l.max(1));
            }
        }
        record(&self.histogram, &self.delivered, latencies);
    }

    /// Hands in reply latencies, counted as replies (and as timed).
    fn record_replies(&self, latencies: &mut Vec<u64>) {
        let n = latencies.len() as u64;
        record(&self.reply_histogram, &self.replies_timed, latencies);
        self.replies.fetch_add(n, Ordering::Relaxed);
    }

    /// The p99 so far of one of the histograms, in ms.
    fn p99_ms(histogram: &Mutex<Option<Histogram<u64>>>) -> f64 {
        histogram
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(0.99) as f64 / 1000.0)
    }
}

/// The clients' WebSocket settings. tungstenite zero-fills its whole read buffer before every
/// read: at the default 128 KiB that memset was a quarter of the harness's CPU.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
}

/// Finds `"sent_at":<digits>` in a frame without parsing it.
fn sent_at(frame: &str) -> Option<u64> {
    let at = frame.find("\"sent_at\":")? + "\"sent_at\":".len();
    let digits: &str = &frame[at..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// The ref a client gives its push number `seq`, sent at `stamp` µs after the epoch.
fn push_ref(seq: u64, stamp: u64) -> String {
    format!("m{seq}.{stamp}")
}

/// Reads the send time back from a reply to a push, without parsing the frame: the frame is
/// `[join_ref, msg_ref, …]`, and the harness's own join ref is a plain string (or null).
fn reply_stamp(frame: &str) -> Option<u64> {
    let rest = frame.strip_prefix('[')?;
    let rest = match rest.strip_prefix("null") {
        Some(rest) => rest,
        None => {
            let rest = rest.strip_prefix('"')?;
            &rest[rest.find('"')? + 1..]
        }
    };
    let msg_ref = rest.strip_prefix(",\"m")?;
    let msg_ref = &msg_ref[..msg_ref.find('"')?];
    msg_ref.split_once('.')?.1.parse().ok()
}

struct ClientPlan {
    url: String,
    /// In a cluster: whether the client is on another node than its zone's owner.
    remote: Option<bool>,
    topic: String,
    agent: String,
    token: String,
    /// Seconds between this client's pushes.
    period: f64,
    /// Delay before its first push, to spread clients over the period.
    phase: f64,
    /// With --rolling-restart: every node's URL, for a client its node closes to rejoin
    /// another (empty: it does not).
    nodes: Arc<[String]>,
    /// With --agents-per-zone: where its random walk is.
    walk: Option<Walk>,
    /// Whether its zone filters by interest: then it cannot know how many of its zone's
    /// broadcasts are for it, and stops once its own pushes are answered.
    filtered: bool,
}

/// An agent's random walk over a square: a uniform start, then steps of up to `step` each way.
struct Walk {
    rng: fastrand::Rng,
    world: f64,
    step: f64,
    x: f64,
    y: f64,
}

impl Walk {
    fn new(seed: u64, world: f64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (x, y) = (rng.f64() * world, rng.f64() * world);
        Self {
            rng,
            world,
            step: world / 200.0,
            x,
            y,
        }
    }

    /// Where it is now; the next call takes a step.
    fn next(&mut self) -> (f64, f64) {
        let here = (self.x, self.y);
        let stride = |v: f64, rng: &mut fastrand::Rng| {
            (v + (rng.f64() * 2.0 - 1.0) * self.step).clamp(0.0, self.world)
        };
        self.x = stride(self.x, &mut self.rng);
        self.y = stride(self.y, &mut self.rng);
        here
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What a join's reply said: the zone's epoch and seq, and (for a rejoin) whether every missed
/// event follows.
struct Joined {
    epoch: String,
    seq: u64,
    recovered: bool,
}

/// Connects to `url` and joins `plan`'s zone (from `since`, a rejoin); `None` if either fails.
async fn connect_and_join(
    url: &str,
    plan: &ClientPlan,
    since: Option<(&str, u64)>,
) -> Option<(Ws, Joined)> {
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
        .await
        .ok()?;
    let mut params = json!({"agent_id": plan.agent, "token": plan.token});
    if let Some((epoch, seq)) = since {
        params["since"] = json!({"epoch": epoch, "seq": seq});
    }
    let join = json!(["1", "1", plan.topic, "phx_join", params]);
    ws.send(Message::text(join.to_string())).await.ok()?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) if t.contains("\"phx_reply\"") => {
                let reply: serde_json::Value = serde_json::from_str(&t).ok()?;
                if reply[4]["status"] != "ok" {
                    return None;
                }
                // The bare baseline server answers `{}`: no history to rejoin.
                let response = &reply[4]["response"];
                let joined = Joined {
                    epoch: response["epoch"].as_str().unwrap_or_default().to_owned(),
                    seq: response["seq"].as_u64().unwrap_or_default(),
                    recovered: response["recovered"] == true,
                };
                return Some((ws, joined));
            }
            Some(Ok(_)) => {}
            _ => return None,
        }
    }
}

/// The `seq` of a zone event's frame, found without parsing it.
fn frame_seq(frame: &str) -> Option<u64> {
    let at = frame.rfind("\"seq\":")? + 6;
    let digits = frame[at..].split(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

/// How long a client closed by its node keeps trying the other nodes.
const REJOIN_LIMIT: Duration = Duration::from_secs(20);

/// Rejoins `plan`'s zone on the next node after `node` that takes it, from `last_seq` of
/// `epoch`; `None` when the client does not rejoin, or no node took it in time.
async fn rejoin(
    plan: &ClientPlan,
    node: &mut usize,
    epoch: &str,
    last_seq: Option<u64>,
    shared: &Shared,
) -> Option<(Ws, Joined)> {
    let last = last_seq?;
    let deadline = Instant::now() + REJOIN_LIMIT;
    while Instant::now() < deadline {
        *node = (*node + 1) % plan.nodes.len();
        if let Some(joined) = connect_and_join(&plan.nodes[*node], plan, Some((epoch, last))).await
        {
            shared.reconnects.fetch_add(1, Ordering::Relaxed);
            if joined.1.recovered {
                shared.recovered.fetch_add(1, Ordering::Relaxed);
            }
            return Some(joined);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// How long after the load stops a client waits for the rest of its zone's broadcasts; a
/// broadcast later than this counts as lost.
const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Marks a client as done pushing however it ends, so the others know when every push is in.
struct DonePushing(Arc<Shared>);

impl Drop for DonePushing {
    fn drop(&mut self) {
        self.0.done_pushing.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a client has read from its socket.
struct Inbox {
    epoch: Instant,
    shared: Arc<Shared>,
    latencies: Vec<u64>,
    reply_latencies: Vec<u64>,
    /// `agent_moved` broadcasts received.
    received: u64,
    /// Replies to this client's pushes received, ok or not.
    answered: u64,
    remote: Option<bool>,
    /// With --rolling-restart: the newest seq of its zone it has seen.
    last_seq: Option<u64>,
}

impl Inbox {
    /// Takes one item from the socket; false once the connection is gone.
    fn take(&mut self, frame: Option<Result<Message, WsError>>) -> bool {
        match frame {
            Some(Ok(Message::Text(t))) => {
                if let Some(last) = &mut self.last_seq
                    && !t.contains("\"phx_reply\"")
                    && let Some(seq) = frame_seq(&t)
                {
                    *last = (*last).max(seq);
                }
                if t.contains("_view\"") {
                    self.shared.view_frames.fetch_add(1, Ordering::Relaxed);
                } else if t.contains("\"agent_entered\"") {
                    self.shared.entered.fetch_add(1, Ordering::Relaxed);
                } else if t.contains("\"agent_moved\"") {
                    if let Some(at) = sent_at(&t) {
                        let now = self.epoch.elapsed().as_micros() as u64;
                        self.received += 1;
                        self.latencies.push(now.saturating_sub(at));
                        if self.latencies.len() == FLUSH_EVERY {
                            self.shared
                                .record_broadcasts(&mut self.latencies, self.remote);
                        }
                    }
                } else if t.contains("\"phx_reply\"") {
                    self.answered += 1;
                    if t.contains("\"status\":\"ok\"") {
                        if let Some(at) = reply_stamp(&t) {
                            let now = self.epoch.elapsed().as_micros() as u64;
                            self.reply_latencies.push(now.saturating_sub(at));
                            if self.reply_latencies.len() == FLUSH_EVERY {
                                self.shared.record_replies(&mut self.reply_latencies);
                            }
                        } else {
                            self.shared.replies.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        self.shared.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                true
            }
            Some(Ok(Message::Close(frame))) => {
                self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
                if frame.is_some_and(|f| u16::from(f.code) == 1011) {
                    self.shared.slow.fetch_add(1, Ordering::Relaxed);
                }
                false
            }
            Some(Ok(_)) => true,
            Some(Err(_)) | None => {
                self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        self.shared
            .record_broadcasts(&mut self.latencies, self.remote);
        self.shared.record_replies(&mut self.reply_latencies);
    }
}

/// One client: connect, join, push on its schedule until `stop`, time every broadcast, then
/// read until its zone's last broadcast is in.
async fn client(
    mut plan: ClientPlan,
    epoch: Instant,
    shared: Arc<Shared>,
    mut go: watch::Receiver<Option<Instant>>,
    sent_in_zone: Arc<AtomicU64>,
    connect_permits: Arc<Semaphore>,
) {
    let done_pushing = DonePushing(shared.clone());
    let permit = connect_permits.acquire().await;
    let Some((mut ws, joined)) = connect_and_join(&plan.url, &plan, None).await else {
        shared.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    drop(permit);
    // Where it is in its zone's history, for a rejoin elsewhere: the first event it is sent is
    // its own join's.
    let mut zone_epoch = joined.epoch;
    let mut node = plan.nodes.iter().position(|u| *u == plan.url).unwrap_or(0);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut inbox = Inbox {
        epoch,
        shared: shared.clone(),
        latencies: Vec::with_capacity(FLUSH_EVERY),
        reply_latencies: Vec::with_capacity(FLUSH_EVERY),
        received: 0,
        answered: 0,
        remote: plan.remote,
        last_seq: (!plan.nodes.is_empty()).then_some(joined.seq.saturating_sub(1)),
    };
    // It reads while the others join (each join is broadcast to it): a client that did not
    // would fill its outbound queue in a crowded zone and be closed as a slow consumer.
    let start = loop {
        tokio::select! {
            biased;
            started = go.wait_for(Option::is_some) => match started {
                Ok(s) => break (*s).expect("set"),
                Err(_) => return,
            },
            frame = ws.next() => if !inbox.take(frame) {
                return;
            },
        }
    };
    let mut next_push = tokio::time::Instant::from_std(start) + Duration::from_secs_f64(plan.phase);
    let mut walk = plan.walk.take();
    let mut seq = 0u64;
    let mut sent_by_me = 0u64;
    // Both built once, not per frame read: a fresh timer and watch registration for every
    // frame showed in the harness's profile.
    let push = tokio::time::sleep_until(next_push);
    tokio::pin!(push);
    // The run's end is signalled by clearing the start.
    let stop = async {
        while go.changed().await.is_ok() {
            if go.borrow().is_none() {
                break;
            }
        }
    };
    tokio::pin!(stop);
    let connected = loop {
        tokio::select! {
            biased;
            frame = ws.next() => if !inbox.take(frame) {
                // Closed by its node (restarting): it rejoins another, from where it left off.
                match rejoin(&plan, &mut node, &zone_epoch, inbox.last_seq, &shared).await {
                    Some((again, joined)) => {
                        ws = again;
                        if !joined.recovered {
                            inbox.last_seq = Some(joined.seq.saturating_sub(1));
                        }
                        zone_epoch = joined.epoch;
                    }
                    None => break false,
                }
            },
            () = &mut stop => break true,
            () = &mut push => {
                seq += 1;
                let stamp = epoch.elapsed().as_micros() as u64;
                let (x, y) = match walk.as_mut() {
                    Some(w) => w.next(),
                    None => (seq as f64, 0.0),
                };
                let frame = format!(
                    r#"["1","{}","{}","agent_move",{{"position":{{"x":{x:.2},"y":{y:.2},"z":0}},"sent_at":{stamp}}}]"#,
                    push_ref(seq, stamp),
                    plan.topic
                );
                if ws.send(Message::text(frame)).await.is_err() {
                    shared.disconnects.fetch_add(1, Ordering::Relaxed);
                    break false;
                }
                shared.sent.fetch_add(1, Ordering::Relaxed);
                sent_in_zone.fetch_add(1, Ordering::Relaxed);
                sent_by_me += 1;
                next_push += Duration::from_secs_f64(plan.period);
                push.as_mut().reset(next_push);
            }
        }
    };
    drop(done_pushing);
    if !connected {
        return;
    }
    // Every client has stopped once `done_pushing` reaches `clients`; from then on, this zone's
    // count of pushes is final and this client should see every one of them, and the answer to
    // each of its own (with durable replies, an answer comes after its broadcast).
    let deadline = tokio::time::sleep(DRAIN_LIMIT);
    tokio::pin!(deadline);
    let mut check = tokio::time::interval(Duration::from_millis(20));
    loop {
        if shared.done_pushing.load(Ordering::Relaxed) >= shared.clients
            && (plan.filtered || inbox.received >= sent_in_zone.load(Ordering::Relaxed))
            && inbox.answered >= sent_by_me
        {
            break;
        }
        tokio::select! {
            biased;
            frame = ws.next() => if !inbox.take(frame) {
                return;
            },
            _ = check.tick() => {}
            () = &mut deadline => break,
        }
    }
    drop(inbox);
    let _ = ws.send(Message::Close(None)).await;
}

fn latency(h: &Histogram<u64>) -> Latency {
    let ms = |us: u64| us as f64 / 1000.0;
    Latency {
        p50: ms(h.value_at_quantile(0.5)),
        p90: ms(h.value_at_quantile(0.9)),
        p99: ms(h.value_at_quantile(0.99)),
        p999: ms(h.value_at_quantile(0.999)),
        max: ms(h.max()),
    }
}

/// With --rolling-restart: every node's URL (for clients to rejoin another), and where the
/// load says it has started (for the restarts to be spread over it).
pub(super) struct Rolling {
    nodes: Arc<[String]>,
    started: tokio::sync::oneshot::Sender<Instant>,
}

/// Connects the clients, runs the load, and gathers what they saw (`plans` from
/// [`Target::plans`]).
pub(super) async fn load(
    args: &WsArgs,
    ws_url: &str,
    plans: Vec<Plan>,
    progress: &ProgressBar,
    label: &str,
    server: &Observed,
    rolling: Option<Rolling>,
) -> RunFigures {
    let epoch = Instant::now();
    let (nodes, started) = match rolling {
        Some(Rolling { nodes, started }) => (nodes, Some(started)),
        None => (Arc::from([]), None),
    };
    let shared = Arc::new(Shared {
        clients: args.clients,
        ..Shared::default()
    });
    let (go_tx, go_rx) = watch::channel(None);
    let zone_sent: Vec<Arc<AtomicU64>> = (0..args.zones).map(|_| Arc::default()).collect();
    let mut members = vec![0u64; args.zones];
    let permits = Arc::new(Semaphore::new(64));
    let period = args.clients as f64 / args.rate;
    let connect_gap = Duration::from_secs_f64(1.0 / args.connect_rate.max(1.0));
    let connect_started = Instant::now();
    let mut tasks = Vec::with_capacity(plans.len());
    for (
        i,
        Plan {
            zone,
            topic,
            agent,
            token,
            node,
        },
    ) in plans.into_iter().enumerate()
    {
        members[zone] += 1;
        let plan = ClientPlan {
            url: node
                .as_ref()
                .map_or_else(|| ws_url.to_owned(), |n| n.url.clone()),
            remote: node.as_ref().map(|n| n.remote),
            topic,
            agent,
            token,
            period,
            phase: period * (i as f64 / args.clients as f64),
            nodes: nodes.clone(),
            walk: args
                .agents_per_zone
                .map(|_| Walk::new(i as u64 + 1, args.world)),
            filtered: args.aoi_radius.is_some(),
        };
        tasks.push(tokio::spawn(client(
            plan,
            epoch,
            shared.clone(),
            go_rx.clone(),
            zone_sent[zone].clone(),
            permits.clone(),
        )));
        tokio::time::sleep(connect_gap).await;
        progress.set_message(format!(
            "{label}: connecting {}/{}",
            shared.connected.load(Ordering::Relaxed),
            args.clients
        ));
    }
    // Wait for the stragglers (at most 30 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while shared.connected.load(Ordering::Relaxed)
        + (shared.errors.load(Ordering::Relaxed) as usize)
        < args.clients
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connected = shared.connected.load(Ordering::Relaxed);
    if args.agents_per_zone.is_some() && connected == args.clients {
        // A crowded zone's joins cost its members N²/2 frames: the load starts once they are
        // all in (each member is sent its own join and every later one), at most a minute.
        let due: u64 = members.iter().map(|&m| m * (m + 1) / 2).sum();
        let deadline = Instant::now() + Duration::from_secs(60);
        while shared.entered.load(Ordering::Relaxed) < due && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    // Idle memory: everyone joined, nothing sent yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connected_rss_bytes = server.pid.and_then(|p| rss(p, "VmRSS:"));
    let batches_before = batches::scrape(&server.metrics, &server.token).await;

    let start = Instant::now();
    let _ = go_tx.send(Some(start));
    if let Some(started) = started {
        let _ = started.send(start);
    }
    let mut timeline = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while start.elapsed().as_secs_f64() < args.duration {
        tick.tick().await;
        let (sent, delivered) = (
            shared.sent.load(Ordering::Relaxed),
            shared.delivered.load(Ordering::Relaxed),
        );
        let p99 = Shared::p99_ms(&shared.histogram);
        let reply_p99 = Shared::p99_ms(&shared.reply_histogram);
        let t = start.elapsed().as_secs_f64();
        let (last_sent, last_delivered) = timeline
            .last()
            .map_or((0, 0), |l: &(f64, u64, u64)| (l.1, l.2));
        progress.set_message(format!(
            "{label}: {connected} connected, {} in/s, {} out/s, p99 {p99:.1} ms, reply p99 {reply_p99:.1} ms",
            sent - last_sent,
            delivered - last_delivered
        ));
        timeline.push((t, sent, delivered));
    }
    let load_seconds = start.elapsed().as_secs_f64();
    let _ = go_tx.send(None);
    for t in tasks {
        let _ = t.await;
    }
    let broadcast_batches = match batches_before {
        Some(before) => batches::scrape(&server.metrics, &server.token)
            .await
            .map(|after| after.since(&before)),
        None => None,
    };
    let sent = shared.sent.load(Ordering::Relaxed);
    let delivered = shared.delivered.load(Ordering::Relaxed);
    // With a radius nobody knows ahead how many broadcasts are due: none are counted.
    let expected: u64 = if args.aoi_radius.is_some() {
        0
    } else {
        zone_sent
            .iter()
            .zip(&members)
            .map(|(s, m)| s.load(Ordering::Relaxed) * m)
            .sum()
    };
    let take = |h: &Mutex<Option<Histogram<u64>>>| {
        h.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_else(new_histogram)
    };
    let histogram = take(&shared.histogram);
    let reply_histogram = take(&shared.reply_histogram);
    let split = |h: &Mutex<Option<Histogram<u64>>>| {
        h.lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(|h| latency(&h))
    };
    RunFigures {
        connected,
        connect_seconds,
        sent,
        ingress_events_per_sec: sent as f64 / load_seconds,
        expected_deliveries: expected,
        delivered,
        delivered_per_sec: delivered as f64 / load_seconds,
        latency_ms: latency(&histogram),
        view_frames: shared.view_frames.load(Ordering::Relaxed),
        reply_latency_ms: latency(&reply_histogram),
        same_node_latency_ms: split(&shared.same_node),
        cross_node_latency_ms: split(&shared.cross_node),
        replies: shared.replies.load(Ordering::Relaxed),
        replies_timed: shared.replies_timed.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        disconnects: shared.disconnects.load(Ordering::Relaxed),
        slow_consumer_disconnects: shared.slow.load(Ordering::Relaxed),
        reconnects: shared.reconnects.load(Ordering::Relaxed),
        recovered_rejoins: shared.recovered.load(Ordering::Relaxed),
        restarted_nodes: 0,
        connected_rss_bytes,
        broadcast_batches,
        timeline,
        histogram: Some(histogram),
        reply_histogram: Some(reply_histogram),
    }
}

fn check(args: &WsArgs) -> Result<(), BenchError> {
    let bad = |m: &str| Err(BenchError::Args(m.to_owned()));
    if args.clients == 0 || args.zones == 0 || args.zones > args.clients {
        return bad("--clients must be at least 1, and --zones between 1 and --clients");
    }
    if !(args.rate > 0.0 && args.rate.is_finite() && args.duration > 0.0 && args.duration <= 3600.0)
    {
        return bad("--rate must be above 0 and --duration between 0 and 3600 seconds");
    }
    if args.url.is_some() && args.admin_token.is_none() {
        return bad(
            "--url needs the server's admin token (--admin-token or THUNDERLINE_ADMIN_TOKEN)",
        );
    }
    if args.sweep.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
        return bad("every --sweep rate must be above 0");
    }
    if args.rolling_restart && args.nodes < 2 {
        return bad(
            "--rolling-restart restarts the nodes of a cluster: it needs --nodes 2 or more",
        );
    }
    if args.nodes > 1 && (args.url.is_some() || !args.sweep.is_empty()) {
        return bad("--nodes starts a cluster of its own: it goes with neither --url nor --sweep");
    }
    if args.url.is_some() && args.replies.is_some() {
        return bad(
            "--replies sets the reply mode of the daemon the harness starts; with --url, start \
             that server in the mode you want and leave --replies out",
        );
    }
    Ok(())
}

/// One client's part of the load: its zone, topic, agent and token, and in a cluster which
/// node it talks to.
#[derive(Clone)]
pub(super) struct Plan {
    zone: usize,
    topic: String,
    agent: String,
    token: String,
    node: Option<NodePlan>,
}

/// A client's node in a cluster.
#[derive(Clone)]
struct NodePlan {
    url: String,
    /// Another node than its zone's owner: its broadcasts cross NATS.
    remote: bool,
}

/// How the harness runs the server it loads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Setup {
    /// `--url`, or one daemon on a throwaway SQLite store.
    Default,
    /// One daemon on a schema of its own in `--database` (the cluster's single-node twin).
    OneNode,
    /// `--nodes` daemons sharing `--cluster` and a schema of their own in `--database`.
    Cluster,
}

/// A PostgreSQL schema a run keeps its zones in, dropped afterwards.
pub(super) struct Schema {
    base: String,
    pub(super) name: String,
}

impl Schema {
    pub(super) async fn create(base: &str) -> Result<Self, BenchError> {
        use sqlx::Connection;
        let name = format!("bench_{}", uuid::Uuid::now_v7().simple());
        let mut db = sqlx::PgConnection::connect(base).await?;
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut db)
            .await?;
        Ok(Self {
            base: base.to_owned(),
            name,
        })
    }

    /// The URL whose connections use the schema.
    pub(super) fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!("{}{sep}options[search_path]={}", self.base, self.name)
    }

    pub(super) async fn drop_now(self) {
        use sqlx::Connection;
        if let Ok(mut db) = sqlx::PgConnection::connect(&self.base).await {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name))
                .execute(&mut db)
                .await;
        }
    }
}

/// The server under test, its zones, and a token for every client.
pub(super) struct Target {
    daemons: Vec<Daemon>,
    admin_token: String,
    pub(super) ws_url: String,
    plans: Vec<Plan>,
    pub(super) progress: ProgressBar,
    schema: Option<Schema>,
}

impl Target {
    /// The daemon's process id, when the harness started one.
    pub(super) fn pid(&self) -> Option<u32> {
        match self.daemons.as_slice() {
            [one] => Some(one.child.id()),
            _ => None,
        }
    }

    /// What a load run watches of these daemons.
    pub(super) fn observed(&self) -> Observed {
        Observed {
            pid: self.pid(),
            metrics: self.daemons.iter().map(|d| d.addr).collect(),
            token: self.admin_token.clone(),
        }
    }

    pub(super) fn plans(&self) -> Vec<Plan> {
        self.plans.clone()
    }

    /// Stops the daemons and drops the schema.
    pub(super) async fn finish(mut self) {
        self.daemons.clear();
        if let Some(schema) = self.schema.take() {
            schema.drop_now().await;
        }
    }
}

/// What a load run watches of the servers it loads: the memory of the one daemon, and the
/// broadcast batches of every daemon (none for the bare baseline or `--url`).
#[derive(Clone, Default)]
pub(super) struct Observed {
    pid: Option<u32>,
    metrics: Vec<SocketAddr>,
    token: String,
}

/// Waits until a daemon says it is ready (a cluster node: it has joined).
pub(super) async fn ready(addr: SocketAddr) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut probe) = AdminClient::connect(addr, "").await
            && probe
                .call(Method::GET, "/readyz", &json!(null))
                .await
                .is_ok()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Start(format!(
                "the node at {addr} never became ready"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn prepare(args: &WsArgs, setup: Setup) -> Result<Target, BenchError> {
    check(args)?;
    raise_fd_limit();
    let progress = if args.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::with_draw_target(None, ProgressDrawTarget::hidden())
    } else {
        ProgressBar::new_spinner()
    };
    progress.set_style(
        ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("a valid template"),
    );
    progress.enable_steady_tick(Duration::from_millis(200));

    let admin_token = args
        .admin_token
        .clone()
        .unwrap_or_else(crate::realtime::random_secret);
    // Every node signs and checks tokens with the same secret.
    let secret = crate::realtime::random_secret();
    let schema = match setup {
        Setup::Default => None,
        Setup::OneNode | Setup::Cluster => Some(Schema::create(&args.database).await?),
    };
    let mut daemons = Vec::new();
    match (&args.url, setup, &schema) {
        (Some(_), _, _) => {}
        (None, Setup::Default, _) | (None, _, None) => {
            daemons.push(start_daemon(&admin_token, &secret, args.replies, &[])?);
        }
        (None, Setup::OneNode, Some(schema)) => {
            let extra = ["--database".to_owned(), schema.url()];
            daemons.push(start_daemon(&admin_token, &secret, args.replies, &extra)?);
        }
        (None, Setup::Cluster, Some(schema)) => {
            progress.set_message(format!("starting {} nodes", args.nodes));
            for n in 0..args.nodes {
                let extra = [
                    "--database".to_owned(),
                    schema.url(),
                    "--cluster".to_owned(),
                    args.cluster.clone(),
                    "--node-id".to_owned(),
                    format!("n{n}"),
                    "--cluster-name".to_owned(),
                    schema.name.clone(),
                    "--cluster-heartbeat-ms".to_owned(),
                    "250".to_owned(),
                ];
                daemons.push(start_daemon(&admin_token, &secret, args.replies, &extra)?);
            }
            for d in &daemons {
                ready(d.addr).await?;
            }
        }
    }
    let (http_addr, ws_url) = match (&args.url, daemons.first()) {
        (Some(url), _) => {
            let hostport = url
                .trim_start_matches("ws://")
                .trim_start_matches("http://");
            let hostport = hostport.split('/').next().unwrap_or(hostport);
            let addr: SocketAddr = tokio::net::lookup_host(hostport)
                .await?
                .next()
                .ok_or_else(|| BenchError::Args(format!("cannot resolve {hostport}")))?;
            (addr, format!("ws://{hostport}/socket/websocket?vsn=2.0.0"))
        }
        (None, Some(d)) => (d.addr, ws_url_of(d.addr)),
        (None, None) => unreachable!("a daemon is started without --url"),
    };

    // Zones and tokens through the admin API (of the first node).
    progress.set_message("creating zones and tokens");
    let mut admin = AdminClient::connect(http_addr, &admin_token).await?;
    let per_zone = args.clients.div_ceil(args.zones);
    let mut zone_ids = Vec::new();
    let mut owners = Vec::new();
    for i in 0..args.zones {
        let mut spec =
            json!({"name": format!("bench-{i}"), "capacity": per_zone + 1, "permissions": 1});
        if let Some(radius) = args.aoi_radius {
            spec["interest_radius"] = json!(radius);
        }
        let z = admin.call(Method::POST, "/api/zones", &spec).await?;
        zone_ids.push(z["id"].as_str().unwrap_or_default().to_owned());
        owners.push(z["assigned_server"].as_str().unwrap_or_default().to_owned());
    }
    let mut plans = Vec::with_capacity(args.clients);
    for c in 0..args.clients {
        let zone = c % args.zones;
        let agent = format!("bench-agent-{c}");
        let t = admin
            .call(Method::POST, "/api/tokens", &json!({"agent_id": agent, "zone_id": zone_ids[zone], "permissions": 1, "ttl_seconds": 3600}))
            .await?;
        let token = t["token"].as_str().unwrap_or_default().to_owned();
        // In a cluster, client c talks to node c mod N.
        let node = (setup == Setup::Cluster && args.url.is_none()).then(|| {
            let n = c % daemons.len();
            NodePlan {
                url: ws_url_of(daemons[n].addr),
                remote: owners[zone] != format!("n{n}"),
            }
        });
        plans.push(Plan {
            zone,
            topic: format!("zone:{}", zone_ids[zone]),
            agent,
            token,
            node,
        });
    }
    Ok(Target {
        daemons,
        admin_token,
        ws_url,
        plans,
        progress,
        schema,
    })
}

pub(super) fn ws_url_of(addr: SocketAddr) -> String {
    format!("ws://{addr}/socket/websocket?vsn=2.0.0")
}

/// The cluster's load again, on a fresh cluster, while each node in turn is stopped with
/// SIGTERM and started again, the restarts spread evenly over the load.
async fn rolling_restart(args: &WsArgs) -> Result<RunFigures, BenchError> {
    let mut target = prepare(args, Setup::Cluster).await?;
    let nodes: Arc<[String]> = target.daemons.iter().map(|d| ws_url_of(d.addr)).collect();
    let (started_tx, started) = tokio::sync::oneshot::channel::<Instant>();
    let mut daemons = std::mem::take(&mut target.daemons);
    let progress = target.progress.clone();
    let duration = Duration::from_secs_f64(args.duration);
    let restarts = tokio::spawn(async move {
        let mut outcome = Ok(0);
        if let Ok(start) = started.await {
            let count = daemons.len() as u32;
            for (i, daemon) in daemons.iter_mut().enumerate() {
                let at: Instant = start + duration * (2 * i as u32 + 1) / (2 * count);
                tokio::time::sleep_until(at.into()).await;
                // Only while the load runs: a restart after it would measure nothing.
                if start.elapsed() >= duration {
                    break;
                }
                progress.println(format!("restarting node n{i}"));
                match daemon.restart().await {
                    Ok(()) => outcome = outcome.map(|n| n + 1),
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
        }
        (daemons, outcome)
    });
    let run = load(
        args,
        &target.ws_url,
        target.plans.clone(),
        &target.progress,
        &format!("{} nodes, rolling restart", args.nodes),
        // Restarted daemons start their counts again: their batches are not summed.
        &Observed::default(),
        Some(Rolling {
            nodes,
            started: started_tx,
        }),
    )
    .await;
    let (daemons, outcome) = restarts.await.map_err(std::io::Error::other)?;
    target.daemons = daemons;
    target.progress.finish_and_clear();
    target.finish().await;
    outcome.map(|restarted| RunFigures {
        restarted_nodes: restarted,
        ..run
    })
}

pub async fn run_async(args: &WsArgs) -> Result<WsReport, BenchError> {
    // A cluster is compared with one node on the same database, in the same run, first (or,
    // with --rolling-restart, with itself while its nodes restart, after).
    let one_node = if args.nodes > 1 && !args.rolling_restart {
        let target = prepare(args, Setup::OneNode).await?;
        let run = load(
            args,
            &target.ws_url,
            target.plans.clone(),
            &target.progress,
            "one node",
            &target.observed(),
            None,
        )
        .await;
        target.progress.finish_and_clear();
        target.finish().await;
        Some(run)
    } else {
        None
    };
    let setup = if args.nodes > 1 {
        Setup::Cluster
    } else {
        Setup::Default
    };
    let target = prepare(args, setup).await?;
    let pid = target.pid();
    let observed = target.observed();
    let rss_before = pid.and_then(|p| rss(p, "VmRSS:"));
    let label = if args.nodes > 1 {
        format!("{} nodes", args.nodes)
    } else {
        "thunderline".to_owned()
    };
    let run = load(
        args,
        &target.ws_url,
        target.plans.clone(),
        &target.progress,
        &label,
        &observed,
        None,
    )
    .await;
    let server_peak = pid.and_then(|p| rss(p, "VmHWM:"));
    let (plans, progress) = (target.plans.clone(), target.progress.clone());
    target.finish().await;
    let rolling = if args.rolling_restart {
        Some(rolling_restart(args).await?)
    } else {
        None
    };

    let baseline = if args.no_baseline || args.url.is_some() {
        None
    } else {
        let server = ws_baseline::start().await?;
        let url = format!("ws://{}/socket/websocket?vsn=2.0.0", server.addr);
        Some(
            load(
                args,
                &url,
                plans,
                &progress,
                "baseline",
                &Observed::default(),
                None,
            )
            .await,
        )
    };
    progress.finish_and_clear();

    // Per connection while idle: what joining everyone added to the server's memory.
    let per_connection = match (run.connected_rss_bytes, rss_before) {
        (Some(connected), Some(before)) if run.connected > 0 => {
            Some(connected.saturating_sub(before) as f64 / run.connected as f64)
        }
        _ => None,
    };
    let ratio = baseline
        .as_ref()
        .filter(|b| b.delivered_per_sec > 0.0)
        .map(|b| run.delivered_per_sec / b.delivered_per_sec);
    Ok(WsReport {
        clients: args.clients,
        zones: args.zones,
        rate: args.rate,
        duration: args.duration,
        replies_mode: args.replies,
        server_peak_rss_bytes: server_peak,
        server_idle_rss_bytes: rss_before,
        rss_per_connection_bytes: per_connection,
        baseline_delivered_per_sec: baseline.as_ref().map(|b| b.delivered_per_sec),
        baseline_latency_ms: baseline.as_ref().map(|b| b.latency_ms.clone()),
        baseline_reply_latency_ms: baseline.as_ref().map(|b| b.reply_latency_ms.clone()),
        ratio,
        nodes: args.nodes,
        cross_to_same_p99: match (&run.cross_node_latency_ms, &run.same_node_latency_ms) {
            (Some(cross), Some(same)) if same.p99 > 0.0 => Some(cross.p99 / same.p99),
            _ => None,
        },
        one_node,
        rolling_restart: rolling,
        run,
    })
}

/// Runs the load at each of `args.sweep`'s rates against one server, in order.
pub async fn sweep_async(args: &WsArgs) -> Result<SweepReport, BenchError> {
    let target = prepare(args, Setup::Default).await?;
    let observed = target.observed();
    let (ws_url, plans, progress) = (
        target.ws_url.clone(),
        target.plans.clone(),
        target.progress.clone(),
    );
    let mut steps = Vec::with_capacity(args.sweep.len());
    for &rate in &args.sweep {
        let step_args = WsArgs {
            rate,
            ..args.clone()
        };
        let label = format!("{rate} events/s");
        let run = load(
            &step_args,
            &ws_url,
            plans.clone(),
            &progress,
            &label,
            &observed,
            None,
        )
        .await;
        let within_target = run.latency_ms.p99 < args.p99_target_ms
            && run.delivered == run.expected_deliveries
            && run.answered_every_push(args.clients)
            && run.disconnects == 0;
        steps.push(SweepStep {
            rate,
            within_target,
            run,
        });
    }
    let server_peak_rss_bytes = target.pid().and_then(|p| rss(p, "VmHWM:"));
    target.finish().await;
    progress.finish_and_clear();
    let mut by_rate: Vec<&SweepStep> = steps.iter().collect();
    by_rate.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let highest_rate_within_target = by_rate
        .iter()
        .take_while(|s| s.within_target)
        .last()
        .map(|s| s.rate);
    Ok(SweepReport {
        clients: args.clients,
        zones: args.zones,
        duration: args.duration,
        p99_target_ms: args.p99_target_ms,
        replies_mode: args.replies,
        steps,
        highest_rate_within_target,
        server_peak_rss_bytes,
    })
}

fn block_on<R>(
    work: impl std::future::Future<Output = Result<R, BenchError>>,
) -> Result<R, BenchError> {
    super::runtime()?.block_on(work)
}

pub fn run(args: &WsArgs) -> Result<WsReport, BenchError> {
    block_on(run_async(args))
}

pub fn sweep(args: &WsArgs) -> Result<SweepReport, BenchError> {
    block_on(sweep_async(args))
}

impl SweepReport {
    pub fn table(&self) -> String {
        let mut out = format!(
            "websocket sweep: {} clients over {} zones, {} s per rate, target p99 < {} ms{}\n\
             {:>10} {:>14} {:>22} {:>9} {:>9} {:>9} {:>12} {:>12}  {}\n",
            self.clients,
            self.zones,
            self.duration,
            self.p99_target_ms,
            replies_note(self.replies_mode),
            "events/s",
            "frames/s",
            "delivered / expected",
            "p50 ms",
            "p99 ms",
            "max ms",
            "reply p50",
            "reply p99",
            "within target"
        );
        for s in &self.steps {
            let r = &s.run;
            out.push_str(&format!(
                "{:>10.0} {:>14.0} {:>22} {:>9.2} {:>9.2} {:>9.2} {:>12.2} {:>12.2}  {}\n",
                s.rate,
                r.delivered_per_sec,
                format!("{} / {}", r.delivered, r.expected_deliveries),
                r.latency_ms.p50,
                r.latency_ms.p99,
                r.latency_ms.max,
                r.reply_latency_ms.p50,
                r.reply_latency_ms.p99,
                if s.within_target { "yes" } else { "no" },
            ));
        }
        out.push_str(&match self.highest_rate_within_target {
            Some(rate) => format!("highest rate within target: {rate} events/s\n"),
            None => "no rate held the target\n".to_owned(),
        });
        out
    }
}

/// The table's mention of `--replies`, when it was given.
fn replies_note(mode: Option<Replies>) -> String {
    mode.map_or(String::new(), |m| format!(", replies {}", m.as_str()))
}

impl WsReport {
    pub fn table(&self) -> String {
        let r = &self.run;
        let l = &r.latency_ms;
        let rl = &r.reply_latency_ms;
        let mut out = format!(
            "websocket benchmark: {} clients over {} zones, {} events/s for {} s{}\n\
             {:<30}{:>12.2} s ({} of {} connected)\n\
             {:<30}{:>12.0} events/s ({} sent, {} answered ok)\n\
             {:<30}{:>12.0} frames/s ({} of {} expected)\n\
             {:<30}p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms\n\
             {:<30}p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms\n\
             {:<30}{:>12} errors, {} disconnects, {} slow consumers\n",
            self.clients,
            self.zones,
            self.rate,
            self.duration,
            replies_note(self.replies_mode),
            "connect time",
            r.connect_seconds,
            r.connected,
            self.clients,
            "ingress",
            r.ingress_events_per_sec,
            r.sent,
            r.replies,
            "delivered broadcasts",
            r.delivered_per_sec,
            r.delivered,
            r.expected_deliveries,
            "latency (push → receive)",
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            "reply latency (push → ok)",
            rl.p50,
            rl.p90,
            rl.p99,
            rl.p999,
            rl.max,
            "problems",
            r.errors,
            r.disconnects,
            r.slow_consumer_disconnects,
        );
        if self.nodes > 1 {
            let row = |label: &str, r: &RunFigures| {
                format!(
                    "{label:<30}{:>12.0} frames/s, broadcast p99 {:.2} ms, reply p99 {:.2} ms ({} of {} delivered)\n",
                    r.delivered_per_sec,
                    r.latency_ms.p99,
                    r.reply_latency_ms.p99,
                    r.delivered,
                    r.expected_deliveries
                )
            };
            if let Some(one) = &self.one_node {
                out.push_str(&row("one node (same database)", one));
            }
            let steady = if self.rolling_restart.is_some() {
                format!("{} nodes, steady", self.nodes)
            } else {
                format!("{} nodes", self.nodes)
            };
            out.push_str(&row(&steady, r));
            if let Some(rolling) = &self.rolling_restart {
                out.push_str(&row(
                    &format!("{} nodes, rolling restart", self.nodes),
                    rolling,
                ));
                out.push_str(&format!(
                    "{:<30}{:>12} nodes restarted, {} rejoins ({} recovered), {} closes, {} of {} pushes answered ok, {} errors\n",
                    "during the rolling restart",
                    rolling.restarted_nodes,
                    rolling.reconnects,
                    rolling.recovered_rejoins,
                    rolling.disconnects,
                    rolling.replies,
                    rolling.sent,
                    rolling.errors,
                ));
            }
            if let (Some(same), Some(cross)) = (&r.same_node_latency_ms, &r.cross_node_latency_ms) {
                out.push_str(&format!(
                    "{:<30}same node p50 {:.2}  p99 {:.2} ms; cross node p50 {:.2}  p99 {:.2} ms; ratio {:.2}\n",
                    "broadcast by receiver's node",
                    same.p50,
                    same.p99,
                    cross.p50,
                    cross.p99,
                    self.cross_to_same_p99.unwrap_or(f64::NAN),
                ));
            }
        }
        if let Some(b) = &r.broadcast_batches {
            out.push_str(&format!(
                "{:<30}{}\n",
                "broadcast batches (trigger)",
                b.summary()
            ));
        }
        if let Some(peak) = self.server_peak_rss_bytes {
            out.push_str(&format!(
                "{:<30}{:>12.1} MiB peak, {} per idle connection\n",
                "server memory",
                peak as f64 / 1048576.0,
                self.rss_per_connection_bytes
                    .map_or("n/a".into(), |b| format!("{:.1} KiB", b / 1024.0)),
            ));
        }
        if let (Some(b), Some(ratio), Some(l), Some(rl)) = (
            self.baseline_delivered_per_sec,
            self.ratio,
            &self.baseline_latency_ms,
            &self.baseline_reply_latency_ms,
        ) {
            out.push_str(&format!(
                "{:<30}{:>12.0} frames/s, p50 {:.2}  p99 {:.2} ms; replies p50 {:.2}  p99 {:.2} ms; ratio {:.3}\n",
                "baseline (bare broadcast)", b, l.p50, l.p99, rl.p50, rl.p99, ratio
            ));
        }
        out
    }

    /// A self-contained HTML page with the latency distribution and throughput over time.
    pub fn html(&self) -> String {
        super::ws_report::render(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_stamp_without_parsing() {
        assert_eq!(
            sent_at(
                r#"[null,null,"zone:x","agent_moved",{"agent_id":"a","position":{"x":1.0},"sent_at":12345}]"#
            ),
            Some(12345)
        );
        assert_eq!(sent_at(r#"[null,null,"t","agent_moved",{}]"#), None);
    }

    #[test]
    fn reads_the_send_time_back_from_a_reply_ref() {
        let r = push_ref(7, 123456);
        let reply = crate::realtime::protocol::reply(
            Some("1"),
            Some(&r),
            "zone:x",
            true,
            &serde_json::json!({}),
        );
        assert_eq!(reply_stamp(&reply), Some(123456));
        let baseline = json!(["1", r, "zone:x", "phx_reply", {"status": "ok", "response": {}}]);
        assert_eq!(reply_stamp(&baseline.to_string()), Some(123456));
        assert_eq!(
            reply_stamp(r#"[null,"m3.42","t","phx_reply",{"status":"ok"}]"#),
            Some(42)
        );
        // Not a ref the harness wrote: the join's, or someone else's.
        assert_eq!(
            reply_stamp(r#"["1","1","t","phx_reply",{"status":"ok"}]"#),
            None
        );
        assert_eq!(reply_stamp(r#"["1",null,"t","phx_reply",{}]"#), None);
        assert_eq!(reply_stamp(r#"["1","m5","t","phx_reply",{}]"#), None);
    }
}

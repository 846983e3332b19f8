//! `thunderline serve`: the zone pipeline, the WebSocket endpoint and the admin API on one
//! listener, and an orderly shutdown.
//!
//! The pipeline it runs: an in-memory producer fed by the sockets, the admin API and the zones'
//! clock → one writer per zone (processors partitioned by zone id) → two batchers, `broadcast`
//! (flushes within a few milliseconds, to the topic sink) and `audit` (20 events / 2 s, to the
//! audit log, retried until the database takes it). Snapshots of the zones are written by a
//! second, small pipeline as messages are acknowledged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::DatabaseArgs;
use super::api::{self, ApiState};
use super::config::PipelineFile;
use super::console;
use super::control::ZonePipeline;
use super::error::DaemonError;
use super::ingest::{Sources, SourcesSettled};
use crate::cluster::{Cluster, HAND_OVER_LIMIT};
use crate::pipeline::{BatcherName, Message, Pipeline, PipelineMetrics, in_memory};
use crate::realtime::revocation::{Revocation, Revocations};
use crate::realtime::socket::SERVICE_RESTART;
use crate::realtime::{
    Hub, HubMetrics, SocketConfig, SocketContext, SocketMetrics, TokenSigner, TopicSink,
    random_secret,
};
use crate::runtime::{
    Limits, Migrations, OWNERS_BATCHER, OwnerOutcomes, Replies, Snapshots, TimerConfig,
    WriterConfig, ZoneAcker, ZoneHandle, ZoneRegistry, ZoneWork, ZoneWriter, command, run_timers,
};
use crate::store::{AuditSink, Backend, Store};
use crate::zone::{Actor, CommandKind};

/// Each connection's kernel send buffer (Linux doubles it for bookkeeping): room for several
/// hundred broadcast frames, so writes still batch, and a bounded amount of hidden lag.
const SEND_BUFFER_BYTES: usize = 64 * 1024;

#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on (HTTP, the WebSocket endpoint and the admin API).
    #[arg(long, env = "THUNDERLINE_LISTEN", default_value = "127.0.0.1:4000")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub db: DatabaseArgs,
    /// The pipeline file (see pipelines/zones.toml); without it, the same built-in defaults.
    #[arg(long, env = "THUNDERLINE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log format: `text` for people, `json` for machines.
    #[arg(long, env = "THUNDERLINE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// The least severe log lines written: error, warn, info, debug or trace. `RUST_LOG`, when
    /// set, adds per-module levels on top (e.g. `RUST_LOG=thunderline::cluster=debug`).
    #[arg(long, env = "THUNDERLINE_LOG_LEVEL", default_value = "info")]
    pub log_level: tracing::Level,
    /// When a client's `ok` is sent: `applied` (once its zone applied the command) or `durable`
    /// (once the events it caused are committed to the audit log, so that a crash loses nothing
    /// answered ok). Default: the pipeline file's `[replies] after`, else `durable`.
    #[arg(long, env = "THUNDERLINE_REPLIES", value_enum)]
    pub replies: Option<Replies>,
    /// The most events a client that rejoins (`since` in its join) may have missed and still
    /// get them all, from memory and the audit log; past it, it gets a fresh snapshot.
    /// Default: the pipeline file's `[zones] history_max`, else 10000.
    #[arg(long, env = "THUNDERLINE_HISTORY_MAX")]
    pub history_max: Option<u64>,
    /// The longest a join token minted through the admin API may live, in seconds (or 90m,
    /// 24h, 7d); a longer `ttl_seconds` is refused with 422.
    #[arg(long, env = "THUNDERLINE_MAX_TOKEN_TTL", default_value_t = DEFAULT_MAX_TOKEN_TTL,
          value_parser = super::seconds)]
    pub max_token_ttl: u64,
    /// Serve `/metrics` on this address instead of the public one (e.g. 127.0.0.1:9100).
    #[arg(long, env = "THUNDERLINE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Require `Authorization: Bearer <this>` on `/metrics` (at least 32 characters).
    #[arg(long, env = "THUNDERLINE_METRICS_TOKEN")]
    pub metrics_token: Option<String>,
    /// The most sessions one agent may hold in one zone; one more join is refused
    /// `too_many_sessions`.
    #[arg(long, env = "THUNDERLINE_MAX_SESSIONS_PER_AGENT", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_agent: u32,
    /// The most WebSocket connections open at once; past it, upgrades are refused with 503.
    #[arg(long, env = "THUNDERLINE_MAX_CONNECTIONS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,
    /// The most WebSocket connections open at once from one client address (default:
    /// unlimited); past it, that address's upgrades are refused with 503.
    #[arg(long, env = "THUNDERLINE_MAX_CONNECTIONS_PER_IP",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_ip: Option<u32>,
    /// The most bytes waiting to be written to one connection; past it (as past 1,024 frames)
    /// the client is a slow consumer and is closed with 1011.
    #[arg(long, env = "THUNDERLINE_MAX_OUTBOUND_BYTES", default_value_t = 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..))]
    pub max_outbound_bytes: u64,
    /// Run as a node of a cluster: the NATS server all nodes share (with one database and one
    /// signing secret, THUNDERLINE_SECRET). Default: the pipeline file's `[cluster] url`, else a
    /// single daemon.
    #[arg(long, env = "THUNDERLINE_CLUSTER")]
    pub cluster: Option<String>,
    /// This node's name in the cluster (letters, digits, '-', '_'), the same across restarts.
    #[arg(long, env = "THUNDERLINE_NODE_ID")]
    pub node_id: Option<String>,
    /// How often the node announces itself to the cluster, in milliseconds; a node silent for
    /// three heartbeats is dead. Default: `[cluster] heartbeat_ms`, else 1000.
    #[arg(long, env = "THUNDERLINE_CLUSTER_HEARTBEAT_MS",
          value_parser = clap::value_parser!(u64).range(10..=60_000))]
    pub cluster_heartbeat_ms: Option<u64>,
    /// The cluster's name, which its NATS subjects and lease bucket start with, so that
    /// several clusters can share one NATS server. Default: `[cluster] name`, else thunderline.
    #[arg(long, env = "THUNDERLINE_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
}

impl ServeArgs {
    /// A server on a free loopback port with every default, for the benches and tests that
    /// start one in-process.
    pub fn local(database: Option<String>, data_dir: PathBuf) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            db: DatabaseArgs { database, data_dir },
            config: None,
            log_format: LogFormat::Text,
            log_level: tracing::Level::INFO,
            replies: None,
            history_max: None,
            max_token_ttl: DEFAULT_MAX_TOKEN_TTL,
            metrics_listen: None,
            metrics_token: None,
            max_sessions_per_agent: 4,
            max_connections: 100_000,
            max_connections_per_ip: None,
            max_outbound_bytes: 1024 * 1024,
            cluster: None,
            node_id: None,
            cluster_heartbeat_ms: None,
            cluster_name: None,
        }
    }
}

/// 24 hours.
pub const DEFAULT_MAX_TOKEN_TTL: u64 = 24 * 3600;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl ServeArgs {
    /// The pipeline file, or the defaults, with the flags that override it applied.
    pub fn pipeline(&self) -> Result<PipelineFile, DaemonError> {
        let mut file = match &self.config {
            Some(path) => PipelineFile::load(path)?,
            None => PipelineFile::default(),
        };
        if let Some(replies) = self.replies {
            file.replies.after = replies;
        }
        if let Some(max) = self.history_max {
            file.zones.history_max = max;
        }
        match (&self.cluster, &mut file.cluster) {
            (Some(url), Some(cluster)) => cluster.url = url.clone(),
            (Some(url), None) => {
                file.cluster = Some(crate::cluster::ClusterConfig {
                    url: url.clone(),
                    node_id: String::new(),
                    heartbeat_ms: 1_000,
                    name: "thunderline".into(),
                });
            }
            (None, _) => {}
        }
        if let Some(cluster) = &mut file.cluster {
            if let Some(node) = &self.node_id {
                cluster.node_id = node.clone();
            }
            if let Some(ms) = self.cluster_heartbeat_ms {
                cluster.heartbeat_ms = ms;
            }
            if let Some(name) = &self.cluster_name {
                cluster.name = name.clone();
            }
            if cluster.node_id.is_empty() {
                return Err(DaemonError::Cluster(
                    crate::cluster::ClusterError::NodeName("(none: give --node-id)".into()),
                ));
            }
        } else if self.node_id.is_some()
            || self.cluster_heartbeat_ms.is_some()
            || self.cluster_name.is_some()
        {
            return Err(DaemonError::Cluster(crate::cluster::ClusterError::Config(
                "--node-id and --cluster-heartbeat-ms need --cluster (or [cluster] in the pipeline file)".into(),
            )));
        }
        Ok(file)
    }
}

/// The server's secrets: the token-signing secret and the admin API's bearer token.
#[derive(Clone, Debug)]
pub struct Secrets {
    pub signing: String,
    pub admin_token: String,
    /// Where the admin token came from: the banner says where it is kept.
    pub admin_token_origin: SecretOrigin,
}

/// Where a secret came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretOrigin {
    /// The environment variable named.
    Env(String),
    /// A file of the data directory, written on an earlier start.
    File(PathBuf),
    /// A file of the data directory, generated on this start.
    Generated(PathBuf),
}

impl std::fmt::Display for SecretOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Env(var) => write!(f, "from {var}"),
            Self::File(path) => write!(f, "kept in {}", path.display()),
            Self::Generated(path) => write!(f, "generated now, kept in {}", path.display()),
        }
    }
}

/// The shortest secret or admin token taken from the environment.
const MIN_SECRET_CHARS: usize = 32;

/// Reads a secret from the environment, or from `data_dir/name`, generating it there on first
/// start (readable by the owner only) when `create`.
fn secret(
    env: &str,
    data_dir: &Path,
    name: &str,
    create: bool,
) -> Result<(String, SecretOrigin), DaemonError> {
    if let Ok(v) = std::env::var(env)
        && !v.is_empty()
    {
        if v.chars().count() < MIN_SECRET_CHARS {
            return Err(DaemonError::WeakSecret {
                env: env.to_owned(),
            });
        }
        return Ok((v, SecretOrigin::Env(env.to_owned())));
    }
    let path = shown(&data_dir.join(name));
    let io = |source| DaemonError::Secret {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            refuse_if_shared(&path)?;
            return Ok((s.trim().to_owned(), SecretOrigin::File(path)));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    if !create {
        return Err(DaemonError::NoSecret { path });
    }
    let value = random_secret();
    write_private(data_dir, &path, &value).map_err(io)?;
    Ok((value, SecretOrigin::Generated(path)))
}

/// A secret file others can read is a leaked secret: refuse it and say how to fix it.
fn refuse_if_shared(path: &Path) -> Result<(), DaemonError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| DaemonError::Secret {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode();
        if let Some(who) = open_to(mode) {
            return Err(DaemonError::SharedSecret {
                path: path.to_owned(),
                mode: mode & 0o777,
                who,
            });
        }
    }
    Ok(())
}

/// Who besides its owner a file mode lets in, if anyone.
fn open_to(mode: u32) -> Option<&'static str> {
    match (mode & 0o070 != 0, mode & 0o007 != 0) {
        (true, true) => Some("its group and others"),
        (true, false) => Some("its group"),
        (false, true) => Some("others"),
        (false, false) => None,
    }
}

/// A path as an error shows it: absolute, so that a command run from the wrong directory says
/// where it looked.
fn shown(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// Refuses a data directory its owner shares: it holds the secrets and the database. One that
/// does not exist yet is fine (`serve` creates it, mode 0700).
pub fn check_data_dir(data_dir: &Path) -> Result<(), DaemonError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = match std::fs::metadata(data_dir) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => {
                return Err(DaemonError::Secret {
                    path: shown(data_dir),
                    source,
                });
            }
        };
        let mode = meta.permissions().mode();
        if let Some(who) = open_to(mode) {
            return Err(DaemonError::SharedDataDir {
                path: shown(data_dir),
                mode: mode & 0o777,
                who,
            });
        }
    }
    Ok(())
}

/// The data directory of a server that has run here: the commands around `serve` read it and
/// never create one (a new secret would make a second, different server).
pub fn existing_data_dir(data_dir: &Path) -> Result<(), DaemonError> {
    if !data_dir.is_dir() {
        return Err(DaemonError::NoDataDir {
            path: shown(data_dir),
        });
    }
    check_data_dir(data_dir)
}

/// Creates `path` holding `value`, readable by its owner only from the first byte on (never
/// written first and restricted after), in a data directory only its owner may enter when it
/// is created here. An existing file is not overwritten.
fn write_private(data_dir: &Path, path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new();
    file.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        file.mode(0o600);
    }
    create_data_dir(data_dir)?;
    let mut file = file.open(path)?;
    file.write_all(value.as_bytes())?;
    file.sync_all()
}

/// Creates the data directory (and its parents) if it is missing, only its owner may enter it:
/// whatever else writes there later (the SQLite database) finds it private.
fn create_data_dir(data_dir: &Path) -> std::io::Result<()> {
    let mut dir = std::fs::DirBuilder::new();
    dir.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        dir.mode(0o700);
    }
    dir.create(data_dir)
}

/// The generated admin token's file in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin_token";

/// The server's secrets, generated in `data_dir` on its first start.
pub fn load_secrets(data_dir: &Path) -> Result<Secrets, DaemonError> {
    check_data_dir(data_dir)?;
    create_data_dir(data_dir).map_err(|source| DaemonError::Secret {
        path: shown(data_dir),
        source,
    })?;
    let (signing, _) = secret("THUNDERLINE_SECRET", data_dir, "secret", true)?;
    let (admin_token, admin_token_origin) =
        secret("THUNDERLINE_ADMIN_TOKEN", data_dir, ADMIN_TOKEN_FILE, true)?;
    Ok(Secrets {
        signing,
        admin_token,
        admin_token_origin,
    })
}

/// The token-signing secret of the server whose data directory is `data_dir` (or
/// `THUNDERLINE_SECRET`), never generated: for the commands around `serve`.
pub fn signing_secret(data_dir: &Path) -> Result<String, DaemonError> {
    if std::env::var("THUNDERLINE_SECRET").is_ok_and(|v| !v.is_empty()) {
        return secret("THUNDERLINE_SECRET", data_dir, "secret", false).map(|(s, _)| s);
    }
    existing_data_dir(data_dir)?;
    secret("THUNDERLINE_SECRET", data_dir, "secret", false).map(|(s, _)| s)
}

/// What every exporter of a daemon is expected to show: the process's CPU, memory and file
/// descriptors (`process_*`, read from /proc), and which build is running.
fn register_process_metrics(registry: &Registry) -> Result<(), prometheus::Error> {
    #[cfg(target_os = "linux")]
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    let build = prometheus::IntGaugeVec::new(
        prometheus::Opts::new(
            "thunderline_build_info",
            "Always 1; its label says which version of thunderline is running.",
        ),
        &["version"],
    )?;
    build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    registry.register(Box::new(build))
}

/// The audit batcher's settings. SQLite takes one writer at a time: more sink workers would only
/// queue their commits behind each other, while one worker lets waiting events group into the
/// next commit (measured: durable reply p99 13 ms with one, 40–47 ms with four; BENCHMARKS.md).
fn audit_config(file: &PipelineFile, store: &Store) -> crate::pipeline::BatcherConfig {
    let config = file.batchers.audit.clone();
    if store.backend() == Backend::Sqlite && config.get_concurrency() > 1 {
        tracing::info!(
            configured = config.get_concurrency(),
            "SQLite has a single writer: the audit batcher runs one sink worker"
        );
        return config.concurrency(1);
    }
    config
}

/// Serves `app` on `listener` until `stop` turns true, then finishes the requests under way.
/// Handlers see the client's address (`ConnectInfo<SocketAddr>`).
fn serve_until<L>(
    listener: L,
    app: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<std::io::Result<()>>
where
    L: axum::serve::Listener<Addr = SocketAddr>,
    for<'a> SocketAddr: axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|&s| s).await;
        })
        .await
    })
}

/// A running server.
pub struct Server {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when it has its own address.
    pub metrics_addr: Option<SocketAddr>,
    pub secrets: Secrets,
    pub registry: Registry,
    pub zones: ZoneHandle,
    stop: watch::Sender<bool>,
    sockets_stop: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    metrics_http: Option<JoinHandle<std::io::Result<()>>>,
    timers: JoinHandle<()>,
    pipeline: ZonePipeline,
    snapshots: Arc<Snapshots>,
    store: Store,
    connections: prometheus::IntGauge,
    /// The broker sources' last settlements, waited for after the drain.
    settled: SourcesSettled,
    /// In a cluster: this node's part, and what ends its membership once it has stopped.
    cluster: Option<(Cluster, watch::Sender<bool>)>,
}

impl Server {
    /// Opens the store, builds the pipelines and starts listening.
    pub async fn start(args: &ServeArgs, file: &PipelineFile) -> Result<Self, DaemonError> {
        // Nothing is created (data directory, secrets, database) before the addresses are held:
        // a server that cannot listen leaves no trace.
        let listener =
            TcpListener::bind(args.listen)
                .await
                .map_err(|source| DaemonError::Listen {
                    addr: args.listen,
                    source,
                })?;
        let metrics_listener = match args.metrics_listen {
            None => None,
            Some(at) => Some(
                TcpListener::bind(at)
                    .await
                    .map_err(|source| DaemonError::Listen { addr: at, source })?,
            ),
        };
        let secrets = load_secrets(&args.db.data_dir)?;
        if args
            .metrics_token
            .as_ref()
            .is_some_and(|t| t.chars().count() < MIN_SECRET_CHARS)
        {
            return Err(DaemonError::WeakSecret {
                env: "--metrics-token".into(),
            });
        }
        let signer = TokenSigner::new(secrets.signing.as_bytes())?;
        let store = match &file.cluster {
            Some(config) => {
                Store::connect_with_stall_limit(&args.db.url(), config.stall_limit()).await?
            }
            None => Store::connect(&args.db.url()).await?,
        };
        let registry = Registry::new();
        register_process_metrics(&registry)?;
        let hub = Arc::new(Hub::new(HubMetrics::register(&registry)?));
        let zone_registry = Arc::new(ZoneRegistry::new(store.clone()));
        // A node of a cluster: announced from now on, until the server has stopped.
        let (cluster_stop, cluster_stop_rx) = watch::channel(false);
        let cluster = match &file.cluster {
            Some(config) => Some(
                Cluster::join(
                    config,
                    hub.clone(),
                    store.clone(),
                    &registry,
                    cluster_stop_rx,
                )
                .await?,
            ),
            None => None,
        };
        let pipeline_metrics = PipelineMetrics::register(&registry)?;
        let snapshots = Arc::new(Snapshots::start(
            store.clone(),
            &zone_registry,
            registry.clone(),
            pipeline_metrics.clone(),
        )?);
        let mut acker = ZoneAcker::new(zone_registry.clone(), snapshots.clone());
        if let Some(cluster) = &cluster {
            acker = acker.placed(cluster.router.clone());
        }
        let acker = Arc::new(acker);
        let processors = file.processors.config.get_concurrency();
        let mut sources = Sources::connect(file, acker.clone(), &registry, processors).await?;
        let settled = sources.settled();

        let (producer, push) = in_memory::<ZoneWork>(file.producer.queue.get());
        let routes: Arc<[BatcherName]> =
            Arc::from(vec![BatcherName::from("broadcast"), "audit".into()]);
        let evict_after = Duration::from_millis(file.zones.evict_after_ms.get());
        let mut writer = ZoneWriter::new(
            zone_registry.clone(),
            routes,
            WriterConfig {
                replies: file.replies.after,
                limits: Limits {
                    broadcast_limit: file.zones.broadcast_limit(),
                    max_sessions_per_agent: Some(args.max_sessions_per_agent),
                },
                evict_after,
                history: file.zones.history(),
            },
            &registry,
        )?;
        if let Some(cluster) = &cluster {
            writer = writer.placed(cluster.router.clone());
        }
        let migrations_slot: Arc<std::sync::OnceLock<Arc<Migrations>>> = Arc::default();
        let writer = writer.migrating(migrations_slot.clone());
        // One writer per zone: all of a zone's commands go to one worker, in order.
        let builder = Pipeline::builder("zones")
            .producer(producer)
            .processor(writer, file.processors.config.clone());
        // The wait for the writers only lets a busy server's next batch grow: never longer
        // than the batch timeout, nor than a few milliseconds (a client whose socket is full
        // holds its frames until it is cut off, and must not hold everyone's next batch).
        let write_wait = file
            .batchers
            .broadcast
            .get_batch_timeout()
            .min(Duration::from_millis(5));
        let topics = TopicSink::new(hub.clone(), write_wait);
        // In a cluster, the zones' events also go to the other nodes that follow them.
        let builder = match &cluster {
            Some(cluster) => builder.batcher(
                file.batchers.broadcast.clone(),
                cluster.publisher(topics, zone_registry.clone()),
            ),
            None => builder.batcher(file.batchers.broadcast.clone(), topics),
        };
        let mut builder =
            builder.batcher(audit_config(file, &store), AuditSink::new(store.clone()));
        // Broker commands for zones other nodes own wait here for the owner's outcome, and
        // services' migrations for their end: many at once, each batch as soon as a worker is
        // free.
        builder = builder.batcher(
            crate::pipeline::BatcherConfig::new(OWNERS_BATCHER)
                // Never more than the pipeline lets in at once, or a batch could never fill.
                .batch_size(100.min(file.in_flight_bound.get()))
                .concurrency(8)
                .group_commit(true),
            OwnerOutcomes::new(
                cluster
                    .as_ref()
                    .map(|c| c.router.clone() as Arc<dyn crate::runtime::Placement>),
            ),
        );
        let mut builder = builder
            .in_flight_bound(file.in_flight_bound.get())
            .shutdown_timeout(Duration::from_millis(file.shutdown_timeout_ms.get()))
            .metrics(registry.clone(), pipeline_metrics)
            .partition_by(|m: &Message<ZoneWork>| {
                let (hi, lo) = m.data.zone_id.as_u64_pair();
                hi ^ lo
            });
        if let Some(source) = sources.jetstream.take() {
            builder = builder.producer(source);
        }
        if let Some(source) = sources.rabbitmq.take() {
            builder = builder.producer(source);
        }
        if let Some(rl) = &file.producer.rate_limit {
            builder = builder.rate_limit(
                rl.allowed.get(),
                Duration::from_millis(rl.interval_ms.get()),
            );
        }
        let pipeline = Arc::new(builder.start()?);
        let zones = ZoneHandle::new(zone_registry.clone(), push, acker);

        // Sessions the store still holds belong to connections of an earlier run that ended
        // without their leaves (a crash): end them before anyone reads them. In a cluster, the
        // zones' owners end the sessions of a node's earlier run when it is declared dead.
        match &cluster {
            None => {
                for id in store.zones_with_sessions().await? {
                    let expire = command(id, Actor::System, CommandKind::ExpireSessions);
                    zones.push(ZoneWork::command(expire, None)).await;
                }
            }
            Some(cluster) => cluster.serve(zones.clone()).await?,
        }

        let migrations = Migrations::new(
            zones.clone(),
            Duration::from_millis(file.zones.migration_ticket_ms.get()),
        );
        let _ = migrations_slot.set(migrations.clone());
        let (stop, stop_rx) = watch::channel(false);
        // The WebSockets stop on a signal of their own: in a cluster, only once this node's
        // zones are handed over.
        let (sockets_stop, sockets_stop_rx) = watch::channel(false);
        let socket_metrics = SocketMetrics::register(&registry)?;
        let sockets =
            SocketContext::new(
                hub.clone(),
                signer.clone(),
                zones.push_handle(),
                zones.envelope(),
                SocketConfig {
                    max_connections: args.max_connections as usize,
                    max_connections_per_ip: args.max_connections_per_ip.map(|n| n as usize),
                    outbound_bytes: usize::try_from(args.max_outbound_bytes).unwrap_or(usize::MAX),
                    ..SocketConfig::default()
                },
                socket_metrics,
                sockets_stop_rx,
            )
            .with_console(console::feed(secrets.admin_token.clone(), registry.clone()))
            .with_migrations(migrations.clone())
            .with_revocations(Arc::new(Revocations::new(
                store.token_revocations().await?.into_iter().map(
                    |(agent_id, zone_id, before_us)| Revocation {
                        agent_id,
                        zone_id,
                        before_us,
                    },
                ),
            )));
        let sockets = match &cluster {
            Some(cluster) => sockets
                .with_run(cluster.run_prefix())
                .with_stop_close(SERVICE_RESTART),
            None => sockets,
        };
        let sockets = Arc::new(sockets);
        if let Some(cluster) = &cluster {
            cluster
                .share_revocations(sockets.revocations.clone())
                .await?;
            cluster.report(sockets.metrics.connections.clone());
        }
        let connections = sockets.metrics.connections.clone();
        let state = ApiState {
            zones: zones.clone(),
            hub: hub.clone(),
            signer,
            admin_token: Arc::from(secrets.admin_token.as_str()),
            sockets,
            migrations,
            registry: registry.clone(),
            server_name: match &file.cluster {
                Some(c) => c.node_id.clone(),
                None => args.listen.to_string(),
            },
            cluster: cluster.as_ref().map(|c| c.router.clone()),
            pipeline: pipeline.clone(),
            max_token_ttl: args.max_token_ttl,
            metrics_token: args.metrics_token.as_deref().map(Arc::from),
        };
        let addr = listener.local_addr().map_err(DaemonError::Http)?;
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            // Frames are small and latency matters: no Nagle delay on replies and broadcasts.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::warn!(error = %e, "cannot set TCP_NODELAY");
            }
            // A fixed send buffer instead of the kernel's autotuned one (up to 4 MiB): a client
            // that reads too slowly then backs up into its outbound queue, where the
            // slow-consumer bound sees it, instead of hiding seconds of lag in the kernel.
            if let Err(e) = socket2::SockRef::from(&*tcp).set_send_buffer_size(SEND_BUFFER_BYTES) {
                tracing::warn!(error = %e, "cannot set SO_SNDBUF");
            }
        });
        let metrics_http = match metrics_listener {
            None => None,
            Some(listener) => {
                let bound = listener.local_addr().map_err(DaemonError::Http)?;
                let app = api::metrics_router(state.clone());
                Some((bound, serve_until(listener, app, stop_rx.clone())))
            }
        };
        let app = api::router(state, metrics_http.is_none());
        let http = serve_until(listener, app, stop_rx.clone());
        let timers = tokio::spawn(run_timers(
            zones.clone(),
            TimerConfig {
                tick_every: Duration::from_millis(file.tick_interval_ms.get()),
                evict_after,
            },
            stop_rx,
        ));
        Ok(Self {
            addr,
            secrets,
            registry,
            zones,
            stop,
            sockets_stop,
            http,
            metrics_addr: metrics_http.as_ref().map(|(at, _)| *at),
            metrics_http: metrics_http.map(|(_, task)| task),
            timers,
            pipeline,
            snapshots,
            store,
            connections,
            settled,
            cluster: cluster.map(|c| (c, cluster_stop)),
        })
    }

    /// Stops taking connections and events, tells clients the server is going away, drains the
    /// pipeline into the audit log, and closes the store. A node of a cluster first hands its
    /// zones to their next owners (who continue them in the same epoch), then closes its
    /// clients' connections with 1012, each once its commands are answered.
    pub async fn shutdown(self) -> Result<(), DaemonError> {
        self.stop.send_replace(true);
        let _ = self.timers.await;
        let http = self.http.await;
        if let Some(task) = self.metrics_http {
            let _ = task.await;
        }
        if let Some((cluster, _)) = &self.cluster {
            cluster.router.drain(HAND_OVER_LIMIT).await;
        }
        self.sockets_stop.send_replace(true);
        // Upgraded WebSockets outlive the HTTP server's graceful shutdown: wait (a while) for
        // each to have its commands answered, send its close frame and hand in its leaves
        // before the pipeline drains.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while self.connections.get() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The admin API shares the pipeline (to resize it): drain it through a handle.
        let drain = self.pipeline.shutdown_handle();
        drain.shutdown();
        let drained = drain.join().await;
        // Settlements not sent are not lost (the broker delivers again, and the zones apply a
        // command once), but a clean stop should not cause redeliveries.
        self.settled.wait(Duration::from_secs(5)).await;
        // The zone pipeline's last acknowledgements queued the last snapshots; they are written
        // even when the drain above ran out of time.
        let written = self.snapshots.shutdown().await;
        // Everything the zones broadcast is in the log once the drain acknowledged it all: they
        // may keep their epochs. After a drain that ran out of time, they stay open, and each
        // starts a new epoch when it is next loaded.
        let closed = match &drained {
            Ok(_) => self.zones.registry.close_all().await,
            Err(_) => Ok(()),
        };
        // The zones' leases go once they are closed: their next owners keep their epochs.
        if let Some((cluster, stop)) = &self.cluster {
            if closed.is_ok() && drained.is_ok() {
                cluster.router.release_all().await;
            }
            stop.send_replace(true);
        }
        self.store.close().await;
        drained?;
        written?;
        closed?;
        match http {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(DaemonError::Http(e)),
            Err(e) => Err(DaemonError::Http(std::io::Error::other(e))),
        }
    }
}

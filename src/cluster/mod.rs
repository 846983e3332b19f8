//! Past one machine: daemons that share NATS (and one database) as a cluster, where any node
//! serves any zone and each zone still has exactly one writer, cluster-wide.
//!
//! The parts, each on NATS and nothing of our own:
//!
//! - [`node`] and [`membership`]: who is in the cluster. A node is a name and an incarnation
//!   (fresh at every start, so a restarted node is a new member and its old sessions are gone);
//!   nodes announce themselves every heartbeat, and one silent for three is dead.
//! - [`ownership`]: which node writes each zone. The live node that rendezvous hashing picks
//!   holds the zone's lease, a compare-and-set register in JetStream KV whose revision is the
//!   lease's fencing token: it grows with every grant, and the store refuses a write carrying a
//!   lower one than the zone's row names, so a holder whose lease has moved on (paused,
//!   partitioned) writes nothing, and two nodes never both write one zone. A lease is not timed
//!   (per-key TTL needs a newer server than ours): it holds while its holder is a live member.
//! - [`router`]: the runtime's placement in a cluster: a zone's commands go to its owner over
//!   NATS request/reply, and come back answered.
//! - [`feed`]: a zone's events, published by its owner, followed by the nodes whose clients are
//!   in it, in seq order, gaps healed from the owner's history.

pub mod feed;
pub mod membership;
pub mod node;
pub mod ownership;
pub mod protocol;
pub mod router;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Client;
use futures_util::StreamExt;
use prometheus::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use feed::{Feeds, PublishSink};
pub use membership::Membership;
pub use node::NodeId;
pub use protocol::Subjects;
pub use router::{ClusterMetrics, Router};

use crate::realtime::Hub;
use crate::redact::redact_url;
use crate::runtime::{ZoneHandle, ZoneWork, command};
use crate::zone::{Actor, CommandKind};

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the lease store failed: {0}")]
    Leases(String),
    #[error("the lease of zone {zone} holds a value this version cannot read: {reason}")]
    Corrupt { zone: uuid::Uuid, reason: String },
    #[error("NATS: {0}")]
    Nats(String),
    #[error("cannot connect to the cluster at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("this node has not joined the cluster yet")]
    NotJoined,
    #[error("no node named {0:?} is alive in the cluster")]
    UnknownNode(String),
    #[error(
        "invalid node id {0:?}: use 1 to 64 letters, digits, '-' or '_' (it names NATS subjects)"
    )]
    NodeName(String),
}

/// How a node joins a cluster: `serve --cluster`, or the pipeline file's `[cluster]`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The NATS server every node of the cluster shares.
    pub url: String,
    /// This node's name, the same across its restarts.
    pub node_id: String,
    /// How often the node announces itself; three missed heartbeats and it is dead.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// The cluster's name: its NATS subjects and lease bucket start with it, so that clusters
    /// can share a NATS server.
    #[serde(default = "default_name")]
    pub name: String,
}

impl ClusterConfig {
    /// How long a node may be silent before the others declare it dead and take its zones.
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(1)) * membership::SILENT_HEARTBEATS
    }

    /// How long a transaction of this node's may sit idle before PostgreSQL ends it (see
    /// [`Store::connect_with_stall_limit`](crate::store::Store::connect_with_stall_limit)):
    /// five times [`dead_after`](Self::dead_after). A node that is only slow keeps its writes
    /// (ended, a write of a zone taken over may leave a hole in its log, as a crash does); a
    /// stopped one holds the rows of its zones from their next owners for a bounded time.
    pub fn stall_limit(&self) -> Duration {
        self.dead_after() * 5
    }
}

fn default_heartbeat_ms() -> u64 {
    1_000
}

fn default_name() -> String {
    "thunderline".into()
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("url", &redact_url(&self.url))
            .field("node_id", &self.node_id)
            .field("heartbeat_ms", &self.heartbeat_ms)
            .field("name", &self.name)
            .finish()
    }
}

/// Whether `name` can name a node (and the NATS subjects it is reached on).
pub fn valid_node_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// How long a node waits for its zones to be handed over (their last events written) before
/// it gives up and keeps them.
pub const HAND_OVER_LIMIT: Duration = Duration::from_secs(10);

/// This node's part in a cluster.
pub struct Cluster {
    pub router: Arc<Router>,
    pub feeds: Arc<Feeds>,
    client: Client,
    heartbeat: Duration,
}

impl Cluster {
    /// Connects to NATS, starts announcing this node and opens the leases.
    pub async fn join(
        config: &ClusterConfig,
        hub: Arc<Hub>,
        store: crate::store::Store,
        metrics: &Registry,
        stop: watch::Receiver<bool>,
    ) -> Result<Self, ClusterError> {
        if !valid_node_name(&config.node_id) {
            return Err(ClusterError::NodeName(config.node_id.clone()));
        }
        if !valid_node_name(&config.name) {
            return Err(ClusterError::Config(format!(
                "invalid cluster name {:?}: use 1 to 64 letters, digits, '-' or '_'",
                config.name
            )));
        }
        let subjects = Subjects(config.name.clone());
        let client = async_nats::ConnectOptions::new()
            .name(format!("thunderline {}", config.node_id))
            .connect(config.url.as_str())
            .await
            .map_err(|e| ClusterError::Connect {
                url: redact_url(&config.url),
                reason: e.to_string(),
            })?;
        let metrics = ClusterMetrics::register(metrics)
            .map_err(|e| ClusterError::Nats(format!("metrics: {e}")))?;
        let me = NodeId::start(config.node_id.clone());
        let heartbeat = Duration::from_millis(config.heartbeat_ms.max(1));
        let membership = Membership::start(
            client.clone(),
            &subjects,
            me,
            heartbeat,
            metrics.nodes.clone(),
            stop,
        )
        .await?;
        let leases = ownership::KvLeases::open(
            &async_nats::jetstream::new(client.clone()),
            &subjects.leases(),
        )
        .await?;
        let feeds = Feeds::new(
            client.clone(),
            subjects.clone(),
            hub,
            store,
            metrics.gaps_healed.clone(),
        );
        let router = Router::start(
            client.clone(),
            subjects,
            membership,
            leases,
            feeds.clone(),
            metrics,
        )
        .await?;
        feeds.set_router(&router);
        Ok(Self {
            router,
            feeds,
            client,
            heartbeat,
        })
    }

    /// What this run names its connections by: its incarnation, so that the owners can end
    /// the sessions of this run once it is dead.
    pub fn run_prefix(&self) -> String {
        run_prefix(self.router.me())
    }

    /// The owner's broadcast sink over `local`.
    pub fn publisher(
        &self,
        local: crate::realtime::TopicSink,
        registry: Arc<crate::runtime::ZoneRegistry>,
    ) -> PublishSink {
        PublishSink::new(
            local,
            self.client.clone(),
            self.router.subjects().clone(),
            registry,
        )
    }

    /// Starts serving: the commands and history asks of other nodes, and the end of the
    /// sessions of nodes that die.
    pub async fn serve(&self, zones: ZoneHandle) -> Result<(), ClusterError> {
        self.router.set_local(zones.clone());
        let subjects = self.router.subjects();
        router::serve_commands(
            self.client.clone(),
            subjects,
            self.router.me(),
            zones.clone(),
        )
        .await?;
        router::serve_history(
            self.client.clone(),
            self.router.clone(),
            zones.registry.clone(),
        )
        .await?;
        // Drains asked of this node through any node's admin API.
        let mut drains = self
            .client
            .subscribe(subjects.drain(&self.router.me().name))
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot subscribe to drains: {e}")))?;
        let (router, client) = (self.router.clone(), self.client.clone());
        tokio::spawn(async move {
            while let Some(msg) = drains.next().await {
                let (router, client) = (router.clone(), client.clone());
                tokio::spawn(async move {
                    let handed = router.drain(HAND_OVER_LIMIT).await as u64;
                    if let Some(to) = msg.reply {
                        let _ = client.publish(to, protocol::encode(&handed)).await;
                    }
                });
            }
        });
        let router = self.router.clone();
        let feeds = self.feeds.clone();
        let mut members = router.membership().watch();
        let settle = self.heartbeat * (membership::SILENT_HEARTBEATS + 1);
        tokio::spawn(async move {
            let mut before = members.borrow().clone();
            while members.changed().await.is_ok() {
                let now = members.borrow_and_update().clone();
                if now.iter().any(|n| !before.contains(n)) {
                    // A node joined: the zones rendezvous hashing gives it now are handed to it,
                    // once it has listened long enough to take them.
                    let router = router.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(settle).await;
                        router.rebalance(HAND_OVER_LIMIT).await;
                    });
                }
                for gone in before.iter().filter(|n| !now.contains(n)) {
                    // The zones it wrote: this node's sessions in them go to their next owners,
                    // and its commands waiting for an answer from it are sent there too.
                    for zone in router.owned_by(gone) {
                        feeds.owner_lost(zone);
                    }
                    router.node_died(gone);
                    // Its sessions in the zones written here end: everyone sees them leave.
                    let prefix = format!("{}.", run_prefix(gone));
                    for zone in router.held() {
                        let end = command(
                            zone,
                            Actor::System,
                            CommandKind::EndConnections {
                                prefix: prefix.clone(),
                            },
                        );
                        zones.push(ZoneWork::command(end, None)).await;
                    }
                }
                before = now;
            }
        });
        Ok(())
    }
}

impl Cluster {
    /// Reports this node's load (its zones, `connections` open, commands forwarded) in its
    /// heartbeats.
    pub fn report(&self, connections: prometheus::IntGauge) {
        let router = Arc::downgrade(&self.router);
        self.router
            .membership()
            .report(Box::new(move || match router.upgrade() {
                Some(router) => router.load(connections.get().max(0) as u64),
                None => protocol::Load::default(),
            }));
    }

    /// Puts in force on this node the token revocations any node announces (see
    /// [`Router::announce_revocation`]): their sessions here end at once.
    pub async fn share_revocations(
        &self,
        revocations: Arc<crate::realtime::revocation::Revocations>,
    ) -> Result<(), ClusterError> {
        let mut heard = self
            .client
            .subscribe(self.router.subjects().revocations())
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot subscribe to revocations: {e}")))?;
        tokio::spawn(async move {
            while let Some(msg) = heard.next().await {
                match protocol::decode(&msg.payload) {
                    Ok(revocation) => revocations.revoke(revocation),
                    Err(e) => tracing::warn!(error = %e, "an unreadable revocation was ignored"),
                }
            }
        });
        Ok(())
    }
}

/// The connection-name prefix of a node's run.
pub fn run_prefix(node: &NodeId) -> String {
    node.incarnation.simple().to_string()[..12].to_owned()
}

/// Locks a mutex, whatever a panicking holder left behind.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

//! Which node writes each zone, as this node sees it, and how commands reach that node.
//!
//! [`Router`] is the runtime's [`Placement`] in a cluster. A zone whose lease this node holds
//! is written here (with the lease's fencing token). For any other zone the writer hands the
//! command to the router, which sends it to the zone's owner over NATS and passes the owner's
//! answer to whoever asked. Commands are sent in the order the writer hands them over, from one
//! connection, so one client's commands reach the owner in the order it sent them. A command
//! whose owner is changing (the node it went to says it is not the owner, or does not answer)
//! is sent again under the same command id until a bound: the zone applies a command id once,
//! so it is applied at most once and answered once.
//!
//! The owner's side: [`serve_commands`] takes the commands sent to this node into the local
//! pipeline, and [`serve_history`] answers for a zone's recent events (to heal a broadcast gap
//! on another node).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::Client;
use futures_util::StreamExt;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::feed::Feeds;
use super::membership::Membership;
use super::node::NodeId;
use super::ownership::{Acquired, KvLeases, Ownership, rendezvous};
use super::protocol::{self, Answered, Forward, HistoryAnswer, HistoryAsk, Subjects};
use super::{ClusterError, lock};
use crate::runtime::{
    Forwarded, NOT_OWNER, Place, Placement, Reply, ReplyTo, ZoneHandle, ZoneRegistry, ZoneWork,
    unavailable,
};
use crate::zone::{CommandKind, Outcome, ZoneError};

/// How long a node waits for the owner's answer before it sends the command again.
const ANSWER_WAIT: Duration = Duration::from_secs(2);
/// How long a command may wait for its zone's owner (changing owners included) in all.
const OWNER_WAIT: Duration = Duration::from_secs(10);
/// The pause before a command refused by a node that is not the owner is sent again.
const REROUTE_PAUSE: Duration = Duration::from_millis(20);
/// The pause before the leases are watched again after the watch ended.
const REWATCH_PAUSE: Duration = Duration::from_millis(500);
/// How often a hand-over looks whether its zones are written (and asks again for those not).
const HAND_OVER_POLL: Duration = Duration::from_millis(20);

/// The cluster's metrics.
#[derive(Clone)]
pub struct ClusterMetrics {
    pub nodes: IntGauge,
    pub owned_zones: IntGauge,
    pub forwarded: IntCounterVec,
    pub forward_latency: Histogram,
    pub gaps_healed: IntCounter,
    pub ownership_changes: IntCounter,
}

impl ClusterMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            nodes: IntGauge::new(
                "thunderline_cluster_nodes",
                "Nodes of the cluster alive, as this node sees it (itself included).",
            )?,
            owned_zones: IntGauge::new(
                "thunderline_cluster_owned_zones",
                "Zones whose lease this node holds: it runs their writers.",
            )?,
            forwarded: IntCounterVec::new(
                Opts::new(
                    "thunderline_cluster_forwarded_commands_total",
                    "Commands sent to their zone's owner on another node, by outcome: ok, \
                     refused (the zone refused it), unavailable (no owner answered in time).",
                ),
                &["outcome"],
            )?,
            forward_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "thunderline_cluster_forward_seconds",
                    "From a command being sent to its zone's owner to its answer coming back.",
                )
                .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 16)?),
            )?,
            gaps_healed: IntCounter::new(
                "thunderline_cluster_broadcast_gaps_healed_total",
                "Gaps in a zone's broadcasts from another node, filled from its owner's history \
                 before anything newer was delivered.",
            )?,
            ownership_changes: IntCounter::new(
                "thunderline_cluster_ownership_changes_total",
                "Zone leases this node took: new zones, and zones taken over from a node that \
                 died or let them go.",
            )?,
        };
        registry.register(Box::new(m.nodes.clone()))?;
        registry.register(Box::new(m.owned_zones.clone()))?;
        registry.register(Box::new(m.forwarded.clone()))?;
        registry.register(Box::new(m.forward_latency.clone()))?;
        registry.register(Box::new(m.gaps_healed.clone()))?;
        registry.register(Box::new(m.ownership_changes.clone()))?;
        Ok(m)
    }
}

/// A command on its way to its owner.
struct Job {
    work: ZoneWork,
    done: oneshot::Sender<Option<Outcome>>,
    /// When it was first handed over: past [`OWNER_WAIT`], it is answered `unavailable`.
    since: Instant,
    /// Its place in the order commands were handed over.
    order: u64,
}

/// What the router's sender takes, in order.
enum Queued {
    Job(Box<Job>),
    /// Zone's commands held back may go now.
    Release(Uuid),
}

/// One zone's commands on their way: they reach its owner in the order they were handed
/// over. Commands go on to the node the ones in flight went to without waiting; once the zone's
/// owner changes (or one comes back refused), later ones are held until every one in flight is
/// answered, and the refused ones are sent again ahead of them, in order.
#[derive(Default)]
struct Lane {
    /// Where the commands in flight went.
    to: Option<NodeId>,
    in_flight: usize,
    /// Held back, by order.
    held: std::collections::BTreeMap<u64, Job>,
    /// A release of the held ones is on its way.
    releasing: bool,
}

/// A command sent, waiting for its answer.
struct Pending {
    job: Job,
    sent: Instant,
    /// The node it was sent to.
    to: NodeId,
}

/// See the module documentation.
pub struct Router {
    client: Client,
    subjects: Subjects,
    membership: Membership,
    ownership: Ownership<KvLeases>,
    /// Zones whose lease this node holds, with its fencing token.
    held: Mutex<HashMap<Uuid, u64>>,
    /// Zones this node is handing to their next owners: it applies nothing more of theirs.
    handing: Mutex<HashSet<Uuid>>,
    /// Who writes the zones this node does not, as last learned.
    owners: Mutex<HashMap<Uuid, NodeId>>,
    queue: mpsc::UnboundedSender<Queued>,
    pending: Mutex<HashMap<u64, Pending>>,
    lanes: Mutex<HashMap<Uuid, Lane>>,
    order: AtomicU64,
    next: AtomicU64,
    inbox: String,
    feeds: Arc<Feeds>,
    /// The local zones, for a command whose zone turns out to be this node's after all.
    local: OnceLock<ZoneHandle>,
    pub metrics: ClusterMetrics,
    /// Itself, for the tasks it starts.
    this: std::sync::Weak<Router>,
}

impl Router {
    pub(crate) async fn start(
        client: Client,
        subjects: Subjects,
        membership: Membership,
        leases: KvLeases,
        feeds: Arc<Feeds>,
        metrics: ClusterMetrics,
    ) -> Result<Arc<Self>, ClusterError> {
        let inbox = client.new_inbox();
        let mut answers = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot subscribe to answers: {e}")))?;
        let (queue, mut jobs) = mpsc::unbounded_channel();
        let router = Arc::new_cyclic(|this| Self {
            this: this.clone(),
            ownership: Ownership::new(leases.clone(), membership.me.clone()),
            client,
            subjects,
            membership,
            held: Mutex::default(),
            handing: Mutex::default(),
            owners: Mutex::default(),
            queue,
            pending: Mutex::default(),
            lanes: Mutex::default(),
            order: AtomicU64::new(0),
            next: AtomicU64::new(1),
            inbox,
            feeds,
            local: OnceLock::new(),
            metrics,
        });
        // Sends, in order.
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(queued) = jobs.recv().await {
                let Some(router) = weak.upgrade() else { return };
                match queued {
                    Queued::Job(job) => router.send(*job).await,
                    Queued::Release(zone) => router.release_held(zone).await,
                }
            }
        });
        // Answers.
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            while let Some(msg) = answers.next().await {
                let Some(router) = weak.upgrade() else { return };
                let id = msg.subject.rsplit('.').next().and_then(|n| n.parse().ok());
                let Some(id) = id else { continue };
                if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    // Nobody takes commands there (the node is gone): ask the zone again.
                    router.unanswered(id);
                } else {
                    router.answered(id, &msg.payload);
                }
            }
        });
        // Commands that waited too long for an answer are sent again.
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            let mut sweep = tokio::time::interval(ANSWER_WAIT / 4);
            loop {
                sweep.tick().await;
                let Some(router) = weak.upgrade() else { return };
                let late: Vec<Pending> = {
                    let mut pending = lock(&router.pending);
                    let ids: Vec<u64> = pending
                        .iter()
                        .filter(|(_, p)| p.sent.elapsed() >= ANSWER_WAIT)
                        .map(|(id, _)| *id)
                        .collect();
                    ids.iter().filter_map(|id| pending.remove(id)).collect()
                };
                for p in late {
                    lock(&router.owners).remove(&p.job.work.zone_id);
                    router.retry(p.job);
                }
            }
        });
        // Leases that change under this node: a zone it held and lost, or a new owner elsewhere.
        // Watched again whenever the watch ends (NATS restarted): from the leases as they are.
        let weak = Arc::downgrade(&router);
        tokio::spawn(async move {
            loop {
                match leases.watch().await {
                    Ok(changes) => {
                        let mut changes = std::pin::pin!(changes);
                        while let Some((zone, holder, revision)) = changes.next().await {
                            let Some(router) = weak.upgrade() else { return };
                            router.lease_changed(zone, holder, revision);
                        }
                        tracing::warn!("the lease watch ended: watching again");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lease changes cannot be watched (meanwhile a lost lease is noticed at the store)")
                    }
                }
                if weak.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(REWATCH_PAUSE).await;
            }
        });
        Ok(router)
    }

    /// The local zones, once their pipeline runs.
    pub fn set_local(&self, zones: ZoneHandle) {
        let _ = self.local.set(zones);
    }

    pub fn me(&self) -> &NodeId {
        &self.membership.me
    }

    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The zones whose lease this node holds.
    pub fn held(&self) -> Vec<Uuid> {
        lock(&self.held).keys().copied().collect()
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The name of the node that writes `zone`, as this node last learned it.
    pub fn owner_name(&self, zone: Uuid) -> Option<String> {
        if lock(&self.held).contains_key(&zone) {
            return Some(self.me().name.clone());
        }
        lock(&self.owners).get(&zone).map(|n| n.name.clone())
    }

    fn lease_changed(&self, zone: Uuid, holder: Option<NodeId>, revision: u64) {
        {
            let mut held = lock(&self.held);
            if let Some(fence) = held.get(&zone).copied()
                && revision > fence
                && holder.as_ref() != Some(self.me())
            {
                tracing::warn!(%zone, "this node's lease on the zone was taken over");
                held.remove(&zone);
                self.metrics.owned_zones.set(held.len() as i64);
            }
        }
        let mut owners = lock(&self.owners);
        match holder {
            Some(h) if h != *self.me() => {
                owners.insert(zone, h);
            }
            _ => {
                owners.remove(&zone);
            }
        }
    }

    /// Where `zone` is written; see [`Placement::place`].
    async fn locate(&self, zone: Uuid) -> Result<Place, ClusterError> {
        // A node that has not (or, after a pause, not again) listened to the cluster long
        // enough trusts neither its view of the others nor its own leases. One just resumed
        // from a pause does not know it yet: it waits until its heartbeat task has looked.
        if !self.membership.wait_current(OWNER_WAIT).await {
            return Err(ClusterError::NotJoined);
        }
        if !self.membership.joined() && !self.membership.wait_joined(OWNER_WAIT).await {
            return Err(ClusterError::NotJoined);
        }
        if let Some(fence) = lock(&self.held).get(&zone) {
            if lock(&self.handing).contains(&zone) {
                return Ok(Place::Leaving);
            }
            return Ok(Place::Here {
                fence: Some(*fence),
            });
        }
        let members = self.membership.members();
        if let Some(owner) = lock(&self.owners).get(&zone)
            && members.contains(owner)
        {
            return Ok(Place::Elsewhere);
        }
        let holder = self.ownership.read(zone).await?.and_then(|r| r.holder);
        match holder {
            Some(h) if h != *self.me() && members.contains(&h) => {
                lock(&self.owners).insert(zone, h);
                return Ok(Place::Elsewhere);
            }
            _ => {}
        }
        // Free, or held by a node that is gone: it goes where rendezvous hashing says (never to
        // a draining node, unless every node drains).
        let target = rendezvous(zone, members.eligible())
            .cloned()
            .unwrap_or_else(|| self.me().clone());
        if target != *self.me() {
            lock(&self.owners).insert(zone, target);
            return Ok(Place::Elsewhere);
        }
        match self.ownership.acquire(zone, &members).await? {
            Acquired::Held(lease) => {
                let mut held = lock(&self.held);
                if held.insert(zone, lease.fence).is_none() {
                    self.metrics.ownership_changes.inc();
                    tracing::info!(%zone, fence = lease.fence, "this node writes the zone now");
                }
                self.metrics.owned_zones.set(held.len() as i64);
                lock(&self.owners).remove(&zone);
                drop(held);
                // What this node followed of the zone ends once it is loaded (`taken`).
                Ok(Place::Here {
                    fence: Some(lease.fence),
                })
            }
            Acquired::Taken(h) => {
                lock(&self.owners).insert(zone, h);
                Ok(Place::Elsewhere)
            }
        }
    }

    /// Whether this node writes `zone` now: it holds the lease, and has been awake and listening
    /// to the cluster (a node resumed from a pause learns first whether the lease moved on).
    async fn writes(&self, zone: Uuid) -> bool {
        self.membership.wait_current(ANSWER_WAIT).await
            && self.membership.joined()
            && lock(&self.held).contains_key(&zone)
    }

    /// This node's load as its heartbeats report it, with `connections` open.
    pub fn load(&self, connections: u64) -> super::protocol::Load {
        let forwarded = ["ok", "refused", "unavailable"]
            .iter()
            .map(|o| self.metrics.forwarded.with_label_values(&[o]).get())
            .sum();
        super::protocol::Load {
            zones: lock(&self.held).len() as u64,
            connections,
            forwarded,
        }
    }

    /// Every zone whose owner this node knows, with the owner's name.
    pub fn owners(&self) -> Vec<(Uuid, String)> {
        let mut all: Vec<(Uuid, String)> = lock(&self.owners)
            .iter()
            .map(|(z, n)| (*z, n.name.clone()))
            .collect();
        all.extend(
            lock(&self.held)
                .keys()
                .map(|z| (*z, self.me().name.clone())),
        );
        all.sort();
        all
    }

    /// Tells every node of a token revocation this node recorded (each ends the sessions it
    /// covers); this node's own are ended by the caller.
    pub async fn announce_revocation(
        &self,
        revocation: &crate::realtime::revocation::Revocation,
    ) -> Result<(), ClusterError> {
        self.client
            .publish(self.subjects.revocations(), protocol::encode(revocation))
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot announce a revocation: {e}")))?;
        self.client
            .flush()
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot announce a revocation: {e}")))
    }

    /// Where a command for `zone` goes now: the owner as last learned, else where rendezvous
    /// hashing puts it.
    fn target(&self, zone: Uuid) -> NodeId {
        let members = self.membership.members();
        if let Some(owner) = lock(&self.owners).get(&zone)
            && members.contains(owner)
        {
            return owner.clone();
        }
        rendezvous(zone, members.eligible())
            .cloned()
            .unwrap_or_else(|| self.me().clone())
    }

    /// Hands `zones` (those of them this node holds) to their next owners, each as soon as
    /// everything it applied is written: from now on their commands go to the next owner, which
    /// waits for the lease and continues the zone in the same epoch. Waits up to `limit`; the
    /// zones not handed over by then stay here (and are written and closed at shutdown).
    /// Returns how many were handed over.
    pub async fn hand_over(&self, zones: &[Uuid], limit: Duration) -> usize {
        let Some(local) = self.local.get().cloned() else {
            return 0;
        };
        let mine: Vec<Uuid> = {
            let held = lock(&self.held);
            zones
                .iter()
                .copied()
                .filter(|z| held.contains_key(z))
                .collect()
        };
        if mine.is_empty() {
            return 0;
        }
        lock(&self.handing).extend(mine.iter().copied());
        tracing::info!(zones = mine.len(), "handing zones to their next owners");
        let deadline = Instant::now() + limit;
        let mut nudged = HashSet::new();
        let mut wait = tokio::time::interval(HAND_OVER_POLL);
        loop {
            wait.tick().await;
            let still: Vec<Uuid> = {
                let held = lock(&self.held);
                mine.iter()
                    .filter(|z| held.contains_key(z))
                    .copied()
                    .collect()
            };
            // A zone handed over is loaded by its next owner now, not at its next command: a
            // zone without one would otherwise have no owner (and no ticks) until then.
            for zone in mine.iter().filter(|z| !still.contains(z)) {
                if nudged.insert(*zone) {
                    let load = crate::runtime::command(
                        *zone,
                        crate::zone::Actor::System,
                        CommandKind::GetZoneState,
                    );
                    local.push(ZoneWork::command(load, None)).await;
                }
            }
            if still.is_empty() || Instant::now() >= deadline {
                if !still.is_empty() {
                    tracing::warn!(
                        zones = still.len(),
                        "some zones could not be handed over in time: they stay on this node"
                    );
                }
                let mut handing = lock(&self.handing);
                for z in &mine {
                    handing.remove(z);
                }
                return mine.len() - still.len();
            }
            // Through the zone's writer even when it is not loaded: it may be loading it right
            // now, for a command this node took the zone for.
            for zone in still {
                local.push(ZoneWork::hand_over(zone)).await;
            }
        }
    }

    /// Starts draining: no zone is placed on this node any more, and every zone it holds is
    /// handed to its next owner (see [`hand_over`](Self::hand_over)).
    pub async fn drain(&self, limit: Duration) -> usize {
        self.membership.drain();
        // The last node able to take zones keeps them: they are written and closed when it
        // stops, and whichever node comes next continues them in the same epoch.
        let members = self.membership.members();
        if members.eligible().next().is_none() {
            return 0;
        }
        // The others learn it from the heartbeat just sent; a command they route meanwhile to
        // this node is sent back to them, and routed again.
        let held = self.held();
        self.hand_over(&held, limit).await
    }

    /// Drains node `name` (this one or another, asked over NATS): how many zones it handed
    /// over.
    pub async fn drain_node(&self, name: &str) -> Result<u64, ClusterError> {
        if name == self.me().name {
            return Ok(self.drain(super::HAND_OVER_LIMIT).await as u64);
        }
        if !self.membership.members().iter().any(|n| n.name == name) {
            return Err(ClusterError::UnknownNode(name.to_owned()));
        }
        let asked = self
            .client
            .request(self.subjects.drain(name), bytes::Bytes::new());
        let answer = tokio::time::timeout(super::HAND_OVER_LIMIT + ANSWER_WAIT, asked)
            .await
            .map_err(|_| ClusterError::Nats(format!("node {name} did not answer the drain")))?
            .map_err(|e| ClusterError::Nats(format!("cannot ask node {name} to drain: {e}")))?;
        protocol::decode(&answer.payload)
            .map_err(|e| ClusterError::Nats(format!("node {name} answered the drain: {e}")))
    }

    /// The zones this node holds that rendezvous hashing now gives another node (one that
    /// joined): each is handed over.
    pub async fn rebalance(&self, limit: Duration) -> usize {
        if self.membership.is_draining() {
            return 0;
        }
        let members = self.membership.members();
        let moving: Vec<Uuid> = self
            .held()
            .into_iter()
            .filter(|z| rendezvous(*z, members.eligible()).is_some_and(|n| n != self.me()))
            .collect();
        if moving.is_empty() {
            return 0;
        }
        self.hand_over(&moving, limit).await
    }

    async fn send(&self, job: Job) {
        let zone = job.work.zone_id;
        let mut target = self.target(zone);
        if target == *self.me() {
            // The zone is (or is about to be) this node's: it is taken now, so that the
            // command is applied here in its turn; or whoever took it first is learned.
            match self.locate(zone).await {
                Ok(Place::Here { .. }) => {}
                Ok(Place::Elsewhere | Place::Leaving) => {
                    target = self.target(zone);
                    if target == *self.me() {
                        // Leaving this node: its next owner is the one rendezvous hashing
                        // picks among the others.
                        self.hold(job);
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(%zone, error = %e, "a zone could not be placed: its command waits");
                    self.hold(job);
                    return;
                }
            }
        }
        let here = target == *self.me();
        {
            let mut lanes = lock(&self.lanes);
            let lane = lanes.entry(zone).or_default();
            let elsewhere = lane.in_flight > 0 && lane.to.as_ref() != Some(&target);
            if !lane.held.is_empty() || lane.releasing || elsewhere {
                lane.held.insert(job.order, job);
                return;
            }
            lane.to = Some(target.clone());
            lane.in_flight += 1;
        }
        if here {
            // Applied by this node's writer in its turn; its answer is the outcome.
            let Job {
                mut work,
                done,
                order,
                ..
            } = job;
            let in_order = Arc::new(crate::runtime::InOrder {
                order,
                settled: std::sync::atomic::AtomicBool::new(false),
            });
            work.forwarded = false;
            work.in_order = Some(in_order.clone());
            work.reply = Some(Arc::new(Resolve {
                done: Mutex::new(Some(done)),
                then: work.reply.take(),
                in_order,
                router: self.this.clone(),
                zone,
            }));
            if let Some(local) = self.local.get().cloned() {
                local.push(work).await;
            }
            return;
        }
        let Job { work, .. } = &job;
        let crate::runtime::Job::Command(command) = &work.job else {
            return;
        };
        if command.kind.is_join()
            && let crate::zone::Actor::Agent {
                agent_id,
                connection,
                ..
            } = &command.actor
        {
            self.feeds.expect(zone, connection, agent_id).await;
        }
        let payload = protocol::encode(&Forward {
            command: command.clone(),
            since: work.since.clone(),
        });
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.pending).insert(
            id,
            Pending {
                job,
                sent: Instant::now(),
                to: target.clone(),
            },
        );
        if let Err(e) = self
            .client
            .publish_with_reply(
                self.subjects.commands(&target.name),
                format!("{}.{id}", self.inbox),
                payload,
            )
            .await
        {
            tracing::warn!(error = %e, %zone, "a command could not be sent to its owner");
            if let Some(p) = lock(&self.pending).remove(&id) {
                self.retry(p.job);
            }
        }
    }

    /// A command in flight came back unanswered or refused by a node that is not the owner:
    /// it is sent again (after a pause, ahead of its zone's later commands), or answered
    /// `unavailable` once it has waited for its owner long enough.
    fn retry(&self, job: Job) {
        let zone = job.work.zone_id;
        if job.since.elapsed() >= OWNER_WAIT {
            let command_id = match &job.work.job {
                crate::runtime::Job::Command(c) => c.id,
                crate::runtime::Job::Evict | crate::runtime::Job::HandOver => return,
            };
            self.metrics
                .forwarded
                .with_label_values(&["unavailable"])
                .inc();
            let outcome = unavailable(command_id, "the zone's owner did not answer in time");
            self.finish(job, outcome.into());
            self.landed(zone, None);
            return;
        }
        self.landed(zone, Some(job));
    }

    /// A command of `zone` in flight is settled (`again`: to be sent again). Once none is in
    /// flight, the ones held back go, in order (after a pause if one is a retry).
    fn landed(&self, zone: Uuid, again: Option<Job>) {
        let mut lanes = lock(&self.lanes);
        let Some(lane) = lanes.get_mut(&zone) else {
            return;
        };
        lane.in_flight = lane.in_flight.saturating_sub(1);
        let pause = again.is_some();
        if let Some(job) = again {
            lane.held.insert(job.order, job);
        }
        if lane.in_flight > 0 || lane.releasing {
            return;
        }
        if lane.held.is_empty() {
            lanes.remove(&zone);
            return;
        }
        lane.releasing = true;
        let queue = self.queue.clone();
        if pause {
            tokio::spawn(async move {
                tokio::time::sleep(REROUTE_PAUSE).await;
                let _ = queue.send(Queued::Release(zone));
            });
        } else {
            let _ = queue.send(Queued::Release(zone));
        }
    }

    /// Holds `job` (not on its way) until its zone's commands go again, after a pause.
    fn hold(&self, job: Job) {
        let zone = job.work.zone_id;
        let mut lanes = lock(&self.lanes);
        let lane = lanes.entry(zone).or_default();
        lane.held.insert(job.order, job);
        if lane.in_flight == 0 && !lane.releasing {
            lane.releasing = true;
            let queue = self.queue.clone();
            tokio::spawn(async move {
                tokio::time::sleep(REROUTE_PAUSE).await;
                let _ = queue.send(Queued::Release(zone));
            });
        }
    }

    /// Sends `zone`'s held commands, in order.
    async fn release_held(&self, zone: Uuid) {
        let held = {
            let mut lanes = lock(&self.lanes);
            let Some(lane) = lanes.get_mut(&zone) else {
                return;
            };
            lane.releasing = false;
            std::mem::take(&mut lane.held)
        };
        for job in held.into_values() {
            self.send(job).await;
        }
    }

    /// The node command `id` went to does not take commands (any more).
    fn unanswered(&self, id: u64) {
        if let Some(Pending { job, .. }) = lock(&self.pending).remove(&id) {
            lock(&self.owners).remove(&job.work.zone_id);
            self.retry(job);
        }
    }

    fn answered(&self, id: u64, payload: &[u8]) {
        let Some(Pending { job, sent, .. }) = lock(&self.pending).remove(&id) else {
            return; // answered already (a late answer to a command sent again)
        };
        let answered = match protocol::decode::<Answered>(payload) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "an unreadable answer from a zone's owner");
                self.retry(job);
                return;
            }
        };
        if matches!(&answered.outcome.result, Err(ZoneError::Unavailable(why)) if why == NOT_OWNER)
        {
            lock(&self.owners).remove(&job.work.zone_id);
            self.retry(job);
            return;
        }
        self.metrics
            .forward_latency
            .observe(sent.elapsed().as_secs_f64());
        let label = if answered.outcome.result.is_ok() {
            "ok"
        } else {
            "refused"
        };
        self.metrics.forwarded.with_label_values(&[label]).inc();
        let reply = Reply {
            outcome: answered.outcome,
            recovered: answered.recovered,
            missed: answered.missed.into(),
            presence: answered.presence.map(Into::into),
        };
        let zone = job.work.zone_id;
        self.finish(job, reply);
        self.landed(zone, None);
    }

    /// Answers whoever asked. A join's answer goes through the zone's feed, which sends it
    /// before anything the join's own event starts.
    fn finish(&self, job: Job, reply: Reply) {
        let Job { work, done, .. } = job;
        let outcome = reply.outcome.clone();
        if let (crate::runtime::Job::Command(command), Some(to)) = (&work.job, work.reply) {
            if command.kind.is_join() && matches!(command.actor, crate::zone::Actor::Agent { .. }) {
                self.feeds.joined(work.zone_id, command, reply, to);
            } else {
                to.reply(&reply);
            }
        }
        let _ = done.send(Some(outcome));
    }

    /// Node `dead` died: the commands sent to it and not answered are sent again (to the
    /// zones' next owners), and who owned what is learned again.
    pub fn node_died(&self, dead: &NodeId) {
        lock(&self.owners).retain(|_, owner| owner != dead);
        let orphans: Vec<Pending> = {
            let mut pending = lock(&self.pending);
            let ids: Vec<u64> = pending
                .iter()
                .filter(|(_, p)| p.to == *dead)
                .map(|(id, _)| *id)
                .collect();
            ids.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in orphans {
            self.retry(p.job);
        }
    }

    /// The zones this node follows whose owner was `dead`, as last learned.
    pub fn owned_by(&self, dead: &NodeId) -> Vec<Uuid> {
        lock(&self.owners)
            .iter()
            .filter(|(_, owner)| *owner == dead)
            .map(|(zone, _)| *zone)
            .collect()
    }

    /// Lets every zone this node holds go (a clean stop, once they are written and closed).
    pub async fn release_all(&self) {
        let held: Vec<(Uuid, u64)> = lock(&self.held).iter().map(|(z, f)| (*z, *f)).collect();
        for (zone, fence) in held {
            self.release(zone, fence).await;
        }
    }

    /// Lets zone `zone` go: its state is written, its next owner continues it.
    async fn release(&self, zone: Uuid, fence: u64) {
        let removed = {
            let mut held = lock(&self.held);
            let removed = held.get(&zone) == Some(&fence);
            if removed {
                held.remove(&zone);
            }
            self.metrics.owned_zones.set(held.len() as i64);
            removed
        };
        if removed {
            let lease = super::ownership::Lease {
                zone,
                holder: self.me().clone(),
                fence,
            };
            if let Err(e) = self.ownership.release(&lease).await {
                tracing::warn!(%zone, error = %e, "a zone's lease could not be released");
            }
        }
    }
}

impl Placement for Router {
    fn place(
        &self,
        zone: Uuid,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<Place, String>> + Send + '_>> {
        Box::pin(async move { self.locate(zone).await.map_err(|e| e.to_string()) })
    }

    fn forward(&self, work: ZoneWork) -> Forwarded {
        let (done, answer) = oneshot::channel();
        // One this node's writer was given in its turn and sends on after all keeps its place,
        // and is no longer counted as on its way (it is again, from here).
        let order = match &work.in_order {
            Some(in_order) => {
                if !in_order.settled.swap(true, Ordering::AcqRel) {
                    self.landed(work.zone_id, None);
                }
                in_order.order
            }
            None => self.order.fetch_add(1, Ordering::Relaxed),
        };
        let job = Job {
            work,
            done,
            since: Instant::now(),
            order,
        };
        if let Err(mpsc::error::SendError(Queued::Job(job))) =
            self.queue.send(Queued::Job(Box::new(job)))
        {
            let _ = job.done.send(None);
        }
        Box::pin(async move { answer.await.ok().flatten() })
    }

    fn fenced(&self, zone: Uuid, fence: u64) {
        let mut held = lock(&self.held);
        // A lease taken again since (a higher token) is not the one that moved on.
        if held.get(&zone).is_some_and(|held| *held <= fence) {
            tracing::warn!(%zone, fence, "this node's lease on the zone has moved on (the store refused its write)");
            held.remove(&zone);
            self.metrics.owned_zones.set(held.len() as i64);
            lock(&self.owners).remove(&zone);
        }
    }

    fn connection_alive(&self, connection: &str) -> bool {
        let run = connection
            .split_once('.')
            .map_or(connection, |(run, _)| run);
        self.membership
            .members()
            .iter()
            .any(|node| super::run_prefix(node) == run)
    }

    fn taken(&self, zone: Uuid, epoch: String, seq: u64) -> crate::runtime::Settled<'_> {
        Box::pin(async move { self.feeds.owned(zone, epoch, seq).await })
    }

    fn handing(&self, zone: Uuid, epoch: String, seq: u64) -> crate::runtime::Settled<'_> {
        Box::pin(async move { self.feeds.follow(zone, epoch, seq + 1).await })
    }

    fn queued(&self, zone: Uuid) -> bool {
        lock(&self.lanes).contains_key(&zone)
    }

    fn left(&self, zone: Uuid, fence: Option<u64>) -> crate::runtime::Settled<'_> {
        Box::pin(async move {
            let held = lock(&self.held).get(&zone).copied();
            if let Some(fence) = fence.or(held) {
                self.release(zone, fence).await;
            }
        })
    }
}

/// Where the answer to a command this node routed to its own writer goes: to the outcome its
/// sender awaits, then on to whoever asked; and its zone's next commands may go.
struct Resolve {
    done: Mutex<Option<oneshot::Sender<Option<Outcome>>>>,
    then: Option<Arc<dyn ReplyTo>>,
    in_order: Arc<crate::runtime::InOrder>,
    router: std::sync::Weak<Router>,
    zone: Uuid,
}

impl Resolve {
    fn settle(&self) {
        if !self.in_order.settled.swap(true, Ordering::AcqRel)
            && let Some(router) = self.router.upgrade()
        {
            router.landed(self.zone, None);
        }
    }
}

impl ReplyTo for Resolve {
    fn reply(&self, reply: &Reply) {
        if let Some(done) = lock(&self.done).take() {
            let _ = done.send(Some(reply.outcome.clone()));
        }
        if let Some(then) = &self.then {
            then.reply(reply);
        }
        self.settle();
    }
}

impl Drop for Resolve {
    /// Dropped unanswered (the pipeline closed): its zone's next commands must not wait for it.
    fn drop(&mut self) {
        self.settle();
    }
}

/// Where a forwarded command's answer goes: back to the node that sent it.
struct AnswerBack {
    client: Client,
    to: async_nats::Subject,
}

impl ReplyTo for AnswerBack {
    fn reply(&self, reply: &Reply) {
        let payload = protocol::encode(&Answered {
            outcome: reply.outcome.clone(),
            recovered: reply.recovered,
            missed: reply.missed.to_vec(),
            presence: reply.presence.as_ref().map(|p| p.to_vec()),
        });
        let client = self.client.clone();
        let to = self.to.clone();
        tokio::spawn(async move {
            if let Err(e) = client.publish(to, payload).await {
                tracing::warn!(error = %e, "an answer could not be sent back");
            }
        });
    }
}

/// Takes the commands other nodes send this node into the local pipeline, in the order they
/// arrive.
pub async fn serve_commands(
    client: Client,
    subjects: &Subjects,
    me: &NodeId,
    zones: ZoneHandle,
) -> Result<(), ClusterError> {
    let mut commands = client
        .subscribe(subjects.commands(&me.name))
        .await
        .map_err(|e| ClusterError::Nats(format!("cannot subscribe to commands: {e}")))?;
    tokio::spawn(async move {
        while let Some(msg) = commands.next().await {
            let Some(to) = msg.reply.clone() else {
                continue;
            };
            let forward = match protocol::decode::<Forward>(&msg.payload) {
                Ok(f) => f,
                Err(e) => {
                    tracing::warn!(error = %e, "an unreadable command from another node was ignored");
                    continue;
                }
            };
            let reply: Arc<dyn ReplyTo> = Arc::new(AnswerBack {
                client: client.clone(),
                to,
            });
            let mut work =
                ZoneWork::command(forward.command, Some(reply.clone())).since(forward.since);
            work.forwarded = true;
            if !zones.push(work).await {
                return; // shutting down: the senders will find another owner
            }
        }
    });
    Ok(())
}

/// Answers other nodes' questions for the recent events of the zones this node writes. A zone
/// it does not write (any more) is answered with no epoch: a copy left in memory by a lost
/// lease is stale, and the log may hold the next owner's epoch, which the copy's would mislabel.
pub async fn serve_history(
    client: Client,
    router: Arc<Router>,
    registry: Arc<ZoneRegistry>,
) -> Result<(), ClusterError> {
    let mut asks = client
        .subscribe(router.subjects().history(&router.me().name))
        .await
        .map_err(|e| ClusterError::Nats(format!("cannot subscribe to history asks: {e}")))?;
    tokio::spawn(async move {
        while let Some(msg) = asks.next().await {
            let Some(to) = msg.reply.clone() else {
                continue;
            };
            let Ok(ask) = protocol::decode::<HistoryAsk>(&msg.payload) else {
                continue;
            };
            let live = match registry.live(ask.zone) {
                Some(live) if router.writes(ask.zone).await => live,
                _ => {
                    let none = HistoryAnswer {
                        epoch: String::new(),
                        events: Vec::new(),
                    };
                    let _ = client.publish(to, protocol::encode(&none)).await;
                    continue;
                }
            };
            let epoch = live.state().epoch().to_owned();
            let mut events: Vec<_> = live
                .history()
                .between(ask.after, ask.upto.saturating_sub(1))
                .cloned()
                .collect();
            let complete = crate::runtime::history_complete(&events, ask.after, ask.upto);
            if !complete {
                let limit =
                    u32::try_from(ask.upto.saturating_sub(ask.after + 1)).unwrap_or(u32::MAX);
                match registry
                    .store()
                    .zone_events(ask.zone, None, Some(ask.after), Some(limit))
                    .await
                {
                    Ok(logged) => events = logged,
                    Err(e) => tracing::warn!(error = %e, "a zone's history could not be read"),
                }
            }
            let payload = protocol::encode(&HistoryAnswer { epoch, events });
            let _ = client.publish(to, payload).await;
        }
    });
    Ok(())
}

//! Who is in the cluster: every node announces itself on NATS each heartbeat, and a node
//! silent for three heartbeats is dead. A node only trusts what it has heard once it has
//! listened that long itself (until then it has not *joined*): a node that has just started
//! must not take a zone from an owner it simply has not heard from yet.
//!
//! A node that starts again under the same name is a new incarnation: the first heartbeat of
//! the new one ends the old one at once (its sessions are gone; its leases are free).
//!
//! A node cannot see its own pause (SIGSTOP, a long stall) from the inside until its heartbeat
//! task runs again: until then [`Membership::wait_current`] holds whoever would act on the
//! node's leases, so that nothing is applied by a node the others may have declared dead.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_nats::Client;
use futures_util::StreamExt;
use prometheus::IntGauge;
use tokio::sync::watch;
use tokio::time::Instant;

use super::ClusterError;
use super::lock;
use super::node::{Members, NodeId};
use super::protocol::{self, Heartbeat, Load, Subjects};

/// Heartbeats of silence after which a node is dead.
pub const SILENT_HEARTBEATS: u32 = 3;

/// This node's view of the cluster, kept up to date by [`Membership::start`].
#[derive(Clone)]
pub struct Membership {
    pub me: NodeId,
    members: watch::Receiver<Members>,
    joined: watch::Receiver<bool>,
    /// When this node last sent a heartbeat (or, after a pause, last found it was paused).
    beat: watch::Receiver<Instant>,
    heartbeat: Duration,
    /// Whether this node drains: it says so in every heartbeat from the moment it starts.
    draining: Arc<watch::Sender<bool>>,
    /// What this node reports of itself in its heartbeats, once the daemon says.
    report: Arc<OnceLock<Report>>,
    /// Every node heard of lately, as the nodes report themselves.
    views: Arc<Mutex<BTreeMap<String, NodeView>>>,
}

/// How a node reads its own load.
pub type Report = Box<dyn Fn() -> Load + Send + Sync>;

/// A node of the cluster as this node knows it (`GET /api/cluster`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub name: String,
    pub incarnation: String,
    /// Heard within the last 3 heartbeats (a dead node stays listed a while, not alive).
    pub alive: bool,
    pub draining: bool,
    pub zones_owned: u64,
    pub connections: u64,
    /// Commands it sent to other nodes' zones, per second over its last heartbeat.
    pub forwarded_per_sec: f64,
    /// Milliseconds since it was last heard.
    pub last_heard_ms: u64,
    #[serde(skip)]
    heard: Instant,
    #[serde(skip)]
    forwarded: u64,
}

/// How long a node that fell silent (or left) stays listed.
const LISTED_AFTER_DEATH: Duration = Duration::from_secs(300);

impl Membership {
    /// Starts announcing `me` every `heartbeat` and listening to the others, until `stop`
    /// turns true (then it says it is leaving).
    pub async fn start(
        client: Client,
        subjects: &Subjects,
        me: NodeId,
        heartbeat: Duration,
        nodes: IntGauge,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Self, ClusterError> {
        let mut heard = client
            .subscribe(subjects.heartbeat())
            .await
            .map_err(|e| ClusterError::Nats(format!("cannot subscribe to heartbeats: {e}")))?;
        let (members_tx, members) = watch::channel(Members::new([me.clone()]));
        let (joined_tx, joined) = watch::channel(false);
        let (beat_tx, beat) = watch::channel(Instant::now());
        let (draining_tx, mut draining) = watch::channel(false);
        let report: Arc<OnceLock<Report>> = Arc::default();
        let views: Arc<Mutex<BTreeMap<String, NodeView>>> = Arc::default();
        let view = Self {
            report: report.clone(),
            views: views.clone(),
            me: me.clone(),
            members,
            joined,
            beat,
            heartbeat,
            draining: Arc::new(draining_tx),
        };
        nodes.set(1);
        let heartbeat_subject = subjects.heartbeat();
        tokio::spawn(async move {
            let mut started = Instant::now();
            let mut last_beat = Instant::now();
            let mut cut_off = false;
            let dead_after = heartbeat * SILENT_HEARTBEATS;
            // When each node was last heard, and whether it said it drains.
            let mut seen: HashMap<NodeId, (Instant, bool)> = HashMap::new();
            let mut beat = tokio::time::interval(heartbeat);
            beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let announce = |leaving, draining| {
                protocol::encode(&Heartbeat {
                    node: me.clone(),
                    leaving,
                    draining,
                    load: report.get().map(|r| r()).unwrap_or_default(),
                })
            };
            loop {
                let mut beat_sent = false;
                let stopping = tokio::select! {
                    r = stop.changed() => r.is_err() || *stop.borrow_and_update(),
                    // A node that starts draining says so at once, not at its next heartbeat:
                    // the others stop placing zones on it before it lets its own go.
                    Ok(()) = draining.changed() => {
                        let now_draining = *draining.borrow_and_update();
                        if let Err(e) = client.publish(heartbeat_subject.clone(), announce(false, now_draining)).await {
                            tracing::warn!(error = %e, "a heartbeat could not be sent");
                        }
                        let _ = client.flush().await;
                        beat_sent = true;
                        false
                    }
                    _ = beat.tick() => {
                        let now_draining = *draining.borrow();
                        if let Err(e) = client.publish(heartbeat_subject.clone(), announce(false, now_draining)).await {
                            tracing::warn!(error = %e, "a heartbeat could not be sent");
                        }
                        beat_sent = true;
                        if !*joined_tx.borrow() && started.elapsed() >= dead_after {
                            joined_tx.send_replace(true);
                            tracing::info!(node = %me, members = seen.len() + 1, "joined the cluster");
                        }
                        false
                    }
                    msg = heard.next() => {
                        let Some(msg) = msg else { return };
                        match protocol::decode::<Heartbeat>(&msg.payload) {
                            Ok(h) => {
                                note(&views, &h, Instant::now());
                                if h.node == me {
                                } else if h.leaving {
                                    seen.remove(&h.node);
                                } else {
                                    // A new incarnation ends the old one of the same name.
                                    seen.retain(|n, _| n.name != h.node.name || *n == h.node);
                                    seen.insert(h.node, (Instant::now(), h.draining));
                                }
                            }
                            Err(e) => tracing::warn!(error = %e, "an unreadable heartbeat was ignored"),
                        }
                        false
                    }
                };
                if stopping {
                    let _ = client
                        .publish(heartbeat_subject.clone(), announce(true, true))
                        .await;
                    let _ = client.flush().await;
                    return;
                }
                let now = Instant::now();
                let silent = now.saturating_duration_since(last_beat);
                if silent >= dead_after {
                    // This node sent no heartbeat (SIGSTOP, a long stall) for as long as it takes
                    // to declare a node dead: what it heard is stale, and the others may have
                    // declared *it* dead meanwhile. It listens afresh before it acts again.
                    tracing::warn!(node = %me, paused_ms = silent.as_millis() as u64,
                        "this node was paused: it listens to the cluster again before acting");
                    started = now;
                    joined_tx.send_replace(false);
                    for (at, _) in seen.values_mut() {
                        *at = now;
                    }
                    beat_sent = true;
                }
                if beat_sent {
                    // Only now, after `joined` says what the pause means: see `wait_current`.
                    last_beat = now;
                    beat_tx.send_replace(now);
                }
                // Without NATS this node hears nobody (and nobody hears it): the others' silence
                // says nothing of them, and a NATS restart must not end every node's sessions.
                // Its view stands still until NATS is back, then it listens for 3 heartbeats
                // before anyone it does not hear is dead. (A node cut off alone is declared
                // dead by the others; the store's fencing keeps it from writing what they took.)
                if client.connection_state() != async_nats::connection::State::Connected {
                    if !cut_off {
                        tracing::warn!(node = %me, "the cluster's NATS connection is lost: nobody is declared dead until it is back");
                        cut_off = true;
                    }
                    for (at, _) in seen.values_mut() {
                        *at = now;
                    }
                } else if cut_off {
                    tracing::info!(node = %me, "the cluster's NATS connection is back");
                    cut_off = false;
                    for (at, _) in seen.values_mut() {
                        *at = now;
                    }
                }
                seen.retain(|node, (at, _)| {
                    let alive = now.saturating_duration_since(*at) < dead_after;
                    if !alive {
                        tracing::warn!(%node, "a node fell silent: it is dead");
                    }
                    alive
                });
                {
                    let mut views = lock(&views);
                    for view in views.values_mut() {
                        view.alive = seen.keys().any(|n| {
                            n.name == view.name
                                && n.incarnation.simple().to_string() == view.incarnation
                        }) || view.name == me.name;
                    }
                    views.retain(|_, v| {
                        v.alive || now.saturating_duration_since(v.heard) < LISTED_AFTER_DEATH
                    });
                }
                let me_draining = *draining.borrow();
                let current = Members::new(seen.keys().cloned().chain([me.clone()])).draining(
                    seen.iter()
                        .filter(|(_, (_, d))| *d)
                        .map(|(n, _)| n.clone())
                        .chain(me_draining.then(|| me.clone())),
                );
                members_tx.send_if_modified(|m| {
                    let changed = *m != current;
                    if changed {
                        nodes.set(current.len() as i64);
                        *m = current;
                    }
                    changed
                });
            }
        });
        Ok(view)
    }

    /// The nodes alive now, this one included (draining from the moment it starts to).
    pub fn members(&self) -> Members {
        let members = self.members.borrow().clone();
        if self.is_draining() {
            members.with_draining(&self.me)
        } else {
            members
        }
    }

    /// Changes of the members.
    pub fn watch(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    /// Whether this node has listened long enough to trust its view.
    pub fn joined(&self) -> bool {
        *self.joined.borrow()
    }

    /// How this node reads its own load for its heartbeats.
    pub fn report(&self, report: Report) {
        let _ = self.report.set(report);
    }

    /// Every node heard of lately (this one included), by name.
    pub fn nodes(&self) -> Vec<NodeView> {
        let now = Instant::now();
        lock(&self.views)
            .values()
            .map(|v| NodeView {
                last_heard_ms: now.saturating_duration_since(v.heard).as_millis() as u64,
                ..v.clone()
            })
            .collect()
    }

    /// Starts draining: from now on this node says in its heartbeats that no zone is to be
    /// placed on it (until it stops; a drained node is started again to take zones).
    pub fn drain(&self) {
        self.draining.send_replace(true);
    }

    /// Whether this node drains.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }

    /// Waits (up to `limit`) until this node's heartbeats are current: the last went out less
    /// than two heartbeats ago. A node resumed from a pause has not looked at the time yet; once
    /// its heartbeat task has, [`joined`](Self::joined) says whether it must listen again first.
    pub async fn wait_current(&self, limit: Duration) -> bool {
        let mut beat = self.beat.clone();
        let bound = self.heartbeat * 2;
        tokio::time::timeout(limit, beat.wait_for(|at| at.elapsed() < bound))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Waits (up to `limit`) until this node has joined; whether it has.
    pub async fn wait_joined(&self, limit: Duration) -> bool {
        let mut joined = self.joined.clone();
        tokio::time::timeout(limit, joined.wait_for(|&j| j))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Notes what heartbeat `h` says of its node, its forwarding rate from the one before.
fn note(views: &Mutex<BTreeMap<String, NodeView>>, h: &Heartbeat, now: Instant) {
    let mut views = lock(views);
    let incarnation = h.node.incarnation.simple().to_string();
    let rate = match views.get(&h.node.name) {
        Some(before) if before.incarnation == incarnation => {
            let secs = now.saturating_duration_since(before.heard).as_secs_f64();
            let sent = h.load.forwarded.saturating_sub(before.forwarded);
            if secs > 0.0 {
                sent as f64 / secs
            } else {
                before.forwarded_per_sec
            }
        }
        _ => 0.0,
    };
    views.insert(
        h.node.name.clone(),
        NodeView {
            name: h.node.name.clone(),
            incarnation,
            alive: !h.leaving,
            draining: h.draining,
            zones_owned: h.load.zones,
            connections: h.load.connections,
            forwarded_per_sec: rate,
            last_heard_ms: 0,
            heard: now,
            forwarded: h.load.forwarded,
        },
    );
}

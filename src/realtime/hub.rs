//! The topic hub: who is subscribed to each zone, who is present in it, and fan-out.
//!
//! A broadcast is serialised once; every subscriber's queue gets the same bytes (a reference
//! count, not a copy). Each connection's outbound queue is bounded: a client that cannot keep up
//! is disconnected with a close code its client reconnects after, and never slows the zone.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use axum::extract::ws::Utf8Bytes;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use super::protocol;

pub type ConnId = u64;

/// Why the server closes a connection: a WebSocket close code and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// The outbound queue was full: the client reads too slowly. 1011 makes clients reconnect.
pub const SLOW_CONSUMER: CloseReason = CloseReason {
    code: 1011,
    reason: "slow consumer",
};

/// One item of a connection's outbound queue: a frame, or a zone's broadcasts from one batch,
/// which its writer sends with one system call.
#[derive(Clone, Debug)]
pub enum Outbound {
    Frame(Utf8Bytes),
    Frames(Arc<[Utf8Bytes]>),
}

impl Outbound {
    fn frames(&self) -> usize {
        match self {
            Self::Frame(_) => 1,
            Self::Frames(f) => f.len(),
        }
    }
}

/// A connection's outbound queue, bounded in frames rather than items: an item may hold many
/// frames, and the bound is about how far behind a client may fall.
pub fn outbound_queue(frames: usize) -> (OutboundTx, OutboundRx) {
    let (tx, rx) = mpsc::channel(frames.max(1));
    let queued = Arc::new(AtomicUsize::new(0));
    (
        OutboundTx {
            tx,
            queued: queued.clone(),
            limit: frames,
        },
        OutboundRx { rx, queued },
    )
}

#[derive(Clone, Debug)]
pub struct OutboundTx {
    tx: mpsc::Sender<Outbound>,
    queued: Arc<AtomicUsize>,
    limit: usize,
}

pub struct OutboundRx {
    rx: mpsc::Receiver<Outbound>,
    queued: Arc<AtomicUsize>,
}

impl OutboundRx {
    pub async fn recv(&mut self) -> Option<Outbound> {
        let out = self.rx.recv().await?;
        self.queued.fetch_sub(out.frames(), Ordering::Relaxed);
        Some(out)
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        let out = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(out.frames(), Ordering::Relaxed);
        Some(out)
    }
}

/// One connection, as the rest of the server reaches it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: ConnId,
    out: OutboundTx,
    kill: Arc<watch::Sender<Option<CloseReason>>>,
    slow: IntCounter,
}

impl Peer {
    pub fn new(
        id: ConnId,
        out: OutboundTx,
        kill: Arc<watch::Sender<Option<CloseReason>>>,
        slow: IntCounter,
    ) -> Self {
        Self {
            id,
            out,
            kill,
            slow,
        }
    }

    /// Queues a frame; a full queue disconnects the client instead of waiting for it.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        self.queue(Outbound::Frame(frame))
    }

    fn queue(&self, out: Outbound) -> bool {
        let n = out.frames();
        let backlog = self.out.queued.fetch_add(n, Ordering::Relaxed) + n;
        let full = backlog > self.out.limit
            || match self.out.tx.try_send(out) {
                Ok(()) => return true,
                Err(mpsc::error::TrySendError::Full(_)) => true,
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            };
        self.out.queued.fetch_sub(n, Ordering::Relaxed);
        if full && self.kill.send_replace(Some(SLOW_CONSUMER)).is_none() {
            self.slow.inc();
        }
        false
    }

    pub fn send_text(&self, text: String) -> bool {
        self.send(Utf8Bytes::from(text))
    }

    /// Closes the connection with `reason`.
    pub fn close(&self, reason: CloseReason) {
        self.kill.send_if_modified(|r| {
            let first = r.is_none();
            if first {
                *r = Some(reason);
            }
            first
        });
    }
}

/// One presence meta: one connection of one agent.
#[derive(Clone, Debug)]
struct Meta {
    conn: ConnId,
    phx_ref: String,
    online_at: i64,
}

impl Meta {
    fn json(&self) -> Value {
        json!({"phx_ref": self.phx_ref, "online_at": self.online_at})
    }
}

#[derive(Default)]
struct ZoneTopic {
    subscribers: HashMap<ConnId, Peer>,
    /// agent id → its connections' metas.
    presence: BTreeMap<String, Vec<Meta>>,
}

/// Hub metrics (zone-free labels).
#[derive(Clone)]
pub struct HubMetrics {
    pub broadcasts: IntCounter,
    pub deliveries: IntCounter,
    pub slow_consumers: IntCounter,
    pub subscriptions: IntGauge,
    pub presences: IntGauge,
    /// From an event being applied to its broadcast being queued to subscribers.
    pub broadcast_latency: Histogram,
}

impl HubMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            broadcasts: IntCounter::new(
                "thunderline_channel_broadcasts_total",
                "Broadcasts sent to a zone topic (each serialised once).",
            )?,
            deliveries: IntCounter::new(
                "thunderline_channel_deliveries_total",
                "Broadcast frames queued to subscribers.",
            )?,
            slow_consumers: IntCounter::new(
                "thunderline_channel_slow_consumer_disconnects_total",
                "Connections closed because their outbound queue was full.",
            )?,
            subscriptions: IntGauge::new(
                "thunderline_channel_subscriptions",
                "Zone channels joined, across all connections.",
            )?,
            presences: IntGauge::new(
                "thunderline_presence_metas",
                "Presence metas tracked (one per agent connection in a zone).",
            )?,
            broadcast_latency: Histogram::with_opts(
                HistogramOpts::new(
                    "thunderline_broadcast_latency_seconds",
                    "From an event being applied to its broadcast being queued to subscribers.",
                )
                .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 14)?),
            )?,
        };
        registry.register(Box::new(m.broadcasts.clone()))?;
        registry.register(Box::new(m.deliveries.clone()))?;
        registry.register(Box::new(m.slow_consumers.clone()))?;
        registry.register(Box::new(m.subscriptions.clone()))?;
        registry.register(Box::new(m.presences.clone()))?;
        registry.register(Box::new(m.broadcast_latency.clone()))?;
        Ok(m)
    }
}

/// Zone topics, their subscribers and their presence.
pub struct Hub {
    topics: RwLock<HashMap<Uuid, Arc<Mutex<ZoneTopic>>>>,
    next_ref: AtomicU64,
    pub metrics: HubMetrics,
}

pub fn topic_name(zone: Uuid) -> String {
    format!("zone:{zone}")
}

impl Hub {
    pub fn new(metrics: HubMetrics) -> Self {
        Self {
            topics: RwLock::new(HashMap::new()),
            next_ref: AtomicU64::new(1),
            metrics,
        }
    }

    fn topic(&self, zone: Uuid) -> Arc<Mutex<ZoneTopic>> {
        if let Some(t) = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&zone)
        {
            return t.clone();
        }
        self.topics
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .entry(zone)
            .or_default()
            .clone()
    }

    fn existing(&self, zone: Uuid) -> Option<Arc<Mutex<ZoneTopic>>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&zone)
            .cloned()
    }

    /// Sends the same frames, in order, to every subscriber of the zone: one queue item each.
    pub fn broadcast(&self, zone: Uuid, frames: Arc<[Utf8Bytes]>) {
        let Some(topic) = self.existing(zone) else {
            return;
        };
        let topic = topic.lock().unwrap_or_else(|e| e.into_inner());
        self.metrics.broadcasts.inc_by(frames.len() as u64);
        let mut sent = 0;
        for peer in topic.subscribers.values() {
            if peer.queue(Outbound::Frames(frames.clone())) {
                sent += 1;
            }
        }
        self.metrics.deliveries.inc_by(sent * frames.len() as u64);
    }

    /// Subscribes the connection, tracks its agent's presence and tells everyone: the joiner
    /// gets the full `presence_state` first, then all subscribers get the `presence_diff`.
    pub fn join(&self, zone: Uuid, peer: &Peer, agent_id: &str, join_ref: Option<&str>) {
        let topic_name = topic_name(zone);
        let topic = self.topic(zone);
        let mut topic = topic.lock().unwrap_or_else(|e| e.into_inner());
        if topic.subscribers.insert(peer.id, peer.clone()).is_none() {
            self.metrics.subscriptions.inc();
        }
        let meta = Meta {
            conn: peer.id,
            phx_ref: format!("{:x}", self.next_ref.fetch_add(1, Ordering::Relaxed)),
            online_at: chrono::Utc::now().timestamp_millis(),
        };
        topic
            .presence
            .entry(agent_id.to_owned())
            .or_default()
            .push(meta.clone());
        self.metrics.presences.inc();
        peer.send_text(protocol::encode(
            join_ref,
            None,
            &topic_name,
            "presence_state",
            &state_of(&topic.presence),
        ));
        let diff = json!({"joins": {agent_id: {"metas": [meta.json()]}}, "leaves": {}});
        let frame = Utf8Bytes::from(protocol::encode(
            None,
            None,
            &topic_name,
            "presence_diff",
            &diff,
        ));
        for p in topic.subscribers.values() {
            p.send(frame.clone());
        }
    }

    /// Unsubscribes the connection and broadcasts its agent's leave; returns the agent, if it
    /// was present.
    pub fn leave(&self, zone: Uuid, conn: ConnId) -> Option<String> {
        let topic_arc = self.existing(zone)?;
        let mut topic = topic_arc.lock().unwrap_or_else(|e| e.into_inner());
        if topic.subscribers.remove(&conn).is_some() {
            self.metrics.subscriptions.dec();
        }
        let mut left = None;
        for (agent, metas) in topic.presence.iter_mut() {
            if let Some(i) = metas.iter().position(|m| m.conn == conn) {
                left = Some((agent.clone(), metas.remove(i)));
                break;
            }
        }
        let (agent, meta) = left?;
        self.metrics.presences.dec();
        if topic.presence.get(&agent).is_some_and(Vec::is_empty) {
            topic.presence.remove(&agent);
        }
        let diff = json!({"joins": {}, "leaves": {agent.as_str(): {"metas": [meta.json()]}}});
        let frame = Utf8Bytes::from(protocol::encode(
            None,
            None,
            &topic_name(zone),
            "presence_diff",
            &diff,
        ));
        for p in topic.subscribers.values() {
            p.send(frame.clone());
        }
        let empty = topic.subscribers.is_empty() && topic.presence.is_empty();
        drop(topic);
        if empty {
            let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
            // Only if nobody joined in between.
            if topics
                .get(&zone)
                .is_some_and(|t| Arc::ptr_eq(t, &topic_arc) && Arc::strong_count(t) == 2)
            {
                topics.remove(&zone);
            }
        }
        Some(agent)
    }

    /// The agents present in the zone, one entry per agent.
    pub fn agents(&self, zone: Uuid) -> Vec<String> {
        self.existing(zone)
            .map(|t| {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .presence
                    .keys()
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Closes every subscriber of the zone (it was deleted).
    pub fn close_zone(&self, zone: Uuid, reason: &str) {
        let Some(topic) = self.existing(zone) else {
            return;
        };
        let name = topic_name(zone);
        let topic = topic.lock().unwrap_or_else(|e| e.into_inner());
        let frame = Utf8Bytes::from(protocol::encode(
            None,
            None,
            &name,
            "phx_error",
            &json!({"reason": reason}),
        ));
        for p in topic.subscribers.values() {
            p.send(frame.clone());
        }
    }
}

fn state_of(presence: &BTreeMap<String, Vec<Meta>>) -> Value {
    let map: serde_json::Map<String, Value> = presence
        .iter()
        .map(|(agent, metas)| {
            (
                agent.clone(),
                json!({"metas": metas.iter().map(Meta::json).collect::<Vec<_>>()}),
            )
        })
        .collect();
    Value::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbound_bound_counts_frames_not_queue_items() {
        let metrics = HubMetrics::register(&Registry::new()).unwrap();
        let (tx, mut rx) = outbound_queue(4);
        let (kill, killed) = watch::channel(None);
        let peer = Peer::new(1, tx, Arc::new(kill), metrics.slow_consumers.clone());
        let frames = |n| Outbound::Frames(Arc::from(vec![Utf8Bytes::from_static("f"); n]));
        assert!(peer.queue(frames(3)));
        // Once the writer has taken them, they no longer count against the bound.
        assert_eq!(rx.try_recv().map(|o| o.frames()), Some(3));
        assert!(peer.queue(frames(3)));
        assert!(peer.send(Utf8Bytes::from_static("the fourth frame")));
        assert!(killed.borrow().is_none());
        // Two items are queued, well under four, but five frames would be.
        assert!(!peer.queue(frames(1)));
        assert_eq!(*killed.borrow(), Some(SLOW_CONSUMER));
        assert_eq!(metrics.slow_consumers.get(), 1);
    }

    #[test]
    fn a_full_queue_disconnects_the_slow_consumer_once_and_counts_it() {
        let registry = Registry::new();
        let metrics = HubMetrics::register(&registry).unwrap();
        let (tx, _rx) = outbound_queue(2);
        let (kill, mut killed) = watch::channel(None);
        let peer = Peer::new(1, tx, Arc::new(kill), metrics.slow_consumers.clone());
        let hub = Hub::new(metrics.clone());
        let zone = Uuid::now_v7();
        hub.join(zone, &peer, "slow", Some("1"));
        // presence_state and presence_diff filled the queue of 2; every broadcast now overflows.
        for _ in 0..5 {
            hub.broadcast(
                zone,
                Arc::from([Utf8Bytes::from_static("[null,null,\"t\",\"e\",{}]")]),
            );
        }
        assert!(killed.has_changed().unwrap());
        assert_eq!(*killed.borrow_and_update(), Some(SLOW_CONSUMER));
        assert_eq!(metrics.slow_consumers.get(), 1, "counted once");
        assert_eq!(metrics.broadcasts.get(), 5);
        assert_eq!(metrics.deliveries.get(), 0);
        assert_ne!(SLOW_CONSUMER.code, 1000, "clients reconnect after it");
        assert_eq!(hub.agents(zone), vec!["slow".to_owned()]);
        assert_eq!(hub.leave(zone, 1).as_deref(), Some("slow"));
        assert!(hub.agents(zone).is_empty());
        assert_eq!(metrics.presences.get(), 0);
    }
}

//! The topic hub: the open connections, who is subscribed to each zone, who is present in it,
//! and fan-out.
//!
//! A zone's subscribers and presence change only as the topic sink reads the zone's events in
//! seq order (a session's `agent_entered` subscribes its connection, its `agent_left`
//! unsubscribes it), so presence changes and events reach every subscriber in one order, and a
//! joiner sees exactly the events after the state its join reply showed.
//!
//! A broadcast is serialised once; every subscriber's queue gets the same bytes (a reference
//! count, not a copy). Each connection's outbound queue is bounded: a client that cannot keep up
//! is disconnected with a close code its client reconnects after, and never slows the zone.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, Registry};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use super::channel::Channels;
pub use super::outlet::{CloseReason, SLOW_CONSUMER};
use super::outlet::{Outbound, Outlet, Weighed, Written};

/// A connection's name: unique across the server's runs (a random prefix per run), since
/// sessions and presence metas (`phx_ref`) are keyed by it.
pub type ConnId = Arc<str>;

/// One connection, as the rest of the server reaches it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub id: ConnId,
    out: Arc<Outlet>,
}

impl Peer {
    pub fn new(id: impl Into<ConnId>, out: Arc<Outlet>) -> Self {
        Self { id: id.into(), out }
    }

    /// Queues a frame; a full queue disconnects the client instead of waiting for it.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        self.queue(Outbound::Frame(frame))
    }

    pub(crate) fn queue(&self, out: Outbound) -> bool {
        let bytes = out.bytes();
        self.out.queue(Weighed::new(out, bytes, None))
    }

    /// How many more frames its queue takes now before the client counts as a slow consumer.
    fn room(&self) -> usize {
        self.out.room()
    }

    pub fn send_text(&self, text: String) -> bool {
        self.send(Utf8Bytes::from(text))
    }

    /// Queues what a rejoin missed, as one item: see [`Outbound::Replay`].
    pub fn send_replay(&self, frames: Arc<[Utf8Bytes]>) -> bool {
        self.queue(Outbound::Replay(frames))
    }

    /// Closes the connection with `reason` (the first reason asked for wins).
    pub fn close(&self, reason: CloseReason) {
        self.out.close(reason);
    }
}

/// One presence meta: one connection of one agent.
#[derive(Clone, Debug)]
struct Meta {
    conn: ConnId,
    online_at: i64,
}

impl Meta {
    fn json(&self) -> Value {
        json!({"phx_ref": &*self.conn, "online_at": self.online_at})
    }
}

/// A zone's subscribers and presence, as its events so far have left them.
#[derive(Default)]
pub(crate) struct ZoneTopic {
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

/// An open connection, as the topic sink reaches it.
#[derive(Clone)]
pub(crate) struct Connection {
    pub peer: Peer,
    pub channels: Arc<Mutex<Channels>>,
}

/// The open connections, and each zone's subscribers and presence.
pub struct Hub {
    connections: RwLock<HashMap<ConnId, Connection>>,
    /// Changed by the topic sink, in each zone's seq order (and, for a session the server ends,
    /// by [`unsubscribe_now`](Self::unsubscribe_now)).
    pub(crate) topics: Mutex<HashMap<Uuid, ZoneTopic>>,
    pub metrics: HubMetrics,
}

pub fn topic_name(zone: Uuid) -> String {
    format!("zone:{zone}")
}

impl Hub {
    pub fn new(metrics: HubMetrics) -> Self {
        Self {
            connections: RwLock::new(HashMap::new()),
            topics: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Makes a connection reachable by its name, for the sessions it will hold.
    pub fn connect(&self, peer: &Peer, channels: Arc<Mutex<Channels>>) {
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                peer.id.clone(),
                Connection {
                    peer: peer.clone(),
                    channels,
                },
            );
    }

    /// Forgets a connection. Its sessions end through their own `agent_left` events.
    pub fn disconnect(&self, conn: &str) {
        self.connections
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(conn);
    }

    pub(crate) fn connection(&self, conn: &str) -> Option<Connection> {
        self.connections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(conn)
            .cloned()
    }

    /// Stops `conn`'s subscription to `zone` ahead of the topic sink, for a session the server
    /// ended: its leave, when the sink reaches it, unsubscribes again (harmlessly) and updates
    /// presence in the zone's order as usual.
    pub fn unsubscribe_now(&self, zone: Uuid, conn: &str) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(topic) = topics.get_mut(&zone) {
            topic.unsubscribe(self, conn);
        }
    }

    /// Starts this node's copy of a zone's presence from the sessions the zone's owner (another
    /// node of a cluster) reported: (agent, connection, joined at in ms).
    pub fn seed_presence<'a>(
        &self,
        zone: Uuid,
        sessions: impl Iterator<Item = (&'a str, &'a str, i64)>,
    ) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let topic = topics.entry(zone).or_default();
        for (agent, conn, online_at) in sessions {
            topic.track(self, agent, &ConnId::from(conn), online_at);
        }
    }

    /// Subscribes connection `connection`, joined to `zone` as `agent`, to the zone's topic and
    /// sends it the zone's presence, then `since` (the zone's events after its join that this
    /// node delivered before), as delivering its join's own event would have: for a join whose
    /// event this node never delivers (it came before this node's copy of the zone began, which
    /// another join's answer started). Nothing if it is subscribed already or left meanwhile.
    pub fn attach(
        &self,
        zone: Uuid,
        connection: &str,
        agent: &str,
        since: &[crate::zone::ZoneEvent],
    ) {
        let Some(conn) = self.connection(connection) else {
            return;
        };
        let join_ref = {
            let channels = conn.channels.lock().unwrap_or_else(|e| e.into_inner());
            channels
                .get(&zone)
                .filter(|j| j.agent_id == agent)
                .map(|j| j.join_ref.clone())
        };
        let Some(join_ref) = join_ref else {
            return;
        };
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let topic = topics.entry(zone).or_default();
        if topic.subscribers.contains_key(connection) {
            return;
        }
        conn.peer.send_text(super::protocol::encode(
            join_ref.as_deref(),
            None,
            &topic_name(zone),
            "presence_state",
            &topic.state(),
        ));
        if !since.is_empty() {
            let frames: Vec<Utf8Bytes> = since
                .iter()
                .flat_map(|e| super::topic::frames_for(e, agent))
                .collect();
            conn.peer.send_replay(Arc::from(frames));
        }
        topic.subscribe(self, conn.peer.clone());
    }

    /// Replaces this node's copy of a zone's presence with the sessions its owner (another node
    /// of a cluster) reported, and sends every subscriber here the new `presence_state`: after
    /// the zone changed owners, some agents may have left without an event this node heard.
    pub fn resync_presence<'a>(
        &self,
        zone: Uuid,
        sessions: impl Iterator<Item = (&'a str, &'a str, i64)>,
    ) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let topic = topics.entry(zone).or_default();
        let metas: usize = topic.presence.values().map(Vec::len).sum();
        self.metrics.presences.sub(metas as i64);
        topic.presence.clear();
        for (agent, conn, online_at) in sessions {
            topic.track(self, agent, &ConnId::from(conn), online_at);
        }
        let state = topic.state();
        let name = topic_name(zone);
        for peer in topic.subscribers.values() {
            let join_ref = self.connection(&peer.id).and_then(|c| {
                let channels = c.channels.lock().unwrap_or_else(|e| e.into_inner());
                channels.get(&zone).map(|j| j.join_ref.clone())
            });
            peer.send_text(super::protocol::encode(
                join_ref.flatten().as_deref(),
                None,
                &name,
                "presence_state",
                &state,
            ));
        }
    }

    /// The sessions of this node's connections subscribed to `zone`: (connection, agent,
    /// token bits), for the zone's new owner to take them in again.
    pub fn local_sessions(&self, zone: Uuid) -> Vec<(ConnId, String, crate::zone::Permissions)> {
        let peers: Vec<ConnId> = self
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&zone)
            .map(|t| t.subscribers.keys().cloned().collect())
            .unwrap_or_default();
        peers
            .into_iter()
            .filter_map(|conn| {
                let c = self.connection(&conn)?;
                let channels = c.channels.lock().unwrap_or_else(|e| e.into_inner());
                let joined = channels.get(&zone)?;
                Some((conn.clone(), joined.agent_id.clone(), joined.perms))
            })
            .collect()
    }

    /// Forgets this node's copy of a zone another node writes: its presence (when no
    /// connection of this node is subscribed any more), or everything, closing the channels of
    /// those that are with `reason` (its history was lost: they join again).
    pub fn forget_zone(&self, zone: Uuid, force: bool) -> Vec<Peer> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        let Some(topic) = topics.get_mut(&zone) else {
            return Vec::new();
        };
        if !force && !topic.subscribers.is_empty() {
            return Vec::new();
        }
        let peers = topic.close(self);
        topics.remove(&zone);
        peers
    }

    /// Whether any connection of this node is subscribed to `zone`.
    pub fn has_subscribers(&self, zone: Uuid) -> bool {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&zone)
            .is_some_and(|t| !t.subscribers.is_empty())
    }

    /// How many more frames every subscriber of `zone` here takes now (the fewest of them; no
    /// limit without subscribers): what a backlog of the zone's events may send at once without
    /// making a client that reads as fast as it can a slow consumer.
    pub fn room(&self, zone: Uuid) -> usize {
        self.topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&zone)
            .and_then(|t| t.subscribers.values().map(Peer::room).min())
            .unwrap_or(usize::MAX)
    }

    /// Sends frames to one subscriber (if it is subscribed here): one queue item.
    pub(crate) fn send_to(
        &self,
        topic: &ZoneTopic,
        conn: &str,
        frames: Arc<[Utf8Bytes]>,
        written: Option<&Written>,
    ) {
        let size = frames.iter().map(|f| f.len()).sum();
        let n = frames.len() as u64;
        if let Some(peer) = topic.subscribers.get(conn)
            && peer
                .out
                .queue(Weighed::new(Outbound::Frames(frames), size, written))
        {
            self.metrics.deliveries.inc_by(n);
        }
    }

    /// Sends the same frames, in order, to every subscriber: one queue item each.
    pub(crate) fn fan_out(
        &self,
        topic: &ZoneTopic,
        frames: Arc<[Utf8Bytes]>,
        written: Option<&Written>,
    ) {
        let mut sent = 0;
        let size = frames.iter().map(|f| f.len()).sum();
        let n = frames.len() as u64;
        let item = Weighed::new(Outbound::Frames(frames), size, written);
        for peer in topic.subscribers.values() {
            if peer.out.queue(item.clone()) {
                sent += 1;
            }
        }
        self.metrics.deliveries.inc_by(sent * n);
    }
}

impl ZoneTopic {
    /// Tracks a session's presence; returns the `presence_diff` payload for its join.
    pub(crate) fn track(&mut self, hub: &Hub, agent: &str, conn: &ConnId, online_at: i64) -> Value {
        let meta = Meta {
            conn: conn.clone(),
            online_at,
        };
        let metas = self.presence.entry(agent.to_owned()).or_default();
        if !metas.iter().any(|m| m.conn == *conn) {
            metas.push(meta.clone());
            hub.metrics.presences.inc();
        }
        json!({"joins": {agent: {"metas": [meta.json()]}}, "leaves": {}})
    }

    /// Forgets a session's presence; returns the `presence_diff` payload for its leave, if it
    /// was present.
    pub(crate) fn untrack(&mut self, hub: &Hub, agent: &str, conn: &str) -> Option<Value> {
        let metas = self.presence.get_mut(agent)?;
        let i = metas.iter().position(|m| &*m.conn == conn)?;
        let meta = metas.remove(i);
        if metas.is_empty() {
            self.presence.remove(agent);
        }
        hub.metrics.presences.dec();
        Some(json!({"joins": {}, "leaves": {agent: {"metas": [meta.json()]}}}))
    }

    /// Every agent present and their metas: the `presence_state` payload.
    pub(crate) fn state(&self) -> Value {
        let map: serde_json::Map<String, Value> = self
            .presence
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

    /// The connections here subscribed with a session of `agent`.
    pub(crate) fn local_connections(&self, agent: &str) -> Vec<ConnId> {
        self.presence
            .get(agent)
            .map(|metas| {
                metas
                    .iter()
                    .filter(|m| self.subscribers.contains_key(&m.conn))
                    .map(|m| m.conn.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn subscribe(&mut self, hub: &Hub, peer: Peer) {
        if self.subscribers.insert(peer.id.clone(), peer).is_none() {
            hub.metrics.subscriptions.inc();
        }
    }

    pub(crate) fn unsubscribe(&mut self, hub: &Hub, conn: &str) -> Option<Peer> {
        let peer = self.subscribers.remove(conn)?;
        hub.metrics.subscriptions.dec();
        Some(peer)
    }

    /// Ends every subscription (the zone is gone); returns who was subscribed.
    pub(crate) fn close(&mut self, hub: &Hub) -> Vec<Peer> {
        let peers: Vec<Peer> = self.subscribers.drain().map(|(_, p)| p).collect();
        hub.metrics.subscriptions.sub(peers.len() as i64);
        let metas: usize = self.presence.values().map(Vec::len).sum();
        hub.metrics.presences.sub(metas as i64);
        self.presence.clear();
        peers
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subscribers.is_empty() && self.presence.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_disconnects_the_slow_consumer_once_and_counts_it() {
        let registry = Registry::new();
        let metrics = HubMetrics::register(&registry).unwrap();
        let outlet = Outlet::new(2, usize::MAX, metrics.slow_consumers.clone());
        let peer = Peer::new("c1", outlet.clone());
        let hub = Hub::new(metrics.clone());
        let mut topic = ZoneTopic::default();
        topic.subscribe(&hub, peer.clone());
        for _ in 0..5 {
            hub.fan_out(
                &topic,
                Arc::from([
                    Utf8Bytes::from_static("[null,null,\"t\",\"e\",{}]"),
                    Utf8Bytes::from_static("[null,null,\"t\",\"e\",{}]"),
                ]),
                None,
            );
        }
        assert_eq!(outlet.close_reason(), Some(SLOW_CONSUMER));
        assert_eq!(metrics.slow_consumers.get(), 1, "counted once");
        assert_eq!(metrics.deliveries.get(), 2, "the first fit, nothing after");
        assert_ne!(SLOW_CONSUMER.code, 1000, "clients reconnect after it");
        assert_eq!(metrics.subscriptions.get(), 1);
        assert!(topic.unsubscribe(&hub, "c1").is_some());
        assert_eq!(metrics.subscriptions.get(), 0);
    }
}

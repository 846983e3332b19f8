//! The topic sink: the broadcast batcher's sink, which turns each zone's events into frames for
//! its subscribers, and keeps the zone's subscribers and presence as those events say.
//!
//! It reads a batch's events in order (one zone's events arrive in seq order: one writer per
//! zone, one broadcast batcher, one sink worker). An `agent_entered` subscribes the session's
//! connection and sends it `presence_state`; an `agent_left` unsubscribes it; both add a
//! `presence_diff` to the stream at their place in it, so no subscriber ever sees a presence
//! change before the events that happened before it. `zone_deleted` closes every channel of the
//! zone (`phx_close`) and forgets its presence. Between such changes, a zone's frames from one batch travel to each
//! subscriber as one queue item, written with one system call.
//!
//! In a zone with an interest radius, an event carries whom it reaches and whose views it
//! changes (its [`View`], decided by the zone's writer): a move goes only to the sessions of the
//! agents it reaches, after the `agent_entered_view` / `agent_left_view` frames it causes for
//! them ([`received`] is the order); each frame is encoded once per event, whoever receives it.
//!
//! A batch is done once the connections' writers have taken its frames (or after a few
//! milliseconds): with the broadcast batcher's group commit, an idle server sends each event at
//! once, and a busy one gathers into the next batch what arrives while the last is written.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use super::channel::Joined;
use super::hub::{ConnId, Hub, ZoneTopic, topic_name};
use super::outlet::{Written, WrittenWait, written};
use super::protocol;
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::runtime::ZoneWork;
use crate::zone::{EventKind, Received, Sight, View, ZoneEvent, received};

/// A pipeline message that may carry zone events to broadcast.
pub trait Broadcasts: Send + Sync + 'static {
    fn broadcasts(&self) -> &[ZoneEvent];
}

impl Broadcasts for ZoneEvent {
    fn broadcasts(&self) -> &[ZoneEvent] {
        std::slice::from_ref(self)
    }
}

/// The zone pipeline's messages carry the events their command caused.
impl Broadcasts for ZoneWork {
    fn broadcasts(&self) -> &[ZoneEvent] {
        &self.events
    }
}

/// A zone event as its subscribers receive it: `[null, null, "zone:<id>", <name>, <payload with
/// seq>]`. Also what a rejoin's missed events are sent as.
pub fn event_frame(event: &ZoneEvent) -> String {
    protocol::encode(
        None,
        None,
        &topic_name(event.zone_id),
        event.name(),
        &event.broadcast_payload(),
    )
}

/// A view change's frame: `agent_entered_view` `{agent_id, position}` or `agent_left_view`
/// `{agent_id}`, with no `seq` (it is not an event of the zone's history but a consequence of
/// one).
pub fn sight_frame(zone: Uuid, sight: &Sight) -> String {
    protocol::encode(
        None,
        None,
        &topic_name(zone),
        sight.name(),
        &sight.payload(),
    )
}

/// What a session of `agent` receives of `event`, in order, as frames: what a rejoin recovers
/// of the events it missed (only what its client would have received).
pub fn frames_for(event: &ZoneEvent, agent: &str) -> Vec<Utf8Bytes> {
    if event.view.is_none() {
        return vec![Utf8Bytes::from(event_frame(event))];
    }
    received(event, agent)
        .into_iter()
        .map(|r| match r {
            Received::Event => Utf8Bytes::from(event_frame(event)),
            Received::Sight(sight) => Utf8Bytes::from(sight_frame(event.zone_id, &sight)),
        })
        .collect()
}

/// The channel of a connection whose agent a service moved into a zone: no join of its own (no
/// `join_ref`, no token bits), for as long as the connection lasts.
fn moved_in(agent_id: &str) -> Joined {
    Joined {
        join_ref: None,
        agent_id: agent_id.to_owned(),
        perms: crate::zone::Permissions::empty(),
        expires_at: tokio::time::Instant::now()
            + std::time::Duration::from_secs(100 * 365 * 24 * 3600),
        minted_us: 0,
        migrating: false,
    }
}

/// Broadcasts each processed event to its zone's subscribers; see the module documentation.
pub struct TopicSink {
    hub: Arc<Hub>,
    /// How long a batch waits, at most, for the connections' writers to take its frames.
    write_wait: Duration,
}

impl TopicSink {
    /// `write_wait`: at most the broadcast batcher's timeout (see [`TopicSink::written`]).
    pub fn new(hub: Arc<Hub>, write_wait: Duration) -> Self {
        Self { hub, write_wait }
    }
}

/// Frames waiting for a zone's current subscribers: for all of them, or (an interest-filtered
/// event's) for some. One of the two is empty at any time, so each subscriber receives them in
/// the order they were pushed.
struct Run {
    frames: Vec<Utf8Bytes>,
    personal: HashMap<ConnId, Vec<Utf8Bytes>>,
    /// Held by every queue item the run makes.
    written: Written,
}

impl Run {
    fn new(written: Written) -> Self {
        Self {
            frames: Vec::new(),
            personal: HashMap::default(),
            written,
        }
    }

    fn push(&mut self, hub: &Hub, topic: &ZoneTopic, frame: String) {
        if !self.personal.is_empty() {
            self.flush(hub, topic);
        }
        self.frames.push(Utf8Bytes::from(frame));
    }

    fn push_to(&mut self, hub: &Hub, topic: &ZoneTopic, conn: &ConnId, frame: Utf8Bytes) {
        if !self.frames.is_empty() {
            self.flush(hub, topic);
        }
        self.personal.entry(conn.clone()).or_default().push(frame);
    }

    fn flush(&mut self, hub: &Hub, topic: &ZoneTopic) {
        if !self.frames.is_empty() {
            hub.fan_out(
                topic,
                Arc::from(std::mem::take(&mut self.frames)),
                Some(&self.written),
            );
        }
        for (conn, frames) in self.personal.drain() {
            hub.send_to(topic, &conn, Arc::from(frames), Some(&self.written));
        }
    }
}

impl TopicSink {
    /// Applies one event to its zone's topic, queuing or sending what it causes: for everyone,
    /// then the view changes it causes; or, filtered by interest, to the agents it reaches.
    fn event(&self, topic: &mut ZoneTopic, run: &mut Run, event: &ZoneEvent) {
        match event.view.as_deref() {
            Some(view) if view.audience.is_some() => self.filtered(topic, run, event, view),
            view => {
                self.zone_wide(topic, run, event);
                if let Some(view) = view {
                    self.sights(topic, run, event.zone_id, view);
                }
            }
        }
    }

    /// Queues each watcher's view changes to its sessions here, each frame encoded once.
    fn sights(&self, topic: &ZoneTopic, run: &mut Run, zone: Uuid, view: &View) {
        let hub = &*self.hub;
        let mut encoded: HashMap<(&'static str, String), Utf8Bytes> = HashMap::new();
        for (watcher, sights) in view.sights() {
            let conns = topic.local_connections(watcher);
            if conns.is_empty() {
                continue;
            }
            for sight in &sights {
                // Within one event an agent is in one place: its frame is the same for all.
                let frame = encoded
                    .entry((sight.name(), sight.agent_id().to_owned()))
                    .or_insert_with(|| Utf8Bytes::from(sight_frame(zone, sight)))
                    .clone();
                for conn in &conns {
                    run.push_to(hub, topic, conn, frame.clone());
                }
            }
        }
    }

    /// An event for some agents only: the view changes it causes, then the event itself to the
    /// agents it reaches (its own agent, an interaction's target, and its audience).
    fn filtered(&self, topic: &ZoneTopic, run: &mut Run, event: &ZoneEvent, view: &View) {
        let hub = &*self.hub;
        self.sights(topic, run, event.zone_id, view);
        let (actor, target) = event.kind.audience_agents();
        let reached: BTreeSet<&str> = actor
            .into_iter()
            .chain(target)
            .chain(view.audience.iter().flatten().map(String::as_str))
            .collect();
        let frame = Utf8Bytes::from(event_frame(event));
        for agent in reached {
            for conn in topic.local_connections(agent) {
                run.push_to(hub, topic, &conn, frame.clone());
            }
        }
    }

    /// Applies an event for everyone to its zone's topic, queuing or sending what it causes.
    fn zone_wide(&self, topic: &mut ZoneTopic, run: &mut Run, event: &ZoneEvent) {
        let hub = &*self.hub;
        let name = topic_name(event.zone_id);
        let frame = event_frame(event);
        let diff = |payload: serde_json::Value| {
            protocol::encode(None, None, &name, "presence_diff", &payload)
        };
        match &event.kind {
            EventKind::AgentEntered(p) => {
                let conn = hub.connection(&p.connection);
                let online_at = p.timestamp.timestamp_millis();
                let Some(conn) = conn else {
                    // The connection is already gone; its leave follows.
                    let tracked = diff(topic.track(
                        hub,
                        &p.agent_id,
                        &p.connection.as_str().into(),
                        online_at,
                    ));
                    run.push(hub, topic, tracked);
                    run.push(hub, topic, frame);
                    return;
                };
                let join_ref = {
                    let channels = conn.channels.lock().unwrap_or_else(|e| e.into_inner());
                    channels
                        .get(&event.zone_id)
                        .filter(|j| j.agent_id == p.agent_id)
                        .map(|j| j.join_ref.clone())
                };
                let diff_frame = diff(topic.track(hub, &p.agent_id, &conn.peer.id, online_at));
                if let Some(join_ref) = join_ref {
                    // Whatever the others were sent before this join is not the joiner's.
                    run.flush(hub, topic);
                    topic.subscribe(hub, conn.peer.clone());
                    conn.peer.send_text(protocol::encode(
                        join_ref.as_deref(),
                        None,
                        &name,
                        "presence_state",
                        &topic.state(),
                    ));
                }
                run.push(hub, topic, diff_frame);
                run.push(hub, topic, frame);
            }
            EventKind::AgentLeft(p) => {
                if topic.unsubscribe(hub, &p.connection).is_some() {
                    run.flush(hub, topic);
                }
                if let (Some(to), Some(conn)) = (p.to, hub.connection(&p.connection)) {
                    // Moved away by a service: its client is told where. (A migration the
                    // connection asked for itself closes its channel with its answer.)
                    let closed = {
                        let mut channels = conn.channels.lock().unwrap_or_else(|e| e.into_inner());
                        match channels.get(&event.zone_id) {
                            Some(j) if j.agent_id == p.agent_id && !j.migrating => {
                                let closed = channels.remove(&event.zone_id).map(|j| j.join_ref);
                                // Its session begins in `to` at once: the connection holds
                                // it, and leaves it when it goes, as for a channel it joined
                                // (this node hears `to`'s events only if it follows `to`).
                                channels.get_or_insert_with(to, || moved_in(&p.agent_id));
                                closed
                            }
                            _ => None,
                        }
                    };
                    if let Some(join_ref) = closed {
                        conn.peer.send_text(protocol::encode(
                            join_ref.as_deref(),
                            join_ref.as_deref(),
                            &name,
                            "phx_close",
                            &json!({"reason": "migrated", "to": to.to_string()}),
                        ));
                    }
                }
                if let Some(payload) = topic.untrack(hub, &p.agent_id, &p.connection) {
                    run.push(hub, topic, diff(payload));
                }
                run.push(hub, topic, frame);
            }
            EventKind::ZoneDeleted(_) => {
                run.push(hub, topic, frame);
                run.flush(hub, topic);
                for peer in topic.close(hub) {
                    let join_ref = hub.connection(&peer.id).and_then(|c| {
                        let mut channels = c.channels.lock().unwrap_or_else(|e| e.into_inner());
                        channels.remove(&event.zone_id).map(|j| j.join_ref)
                    });
                    let join_ref = join_ref.flatten();
                    peer.send_text(protocol::encode(
                        join_ref.as_deref(),
                        join_ref.as_deref(),
                        &name,
                        "phx_close",
                        &json!({"reason": "zone_deleted"}),
                    ));
                }
            }
            _ => run.push(hub, topic, frame),
        }
    }
}

impl TopicSink {
    /// Delivers events (each zone's in seq order) to their zones' subscribers, and keeps the
    /// zones' subscribers and presence as they say. Also how a node of a cluster delivers the
    /// events of a zone another node writes. The frames are queued, not yet written: the wait
    /// returned ends once the connections' writers have taken them all.
    pub fn deliver<'a>(&self, events: impl Iterator<Item = &'a ZoneEvent>) -> WrittenWait {
        let hub = &*self.hub;
        let (written, wait) = written();
        let mut topics = hub.topics.lock().unwrap_or_else(|e| e.into_inner());
        // A batch holds few zones: their runs in a short list beat a map.
        let mut runs: Vec<(Uuid, Run)> = Vec::new();
        let mut count = 0u64;
        for event in events {
            count += 1;
            let topic = match topics.entry(event.zone_id) {
                Entry::Occupied(t) => t.into_mut(),
                Entry::Vacant(v) => v.insert(ZoneTopic::default()),
            };
            let run = match runs.iter().position(|(z, _)| *z == event.zone_id) {
                Some(i) => &mut runs[i].1,
                None => {
                    runs.push((event.zone_id, Run::new(written.clone())));
                    &mut runs.last_mut().expect("just pushed").1
                }
            };
            self.event(topic, run, event);
        }
        hub.metrics.broadcasts.inc_by(count);
        for (zone, mut run) in runs {
            if let Some(topic) = topics.get(&zone) {
                run.flush(hub, topic);
                if topic.is_empty() {
                    topics.remove(&zone);
                }
            }
        }
        // Only the queued items hold tickets now.
        drop(written);
        wait
    }
}

impl TopicSink {
    /// Delivers a batch's broadcasts and records how long they took to get here; the returned
    /// wait is for [`written`](Self::written).
    pub fn deliver_batch<T: Broadcasts>(&self, messages: &[Message<T>]) -> WrittenWait {
        let written = self.deliver(messages.iter().flat_map(|m| m.data.broadcasts()));
        let now = chrono::Utc::now();
        for event in messages.iter().flat_map(|m| m.data.broadcasts()) {
            let waited = now - event.occurred_at;
            self.hub
                .metrics
                .broadcast_latency
                .observe(waited.to_std().unwrap_or_default().as_secs_f64());
        }
        written
    }

    /// The frames are queued, not written: the connections' writers now do the costly part.
    /// The sink stays busy until they have taken them, so that on a busy server the next batch
    /// gathers what arrives meanwhile (with group commit) instead of leaving one event at a
    /// time, each costing every subscriber a system call. At most `write_wait`: a client that
    /// stops reading must not hold everyone's broadcasts.
    pub async fn written(&self, wait: WrittenWait) {
        wait.within(self.write_wait).await;
    }
}

impl<T: Broadcasts> BatchSink<T> for TopicSink {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<T>],
    ) -> Result<(), Failure> {
        let written = self.deliver_batch(messages);
        self.written(written).await;
        Ok(())
    }
}

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

use std::collections::hash_map::Entry;
use std::sync::Arc;

use axum::extract::ws::Utf8Bytes;
use serde_json::json;
use uuid::Uuid;

use super::channel::Joined;
use super::hub::{Hub, ZoneTopic, topic_name};
use super::protocol;
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::runtime::ZoneWork;
use crate::zone::{EventKind, ZoneEvent};

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
}

impl TopicSink {
    pub fn new(hub: Arc<Hub>) -> Self {
        Self { hub }
    }
}

/// Frames waiting for a zone's current subscribers.
#[derive(Default)]
struct Run {
    frames: Vec<Utf8Bytes>,
}

impl Run {
    fn push(&mut self, frame: String) {
        self.frames.push(Utf8Bytes::from(frame));
    }

    fn flush(&mut self, hub: &Hub, topic: &ZoneTopic) {
        if !self.frames.is_empty() {
            hub.fan_out(topic, Arc::from(std::mem::take(&mut self.frames)));
        }
    }
}

impl TopicSink {
    /// Applies one event to its zone's topic, queuing or sending what it causes.
    fn event(&self, topic: &mut ZoneTopic, run: &mut Run, event: &ZoneEvent) {
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
                    run.push(diff(topic.track(
                        hub,
                        &p.agent_id,
                        &p.connection.as_str().into(),
                        online_at,
                    )));
                    run.push(frame);
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
                run.push(diff_frame);
                run.push(frame);
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
                                channels.entry(to).or_insert_with(|| moved_in(&p.agent_id));
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
                    run.push(diff(payload));
                }
                run.push(frame);
            }
            EventKind::ZoneDeleted(_) => {
                run.push(frame);
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
            _ => run.push(frame),
        }
    }
}

impl TopicSink {
    /// Delivers events (each zone's in seq order) to their zones' subscribers, and keeps the
    /// zones' subscribers and presence as they say. Also how a node of a cluster delivers the
    /// events of a zone another node writes.
    pub fn deliver<'a>(&self, events: impl Iterator<Item = &'a ZoneEvent>) {
        let hub = &*self.hub;
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
                    runs.push((event.zone_id, Run::default()));
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
    }
}

impl<T: Broadcasts> BatchSink<T> for TopicSink {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<T>],
    ) -> Result<(), Failure> {
        self.deliver(messages.iter().flat_map(|m| m.data.broadcasts()));
        let now = chrono::Utc::now();
        for event in messages.iter().flat_map(|m| m.data.broadcasts()) {
            let waited = now - event.occurred_at;
            self.hub
                .metrics
                .broadcast_latency
                .observe(waited.to_std().unwrap_or_default().as_secs_f64());
        }
        Ok(())
    }
}

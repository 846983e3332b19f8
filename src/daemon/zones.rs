//! Live zones and the processor that changes them: where the engine, the zone rules, the store
//! and the WebSocket channels meet.
//!
//! The zone processor runs in the pipeline's processor pool, partitioned by zone id, so one
//! zone's commands are applied one at a time in the order they arrived. It checks permissions
//! (the token's bits and the zone's, on every event), applies the command, answers the client,
//! and sends the event it caused on to the broadcast and audit batchers. A refused command is
//! answered with its reason, changes nothing, and goes no further.

use std::collections::HashMap;
use std::sync::Arc;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Registry};
use serde_json::{Map, Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::pipeline::{BatcherName, Failure, Message, Processor};
use crate::realtime::hub::topic_name;
use crate::realtime::{Command, Hub, Origin, ZoneWork, protocol};
use crate::store::{Store, StoreError};
use crate::zone::{Zone, ZoneError, ZoneEvent, now};

/// The zones in memory, loaded from the store on first use.
pub struct ZoneRegistry {
    store: Store,
    live: std::sync::Mutex<HashMap<Uuid, Arc<Mutex<Zone>>>>,
}

impl ZoneRegistry {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            live: std::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The live zone, loading it if needed. Sessions do not survive a restart, so a zone comes
    /// back from the store with none.
    pub async fn get(&self, id: Uuid) -> Result<Arc<Mutex<Zone>>, StoreError> {
        if let Some(z) = self.live.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Ok(z.clone());
        }
        let mut zone = self.store.get_zone(id).await?;
        zone.active_session_count = 0;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        Ok(live
            .entry(id)
            .or_insert_with(|| Arc::new(Mutex::new(zone)))
            .clone())
    }

    pub async fn create(&self, zone: Zone) -> Result<Zone, StoreError> {
        self.store.insert_zone(&zone).await?;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(zone.id, Arc::new(Mutex::new(zone.clone())));
        Ok(zone)
    }

    pub async fn delete(&self, id: Uuid) -> Result<(), StoreError> {
        self.store.delete_zone(id).await?;
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        Ok(())
    }

    /// Zones in memory that have agents in them.
    pub async fn active(&self) -> Vec<Uuid> {
        let zones: Vec<(Uuid, Arc<Mutex<Zone>>)> = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(id, z)| (*id, z.clone()))
            .collect();
        let mut active = Vec::new();
        for (id, zone) in zones {
            if zone.lock().await.active_session_count > 0 {
                active.push(id);
            }
        }
        active
    }

    /// Writes a zone's state back; the audit log has every event, so a failure here is logged,
    /// not fatal.
    pub async fn save(&self, zone: &Zone) {
        if let Err(e) = self.store.save_zone(zone).await {
            tracing::warn!(zone = %zone.id, error = %e, "could not save the zone's state");
        }
    }
}

/// Applies zone commands; see the module documentation.
pub struct ZoneProcessor {
    registry: Arc<ZoneRegistry>,
    hub: Arc<Hub>,
    /// Where events go: the broadcast and audit batchers.
    routes: Arc<[BatcherName]>,
    latency: HistogramVec,
    /// Join outcomes decided here (ok, zone_full, zone_not_found); the socket counts the rest.
    joins: IntCounterVec,
}

impl ZoneProcessor {
    pub fn new(
        registry: Arc<ZoneRegistry>,
        hub: Arc<Hub>,
        routes: Arc<[BatcherName]>,
        joins: IntCounterVec,
        metrics: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "thunderline_zone_command_seconds",
                "Time to apply one zone command in the processor, by command.",
            )
            .buckets(prometheus::exponential_buckets(0.000_005, 4.0, 10)?),
            &["command"],
        )?;
        metrics.register(Box::new(latency.clone()))?;
        Ok(Self {
            registry,
            hub,
            routes,
            latency,
            joins,
        })
    }
}

fn command_label(c: &Command) -> &'static str {
    match c {
        Command::Join => "join",
        Command::Leave { .. } => "leave",
        Command::Move { .. } => "agent_move",
        Command::Interact { .. } => "agent_interact",
        Command::Consume { .. } => "consume_resource",
        Command::GetState => "get_zone_state",
        Command::Tick => "tick",
    }
}

/// A refusal: the reason a client sees, and the details.
type Refused = (&'static str, String);

fn refusal(e: &ZoneError) -> Refused {
    let reason = match e {
        ZoneError::ZoneNotFound(_) => "zone_not_found",
        ZoneError::ZoneFull { .. } => "zone_full",
        ZoneError::Forbidden { .. } => "forbidden",
        ZoneError::InsufficientResources { .. } => "insufficient_resources",
        ZoneError::UnknownResource(_) => "unknown_resource",
        _ => "invalid_payload",
    };
    (reason, e.to_string())
}

fn state(zone: &Zone, agents: Vec<String>) -> Value {
    json!({"zone": zone, "agents": agents})
}

impl ZoneProcessor {
    /// Applies one command to a locked zone: the event it caused (if any), or a refusal.
    async fn apply(
        &self,
        zone: &mut Zone,
        command: &Command,
        origin: Option<&Origin>,
    ) -> Result<Option<ZoneEvent>, Refused> {
        let t = now();
        let agent = origin.map_or("", |o| o.agent_id.as_str());
        if let (Some(needed), Some(o)) = (command.needs(), origin) {
            zone.authorize(o.perms, needed).map_err(|e| refusal(&e))?;
        }
        let event = match command {
            Command::Join => {
                let event = zone.agent_entered(agent, t).map_err(|e| refusal(&e))?;
                self.registry.save(zone).await;
                if let Some(o) = origin {
                    let mut agents = self.hub.agents(zone.id);
                    if !agents.iter().any(|a| a == agent) {
                        agents.push(agent.to_owned());
                        agents.sort();
                    }
                    // Reply, then presence_state, then everyone's presence_diff.
                    o.reply_ok(zone.id, &state(zone, agents));
                    self.hub
                        .join(zone.id, &o.peer, agent, o.join_ref.as_deref());
                }
                Some(event)
            }
            Command::Leave { reply } => {
                let mut event = None;
                if let Some(o) = origin {
                    self.hub.leave(zone.id, o.peer.id);
                    if let Ok(e) = zone.agent_left(agent, t) {
                        self.registry.save(zone).await;
                        event = Some(e);
                    }
                    if *reply {
                        o.reply_ok(zone.id, &json!({}));
                        o.peer.send_text(protocol::encode(
                            o.join_ref.as_deref(),
                            o.join_ref.as_deref(),
                            &topic_name(zone.id),
                            "phx_close",
                            &json!({}),
                        ));
                    }
                }
                event
            }
            Command::Move { position, sent_at } => {
                let e = zone
                    .agent_moved_stamped(agent, *position, *sent_at, t)
                    .map_err(|e| refusal(&e))?;
                if let Some(o) = origin {
                    o.reply_ok(zone.id, &json!({}));
                }
                Some(e)
            }
            Command::Interact {
                target_agent_id,
                kind,
                data,
            } => {
                let e = zone
                    .agent_interaction(agent, target_agent_id, kind, data.clone(), t)
                    .map_err(|e| refusal(&e))?;
                if let Some(o) = origin {
                    o.reply_ok(zone.id, &json!({}));
                }
                Some(e)
            }
            Command::Consume {
                resource_type,
                amount,
            } => {
                let mut changes = Map::new();
                changes.insert(resource_type.clone(), json!(-amount));
                let e = zone
                    .consume_resources(Some(agent), &changes, t)
                    .map_err(|e| refusal(&e))?;
                self.registry.save(zone).await;
                if let Some(o) = origin {
                    o.reply_ok(zone.id, &json!({"new_resources": zone.amounts()}));
                }
                Some(e)
            }
            Command::GetState => {
                if let Some(o) = origin {
                    o.reply_ok(zone.id, &state(zone, self.hub.agents(zone.id)));
                }
                None
            }
            Command::Tick => {
                let e = zone.tick(t);
                self.registry.save(zone).await;
                Some(e)
            }
        };
        Ok(event)
    }
}

impl Processor<ZoneWork> for ZoneProcessor {
    async fn handle_message(&self, msg: &mut Message<ZoneWork>) -> Result<(), Failure> {
        let started = std::time::Instant::now();
        let work = &mut msg.data;
        let zone_id = work.zone_id;
        let outcome = match self.registry.get(zone_id).await {
            Ok(zone) => {
                let mut zone = zone.lock().await;
                self.apply(&mut zone, &work.command, work.origin.as_ref())
                    .await
            }
            Err(StoreError::Zone(e)) => Err(refusal(&e)),
            // The store is unreachable: nothing was applied, so the command can be retried.
            Err(e) => {
                return Err(Failure::retryable(format!(
                    "cannot load zone {zone_id}: {e}"
                )));
            }
        };
        self.latency
            .with_label_values(&[command_label(&work.command)])
            .observe(started.elapsed().as_secs_f64());
        if work.command == Command::Join {
            let label = match &outcome {
                Ok(_) => "ok",
                Err((reason, _)) => reason,
            };
            self.joins.with_label_values(&[label]).inc();
        }
        match outcome {
            Ok(event) => {
                let routed = event.is_some();
                work.event = event;
                msg.put_batchers(if routed {
                    self.routes.clone()
                } else {
                    Arc::from(Vec::new())
                });
                Ok(())
            }
            Err((reason, details)) => {
                if let Some(o) = &work.origin {
                    if work.command == Command::Join {
                        // The socket recorded the channel when it asked; a refused join undoes that.
                        let mut channels = o.channels.lock().unwrap_or_else(|e| e.into_inner());
                        if channels
                            .get(&zone_id)
                            .is_some_and(|j| j.join_ref == o.join_ref)
                        {
                            channels.remove(&zone_id);
                        }
                    }
                    o.reply_error(zone_id, reason, &details);
                }
                Err(Failure::permanent(format!("{reason}: {details}")))
            }
        }
    }
}

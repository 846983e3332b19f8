//! The zone writer: the pipeline processor that applies commands to zones.
//!
//! The pipeline is partitioned by zone, so each zone has one writer, which applies its commands
//! one at a time in the order they arrived. The writer loads a zone (I/O) before it holds it;
//! holding it, it only decides and applies ([`ZoneState::execute`]), which cannot wait or time
//! out, so a retry can never apply a command twice (and the zone remembers command ids besides).
//! What the command caused leaves through the batchers: events to the broadcast and audit
//! batchers, a snapshot (at acknowledgement) to the snapshot pipeline. The answer goes back at
//! once, or, when replies are durable and the command caused events, at acknowledgement.
//!
//! A zone's creation and deletion are commands like the others. A creation is decided against
//! the zone as absent, and its row and `zone_created` are written together before it goes live;
//! a deletion leaves the zone in memory, refusing everything, until its snapshot (which, for a
//! deleted zone, removes the row) is written once `zone_deleted` is in the log.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::time::Instant;

use super::context::{self, Limits, now};
use super::history::{self, HistoryConfig, Plan, Since};
use super::migration::{MigrationRequest, Migrations};
use super::placement::{Forwarded, NOT_OWNER, Place, Placement};
use super::registry::{Eviction, LiveZone, ZoneRegistry};
use super::work::{Job, Replies, Reply, ZoneWork};
use crate::pipeline::{BatchMode, BatcherName, Failure, Message, Processor};
use crate::sources::Redeliver;
use crate::store::StoreError;
use crate::zone::{
    Accepted, Actor, Answer, CommandKind, Mover, Outcome, ZoneCommand, ZoneError, ZoneEvent,
    ZoneState,
};
use futures_util::FutureExt;

/// The writer's settings.
#[derive(Clone, Debug)]
pub struct WriterConfig {
    pub replies: Replies,
    /// The limits every decision is held to.
    pub limits: Limits,
    /// How long a zone stays in memory without sessions.
    pub evict_after: Duration,
    /// What each zone keeps for rejoins.
    pub history: HistoryConfig,
}

/// Applies zone commands; see the module documentation.
pub struct ZoneWriter {
    registry: Arc<ZoneRegistry>,
    /// Where events go: the broadcast and audit batchers.
    routes: Arc<[BatcherName]>,
    config: WriterConfig,
    latency: HistogramVec,
    /// Joins with `since`, by whether what they missed was recovered.
    rejoins: IntCounterVec,
    /// In a cluster: which zones this node writes, and how the others' commands reach them.
    placement: Option<Arc<dyn Placement>>,
    /// What carries out a service's `migrate` (set once the pipeline it drives is running).
    migrations: Arc<OnceLock<Arc<Migrations>>>,
}

impl ZoneWriter {
    pub fn new(
        registry: Arc<ZoneRegistry>,
        routes: Arc<[BatcherName]>,
        config: WriterConfig,
        metrics: &Registry,
    ) -> Result<Self, prometheus::Error> {
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "thunderline_zone_command_seconds",
                "Time to apply one zone command in its writer, loading included, by command.",
            )
            .buckets(prometheus::exponential_buckets(0.000_005, 4.0, 10)?),
            &["command"],
        )?;
        metrics.register(Box::new(latency.clone()))?;
        let rejoins = IntCounterVec::new(
            Opts::new(
                "thunderline_zone_rejoins_total",
                "Joins with `since`, by outcome: recovered (the missed events followed the \
                 reply) or fresh (a snapshot: another epoch, too far back, or ahead).",
            ),
            &["outcome"],
        )?;
        metrics.register(Box::new(rejoins.clone()))?;
        // Both series exist from the start, so a dashboard's rate over them is 0, not "no data".
        for outcome in ["recovered", "fresh"] {
            rejoins.with_label_values(&[outcome]);
        }
        Ok(Self {
            registry,
            routes,
            config,
            latency,
            rejoins,
            placement: None,
            migrations: Arc::default(),
        })
    }

    /// Carries out services' `migrate` commands with the [`Migrations`] set here later.
    pub fn migrating(mut self, migrations: Arc<OnceLock<Arc<Migrations>>>) -> Self {
        self.migrations = migrations;
        self
    }

    /// Writes only the zones `placement` gives this node, and forwards the others' commands.
    pub fn placed(mut self, placement: Arc<dyn Placement>) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Answers now, or keeps the reply for the acknowledgement when it must wait for the events
    /// to be durable.
    ///
    /// A client's join is answered at once either way: what it missed must follow its reply
    /// before the topic sink sends it anything newer, and a session does not outlive a crash
    /// anyway. (A service's agent's arrival, the end of a migration, waits like any command.)
    fn answer(&self, work: &mut ZoneWork, reply: Reply) {
        let join = matches!(&work.job, Job::Command(c) if c.kind.is_join() && matches!(c.actor, Actor::Agent { .. }));
        let durable = self.config.replies == Replies::Durable
            && !work.events.is_empty()
            && reply.outcome.result.is_ok()
            && !join;
        if durable {
            work.outcome = Some(Arc::new(reply));
        } else if let Some(to) = work.reply.take() {
            to.reply(&reply);
        }
    }

    /// Answers a command whose message goes to no batcher: a refusal, or a creation.
    fn reply_unrouted(&self, msg: &mut Message<ZoneWork>, outcome: Outcome) {
        self.answer(&mut msg.data, outcome.into());
        msg.put_batchers(Arc::from([]));
    }
}

impl Processor<ZoneWork> for ZoneWriter {
    async fn handle_message(&self, msg: &mut Message<ZoneWork>) -> Result<(), Failure> {
        let started = std::time::Instant::now();
        let zone_id = msg.data.zone_id;
        let command = match &msg.data.job {
            Job::Command(c) => c.clone(),
            Job::Evict | Job::HandOver => {
                self.evict(&mut msg.data).await;
                msg.put_batchers(Arc::from([]));
                return Ok(());
            }
        };
        if let CommandKind::Migrate { to } = command.kind {
            return self.migrate(msg, &command, to);
        }
        let creation = matches!(command.kind, CommandKind::CreateZone(_));
        let fence = match &self.placement {
            None => None,
            Some(placement) => match placement.place(zone_id).await {
                // This node's own commands of the zone still on their way to an owner go
                // first: a new one queues behind them (one from another node has no order
                // with them to keep).
                Ok(Place::Here { .. })
                    if msg.data.in_order.is_none()
                        && !msg.data.forwarded
                        && placement.queued(zone_id) =>
                {
                    return self.elsewhere(placement, msg, &command, false).await;
                }
                Ok(Place::Here { fence }) => fence,
                Ok(Place::Elsewhere) => {
                    return self.elsewhere(placement, msg, &command, true).await;
                }
                Ok(Place::Leaving) => return self.elsewhere(placement, msg, &command, false).await,
                Err(e) => {
                    return Err(undecided(
                        &command,
                        format!("cannot find zone {zone_id}'s owner: {e}"),
                    ));
                }
            },
        };
        // A copy in memory from an earlier lease of this node's (lost, then taken again) may
        // miss what the holders in between applied: the zone is loaded anew under this lease.
        if let Some(live) = self.registry.live(zone_id)
            && live.fence() != fence
        {
            tracing::warn!(zone = %zone_id, "a copy of the zone from an earlier lease is dropped: it is loaded again");
            self.registry.remove(zone_id);
        }
        let (live, fresh) = match self.registry.load(zone_id, fence).await {
            Ok((live, Some(stale))) => {
                if let Some(placement) = &self.placement {
                    let (epoch, seq) = {
                        let state = live.state();
                        (state.epoch().to_owned(), state.seq())
                    };
                    placement.taken(zone_id, epoch, seq).await;
                }
                (live, Some(stale))
            }
            Ok(loaded) => loaded,
            // A zone that does not exist yet: this is its creation.
            Err(StoreError::Zone(ZoneError::ZoneNotFound(_))) if creation => {
                self.create(msg, &command, fence).await?;
                self.observe(&command, started);
                return Ok(());
            }
            Err(StoreError::Zone(refusal)) => {
                // A failed message goes no further: no batchers to clear.
                if let Some(failure) = service_refusal(&command, &refusal) {
                    return Err(failure);
                }
                let outcome = Outcome {
                    command_id: command.id,
                    result: Err(refusal),
                };
                self.reply_unrouted(msg, outcome);
                return Ok(());
            }
            // The store holds what this version cannot read: retrying will not change that, and
            // would hold up every other zone of this writer.
            Err(e @ StoreError::Corrupt(_)) => {
                tracing::error!(zone = %zone_id, error = %e, "the zone cannot be loaded");
                if matches!(command.actor, Actor::Service { .. }) {
                    return Err(Failure::permanent(format!("unavailable: {e}")));
                }
                self.reply_unrouted(msg, unavailable(command.id, &e.to_string()));
                return Ok(());
            }
            // The lease this node placed the zone by has moved on (it has not heard yet): nothing
            // was applied, and the zone's owner now is elsewhere.
            Err(StoreError::Fenced {
                zone,
                fence,
                current,
            }) => {
                if let Some(placement) = &self.placement {
                    placement.fenced(zone, fence);
                }
                return Err(undecided(
                    &command,
                    format!(
                        "cannot load zone {zone}: this node's lease (token {fence}) has moved on (token {current})"
                    ),
                ));
            }
            // Nothing was applied: the command can be retried.
            Err(e) => {
                return Err(Failure::retryable(format!(
                    "cannot load zone {zone_id}: {e}"
                )));
            }
        };
        let work = &mut msg.data;
        // What a rejoin missed before memory's reach is read from the log now, before the
        // zone is held (nothing else changes the zone meanwhile: this is its only writer).
        let rejoin = match work.since.take() {
            Some(since) if command.kind.is_join() => {
                Some((since.seq, self.missed_in_log(zone_id, &live, &since).await))
            }
            _ => None,
        };
        let now = now();
        let limits = self.config.limits;
        let mut events = Vec::new();
        let reply = {
            let mut state = live.state();
            if fresh.is_some() && state.session_count() > 0 {
                for kind in self.stale_sessions(&state) {
                    let expire = context::command(zone_id, Actor::System, kind);
                    if let Ok(accepted) = state.execute(&expire, &limits.context(now)).result {
                        events.extend(accepted.events);
                    }
                }
            }
            let mut outcome = state.execute(&command, &limits.context(now));
            // A service's command applied before whose events are not in the log yet is not
            // done yet for a broker that settles by durable outcomes: they may never be (this
            // node's lease may have moved on, and the log refuse them). Answered `unavailable`,
            // its message goes back to the broker, and comes again to be answered from the
            // log, or applied by whoever owns the zone then. A migration's step is held to the
            // same: the next step must not rest on one a crash could still undo. (A socket
            // client's retry keeps its first outcome, `duplicate` added, as it was.)
            if self.config.replies == Replies::Durable
                && matches!(command.actor, Actor::Service { .. } | Actor::System)
                && outcome.result.as_ref().is_ok_and(|a| a.duplicate)
                && state
                    .applied_at(&command.id)
                    .is_some_and(|seq| seq > live.logged_through())
            {
                outcome = unavailable(command.id, NOT_LOGGED_YET);
            }
            if let Ok(accepted) = &outcome.result {
                events.extend(accepted.events.iter().cloned());
            }
            live.history().record(&events, &self.config.history, now);
            let mut reply = Reply::from(outcome);
            if let (Some((after, missed)), Ok(accepted)) = (rejoin, &reply.outcome.result) {
                // The join's own event reaches the client through its subscription.
                let before_join = accepted.events.first().map_or(state.seq(), |e| e.seq - 1);
                if let Some(mut missed) = missed {
                    let through_log = missed.last().map_or(after, |e| e.seq);
                    missed.extend(live.history().between(through_log, before_join).cloned());
                    if history::complete(&missed, after, before_join + 1) {
                        reply.recovered = true;
                        reply.missed = Arc::from(missed);
                    }
                }
                let label = if reply.recovered {
                    "recovered"
                } else {
                    "fresh"
                };
                self.rejoins.with_label_values(&[label]).inc();
            }
            if work.forwarded && command.kind.is_join() && reply.outcome.result.is_ok() {
                reply.presence = Some(state.snapshot().sessions.into());
            }
            live.note_sessions(state.session_count(), Instant::now());
            // A deleted zone's snapshot is its removal: its row goes once zone_deleted is logged.
            let due = live.snapshot_due(&state, &events) || fresh == Some(true);
            if due {
                work.snapshot = Some(Arc::new(state.snapshot()));
            }
            reply
        };
        let routed = !events.is_empty();
        work.events = Arc::from(events);
        work.fence = live.fence();
        let refused = match &reply.outcome.result {
            Err(refusal) => service_refusal(&command, refusal),
            Ok(_) => None,
        };
        self.answer(work, reply);
        self.observe(&command, started);
        msg.put_batchers(if routed {
            self.routes.clone()
        } else {
            Arc::from([])
        });
        match refused {
            Some(failure) if !routed => Err(failure),
            // The events of the session expiry above must still go out, and a failed message
            // would take them nowhere: the refusal is only logged.
            Some(failure) => {
                tracing::warn!(command = %command.id, reason = failure.reason(), "a service's command was refused");
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl ZoneWriter {
    /// What ends the sessions a zone just loaded holds for connections that are gone: on a
    /// single daemon every one (they are of an earlier run); in a cluster, those of nodes that
    /// are not alive (the others' clients are still there).
    fn stale_sessions(&self, state: &ZoneState) -> Vec<CommandKind> {
        let Some(placement) = &self.placement else {
            return vec![CommandKind::ExpireSessions];
        };
        let mut runs: Vec<String> = Vec::new();
        for (key, _) in state.sessions() {
            let run = key
                .connection
                .split_once('.')
                .map_or(key.connection.as_str(), |(run, _)| run);
            if !placement.connection_alive(&key.connection) && !runs.iter().any(|r| r == run) {
                runs.push(run.to_owned());
            }
        }
        runs.into_iter()
            .map(|run| CommandKind::EndConnections {
                prefix: format!("{run}."),
            })
            .collect()
    }

    fn observe(&self, command: &ZoneCommand, started: std::time::Instant) {
        self.latency
            .with_label_values(&[command.kind.name()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Creates a zone that is in neither memory nor the store. The creation is decided against
    /// the zone as absent; its row and its `zone_created` (seq 1) are then written in one
    /// transaction, before the zone goes live and anyone is answered: a zone that was answered
    /// exists, after a crash too, and its log starts with its creation. Nothing is routed to the
    /// batchers (the event is in the log already, and nobody can be subscribed yet).
    async fn create(
        &self,
        msg: &mut Message<ZoneWork>,
        command: &ZoneCommand,
        fence: Option<u64>,
    ) -> Result<(), Failure> {
        let zone_id = command.zone_id;
        let mut state = ZoneState::absent(zone_id);
        let outcome = state.execute(command, &self.config.limits.context(now()));
        if let Ok(accepted) = &outcome.result {
            // Nothing is live yet: a failure here leaves nothing behind, and the retry decides
            // again (finding the zone if the write did land).
            self.registry
                .store()
                .create_fenced(&state.snapshot(), &accepted.events, fence)
                .await
                .map_err(|e| Failure::retryable(format!("cannot create zone {zone_id}: {e}")))?;
            self.registry.insert(state, fence);
        }
        self.reply_unrouted(msg, outcome);
        Ok(())
    }
}

impl ZoneWriter {
    /// A command for a zone another node writes (or, `lost` false, that this node is handing
    /// over). A copy this node still has in memory of a zone it does not write is from a lease
    /// it has lost (it was paused or cut off meanwhile): it goes, unwritten (the store would
    /// refuse its writes anyway); a zone being handed over stays until it is written. A
    /// command another node sent here is sent back to be routed again; one of this node's own
    /// goes to the owner, and its reply comes from there. A service's command waits for the
    /// owner's outcome, so that its broker message is settled by it; the others go on at once,
    /// in order. A tick goes nowhere: the owner has its own clock.
    async fn elsewhere(
        &self,
        placement: &Arc<dyn Placement>,
        msg: &mut Message<ZoneWork>,
        command: &ZoneCommand,
        lost: bool,
    ) -> Result<(), Failure> {
        if lost && self.registry.live(command.zone_id).is_some() {
            tracing::warn!(zone = %command.zone_id, "this node lost the zone's lease: its copy in memory is dropped");
            self.registry.remove(command.zone_id);
        }
        if command.kind == CommandKind::Tick {
            msg.put_batchers(Arc::from([]));
            return Ok(());
        }
        if msg.data.forwarded {
            self.reply_unrouted(msg, unavailable(command.id, NOT_OWNER));
            return Ok(());
        }
        let work = msg.data.clone();
        msg.data.reply = None;
        msg.put_batchers(Arc::from([]));
        let answered = placement.forward(work);
        if matches!(command.actor, Actor::Service { .. }) {
            // Its broker message is settled by the owner's outcome, awaited by the `owners`
            // batcher: this worker goes on with the next command meanwhile.
            msg.data.owner_outcome = Some(answered.shared());
            msg.put_batchers(Arc::from([super::owners::owners_batcher()]));
            msg.put_batch_mode(BatchMode::Flush);
        }
        Ok(())
    }
}

impl ZoneWriter {
    /// A service's `migrate`: a migration of its agent, whose steps are commands to both
    /// zones' writers (this one's among them), so it is not awaited here: it runs on its own,
    /// and its message waits in the `owners` batcher, settled by how it ends (a retry of the
    /// broker message is the same migration, under the message's id).
    fn migrate(
        &self,
        msg: &mut Message<ZoneWork>,
        command: &ZoneCommand,
        to: uuid::Uuid,
    ) -> Result<(), Failure> {
        let agent = match &command.actor {
            Actor::Service {
                agent_id: Some(agent_id),
            } => agent_id.clone(),
            _ => {
                let refusal = ZoneError::InvalidPayload {
                    event_type: "migrate".to_owned(),
                    reason: "only a service moves an agent this way, naming it in agent_id"
                        .to_owned(),
                };
                self.reply_unrouted(
                    msg,
                    Outcome {
                        command_id: command.id,
                        result: Err(refusal),
                    },
                );
                return Ok(());
            }
        };
        let Some(migrations) = self.migrations.get().cloned() else {
            return Err(undecided(
                command,
                "migrations are not running yet".to_owned(),
            ));
        };
        let request = MigrationRequest {
            id: command.id,
            from: command.zone_id,
            to,
            agent_id: agent,
            mover: Mover::Service,
        };
        let command_id = command.id;
        let ended: Forwarded = Box::pin(async move {
            let result = migrations.migrate(request).await.map(|migrated| Accepted {
                events: Vec::new(),
                answer: Answer::Done,
                duplicate: migrated.duplicate,
            });
            Some(Outcome { command_id, result })
        });
        msg.data.owner_outcome = Some(ended.shared());
        msg.put_batchers(Arc::from([super::owners::owners_batcher()]));
        msg.put_batch_mode(BatchMode::Flush);
        Ok(())
    }
}

/// The `unavailable` details of a command applied before whose events are not logged yet.
const NOT_LOGGED_YET: &str = "the command's first application is not in the audit log yet";

/// A refusal of a service's command fails its message: nobody awaits an answer, and the source
/// dead-letters it with the reason (or, for what passes with time, retries it first). One that
/// says the command could not be decided yet (`unavailable`) is not a refusal of the command:
/// it goes back to its broker ([`Redeliver`]), to be decided later, perhaps by another node.
pub(super) fn service_refusal(command: &ZoneCommand, refusal: &ZoneError) -> Option<Failure> {
    if !matches!(command.actor, Actor::Service { .. }) {
        return None;
    }
    let reason = format!("{}: {refusal}", refusal.reason());
    Some(match refusal {
        ZoneError::Unavailable(_) => Redeliver(reason).into(),
        ZoneError::RateLimited { .. } => Failure::retryable(reason),
        _ => Failure::permanent(reason),
    })
}

/// A command this node could not decide here and now (nothing was applied): a service's goes
/// back to its broker ([`Redeliver`]), perhaps to another node; anyone else's is retried in
/// process, then answered `unavailable`.
fn undecided(command: &ZoneCommand, reason: String) -> Failure {
    if matches!(command.actor, Actor::Service { .. }) {
        Redeliver(reason).into()
    } else {
        Failure::retryable(reason)
    }
}

impl ZoneWriter {
    /// Lets an idle zone (or one handed over) leave memory once its latest state is written
    /// (closing it in the store: everything it broadcast is in the log, so its next owner keeps
    /// its epoch); asks for the write (at acknowledgement) when it is not.
    async fn evict(&self, work: &mut ZoneWork) {
        let hand_over = matches!(work.job, Job::HandOver);
        let Some(live) = self.registry.live(work.zone_id) else {
            // Held but never loaded (taken for a command still on its way here): nothing to
            // write, and the lease goes from here, after whatever this writer did before.
            if hand_over && let Some(placement) = &self.placement {
                placement.left(work.zone_id, None).await;
            }
            return;
        };
        let eviction = {
            let state = live.state();
            let eviction =
                live.eviction(&state, self.config.evict_after, Instant::now(), hand_over);
            if eviction == Eviction::WriteFirst {
                work.snapshot = Some(Arc::new(state.snapshot()));
            }
            eviction
        };
        if eviction != Eviction::Evict {
            return;
        }
        let fence = live.fence();
        let (epoch, seq) = {
            let state = live.state();
            (state.epoch().to_owned(), state.seq())
        };
        if hand_over && let Some(placement) = &self.placement {
            placement.handing(work.zone_id, epoch.clone(), seq).await;
        }
        match self
            .registry
            .store()
            .close_zones(&[(work.zone_id, fence)])
            .await
        {
            Ok(()) => {
                self.registry.remove(work.zone_id);
                if let Some(placement) = &self.placement {
                    placement.left(work.zone_id, fence).await;
                }
            }
            // Still open in the store: it stays in memory (and written here), and the next
            // sweep or hand-over tries again.
            Err(e) => {
                tracing::warn!(zone = %work.zone_id, error = %e, "a zone could not be closed; it stays in memory");
                if hand_over && let Some(placement) = &self.placement {
                    placement.taken(work.zone_id, epoch, seq).await;
                }
            }
        }
    }
}

impl ZoneWriter {
    /// The events a rejoin missed that memory no longer has, from the audit log (oldest
    /// first); `None` when it cannot be recovered: another epoch, too far behind, a seq the
    /// zone never reached, or events not in the log yet (still in an audit batch).
    async fn missed_in_log(
        &self,
        zone_id: uuid::Uuid,
        live: &LiveZone,
        since: &Since,
    ) -> Option<Vec<ZoneEvent>> {
        let config = &self.config.history;
        let plan = {
            let state = live.state();
            let memory_first = live.history().first_seq(config, now());
            history::plan(since, state.epoch(), state.seq(), memory_first, config)
        };
        let Plan::Recover { after, upto } = plan else {
            return None;
        };
        if upto == after + 1 {
            return Some(Vec::new());
        }
        let limit = u32::try_from(upto - after - 1).ok()?;
        match self
            .registry
            .store()
            .zone_events(zone_id, None, Some(after), Some(limit))
            .await
        {
            Ok(events) if history::complete(&events, after, upto) => Some(events),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(zone = %zone_id, error = %e, "a rejoin's missed events could not be read from the audit log; it gets a fresh snapshot");
                None
            }
        }
    }
}

/// The outcome of a command that never reached its zone's state.
pub fn unavailable(command_id: uuid::Uuid, why: &str) -> Outcome {
    Outcome {
        command_id,
        result: Err(ZoneError::Unavailable(why.to_owned())),
    }
}

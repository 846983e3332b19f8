//! A zone's events across nodes. The owner publishes each zone's events on
//! `thunderline.zone.<id>` after serving its own subscribers ([`PublishSink`]); another node
//! follows a zone ([`Feeds`]) only while a connection of its own is in it, and delivers the
//! events to its subscribers exactly as the owner's topic sink does, in seq order.
//!
//! Core NATS may drop messages for a slow subscription: a feed that sees a seq gap holds what
//! came after it, asks the owner for the missing events (its history, else the audit log), and
//! delivers nothing newer until the gap is filled. A join forwarded from this node is answered
//! through its zone's feed, before the join's own event (which subscribes the connection), as
//! on the owner. A zone that starts a new epoch (its owner died) cannot be continued: its
//! channels on this node are closed with `phx_error`, and their clients join again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use async_nats::Client;
use futures_util::StreamExt;
use prometheus::IntCounter;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use uuid::Uuid;

use super::lock;
use super::protocol::{self, Broadcast, HistoryAnswer, HistoryAsk, Subjects};
use super::router::Router;
use crate::pipeline::{BatchInfo, BatchSink, Failure, Message};
use crate::realtime::hub::topic_name;
use crate::realtime::{Hub, TopicSink, protocol as wire};
use crate::runtime::{Reply, ReplyTo, ZoneRegistry, ZoneWork};
use crate::store::Store;
use crate::zone::{Answer, EventKind, ZoneCommand, ZoneEvent};

/// How long a gap may stay open before the owner is asked to fill it.
const GAP_GRACE: Duration = Duration::from_millis(20);
/// How long a feed keeps trying to fill a gap before it gives up on the zone's history.
const GAP_LIMIT: Duration = Duration::from_secs(3);
/// How long after the last broadcast a quiet feed asks the owner whether anything followed it.
const TAIL_PROBE: Duration = Duration::from_millis(200);
/// The most events a tail probe asks for.
const TAIL_EVENTS: u64 = 1_000;
/// How long the join's own event waits for the join's answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(2);
/// How long a node that takes a zone over waits for what it followed of it to be delivered
/// (joins' answers included, each waited for up to [`ANSWER_LIMIT`]).
const SETTLE_LIMIT: Duration = Duration::from_secs(4);
/// The most events read from the log to deliver what a feed had not yet when its node took
/// the zone over.
const SETTLE_EVENTS: u32 = 10_000;

/// How long a backlog waits for its clients' queues to make room before it is sent anyway (a
/// client that has not read it by then is a slow consumer, closed as any other).
const BACKLOG_WAIT: Duration = Duration::from_secs(2);

/// Fault injection for tests: drop every n-th broadcast a feed receives.
const DROP_BROADCASTS_ENV: &str = "THUNDERLINE_FAULT_DROP_BROADCASTS";

enum Input {
    /// A join from this node is on its way: hold its event until its answer is sent.
    Expect { connection: String, agent: String },
    /// The join's answer.
    Joined {
        connection: String,
        agent: String,
        reply: Reply,
        to: Arc<dyn ReplyTo>,
    },
    /// The zone's owner died: take this node's sessions in to the next one, and start again
    /// from where it continues.
    Reregister,
    /// The owner's answer to a request for the events after `after`, before `upto` (`None`:
    /// none came in time); `tail`: asked by a quiet feed, not for a gap.
    History {
        after: u64,
        upto: u64,
        tail: bool,
        answer: Option<HistoryAnswer>,
    },
    /// This node writes the zone now, from `seq` of `epoch`: what it followed up to there is
    /// delivered first (from the log, where the previous owner wrote it all before letting the
    /// zone go), then `done` is told.
    Stop {
        epoch: String,
        seq: u64,
        done: oneshot::Sender<()>,
    },
}

/// The zones this node follows.
pub struct Feeds {
    client: Client,
    subjects: Subjects,
    hub: Arc<Hub>,
    store: Store,
    feeds: Mutex<HashMap<Uuid, mpsc::UnboundedSender<Input>>>,
    router: OnceLock<Weak<Router>>,
    gaps_healed: IntCounter,
    drop_every: Option<u64>,
}

impl Feeds {
    pub fn new(
        client: Client,
        subjects: Subjects,
        hub: Arc<Hub>,
        store: Store,
        gaps_healed: IntCounter,
    ) -> Arc<Self> {
        let drop_every = std::env::var(DROP_BROADCASTS_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0);
        Arc::new(Self {
            client,
            subjects,
            hub,
            store,
            feeds: Mutex::default(),
            router: OnceLock::new(),
            gaps_healed,
            drop_every,
        })
    }

    pub(crate) fn set_router(&self, router: &Arc<Router>) {
        let _ = self.router.set(Arc::downgrade(router));
    }

    fn sender(&self, zone: Uuid) -> Option<mpsc::UnboundedSender<Input>> {
        lock(&self.feeds)
            .get(&zone)
            .filter(|tx| !tx.is_closed())
            .cloned()
    }

    /// A join of `agent` on `connection` is being sent to zone `zone`'s owner: follow the zone
    /// from now on (subscribed before the join is sent, so its event cannot be missed).
    pub async fn expect(self: &Arc<Self>, zone: Uuid, connection: &str, agent: &str) {
        let input = || Input::Expect {
            connection: connection.to_owned(),
            agent: agent.to_owned(),
        };
        if let Some(tx) = self.sender(zone) {
            let _ = tx.send(input());
            return;
        }
        self.start(zone, Some(input()), None).await;
    }

    /// This node hands zone `zone` to its next owner, after `next - 1` of `epoch`: its clients
    /// in the zone follow it from `next` on. Subscribed before this returns (and so before the
    /// lease goes, and anything of the next owner's can be published).
    pub async fn follow(self: &Arc<Self>, zone: Uuid, epoch: String, next: u64) {
        if !self.hub.has_subscribers(zone) || self.sender(zone).is_some() {
            return;
        }
        self.start(zone, None, Some((epoch, next))).await;
    }

    /// Starts following `zone` with `first` as its first input, from `from` (an epoch and the
    /// next seq) if this node knows where it is, else from the first join's answer.
    async fn start(
        self: &Arc<Self>,
        zone: Uuid,
        first: Option<Input>,
        from: Option<(String, u64)>,
    ) {
        let sub = match self.client.subscribe(self.subjects.zone(zone)).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(%zone, error = %e, "cannot follow a zone's events");
                return;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let mut feeds = lock(&self.feeds);
            if let Some(existing) = feeds.get(&zone).filter(|t| !t.is_closed()) {
                if let Some(input) = first {
                    let _ = existing.send(input);
                }
                return; // the subscription just made is dropped: unsubscribed
            }
            if let Some(input) = first {
                let _ = tx.send(input);
            }
            feeds.insert(zone, tx.clone());
        }
        let (epoch, next) = from.map_or((None, None), |(e, n)| (Some(e), Some(n)));
        let feed = Feed {
            zone,
            feeds: self.clone(),
            tx,
            epoch,
            next,
            early: Vec::new(),
            buffer: BTreeMap::new(),
            answers: HashMap::new(),
            expected: HashMap::new(),
            gap_since: None,
            backlog_since: None,
            received: 0,
            last_heard: None,
            resync: false,
            asking: false,
        };
        tokio::spawn(feed.run(sub, rx));
    }

    /// The answer to a join [`expect`](Self::expect)ed.
    pub fn joined(&self, zone: Uuid, command: &ZoneCommand, reply: Reply, to: Arc<dyn ReplyTo>) {
        let crate::zone::Actor::Agent {
            agent_id,
            connection,
            ..
        } = &command.actor
        else {
            to.reply(&reply);
            return;
        };
        let input = Input::Joined {
            connection: connection.clone(),
            agent: agent_id.clone(),
            reply,
            to,
        };
        match self.sender(zone) {
            Some(tx) => {
                if let Err(mpsc::error::SendError(Input::Joined { reply, to, .. })) = tx.send(input)
                {
                    to.reply(&reply);
                }
            }
            None => {
                if let Input::Joined { reply, to, .. } = input {
                    to.reply(&reply);
                }
            }
        }
    }

    /// Zone `zone`'s owner died: its next owner takes this node's sessions in again.
    pub fn owner_lost(&self, zone: Uuid) {
        if let Some(tx) = self.sender(zone) {
            let _ = tx.send(Input::Reregister);
        }
    }

    /// This node writes zone `zone` now, from `seq` of `epoch`: it stops following it, once
    /// what it followed is delivered up to there (waits a bounded time for that).
    pub async fn owned(&self, zone: Uuid, epoch: String, seq: u64) {
        // The feed stays this node's way to the zone while it settles: answers to joins sent
        // to the previous owner still come through it, ahead of their joins' events.
        let Some(tx) = self.sender(zone) else {
            return;
        };
        let (done, settled) = oneshot::channel();
        if tx.send(Input::Stop { epoch, seq, done }).is_ok() {
            let _ = tokio::time::timeout(SETTLE_LIMIT, settled).await;
        }
        let mut feeds = lock(&self.feeds);
        if feeds.get(&zone).is_some_and(|t| t.same_channel(&tx)) {
            feeds.remove(&zone);
        }
    }

    /// The events after `after`, before `upto`, from the zone's owner.
    async fn history(&self, zone: Uuid, after: u64, upto: u64) -> Option<HistoryAnswer> {
        let owner = self.router.get()?.upgrade()?.owner_name(zone)?;
        let ask = protocol::encode(&HistoryAsk { zone, after, upto });
        let answer = tokio::time::timeout(
            Duration::from_secs(1),
            self.client.request(self.subjects.history(&owner), ask),
        )
        .await
        .ok()?
        .ok()?;
        protocol::decode(&answer.payload).ok()
    }
}

/// One followed zone.
struct Feed {
    zone: Uuid,
    feeds: Arc<Feeds>,
    tx: mpsc::UnboundedSender<Input>,
    epoch: Option<String>,
    /// The next seq to deliver, once the first answer to a join said where the zone is.
    next: Option<u64>,
    /// What came before that.
    early: Vec<Broadcast>,
    buffer: BTreeMap<u64, ZoneEvent>,
    /// Join answers to send before the event of the seq they are keyed by.
    answers: HashMap<u64, (Reply, Arc<dyn ReplyTo>)>,
    /// Joins sent, not answered yet.
    expected: HashMap<(String, String), Instant>,
    gap_since: Option<Instant>,
    /// Since when events ready to deliver wait for room in the clients' queues.
    backlog_since: Option<Instant>,
    received: u64,
    /// When the last broadcast came, until the tail after it has been checked.
    last_heard: Option<Instant>,
    /// The zone changed owners: the next baseline replaces this node's presence, and every
    /// subscriber here is sent it.
    resync: bool,
    /// A request to the owner for events is on its way.
    asking: bool,
}

impl Feed {
    async fn run(
        mut self,
        mut sub: async_nats::Subscriber,
        mut rx: mpsc::UnboundedReceiver<Input>,
    ) {
        // Delivers as events arrive from the owner, never as a batch sink: nothing waits for
        // its writers.
        let sink = TopicSink::new(self.feeds.hub.clone(), Duration::ZERO);
        let mut tick = tokio::time::interval(GAP_GRACE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Ended because this node writes the zone now, or a newer feed follows it: the zone's
        // topic here is theirs, not this feed's to forget.
        let mut superseded = false;
        loop {
            // Inputs first: a join's `Expect` is queued before the join is sent, so it is taken
            // before any broadcast of the join's own event.
            tokio::select! {
                biased;
                input = rx.recv() => match input {
                    None => break,
                    Some(Input::Stop { epoch, seq, done }) => {
                        self.settle(&sink, &epoch, seq, &mut rx).await;
                        {
                            let mut feeds = lock(&self.feeds.feeds);
                            if feeds.get(&self.zone).is_some_and(|t| t.same_channel(&self.tx)) {
                                feeds.remove(&self.zone);
                            }
                        }
                        let _ = done.send(());
                        superseded = true;
                        break;
                    }
                    Some(Input::Expect { connection, agent }) => {
                        self.expected.insert((connection, agent), Instant::now());
                    }
                    Some(Input::Joined { connection, agent, reply, to }) => {
                        self.joined(connection, agent, reply, to).await;
                    }
                    Some(Input::Reregister) => self.reregister(),
                    Some(Input::History { after, upto, tail, answer }) => {
                        self.answered(after, upto, tail, answer);
                    }
                },
                msg = sub.next() => {
                    let Some(msg) = msg else { break };
                    self.received += 1;
                    self.last_heard = Some(Instant::now());
                    if self.feeds.drop_every.is_some_and(|n| self.received.is_multiple_of(n)) {
                        continue;
                    }
                    match protocol::decode::<Broadcast>(&msg.payload) {
                        Ok(b) => {
                            if !self.receive(b) {
                                self.lost("the zone started a new epoch");
                                break;
                            }
                        }
                        Err(e) => tracing::warn!(zone = %self.zone, error = %e, "an unreadable broadcast was ignored"),
                    }
                }
                _ = tick.tick() => {}
            }
            // This node writes the zone now (its own sink serves its subscribers), or a newer
            // feed follows it: nothing more of this one may reach them.
            if !self.current() {
                superseded = true;
                break;
            }
            self.drain(&sink, true);
            if let Some(since) = self.gap_since
                && since.elapsed() >= GAP_GRACE
            {
                if since.elapsed() >= GAP_LIMIT {
                    self.lost("a gap in its broadcasts could not be filled");
                    break;
                }
                self.heal();
            } else if self.next.is_some()
                && self.buffer.is_empty()
                && self.last_heard.is_some_and(|at| at.elapsed() >= TAIL_PROBE)
            {
                // Quiet since the last broadcast: if it was the one dropped, no later event
                // shows the gap, so the owner is asked once for anything after it.
                self.last_heard = None;
                self.probe_tail();
            }
            if self.idle() {
                let mut feeds = lock(&self.feeds.feeds);
                if feeds
                    .get(&self.zone)
                    .is_some_and(|t| t.same_channel(&self.tx))
                {
                    feeds.remove(&self.zone);
                }
                break;
            }
        }
        // Answers still held go out; the zone's presence on this node is forgotten once none
        // of its connections is subscribed (unless the zone is written here now).
        for (_, (reply, to)) in self.answers.drain() {
            to.reply(&reply);
        }
        if !superseded {
            self.feeds.hub.forget_zone(self.zone, false);
        }
        let _ = sub.unsubscribe().await;
    }

    /// Whether this is still the feed this node follows the zone by.
    fn current(&self) -> bool {
        lock(&self.feeds.feeds)
            .get(&self.zone)
            .is_some_and(|t| t.same_channel(&self.tx))
    }

    /// Whether the feed has nothing left to do: no subscriber here, nothing on its way.
    fn idle(&self) -> bool {
        self.next.is_some()
            && self.expected.is_empty()
            && self.answers.is_empty()
            && !self.feeds.hub.has_subscribers(self.zone)
    }

    /// Takes a broadcast in; false when it is of another epoch than the one followed.
    fn receive(&mut self, b: Broadcast) -> bool {
        let Some(next) = self.next else {
            self.early.push(b);
            return true;
        };
        if self.epoch.as_deref() != Some(b.epoch.as_str()) {
            // A new owner's first events can come before its answer to a session taken in.
            if self.resync {
                self.early.push(b);
                return true;
            }
            return false;
        }
        for e in b.events {
            if e.seq >= next {
                self.buffer.insert(e.seq, e);
            }
        }
        true
    }

    async fn joined(
        &mut self,
        connection: String,
        agent: String,
        reply: Reply,
        to: Arc<dyn ReplyTo>,
    ) {
        self.expected.remove(&(connection.clone(), agent.clone()));
        let Ok(accepted) = &reply.outcome.result else {
            to.reply(&reply);
            return;
        };
        let entered = accepted.events.iter().find(|e| {
            matches!(&e.kind, EventKind::AgentEntered(p) if p.connection == connection && p.agent_id == agent)
        });
        let Answer::Joined(view) = &accepted.answer else {
            to.reply(&reply);
            return;
        };
        let Some(entered) = entered else {
            // The session was in the zone already (taken in again after its owner changed, or a
            // second join): nothing of it is to come.
            if self.next.is_none() || self.resync {
                self.baseline(&reply, view, None, view.seq + 1);
            }
            to.reply(&reply);
            return;
        };
        let seq = entered.seq;
        if self.resync {
            self.baseline(&reply, view, None, seq);
        } else if self.next.is_none() {
            // The first join here: its own event adds the joiner.
            self.baseline(&reply, view, Some((&connection, &agent)), seq);
        } else if self.next.is_some_and(|next| seq < next) {
            // Its event came before this node's copy of the zone began (another join's answer,
            // come first, started it after this one), or was delivered already (it waited past
            // its bound): answered now, and its connection, if not subscribed, is sent its own
            // event and what came after it here (from the owner's history), then subscribed.
            to.reply(&reply);
            let next = self.next.unwrap_or(seq + 1);
            let from_join = match self.feeds.history(self.zone, seq - 1, next).await {
                Some(answer)
                    if self.epoch.as_deref() == Some(answer.epoch.as_str())
                        && crate::runtime::history_complete(&answer.events, seq - 1, next) =>
                {
                    answer.events
                }
                _ => {
                    tracing::warn!(zone = %self.zone, "a join's events could not be read: its channel is closed for a rejoin");
                    self.close_channel(&connection);
                    return;
                }
            };
            let from_join: Vec<ZoneEvent> = from_join
                .into_iter()
                .filter(|e| e.seq >= seq && e.seq < next)
                .collect();
            self.feeds
                .hub
                .attach(self.zone, &connection, &agent, &from_join);
            return;
        }
        self.answers.insert(seq, (reply, to));
    }

    /// Starts (again) from a join's answer: the zone's presence is the owner's sessions (less
    /// `joiner`, whose own event adds it), and the next event to deliver is `next`.
    fn baseline(
        &mut self,
        reply: &Reply,
        view: &crate::zone::ZoneView,
        joiner: Option<(&str, &str)>,
        next: u64,
    ) {
        let sessions = reply.presence.clone().unwrap_or_else(|| Arc::from([]));
        let present = sessions
            .iter()
            .filter(|s| joiner != Some((s.connection.as_str(), s.agent_id.as_str())))
            .map(|s| {
                (
                    s.agent_id.as_str(),
                    s.connection.as_str(),
                    s.joined_at.timestamp_millis(),
                )
            });
        if self.resync {
            self.feeds.hub.resync_presence(self.zone, present);
            self.resync = false;
        } else {
            self.feeds.hub.seed_presence(self.zone, present);
        }
        self.epoch = Some(view.epoch.clone());
        self.next = Some(next);
        self.buffer.clear();
        if let Ok(accepted) = &reply.outcome.result {
            for e in accepted.events.iter().filter(|e| e.seq >= next) {
                self.buffer.insert(e.seq, e.clone());
            }
        }
        for b in std::mem::take(&mut self.early) {
            if b.epoch == view.epoch {
                for e in b.events.into_iter().filter(|e| e.seq >= next) {
                    self.buffer.insert(e.seq, e);
                }
            }
        }
    }

    /// The zone's owner died: every session of this node in it is taken in again by the next
    /// owner (a join under the same connection, answered to nobody: the clients stay joined),
    /// and the feed starts again from the first answer.
    fn reregister(&mut self) {
        let Some(router) = self.feeds.router.get().and_then(Weak::upgrade) else {
            return;
        };
        self.next = None;
        self.epoch = None;
        self.buffer.clear();
        self.early.clear();
        self.gap_since = None;
        self.resync = true;
        // An answer still on its way is of the owner that died: it changes nothing now.
        self.asking = false;
        for (_, (reply, to)) in self.answers.drain() {
            to.reply(&reply);
        }
        let sessions = self.feeds.hub.local_sessions(self.zone);
        tracing::info!(zone = %self.zone, sessions = sessions.len(), "the zone's owner died: its sessions here are taken in by the next one");
        for (connection, agent_id, permissions) in sessions {
            let join = crate::runtime::command(
                self.zone,
                crate::zone::Actor::Agent {
                    agent_id,
                    connection: connection.to_string(),
                    permissions,
                },
                crate::zone::CommandKind::Join,
            );
            let work = ZoneWork::command(join, Some(Arc::new(Unheard)));
            drop(crate::runtime::Placement::forward(&*router, work));
        }
    }

    /// Delivers what is next in seq order, up to a gap or a join whose answer has not come, and,
    /// `paced`, as much as the clients' queues take now: a backlog (what NATS held back during
    /// an outage, a filled gap) goes out as the clients read it, rather than all at once into
    /// queues that would count them as slow consumers. The rest goes at the next call (at most
    /// [`GAP_GRACE`] later); after [`BACKLOG_WAIT`], whatever the queues say.
    fn drain(&mut self, sink: &TopicSink, paced: bool) {
        let Some(mut next) = self.next else { return };
        // An event is at most two frames (with its presence diff); half the room is left for
        // what else the clients are sent meanwhile.
        let mut budget = if paced
            && self
                .backlog_since
                .is_none_or(|t| t.elapsed() < BACKLOG_WAIT)
        {
            self.feeds.hub.room(self.zone) / 4
        } else {
            usize::MAX
        };
        let mut run: Vec<ZoneEvent> = Vec::new();
        while let Some(entry) = self.buffer.first_entry() {
            if *entry.key() != next {
                break;
            }
            if budget == 0 {
                break;
            }
            if let EventKind::AgentEntered(p) = &entry.get().kind {
                let key = (p.connection.clone(), p.agent_id.clone());
                if let Some(at) = self.expected.get(&key) {
                    if at.elapsed() < ANSWER_LIMIT {
                        break;
                    }
                    self.expected.remove(&key);
                }
            }
            let event = entry.remove();
            if let Some((reply, to)) = self.answers.remove(&next) {
                sink.deliver(run.iter());
                run.clear();
                to.reply(&reply);
            }
            run.push(event);
            next += 1;
            budget -= 1;
        }
        sink.deliver(run.iter());
        self.next = Some(next);
        let first = self.buffer.first_key_value().map(|(seq, _)| *seq);
        self.backlog_since = match (first == Some(next) && budget == 0, self.backlog_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
        // Held back for room or for a join's answer is no gap: nothing is missing.
        self.gap_since = match (first.is_some_and(|seq| seq != next), self.gap_since) {
            (true, Some(since)) => Some(since),
            (true, None) => Some(Instant::now()),
            (false, _) => None,
        };
    }

    /// This node takes the zone over at `seq` of `epoch`: what this feed has not delivered up
    /// to there is read from the log and delivered (in the same epoch only: after an owner's
    /// death the zone starts a new one, which its sessions here are taken into afresh).
    async fn settle(
        &mut self,
        sink: &TopicSink,
        epoch: &str,
        seq: u64,
        rx: &mut mpsc::UnboundedReceiver<Input>,
    ) {
        let Some(next) = self.next else { return };
        if self.epoch.as_deref() != Some(epoch) || next > seq {
            return;
        }
        match self
            .feeds
            .store
            .zone_events(self.zone, None, Some(next - 1), Some(SETTLE_EVENTS))
            .await
        {
            Ok(logged) => {
                for e in logged.into_iter().filter(|e| e.seq <= seq) {
                    self.buffer.entry(e.seq).or_insert(e);
                }
            }
            Err(e) => {
                tracing::warn!(zone = %self.zone, error = %e, "the events followed before taking a zone over could not be read");
            }
        }
        // Joins sent to the previous owner and applied there may still be answered: their
        // answers go before their events, as ever (for a bounded time).
        let deadline = Instant::now() + ANSWER_LIMIT;
        loop {
            self.drain(sink, false);
            // Held at a join of this node's whose answer has not come.
            let waiting = self.buffer.first_key_value().is_some_and(|(at, e)| {
                Some(*at) == self.next
                    && matches!(&e.kind, EventKind::AgentEntered(p)
                        if self.expected.contains_key(&(p.connection.clone(), p.agent_id.clone())))
            });
            if !waiting {
                break;
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Input::Joined {
                    connection,
                    agent,
                    reply,
                    to,
                })) => self.joined(connection, agent, reply, to).await,
                Ok(Some(Input::Expect { connection, agent })) => {
                    self.expected.insert((connection, agent), Instant::now());
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        // Nothing newer can come from elsewhere now: joins still waiting for an answer do
        // not hold their events back any more.
        self.expected.clear();
        self.drain(sink, false);
    }

    /// Asks the owner for the events of the gap.
    fn heal(&mut self) {
        let (Some(next), Some((&upto, _))) = (self.next, self.buffer.first_key_value()) else {
            return;
        };
        if upto > next {
            self.ask(next - 1, upto, false);
        }
    }

    /// Asks the owner for events after the last one delivered: a dropped last broadcast has no
    /// later event to reveal it.
    fn probe_tail(&mut self) {
        if let Some(next) = self.next {
            self.ask(next - 1, next + TAIL_EVENTS, true);
        }
    }

    /// Asks the owner for the events after `after`, before `upto`, one request at a time. The
    /// answer comes back as an input: an owner that does not answer (paused, dying) holds
    /// nothing else up, its death and the next owner's taking over included.
    fn ask(&mut self, after: u64, upto: u64, tail: bool) {
        if self.asking {
            return;
        }
        self.asking = true;
        let (feeds, zone, tx) = (self.feeds.clone(), self.zone, self.tx.clone());
        tokio::spawn(async move {
            let answer = feeds.history(zone, after, upto).await;
            let _ = tx.send(Input::History {
                after,
                upto,
                tail,
                answer,
            });
        });
    }

    /// What the owner answered to [`ask`](Self::ask): the events of the epoch followed that
    /// are not delivered yet wait in order with the rest.
    fn answered(&mut self, after: u64, upto: u64, tail: bool, answer: Option<HistoryAnswer>) {
        self.asking = false;
        let (Some(next), Some(answer)) = (self.next, answer) else {
            return;
        };
        if self.epoch.as_deref() != Some(answer.epoch.as_str()) {
            return;
        }
        let filled = if tail {
            answer.events.iter().any(|e| e.seq == after + 1)
        } else {
            crate::runtime::history_complete(&answer.events, after, upto)
        };
        for e in answer.events {
            if e.seq >= next {
                self.buffer.insert(e.seq, e);
            }
        }
        if filled {
            self.feeds.gaps_healed.inc();
            if tail {
                tracing::info!(zone = %self.zone, from = after + 1, "a dropped last broadcast was filled");
            } else {
                tracing::info!(zone = %self.zone, from = after + 1, to = upto - 1, "a gap in a zone's broadcasts was filled");
            }
        }
    }

    /// Closes connection `connection`'s channel of the zone with an error: it cannot be given
    /// the zone's events without a gap (its client joins again, and recovers).
    fn close_channel(&self, connection: &str) {
        let hub = &self.feeds.hub;
        let Some(conn) = hub.connection(connection) else {
            return;
        };
        let join_ref = {
            let mut channels = conn.channels.lock().unwrap_or_else(|e| e.into_inner());
            channels.remove(&self.zone).map(|j| j.join_ref)
        };
        let join_ref = join_ref.flatten();
        let topic = topic_name(self.zone);
        conn.peer.send_text(wire::encode(
            join_ref.as_deref(),
            join_ref.as_deref(),
            &topic,
            "phx_error",
            &json!({"reason": "the zone's events could not be continued"}),
        ));
    }

    /// The zone's history cannot be continued here: its channels on this node close with an
    /// error (clients join again, and get the zone afresh).
    fn lost(&mut self, why: &str) {
        tracing::warn!(zone = %self.zone, why, "this node's channels of the zone are closed for a rejoin");
        let hub = &self.feeds.hub;
        let topic = topic_name(self.zone);
        for peer in hub.forget_zone(self.zone, true) {
            let join_ref = hub.connection(&peer.id).and_then(|c| {
                let mut channels = c.channels.lock().unwrap_or_else(|e| e.into_inner());
                channels.remove(&self.zone).map(|j| j.join_ref)
            });
            let join_ref = join_ref.flatten();
            peer.send_text(wire::encode(
                join_ref.as_deref(),
                join_ref.as_deref(),
                &topic,
                "phx_error",
                &json!({"reason": why}),
            ));
        }
    }
}

/// Where the answer to a session taken in again goes: nowhere (its client did not ask).
struct Unheard;

impl ReplyTo for Unheard {
    fn reply(&self, reply: &Reply) {
        if let Err(refusal) = &reply.outcome.result {
            tracing::warn!(%refusal, "a session could not be taken in by its zone's new owner");
        }
    }
}

/// The owner's broadcast sink: its own subscribers first (no NATS round trip), then each
/// zone's events, in order, on the zone's subject for the nodes that follow it.
pub struct PublishSink {
    local: TopicSink,
    client: Client,
    subjects: Subjects,
    registry: Arc<ZoneRegistry>,
}

impl PublishSink {
    pub fn new(
        local: TopicSink,
        client: Client,
        subjects: Subjects,
        registry: Arc<ZoneRegistry>,
    ) -> Self {
        Self {
            local,
            client,
            subjects,
            registry,
        }
    }
}

impl BatchSink<ZoneWork> for PublishSink {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<ZoneWork>],
    ) -> Result<(), Failure> {
        let written = self.local.deliver_batch(messages);
        let mut zones: Vec<(Uuid, Vec<ZoneEvent>)> = Vec::new();
        for event in messages.iter().flat_map(|m| m.data.events.iter()) {
            match zones.iter_mut().find(|(z, _)| *z == event.zone_id) {
                Some((_, events)) => events.push(event.clone()),
                None => zones.push((event.zone_id, vec![event.clone()])),
            }
        }
        for (zone, events) in zones {
            let Some(live) = self.registry.live(zone) else {
                continue;
            };
            let epoch = live.state().epoch().to_owned();
            let payload = protocol::encode(&Broadcast { epoch, events });
            if let Err(e) = self.client.publish(self.subjects.zone(zone), payload).await {
                // The followers find the gap and ask for it.
                tracing::warn!(%zone, error = %e, "a zone's events could not be published");
            }
        }
        // Published first: the other nodes' subscribers do not wait for this node's writers.
        self.local.written(written).await;
        Ok(())
    }
}

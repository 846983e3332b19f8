//! The zones in memory. A zone is loaded by its writer on first use (its snapshot, then the
//! logged events after it, replayed), lives here while it is used, and leaves once it has had no
//! session for a while and its latest state is written.
//!
//! Only the writer that owns a zone's partition loads it, changes it or removes it; everyone
//! else only reads, except that a copy whose lease has moved on is dropped as soon as the audit
//! log refuses its events ([`ZoneRegistry::drop_fenced`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use super::context::new_epoch;
use super::history::History;
use crate::store::{Store, StoreError};
use crate::zone::{EventKind, REMEMBERED_COMMANDS, ZoneEvent, ZoneSnapshot, ZoneState};

/// A snapshot is taken after an event that changes what a snapshot holds, and otherwise at
/// least every this many events, so that loading never replays a long log.
const SNAPSHOT_EVERY: u64 = 1_000;

/// Which of a zone's events are in the audit log. Audit batches commit in parallel, so a later
/// event may be logged before an earlier one; a snapshot may only be written once every event
/// it reflects is logged, or a crash could leave a snapshot ahead of a log with a hole in it.
#[derive(Default)]
struct Logged {
    /// Every event up to this seq is in the log.
    through: u64,
    /// Ranges logged beyond `through` (first → last), waiting for the gap before them.
    ahead: BTreeMap<u64, u64>,
    /// The newest snapshot taken, until the log has caught up with it.
    waiting: Option<Arc<ZoneSnapshot>>,
}

/// One zone in memory.
pub struct LiveZone {
    state: Mutex<ZoneState>,
    logged: Mutex<Logged>,
    /// The seq of the newest snapshot written to the store.
    persisted: AtomicU64,
    /// The seq of the newest snapshot taken (written, or on its way).
    taken: AtomicU64,
    /// Since when the zone has had no session, if it has none.
    idle_since: Mutex<Option<Instant>>,
    /// Its newest events, for rejoins (the writer's to change).
    history: Mutex<History>,
    /// In a cluster: the fencing token of this node's lease on it.
    fence: Option<u64>,
}

impl LiveZone {
    fn new(state: ZoneState, persisted: u64, fence: Option<u64>) -> Self {
        let idle = (state.session_count() == 0).then(Instant::now);
        let logged = Logged {
            through: state.seq(),
            ..Logged::default()
        };
        Self {
            state: Mutex::new(state),
            logged: Mutex::new(logged),
            persisted: AtomicU64::new(persisted),
            taken: AtomicU64::new(persisted),
            idle_since: Mutex::new(idle),
            history: Mutex::new(History::default()),
            fence,
        }
    }

    /// The fencing token of this node's lease on the zone, in a cluster.
    pub fn fence(&self) -> Option<u64> {
        self.fence
    }

    /// Its newest events. Held briefly, like the state.
    pub fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, for the writer to change or anyone to read. Held briefly: nothing waits
    /// while holding it.
    pub fn state(&self) -> MutexGuard<'_, ZoneState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn persisted(&self) -> u64 {
        self.persisted.load(Ordering::Acquire)
    }

    /// Notes that the events `seqs` are in the audit log, and that `snapshot` (if any) was
    /// taken; returns the newest snapshot that may be written now (none of its events is
    /// missing from the log).
    pub fn logged(
        &self,
        seqs: Option<(u64, u64)>,
        snapshot: Option<Arc<ZoneSnapshot>>,
    ) -> Option<Arc<ZoneSnapshot>> {
        let mut guard = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        let logged = &mut *guard;
        if let Some((first, last)) = seqs
            && last > logged.through
        {
            logged.ahead.insert(first, last);
        }
        while let Some(entry) = logged.ahead.first_entry() {
            if *entry.key() > logged.through + 1 {
                break;
            }
            let last = entry.remove();
            logged.through = logged.through.max(last);
        }
        if let Some(s) = snapshot
            && logged.waiting.as_ref().is_none_or(|w| w.seq < s.seq)
        {
            logged.waiting = Some(s);
        }
        if logged
            .waiting
            .as_ref()
            .is_some_and(|w| w.seq <= logged.through)
        {
            logged.waiting.take()
        } else {
            None
        }
    }

    /// Every event up to this seq is in the audit log.
    pub fn logged_through(&self) -> u64 {
        self.logged
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .through
    }

    /// Notes that a snapshot at `seq` is in the store.
    pub fn written(&self, seq: u64) {
        self.persisted.fetch_max(seq, Ordering::AcqRel);
    }

    /// Whether to take a snapshot after `events` took the zone to `state`.
    pub fn snapshot_due(&self, state: &ZoneState, events: &[ZoneEvent]) -> bool {
        let changed = events.iter().any(|e| {
            !matches!(
                e.kind,
                EventKind::AgentMoved(_) | EventKind::AgentInteraction(_) | EventKind::Custom(_)
            )
        });
        let due = changed || state.seq() >= self.taken.load(Ordering::Acquire) + SNAPSHOT_EVERY;
        if due {
            self.taken.fetch_max(state.seq(), Ordering::AcqRel);
        }
        due
    }

    /// Notes whether the zone has sessions now.
    pub fn note_sessions(&self, sessions: usize, now: Instant) {
        let mut idle = self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
        if sessions > 0 {
            *idle = None;
        } else if idle.is_none() {
            *idle = Some(now);
        }
    }

    /// Whether the zone has had no session since `now - after` or earlier.
    pub fn idle_for(&self, after: Duration, now: Instant) -> bool {
        self.idle_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|since| now.saturating_duration_since(since) >= after)
    }

    /// Whether the zone may leave memory now: it has had no session for `after`, and the store
    /// has its latest state (if not, it must be written first).
    /// A zone handed over (`hand_over`) goes with its sessions, whenever it is written.
    pub fn eviction(
        &self,
        state: &ZoneState,
        after: Duration,
        now: Instant,
        hand_over: bool,
    ) -> Eviction {
        if !hand_over && (state.session_count() > 0 || !self.idle_for(after, now)) {
            Eviction::Keep
        } else if self.persisted() >= state.seq() {
            Eviction::Evict
        } else {
            Eviction::WriteFirst
        }
    }
}

/// What becomes of an idle zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Eviction {
    Keep,
    /// Its snapshot is behind: write it, then it may go.
    WriteFirst,
    Evict,
}

/// The zones in memory, by id.
pub struct ZoneRegistry {
    store: Store,
    live: Mutex<HashMap<Uuid, Arc<LiveZone>>>,
}

/// A zone as loaded: its state, and whether the store should get a snapshot of it now.
pub struct Loaded {
    pub state: ZoneState,
    pub stale_snapshot: bool,
}

impl ZoneRegistry {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            live: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn map(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<LiveZone>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The zone, if it is in memory.
    pub fn live(&self, id: Uuid) -> Option<Arc<LiveZone>> {
        self.map().get(&id).cloned()
    }

    /// The zone, loading it if it is not in memory. When it was loaded just now, the second
    /// value says whether its snapshot in the store is behind it. Only the zone's writer calls
    /// this.
    ///
    /// In a cluster, `fence` is the token of this node's lease on the zone: the store keeps it,
    /// refusing every later write of an earlier holder.
    pub async fn load(
        &self,
        id: Uuid,
        fence: Option<u64>,
    ) -> Result<(Arc<LiveZone>, Option<bool>), StoreError> {
        if let Some(live) = self.live(id) {
            return Ok((live, None));
        }
        // Held from now on; closed again when it leaves memory or the server stops cleanly.
        let left_open = self.store.open_zone(id, fence).await?;
        let Loaded {
            mut state,
            mut stale_snapshot,
        } = self.read(id).await?;
        if left_open {
            // Its last writer stopped without closing it (a crash): what it broadcast may not
            // all be in the log, and seqs past the log's end may have named other events. A
            // client must not be recovered into that history.
            tracing::warn!(zone = %id, "the zone was left open by a writer that stopped uncleanly: a new epoch begins");
            state.reset_epoch(new_epoch());
            stale_snapshot = true;
        }
        let persisted = if stale_snapshot { 0 } else { state.seq() };
        let live = Arc::new(LiveZone::new(state, persisted, fence));
        self.map().insert(id, live.clone());
        Ok((live, Some(stale_snapshot)))
    }

    /// The zone as the store has it: its snapshot with the events logged after it replayed. A
    /// log with a hole after the snapshot (events lost in a crash) starts a new epoch.
    pub async fn read(&self, id: Uuid) -> Result<Loaded, StoreError> {
        let snapshot = self.store.get_zone(id).await?;
        let events = self.store.events_after(id, snapshot.seq).await?;
        // The commands behind the snapshot, remembered as the replayed ones after it are.
        let applied = self
            .store
            .command_ids_up_to(id, snapshot.seq, REMEMBERED_COMMANDS)
            .await?;
        let mut state = ZoneState::from_snapshot(snapshot);
        for (command_id, seq) in applied {
            state.remember_applied(command_id, seq);
        }
        let mut stale_snapshot = !events.is_empty() || state.epoch().is_empty();
        let mut gap = false;
        for event in &events {
            gap |= event.seq != state.seq() + 1;
            state
                .apply(event)
                .map_err(|e| StoreError::Corrupt(format!("zone {id}: {e}")))?;
        }
        if gap || state.epoch().is_empty() {
            if gap {
                tracing::warn!(zone = %id, "the audit log has a hole (events lost in a crash): a new epoch begins");
            }
            state.reset_epoch(new_epoch());
            stale_snapshot = true;
        }
        Ok(Loaded {
            state,
            stale_snapshot,
        })
    }

    /// Puts a zone its writer has just created, whose row is written, in memory.
    pub fn insert(&self, state: ZoneState, fence: Option<u64>) -> Arc<LiveZone> {
        let id = state.id();
        let persisted = state.seq();
        let live = Arc::new(LiveZone::new(state, persisted, fence));
        self.map().insert(id, live.clone());
        live
    }

    /// Closes the zones in memory in the store (see [`Store::close_zones`]): for a clean stop,
    /// once everything they broadcast is in the log.
    pub async fn close_all(&self) -> Result<(), StoreError> {
        let zones: Vec<(Uuid, Option<u64>)> =
            self.map().iter().map(|(id, z)| (*id, z.fence)).collect();
        self.store.close_zones(&zones).await
    }

    /// Forgets a zone (deleted and its row removed, or idle and written).
    pub fn remove(&self, id: Uuid) {
        self.map().remove(&id);
    }

    /// Forgets the zone's copy held under lease `fence`, whose events the log refused (the
    /// lease moved on): it applied what is not in the log, and would answer from it. A copy
    /// loaded since under a newer lease stays. Says whether one went.
    pub fn drop_fenced(&self, id: Uuid, fence: u64) -> bool {
        let mut map = self.map();
        let stale = map.get(&id).is_some_and(|z| z.fence == Some(fence));
        if stale {
            map.remove(&id);
        }
        stale
    }

    /// The zones in memory.
    pub fn zones(&self) -> Vec<(Uuid, Arc<LiveZone>)> {
        self.map().iter().map(|(id, z)| (*id, z.clone())).collect()
    }

    /// Zones in memory with agents in them.
    pub fn active(&self, pick: impl Fn(Uuid) -> bool) -> Vec<Uuid> {
        self.zones()
            .into_iter()
            .filter(|(id, z)| pick(*id) && z.state().session_count() > 0)
            .map(|(id, _)| id)
            .collect()
    }

    /// Zones that have had no session for `after`.
    pub fn idle(&self, after: Duration, now: Instant) -> Vec<Uuid> {
        self.zones()
            .into_iter()
            .filter(|(_, z)| z.idle_for(after, now))
            .map(|(id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Limits, command as new_command, now};
    use crate::zone::{Actor, CommandKind, NewZone, Permissions};

    fn command(state: &mut ZoneState, actor: Actor, kind: CommandKind) {
        let c = new_command(state.id(), actor, kind);
        state
            .execute(&c, &Limits::default().context(now()))
            .result
            .unwrap();
    }

    /// A fresh zone, the same zone in memory, and an agent to act in it.
    fn fixture() -> (ZoneState, LiveZone, Actor) {
        let mut state = ZoneState::absent(Uuid::now_v7());
        command(
            &mut state,
            Actor::Admin,
            CommandKind::CreateZone(Box::new(NewZone {
                name: "z".into(),
                assigned_server: Some("n".into()),
                ..NewZone::default()
            })),
        );
        let live = LiveZone::new(state.clone(), 0, None);
        let agent = Actor::Agent {
            agent_id: "a".into(),
            connection: "c".into(),
            permissions: Permissions::SPAWN_AGENTS,
        };
        (state, live, agent)
    }

    #[test]
    fn a_snapshot_waits_until_every_event_it_reflects_is_logged() {
        // The zone's creation (seq 1) is logged with its row.
        let (mut state, live, agent) = fixture();
        command(&mut state, agent.clone(), CommandKind::Join);
        command(&mut state, agent.clone(), CommandKind::Leave);
        command(&mut state, agent, CommandKind::Join);
        let at = |seq: u64| {
            let mut s = state.snapshot();
            s.seq = seq;
            Some(Arc::new(s))
        };
        // Seq 3 and 4 are logged before seq 2 (another audit worker): nothing may be written.
        assert!(live.logged(Some((4, 4)), at(4)).is_none());
        assert!(live.logged(Some((3, 3)), at(3)).is_none());
        // Seq 2 closes the gap: the newest snapshot, at seq 4, may go.
        assert_eq!(live.logged(Some((2, 2)), at(2)).map(|s| s.seq), Some(4));
        // Logged again (a retry), or a snapshot at what is already logged: at once.
        assert!(live.logged(Some((3, 3)), None).is_none());
        assert_eq!(live.logged(None, at(4)).map(|s| s.seq), Some(4));
        // Events the log never got (a failed batch) hold every later snapshot back.
        assert!(live.logged(Some((6, 7)), at(7)).is_none());
        assert!(live.logged(Some((8, 8)), at(8)).is_none());
        assert_eq!(live.logged(Some((5, 5)), None).map(|s| s.seq), Some(8));
    }

    #[tokio::test(start_paused = true)]
    async fn a_zone_leaves_only_after_its_idle_time_and_once_its_snapshot_is_written() {
        let (mut state, live, agent) = fixture();
        let after = Duration::from_secs(600);
        command(&mut state, agent.clone(), CommandKind::Join);
        live.note_sessions(state.session_count(), Instant::now());
        tokio::time::advance(after * 2).await;
        assert_eq!(
            live.eviction(&state, after, Instant::now(), false),
            Eviction::Keep,
            "it has a session"
        );
        // Handed over to another node, it goes with its sessions, once written.
        assert_eq!(
            live.eviction(&state, after, Instant::now(), true),
            Eviction::WriteFirst
        );

        command(&mut state, agent, CommandKind::Leave);
        live.note_sessions(state.session_count(), Instant::now());
        tokio::time::advance(after - Duration::from_secs(1)).await;
        assert_eq!(
            live.eviction(&state, after, Instant::now(), false),
            Eviction::Keep,
            "not idle long enough"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            live.eviction(&state, after, Instant::now(), false),
            Eviction::WriteFirst
        );
        live.written(state.seq() - 1);
        assert_eq!(
            live.eviction(&state, after, Instant::now(), false),
            Eviction::WriteFirst
        );
        live.written(state.seq());
        assert_eq!(
            live.eviction(&state, after, Instant::now(), false),
            Eviction::Evict
        );
        // An older snapshot written late does not count against the newer one.
        live.written(1);
        assert_eq!(live.persisted(), state.seq());
    }
}

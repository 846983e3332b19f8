//! Live zones: the layer between the zone rules and the front doors (sockets, the admin API,
//! broker ingest). It runs each zone's one writer in the engine, keeps zones in memory, their
//! history and snapshots, ticks them, and hands the front doors a [`ZoneHandle`] to send
//! commands through. Every change of a zone (its creation and deletion included) is a command
//! its writer decides; nobody else writes a zone's state.
//!
//! ```text
//! sockets / admin API / timers ──► ZoneWork (a ZoneCommand, where to answer)
//!   ──► zone pipeline, partitioned by zone ──► ZoneWriter: load, decide, apply (one writer per zone)
//!         ├──► batcher "broadcast" ──► topic sink (frames, presence)
//!         ├──► batcher "audit" ──────► audit log (dead letters for what it refuses)
//!         └──► batcher "owners" (cluster) ► a broker command another node's zone answered
//!   acknowledgement (ZoneAcker) ──► durable replies; snapshots ──► snapshot pipeline ──► zone rows
//! ```

mod acker;
mod context;
mod history;
mod migration;
mod owners;
mod placement;
mod registry;
mod snapshots;
mod timers;
mod work;
mod writer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use acker::ZoneAcker;
pub use context::{IDEMPOTENCY_KEY_CHARS, Limits, command, keyed_command_id, new_epoch, now};
pub use history::{HistoryConfig, Since, complete as history_complete};
pub use migration::{MigrationRequest, Migrations};
pub use owners::{OWNERS_BATCHER, OwnerOutcomes};
pub use placement::{Forwarded, InOrder, NOT_OWNER, Place, Placement, Settled};
pub use registry::{Eviction, LiveZone, Loaded, ZoneRegistry};
pub use snapshots::Snapshots;
pub use timers::{TimerConfig, run_timers};
pub use work::{Job, Replies, Reply, ReplyTo, ZoneWork};
pub use writer::{WriterConfig, ZoneWriter, unavailable};

use crate::pipeline::{Message, PushError, PushHandle};
use crate::store::StoreError;
use crate::zone::{Outcome, ZoneCommand, ZoneError};

/// How a front door wraps a command, where its reply goes and a join's `since` into a message of
/// the zone pipeline.
pub type Wrap =
    Arc<dyn Fn(ZoneCommand, Arc<dyn ReplyTo>, Option<Since>) -> Message<ZoneWork> + Send + Sync>;

/// How the rest of the daemon hands commands to the zones.
#[derive(Clone)]
pub struct ZoneHandle {
    pub registry: Arc<ZoneRegistry>,
    push: PushHandle<ZoneWork>,
    acker: Arc<ZoneAcker>,
}

/// Why a command asked through [`ZoneHandle::ask`] got no outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AskError {
    #[error("the zone pipeline is full: try again later")]
    Overloaded,
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the command was taken but not answered in time; it may still be applied")]
    NoAnswer,
}

/// An outcome delivered to whoever awaits it.
struct Answer(Mutex<Option<tokio::sync::oneshot::Sender<Outcome>>>);

impl ReplyTo for Answer {
    fn reply(&self, reply: &Reply) {
        if let Some(tx) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = tx.send(reply.outcome.clone());
        }
    }
}

impl ZoneHandle {
    pub fn new(
        registry: Arc<ZoneRegistry>,
        push: PushHandle<ZoneWork>,
        acker: Arc<ZoneAcker>,
    ) -> Self {
        Self {
            registry,
            push,
            acker,
        }
    }

    /// The pipeline message for `work`, with the zone acknowledger.
    pub fn message(&self, work: ZoneWork) -> Message<ZoneWork> {
        Message::with_acker(work, self.acker.clone())
    }

    /// Queues work, waiting while the pipeline is full; false once it is shutting down.
    pub async fn push(&self, work: ZoneWork) -> bool {
        self.push.push(self.message(work)).await.is_ok()
    }

    /// How sockets wrap their commands.
    pub fn envelope(&self) -> Wrap {
        let acker = self.acker.clone();
        Arc::new(move |command, reply, since| {
            Message::with_acker(
                ZoneWork::command(command, Some(reply)).since(since),
                acker.clone(),
            )
        })
    }

    pub fn push_handle(&self) -> PushHandle<ZoneWork> {
        self.push.clone()
    }

    /// Whether zone `id` exists: created and not deleted, in memory or in the store.
    pub async fn exists(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        if let Some(live) = self.registry.live(id) {
            return Ok(live.state().exists());
        }
        match self.registry.store().get_zone(id).await {
            Ok(_) => Ok(true),
            Err(StoreError::Zone(ZoneError::ZoneNotFound(_))) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Applies a command and waits for its outcome: up to `room` for room in the pipeline, then
    /// up to `answer` for the outcome.
    pub async fn ask(
        &self,
        command: ZoneCommand,
        room: Duration,
        answer: Duration,
    ) -> Result<Outcome, AskError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply: Arc<dyn ReplyTo> = Arc::new(Answer(Mutex::new(Some(tx))));
        let msg = self.message(ZoneWork::command(command, Some(reply)));
        match tokio::time::timeout(room, self.push.push(msg)).await {
            Err(_) => return Err(AskError::Overloaded),
            Ok(Err(PushError::Closed(_) | PushError::Full(_))) => {
                return Err(AskError::ShuttingDown);
            }
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout(answer, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(AskError::ShuttingDown),
            Err(_) => Err(AskError::NoAnswer),
        }
    }
}

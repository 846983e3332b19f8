//! The zone pipeline's unit of work: a command for one zone (or a request to let an idle zone
//! leave memory), where its answer goes, and what the writer made of it — the events to
//! broadcast and audit, the outcome to answer once those are durable, a snapshot to write.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use futures_util::future::Shared;

use super::history::Since;
use super::placement::{Forwarded, InOrder};
use crate::store::{Audited, Fence};
use crate::zone::{Outcome, Session, ZoneCommand, ZoneEvent, ZoneSnapshot};

/// What whoever asked is told about a command: the zone's outcome and, for a join that gave
/// `since`, what the client missed.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub outcome: Outcome,
    /// For a join: whether `missed` (the events after the client's `since` and before its join,
    /// oldest first) is everything it missed. They are sent after the reply, not in it.
    pub recovered: bool,
    pub missed: Arc<[ZoneEvent]>,
    /// For a join forwarded from another node: the zone's sessions once it joined, from which
    /// that node's copy of the zone's presence starts.
    pub presence: Option<Arc<[Session]>>,
}

impl From<Outcome> for Reply {
    fn from(outcome: Outcome) -> Self {
        Self {
            outcome,
            recovered: false,
            missed: Arc::from([]),
            presence: None,
        }
    }
}

/// Where a command's reply goes: the connection, HTTP request or broker delivery that asked.
/// Called once per command, from the writer (or, when replies wait for durability, from the
/// message's acknowledgement): it must not block.
pub trait ReplyTo: Send + Sync + 'static {
    fn reply(&self, reply: &Reply);
}

/// When a command's `ok` is sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Replies {
    /// As soon as the zone has applied the command. A crash (`kill -9`, power loss) can lose
    /// what was answered but not yet in the audit log: the events in its open batches.
    Applied,
    /// Once the events the command caused are committed to the audit log: nothing answered
    /// `ok` is ever lost. Refusals are answered at once either way.
    #[default]
    Durable,
}

impl Replies {
    /// The name flags, the environment and pipeline files use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Durable => "durable",
        }
    }
}

/// What the writer is asked to do.
#[derive(Clone, Debug)]
pub enum Job {
    Command(ZoneCommand),
    /// Let the zone leave memory if it has had no session for long enough and its snapshot is
    /// written (if it is not, write it first).
    Evict,
    /// In a cluster, the zone goes to its next owner: it leaves memory (sessions and all) as
    /// soon as its snapshot and every event it broadcast are written, and its lease goes.
    HandOver,
}

/// One message of the zone pipeline.
#[derive(Clone)]
pub struct ZoneWork {
    pub zone_id: Uuid,
    pub job: Job,
    /// Where the outcome goes; taken once it has been told.
    pub reply: Option<Arc<dyn ReplyTo>>,
    /// The events the job caused, each with its seq.
    pub events: Arc<[ZoneEvent]>,
    /// The reply, kept for the acknowledgement when replies wait for durability.
    pub outcome: Option<Arc<Reply>>,
    /// The zone's state to write once this message is acknowledged.
    pub snapshot: Option<Arc<ZoneSnapshot>>,
    /// A join's `since`: where the rejoining client left off.
    pub since: Option<Since>,
    /// In a cluster: the fencing token of this node's lease on the zone, which the audit log
    /// checks its events against.
    pub fence: Option<u64>,
    /// In a cluster: the command came from another node, which took this node for the zone's
    /// owner. If it is not (any more), it is sent back to be routed again, never on.
    pub forwarded: bool,
    /// In a cluster: a service's command this node sent to the zone's owner, whose outcome
    /// settles its broker message (awaited by the `owners` batcher, not the writer).
    pub owner_outcome: Option<Shared<Forwarded>>,
    /// In a cluster: handed back to this node's writer in its zone's order (see [`InOrder`]).
    pub in_order: Option<Arc<InOrder>>,
}

impl ZoneWork {
    pub fn command(command: ZoneCommand, reply: Option<Arc<dyn ReplyTo>>) -> Self {
        Self {
            zone_id: command.zone_id,
            job: Job::Command(command),
            reply,
            events: Arc::from([]),
            outcome: None,
            snapshot: None,
            since: None,
            fence: None,
            forwarded: false,
            owner_outcome: None,
            in_order: None,
        }
    }

    /// A join that asks for what the client missed since `since`.
    pub fn since(mut self, since: Option<Since>) -> Self {
        self.since = since;
        self
    }

    pub fn evict(zone_id: Uuid) -> Self {
        Self::job(zone_id, Job::Evict)
    }

    pub fn hand_over(zone_id: Uuid) -> Self {
        Self::job(zone_id, Job::HandOver)
    }

    fn job(zone_id: Uuid, job: Job) -> Self {
        Self {
            zone_id,
            job,
            reply: None,
            events: Arc::from([]),
            outcome: None,
            snapshot: None,
            since: None,
            fence: None,
            forwarded: false,
            owner_outcome: None,
            in_order: None,
        }
    }
}

impl std::fmt::Debug for ZoneWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneWork")
            .field("zone_id", &self.zone_id)
            .field("job", &self.job)
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

impl Audited for ZoneWork {
    fn audited(&self) -> &[ZoneEvent] {
        &self.events
    }

    fn fence(&self) -> Option<Fence> {
        self.fence.map(|f| (self.zone_id, f))
    }
}

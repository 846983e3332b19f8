//! Where each zone's writer runs. A single daemon writes every zone itself; in a cluster only
//! the zone's owner does, and the writer of any other node hands the zone's commands on to it
//! (the cluster layer implements [`Placement`]; the runtime only asks it).

use std::future::Future;
use std::pin::Pin;

use uuid::Uuid;

use super::work::ZoneWork;
use crate::zone::Outcome;

/// The `unavailable` details a node answers a forwarded command with when it is not the zone's
/// owner (any more): the node that sent it routes it again, under the same command id.
pub const NOT_OWNER: &str = "this node does not own the zone";

/// Where a zone's writer runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Place {
    /// On this node. In a cluster, `fence` is the fencing token of this node's lease on the
    /// zone, which every write to the store carries.
    Here { fence: Option<u64> },
    /// On another node.
    Elsewhere,
    /// On this node until its hand-over to the next owner is done: it takes no more commands
    /// (they go to the next owner, and wait there for it), while what it applied is written.
    Leaving,
}

/// A forwarded command's outcome, once its owner answered (None: no answer came in time).
pub type Forwarded = Pin<Box<dyn Future<Output = Option<Outcome>> + Send>>;

/// Where zones are written, and how commands reach the nodes that write them.
pub trait Placement: Send + Sync + 'static {
    /// Where zone `zone` is written now, taking it for this node if it is this node's to take.
    fn place(&self, zone: Uuid)
    -> Pin<Box<dyn Future<Output = Result<Place, String>> + Send + '_>>;

    /// Hands `work` to the zone's owner, in the order of the calls (the hand-over is queued
    /// before this returns); its reply goes where `work.reply` says. The future resolves to
    /// the owner's outcome.
    fn forward(&self, work: ZoneWork) -> Forwarded;

    /// Zone `zone` left this node's memory with everything written (`fence` the lease it was
    /// written under), or, `fence` None, a hand-over found it not in memory at all: its lease
    /// may go. The writer waits for it, so that a next command of the zone finds it released
    /// (and takes it anew) rather than racing the release.
    fn left(&self, zone: Uuid, fence: Option<u64>) -> Settled<'_>;

    /// This node's lease `fence` on zone `zone` has moved on, as the store found when it
    /// refused a write under it (the lease watch may not have told yet): the zone is no longer
    /// this node's under that lease, and where it is written is to be learned again.
    fn fenced(&self, zone: Uuid, fence: u64);

    /// Whether the connection named `connection` may still be open: it belongs to a node alive
    /// now. A zone loaded here keeps the sessions of such connections, and ends the others.
    fn connection_alive(&self, connection: &str) -> bool;

    /// Zone `zone` was just loaded here to be written, at `seq` of `epoch`: whatever this node
    /// followed of it from its previous owner reaches this node's clients up to there first,
    /// before anything the writer applies.
    fn taken(&self, zone: Uuid, epoch: String, seq: u64) -> Settled<'_>;

    /// Zone `zone` leaves this node for its next owner at `seq` of `epoch`: this node's clients
    /// in it follow it from there on (subscribed before the lease goes).
    fn handing(&self, zone: Uuid, epoch: String, seq: u64) -> Settled<'_>;

    /// Whether commands of `zone` handed to [`forward`](Self::forward) are still on their way:
    /// one of this node's own that comes now goes behind them, even if the zone is written here.
    fn queued(&self, zone: Uuid) -> bool;
}

/// A command the placement handed to this node's own writer in its turn among its zone's
/// commands on their way (the zone became this node's meanwhile): the writer applies it without
/// queueing it behind them again, and if it must go elsewhere after all, it keeps its place.
#[derive(Debug)]
pub struct InOrder {
    /// Its place among its zone's commands.
    pub order: u64,
    /// Whether the placement has stopped counting it as on its way.
    pub settled: std::sync::atomic::AtomicBool,
}

/// Done once the change of a zone's place has been seen to.
pub type Settled<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

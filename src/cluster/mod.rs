//! Past one machine: daemons that share NATS (and one database) as a cluster, where any node
//! serves any zone and each zone still has exactly one writer, cluster-wide.
//!
//! The parts, each on NATS and nothing of our own:
//!
//! - [`node`]: who is in the cluster. A node is a name and an incarnation (fresh at every
//!   start, so a restarted node is a new member and its old sessions are gone).
//! - [`ownership`]: which node writes each zone. The live node that rendezvous hashing picks
//!   holds the zone's lease, a compare-and-set register in JetStream KV whose revision is the
//!   lease's fencing token: it grows with every grant, so the store can refuse a write from a
//!   holder whose lease has moved on (paused, partitioned), and two nodes never both write one
//!   zone. A lease is not timed (per-key TTL needs a newer server than ours): it holds while its
//!   holder is a live member, and another node takes it over once the holder is declared dead.

pub mod node;
pub mod ownership;

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("the lease store failed: {0}")]
    Leases(String),
    #[error("the lease of zone {zone} holds a value this version cannot read: {reason}")]
    Corrupt { zone: uuid::Uuid, reason: String },
}

//! Which node writes each zone: the live node rendezvous hashing picks, holding the zone's
//! lease.
//!
//! A lease is a compare-and-set register per zone ([`LeaseStore`]; JetStream KV in a cluster,
//! [`KvLeases`]): every write names the revision it replaces, so two nodes racing for a zone
//! cannot both win, and the revision a grant leaves is the lease's **fencing token**
//! ([`Lease::fence`]): it only grows, so the store of zones can remember the highest it has seen
//! for a zone and refuse a write that carries a lower one. A holder that was paused (a long GC,
//! `SIGSTOP`) or cut off while its lease was taken over cannot write after it wakes.
//!
//! Leases are not timed: the local NATS server (2.9) has no per-key TTL, and the heartbeats of
//! membership are the renewal. A lease is free when it was never granted, when it was released
//! (a hand-off), or when its holder is not a live member: declared dead, or an earlier
//! incarnation of a node that started again. Only then can another node take it
//! ([`Ownership::acquire`]).
//!
//! Rendezvous (highest random weight) hashing picks a zone's node among the live ones: when a
//! node leaves, only its zones move; when one joins, it takes about 1/N of them. It hashes node
//! names, not incarnations, so a node that restarts gets its zones back.

use std::future::Future;

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::ClusterError;
use super::node::{Members, NodeId};

/// The node among `nodes` that zone `zone` belongs to: the one whose weight for it is highest.
pub fn rendezvous<'a>(
    zone: Uuid,
    nodes: impl IntoIterator<Item = &'a NodeId>,
) -> Option<&'a NodeId> {
    nodes
        .into_iter()
        .max_by(|a, b| (weight(zone, &a.name), &a.name).cmp(&(weight(zone, &b.name), &b.name)))
}

/// A zone's weight on a node: the same on every node and in every run (SHA-256, not a hash
/// seeded per process).
fn weight(zone: Uuid, node: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(zone.as_bytes())
        .chain_update(node.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// A grant of a zone's lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub zone: Uuid,
    pub holder: NodeId,
    /// The fencing token: the register's revision this grant left. Every later grant of the
    /// zone has a higher one.
    pub fence: u64,
}

/// What an attempt to take a lease found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Acquired {
    /// It is ours (granted now, or held already).
    Held(Lease),
    /// A live member holds it.
    Taken(NodeId),
}

/// A zone's lease as its store has it: who holds it (nobody once released), at which revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<NodeId>,
    pub revision: u64,
}

/// A compare-and-set register per zone.
pub trait LeaseStore: Send + Sync + 'static {
    /// The zone's record, if it ever had one.
    fn read(&self, zone: Uuid)
    -> impl Future<Output = Result<Option<Record>, ClusterError>> + Send;

    /// Writes `holder` if the zone has no record yet: the new revision, or None if one
    /// appeared meanwhile.
    fn create(
        &self,
        zone: Uuid,
        holder: &NodeId,
    ) -> impl Future<Output = Result<Option<u64>, ClusterError>> + Send;

    /// Writes `holder` (None: released) if the record is still at `revision`: the new
    /// revision, or None if it moved meanwhile.
    fn swap(
        &self,
        zone: Uuid,
        holder: Option<&NodeId>,
        revision: u64,
    ) -> impl Future<Output = Result<Option<u64>, ClusterError>> + Send;
}

/// How often a compare-and-set that lost a race is tried again before the attempt reports
/// who holds the lease now.
const RACES: usize = 16;

/// A node's side of the leases.
pub struct Ownership<S> {
    store: S,
    me: NodeId,
}

impl<S: LeaseStore> Ownership<S> {
    pub fn new(store: S, me: NodeId) -> Self {
        Self { store, me }
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// Takes zone `zone`'s lease if it is ours already or free: never granted, released, or
    /// held by a node that is not in `live` (dead, or an earlier incarnation). A lease a live
    /// member holds is left to it.
    pub async fn acquire(&self, zone: Uuid, live: &Members) -> Result<Acquired, ClusterError> {
        let mut holder = None;
        for _ in 0..RACES {
            let granted = match self.store.read(zone).await? {
                None => self.store.create(zone, &self.me).await?,
                Some(Record {
                    holder: Some(h),
                    revision,
                }) if h == self.me => Some(revision),
                Some(Record {
                    holder: Some(h), ..
                }) if live.contains(&h) => return Ok(Acquired::Taken(h)),
                Some(record) => {
                    holder = record.holder;
                    self.store
                        .swap(zone, Some(&self.me), record.revision)
                        .await?
                }
            };
            if let Some(fence) = granted {
                return Ok(Acquired::Held(Lease {
                    zone,
                    holder: self.me.clone(),
                    fence,
                }));
            }
        }
        // Lost every race: someone else is taking it right now.
        match self.store.read(zone).await? {
            Some(Record {
                holder: Some(h), ..
            }) => Ok(Acquired::Taken(h)),
            _ => Err(ClusterError::Leases(format!(
                "zone {zone}'s lease kept changing under {} attempts (last held by {holder:?})",
                RACES
            ))),
        }
    }

    /// Gives `lease` up (a hand-off: the zone's state is written, its next holder may start):
    /// true if it was still this grant, false if it had moved on already.
    pub async fn release(&self, lease: &Lease) -> Result<bool, ClusterError> {
        Ok(self
            .store
            .swap(lease.zone, None, lease.fence)
            .await?
            .is_some())
    }

    /// The zone's lease as the store has it.
    pub async fn read(&self, zone: Uuid) -> Result<Option<Record>, ClusterError> {
        self.store.read(zone).await
    }

    /// Whether `lease` is still the zone's current grant.
    pub async fn holds(&self, lease: &Lease) -> Result<bool, ClusterError> {
        Ok(self
            .store
            .read(lease.zone)
            .await?
            .is_some_and(|r| r.revision == lease.fence && r.holder.as_ref() == Some(&lease.holder)))
    }
}

/// Leases in a JetStream KV bucket: one key per zone, its value the holder (MessagePack), the
/// entry's revision the fencing token.
#[derive(Clone)]
pub struct KvLeases {
    kv: kv::Store,
}

/// What a key holds.
#[derive(Serialize, Deserialize)]
struct Holder(Option<NodeId>);

impl KvLeases {
    /// Opens bucket `bucket`, creating it (file storage, the latest value per key) if absent.
    pub async fn open(context: &jetstream::Context, bucket: &str) -> Result<Self, ClusterError> {
        let refused = |e: &dyn std::fmt::Display| {
            ClusterError::Leases(format!("cannot open the bucket {bucket}: {e}"))
        };
        if context.get_key_value(bucket).await.is_err() {
            // The bucket's stream, as a KV bucket has it, declared directly: async-nats's own
            // `create_key_value` first asks for the account's details in a shape the 2.9 server
            // does not answer in.
            context
                .get_or_create_stream(stream::Config {
                    name: format!("KV_{bucket}"),
                    description: Some("thunderline: which node writes each zone".into()),
                    subjects: vec![format!("$KV.{bucket}.>")],
                    max_messages_per_subject: 1,
                    storage: stream::StorageType::File,
                    allow_rollup: true,
                    deny_delete: true,
                    allow_direct: true,
                    discard: stream::DiscardPolicy::New,
                    num_replicas: 1,
                    ..stream::Config::default()
                })
                .await
                .map_err(|e| refused(&e))?;
        }
        let kv = context
            .get_key_value(bucket)
            .await
            .map_err(|e| refused(&e))?;
        Ok(Self { kv })
    }

    /// Every lease as it is now, then every change of one: (zone, holder, revision). So every
    /// node knows every zone's owner (`GET /api/zones` shows it), not only the ones it asked.
    pub async fn watch(
        &self,
    ) -> Result<impl futures_util::Stream<Item = (Uuid, Option<NodeId>, u64)> + use<>, ClusterError>
    {
        use futures_util::StreamExt;
        let changes = self
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| ClusterError::Leases(e.to_string()))?;
        // The watch ends at its first error (the caller watches again, from the leases as they
        // are): async-nats 0.51's ordered consumer, polled again after it reported one (its
        // client gone), panics with "async fn resumed after completion".
        let changes = changes.take_while(|entry| std::future::ready(entry.is_ok()));
        Ok(changes.filter_map(|entry| async move {
            let entry = entry.ok()?;
            let zone = Uuid::parse_str(&entry.key).ok()?;
            let holder = match entry.operation {
                Operation::Put => rmp_serde::from_slice::<Holder>(&entry.value).ok()?.0,
                Operation::Delete | Operation::Purge => None,
            };
            Some((zone, holder, entry.revision))
        }))
    }

    fn encode(holder: Option<&NodeId>) -> bytes::Bytes {
        rmp_serde::to_vec_named(&Holder(holder.cloned()))
            .expect("a node id encodes")
            .into()
    }
}

fn key(zone: Uuid) -> String {
    zone.to_string()
}

impl LeaseStore for KvLeases {
    async fn read(&self, zone: Uuid) -> Result<Option<Record>, ClusterError> {
        let entry = self
            .kv
            .entry(key(zone))
            .await
            .map_err(|e| ClusterError::Leases(e.to_string()))?;
        let Some(entry) = entry else {
            return Ok(None);
        };
        let holder = match entry.operation {
            Operation::Delete | Operation::Purge => None,
            Operation::Put => {
                rmp_serde::from_slice::<Holder>(&entry.value)
                    .map_err(|e| ClusterError::Corrupt {
                        zone,
                        reason: e.to_string(),
                    })?
                    .0
            }
        };
        Ok(Some(Record {
            holder,
            revision: entry.revision,
        }))
    }

    async fn create(&self, zone: Uuid, holder: &NodeId) -> Result<Option<u64>, ClusterError> {
        match self.kv.create(key(zone), Self::encode(Some(holder))).await {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(ClusterError::Leases(e.to_string())),
        }
    }

    async fn swap(
        &self,
        zone: Uuid,
        holder: Option<&NodeId>,
        revision: u64,
    ) -> Result<Option<u64>, ClusterError> {
        match self
            .kv
            .update(key(zone), Self::encode(holder), revision)
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Ok(None),
            Err(e) => Err(ClusterError::Leases(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeId {
        NodeId::start(name)
    }

    #[test]
    fn a_zone_goes_to_the_same_node_whoever_asks_and_only_a_leaving_nodes_zones_move() {
        let nodes: Vec<NodeId> = ["a", "b", "c", "d"].into_iter().map(node).collect();
        let zones: Vec<Uuid> = (0..4000u128).map(Uuid::from_u128).collect();
        let owners: Vec<&str> = zones
            .iter()
            .map(|z| rendezvous(*z, &nodes).unwrap().name.as_str())
            .collect();
        // Spread: each of four nodes gets about a quarter.
        for n in &nodes {
            let share = owners.iter().filter(|o| **o == n.name).count();
            assert!((800..1200).contains(&share), "{}: {share}", n.name);
        }
        // Order and incarnations do not matter: names do.
        let again: Vec<NodeId> = nodes.iter().rev().map(|n| node(&n.name)).collect();
        for (z, owner) in zones.iter().zip(&owners) {
            assert_eq!(rendezvous(*z, &again).unwrap().name, *owner);
        }
        // Without `c`, only c's zones move.
        let without: Vec<NodeId> = nodes.iter().filter(|n| n.name != "c").cloned().collect();
        for (z, owner) in zones.iter().zip(&owners) {
            let now = rendezvous(*z, &without).unwrap().name.as_str();
            if *owner != "c" {
                assert_eq!(now, *owner);
            }
        }
        assert!(rendezvous(zones[0], &[]).is_none());
    }
}

//! Who writes each zone in a cluster: the ownership rule over random membership histories, and
//! its leases in the real JetStream KV.
//!
//! The property test runs nodes that start, die, restart (a new incarnation), pause and resume
//! (`SIGSTOP`), and suspect each other wrongly, each acting on its own, possibly stale, view of
//! the members; two nodes may take a lease at the same instant. Whatever happens, the store of
//! zones accepts writes for a zone in the order of their fencing tokens, each token one node's,
//! so two nodes never both write a zone; and once membership is stable and every node sees it,
//! every zone is held by the live node rendezvous hashing picks.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use proptest::prelude::*;
use thunderline::cluster::ClusterError;
use thunderline::cluster::node::{Members, NodeId};
use thunderline::cluster::ownership::{
    Acquired, KvLeases, Lease, LeaseStore, Ownership, Record, rendezvous,
};
use uuid::Uuid;

/// A bucket in memory: one register per zone, revisions counted across the bucket as JetStream
/// counts them. Every call first yields, so that two nodes' attempts run interleaved.
#[derive(Default)]
struct Bucket {
    records: Mutex<(HashMap<Uuid, Record>, u64)>,
    /// Each write's revision, and who held the lease just before it.
    before: Mutex<HashMap<u64, Option<NodeId>>>,
}

impl Bucket {
    /// Who held the lease before the write that left `revision`.
    fn held_before(&self, revision: u64) -> Option<NodeId> {
        self.before.lock().unwrap()[&revision].clone()
    }
}

impl LeaseStore for &'static Bucket {
    async fn read(&self, zone: Uuid) -> Result<Option<Record>, ClusterError> {
        tokio::task::yield_now().await;
        Ok(self.records.lock().unwrap().0.get(&zone).cloned())
    }

    async fn create(&self, zone: Uuid, holder: &NodeId) -> Result<Option<u64>, ClusterError> {
        tokio::task::yield_now().await;
        let mut guard = self.records.lock().unwrap();
        let (records, revision) = &mut *guard;
        if records.contains_key(&zone) {
            return Ok(None);
        }
        *revision += 1;
        records.insert(
            zone,
            Record {
                holder: Some(holder.clone()),
                revision: *revision,
            },
        );
        self.before.lock().unwrap().insert(*revision, None);
        Ok(Some(*revision))
    }

    async fn swap(
        &self,
        zone: Uuid,
        holder: Option<&NodeId>,
        expected: u64,
    ) -> Result<Option<u64>, ClusterError> {
        tokio::task::yield_now().await;
        let mut guard = self.records.lock().unwrap();
        let (records, revision) = &mut *guard;
        let previous = match records.get(&zone) {
            Some(r) if r.revision == expected => r.holder.clone(),
            _ => return Ok(None),
        };
        *revision += 1;
        self.before.lock().unwrap().insert(*revision, previous);
        records.insert(
            zone,
            Record {
                holder: holder.cloned(),
                revision: *revision,
            },
        );
        Ok(Some(*revision))
    }
}

const NAMES: [&str; 4] = ["n0", "n1", "n2", "n3"];
const ZONES: u128 = 3;

#[derive(Clone, Debug)]
enum Op {
    Start(usize),
    Kill(usize),
    Pause(usize),
    Resume(usize),
    /// The node learns who is alive.
    See(usize),
    /// The node wrongly believes another dead (it was slow, or cut off).
    Suspect(usize, usize),
    /// The node takes the zones its view gives it, and hands off those it does not.
    Act(usize),
    /// Two nodes take a zone's lease at the same instant.
    Race(usize, usize, u128),
    /// The node writes each zone it believes it holds.
    Write(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let n = 0..NAMES.len();
    prop_oneof![
        2 => n.clone().prop_map(Op::Start),
        1 => n.clone().prop_map(Op::Kill),
        1 => n.clone().prop_map(Op::Pause),
        1 => n.clone().prop_map(Op::Resume),
        3 => n.clone().prop_map(Op::See),
        1 => (n.clone(), n.clone()).prop_map(|(a, b)| Op::Suspect(a, b)),
        4 => n.clone().prop_map(Op::Act),
        2 => (n.clone(), n.clone(), 0..ZONES).prop_map(|(a, b, z)| Op::Race(a, b, z)),
        3 => n.prop_map(Op::Write),
    ]
}

/// One run of a node: its view of the members and the leases it believes it holds.
struct Process {
    ownership: Ownership<&'static Bucket>,
    view: Members,
    paused: bool,
    held: BTreeMap<Uuid, Lease>,
}

/// The zones' store as far as fencing goes: the highest token it has seen per zone, and every
/// write it accepted, in order.
#[derive(Default)]
struct Zones {
    fence: HashMap<Uuid, u64>,
    accepted: HashMap<Uuid, Vec<(u64, NodeId)>>,
}

impl Zones {
    /// A new holder registers its token before its first write (as it moves the zone's fence
    /// in the store): writes with a lower one are refused from then on.
    fn register(&mut self, lease: &Lease) {
        let f = self.fence.entry(lease.zone).or_default();
        *f = (*f).max(lease.fence);
    }

    fn write(&mut self, lease: &Lease) -> bool {
        if self.fence.get(&lease.zone) != Some(&lease.fence) {
            return false;
        }
        self.accepted
            .entry(lease.zone)
            .or_default()
            .push((lease.fence, lease.holder.clone()));
        true
    }
}

struct World {
    bucket: &'static Bucket,
    processes: Vec<Option<Process>>,
    zones: Zones,
}

fn zone(z: u128) -> Uuid {
    Uuid::from_u128(0x0190_f5a0_0000_7000_8000_0000_0000_0000 | z)
}

impl World {
    fn new() -> Self {
        Self {
            bucket: Box::leak(Box::default()),
            processes: (0..NAMES.len()).map(|_| None).collect(),
            zones: Zones::default(),
        }
    }

    fn live(&self) -> Members {
        Members::new(
            self.processes
                .iter()
                .flatten()
                .map(|p| p.ownership.me().clone()),
        )
    }

    /// A process that can act now: alive and not paused.
    fn running(&mut self, n: usize) -> Option<&mut Process> {
        self.processes[n].as_mut().filter(|p| !p.paused)
    }

    async fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Start(n) => {
                if self.processes[n].is_none() {
                    let me = NodeId::start(NAMES[n]);
                    let mut view = self.live();
                    view = Members::new(view.iter().cloned().chain([me.clone()]));
                    self.processes[n] = Some(Process {
                        ownership: Ownership::new(self.bucket, me),
                        view,
                        paused: false,
                        held: BTreeMap::new(),
                    });
                }
            }
            Op::Kill(n) => self.processes[n] = None,
            Op::Pause(n) => {
                if let Some(p) = self.processes[n].as_mut() {
                    p.paused = true;
                }
            }
            Op::Resume(n) => {
                if let Some(p) = self.processes[n].as_mut() {
                    p.paused = false;
                }
            }
            Op::See(n) => {
                let live = self.live();
                if let Some(p) = self.running(n) {
                    p.view = live;
                }
            }
            Op::Suspect(a, b) => {
                let Some(target) = self.processes[b].as_ref().map(|p| p.ownership.me().clone())
                else {
                    return Ok(());
                };
                if let Some(p) = self.running(a)
                    && p.ownership.me() != &target
                {
                    p.view = Members::new(p.view.iter().filter(|m| **m != target).cloned());
                }
            }
            Op::Act(n) => self.act(n).await?,
            Op::Race(a, b, z) => {
                if a == b {
                    return Ok(());
                }
                let zone = zone(z);
                let (pa, pb) = two(&mut self.processes, a, b);
                let (Some(pa), Some(pb)) = (pa.filter(|p| !p.paused), pb.filter(|p| !p.paused))
                else {
                    return Ok(());
                };
                let (ra, rb) = tokio::join!(
                    pa.ownership.acquire(zone, &pa.view),
                    pb.ownership.acquire(zone, &pb.view)
                );
                let (ra, rb) = (ra.unwrap(), rb.unwrap());
                // Both may be granted only one after the other (a stale view took the lease over
                // from a node it did not know alive): never the same grant twice.
                if let (Acquired::Held(la), Acquired::Held(lb)) = (&ra, &rb) {
                    prop_assert_ne!(la.fence, lb.fence, "one grant, two holders");
                }
                for (p, r) in [(pa, ra), (pb, rb)] {
                    if let Acquired::Held(lease) = r {
                        granted_fairly(self.bucket, p, &lease)?;
                        self.zones.register(&lease);
                        p.held.insert(zone, lease);
                    }
                }
            }
            Op::Write(n) => {
                let Some(p) = self.processes[n].as_mut().filter(|p| !p.paused) else {
                    return Ok(());
                };
                for lease in p.held.values() {
                    self.zones.write(lease);
                }
            }
        }
        self.check()
    }

    /// Hands off the zones the node's view gives another, takes those it gives this node.
    async fn act(&mut self, n: usize) -> Result<(), TestCaseError> {
        let Some(p) = self.processes[n].as_mut().filter(|p| !p.paused) else {
            return Ok(());
        };
        for z in 0..ZONES {
            let zone = zone(z);
            let mine = rendezvous(zone, p.view.iter()) == Some(p.ownership.me());
            if !mine && let Some(lease) = p.held.remove(&zone) {
                p.ownership.release(&lease).await.unwrap();
            }
            if mine {
                match p.ownership.acquire(zone, &p.view).await.unwrap() {
                    Acquired::Held(lease) => {
                        granted_fairly(self.bucket, p, &lease)?;
                        self.zones.register(&lease);
                        p.held.insert(zone, lease);
                    }
                    Acquired::Taken(_) => {
                        p.held.remove(&zone);
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes are accepted in the order of their tokens, each token one node's.
    fn check(&self) -> Result<(), TestCaseError> {
        for (zone, writes) in &self.zones.accepted {
            for pair in writes.windows(2) {
                prop_assert!(pair[0].0 <= pair[1].0, "zone {zone}: {writes:?}");
                if pair[0].0 == pair[1].0 {
                    prop_assert_eq!(&pair[0].1, &pair[1].1, "one token, two writers");
                }
            }
        }
        Ok(())
    }

    /// Everyone alive resumes and sees the members as they are, and acts until nothing moves:
    /// every zone is then held by the node rendezvous picks, and that node can write it.
    async fn settle(&mut self) -> Result<(), TestCaseError> {
        let live = self.live();
        for p in self.processes.iter_mut().flatten() {
            p.paused = false;
            p.view = live.clone();
        }
        for _ in 0..3 {
            for n in 0..NAMES.len() {
                self.act(n).await?;
            }
        }
        for z in 0..ZONES {
            let zone = zone(z);
            let Some(chosen) = rendezvous(zone, live.iter()) else {
                continue;
            };
            let record = self.bucket.read(zone).await.unwrap().unwrap();
            prop_assert_eq!(record.holder.as_ref(), Some(chosen), "zone {}", zone);
            let n = NAMES.iter().position(|name| *name == chosen.name).unwrap();
            let lease = self.processes[n].as_ref().unwrap().held.get(&zone).cloned();
            let lease = lease.expect("the chosen node believes it holds the zone");
            prop_assert!(self.zones.write(&lease), "its writes are accepted");
        }
        self.check()
    }
}

/// A new grant takes the lease only from nobody, from the same node, or from a holder the taker
/// does not see alive: never from a live member it knows. (A grant it already held was checked
/// when it was made, against the view it had then.)
fn granted_fairly(bucket: &Bucket, p: &Process, lease: &Lease) -> Result<(), TestCaseError> {
    if p.held.get(&lease.zone) == Some(lease) {
        return Ok(());
    }
    if let Some(before) = bucket.held_before(lease.fence) {
        prop_assert!(
            before == *p.ownership.me() || !p.view.contains(&before),
            "{} took zone {}'s lease from {}, whom it sees alive",
            p.ownership.me(),
            lease.zone,
            before
        );
    }
    Ok(())
}

/// Two distinct elements of a slice, mutably.
fn two<T>(items: &mut [Option<T>], a: usize, b: usize) -> (Option<&mut T>, Option<&mut T>) {
    if a < b {
        let (left, right) = items.split_at_mut(b);
        (left[a].as_mut(), right[0].as_mut())
    } else {
        let (left, right) = items.split_at_mut(a);
        (right[0].as_mut(), left[b].as_mut())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_zone_has_one_writer_at_a_time_and_an_owner_once_membership_is_stable(
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async {
            let mut world = World::new();
            for op in &ops {
                world.apply(op).await?;
            }
            world.settle().await
        })?;
    }
}

/// The same rule on the real JetStream KV: a lease is granted once, held across asks, taken over
/// from a dead holder with a higher fencing token, and a stale holder can neither release nor
/// keep it.
#[tokio::test]
async fn leases_in_jetstream_kv_are_granted_once_and_taken_over_from_the_dead() {
    let client = async_nats::connect("127.0.0.1:4222")
        .await
        .expect("NATS with JetStream runs at 127.0.0.1:4222 (see the README)");
    let context = async_nats::jetstream::new(client);
    let bucket = format!("t_leases_{}", Uuid::new_v4().simple());
    let leases = KvLeases::open(&context, &bucket).await.unwrap();
    let (a, b) = (NodeId::start("a"), NodeId::start("b"));
    let both = Members::new([a.clone(), b.clone()]);
    let node_a = Ownership::new(leases.clone(), a.clone());
    let node_b = Ownership::new(leases.clone(), b.clone());
    let zone = Uuid::now_v7();

    let Acquired::Held(first) = node_a.acquire(zone, &both).await.unwrap() else {
        panic!("a free lease is granted");
    };
    assert_eq!(
        node_a.acquire(zone, &both).await.unwrap(),
        Acquired::Held(first.clone()),
        "asked again, the same grant"
    );
    assert_eq!(
        node_b.acquire(zone, &both).await.unwrap(),
        Acquired::Taken(a.clone()),
        "a live holder keeps it"
    );
    // `a` is declared dead: `b` takes the lease over, with a higher token.
    let only_b = Members::new([b.clone()]);
    let Acquired::Held(second) = node_b.acquire(zone, &only_b).await.unwrap() else {
        panic!("a dead holder's lease is taken over");
    };
    assert!(second.fence > first.fence);
    assert!(!node_a.holds(&first).await.unwrap());
    assert!(node_b.holds(&second).await.unwrap());
    assert!(
        !node_a.release(&first).await.unwrap(),
        "a stale holder cannot release what moved on"
    );
    // A restarted `a` is a new incarnation: the old one's lease is not the new one's.
    let a_again = Ownership::new(leases.clone(), NodeId::start("a"));
    let all = Members::new([a_again.me().clone(), b.clone()]);
    assert_eq!(
        a_again.acquire(zone, &all).await.unwrap(),
        Acquired::Taken(b.clone())
    );
    // Handed off: released by its holder, the lease is granted to the next, higher again.
    assert!(node_b.release(&second).await.unwrap());
    let Acquired::Held(third) = a_again.acquire(zone, &all).await.unwrap() else {
        panic!("a released lease is granted");
    };
    assert!(third.fence > second.fence);
    context.delete_key_value(&bucket).await.unwrap();
}

//! What the nodes of a cluster say to each other over NATS: the subjects, and the messages
//! (MessagePack) on them.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::node::NodeId;
use crate::runtime::Since;
use crate::zone::{Outcome, Session, ZoneCommand, ZoneEvent};

/// A cluster's subjects, all under its name (`thunderline` unless `--cluster-name` says
/// otherwise), so that several clusters can share one NATS server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects(pub String);

impl Subjects {
    /// Where every node announces itself, each heartbeat.
    pub fn heartbeat(&self) -> String {
        format!("{}.cluster.heartbeat", self.0)
    }

    /// Where a node takes the commands of the zones it owns.
    pub fn commands(&self, node: &str) -> String {
        format!("{}.node.{node}.commands", self.0)
    }

    /// Where a node answers for the recent events of the zones it owns (to heal a gap).
    pub fn history(&self, node: &str) -> String {
        format!("{}.node.{node}.history", self.0)
    }

    /// Where a zone's owner publishes its events.
    pub fn zone(&self, zone: Uuid) -> String {
        format!("{}.zone.{zone}", self.0)
    }

    /// Where a node announces a token revocation it recorded, for every node to end the
    /// sessions it covers.
    pub fn revocations(&self) -> String {
        format!("{}.cluster.revocations", self.0)
    }

    /// Where a node is asked to drain (`POST /api/cluster/drain` on any node).
    pub fn drain(&self, node: &str) -> String {
        format!("{}.node.{node}.drain", self.0)
    }

    /// The JetStream KV bucket of the zones' leases.
    pub fn leases(&self) -> String {
        format!("{}_zone_leases", self.0)
    }
}

/// A node is alive (or, `leaving`, about to stop). A `draining` node hands its zones away and
/// takes no new ones: it is alive (its clients' sessions stand), but no zone is placed on it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub node: NodeId,
    pub leaving: bool,
    #[serde(default)]
    pub draining: bool,
    #[serde(default)]
    pub load: Load,
}

/// What a node carries, as it says in each heartbeat (for `GET /api/cluster` and the console).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Zones whose lease it holds.
    pub zones: u64,
    /// Its open WebSocket connections.
    pub connections: u64,
    /// Commands it has sent to other nodes' zones since it started.
    pub forwarded: u64,
}

/// A command sent to its zone's owner.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Forward {
    pub command: ZoneCommand,
    pub since: Option<Since>,
}

/// The owner's answer to a forwarded command: the runtime's reply, as it travels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Answered {
    pub outcome: Outcome,
    pub recovered: bool,
    pub missed: Vec<ZoneEvent>,
    pub presence: Option<Vec<Session>>,
}

/// Events of one zone, in seq order, in the zone's `epoch`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Broadcast {
    pub epoch: String,
    pub events: Vec<ZoneEvent>,
}

/// Asks a zone's owner for its events after `after`, before `upto`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryAsk {
    pub zone: Uuid,
    pub after: u64,
    pub upto: u64,
}

/// The events asked for, as many as the owner still has, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryAnswer {
    pub epoch: String,
    pub events: Vec<ZoneEvent>,
}

pub fn encode<T: Serialize>(value: &T) -> Bytes {
    rmp_serde::to_vec_named(value)
        .expect("cluster messages encode")
        .into()
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{Limits, command, now};
    use crate::zone::{Actor, CommandKind, NewZone, Permissions, ZoneState};

    #[test]
    fn events_and_answers_cross_the_wire_unchanged() {
        let id = Uuid::now_v7();
        let mut state = ZoneState::absent(id);
        let mut events = Vec::new();
        let create = command(
            id,
            Actor::Admin,
            CommandKind::CreateZone(Box::new(NewZone {
                name: "z".into(),
                assigned_server: Some("n".into()),
                ..NewZone::default()
            })),
        );
        let outcome = state.execute(&create, &Limits::default().context(now()));
        events.extend(outcome.result.clone().unwrap().events);
        let agent = Actor::Agent {
            agent_id: "a".into(),
            connection: "c.1".into(),
            permissions: Permissions::all(),
        };
        for kind in [
            CommandKind::Join,
            CommandKind::from_json("agent_move", r#"{"position": {"x": 1, "y": 2.5, "z": -3}}"#)
                .unwrap(),
            CommandKind::Leave,
        ] {
            let c = command(id, agent.clone(), kind);
            let outcome = state.execute(&c, &Limits::default().context(now()));
            events.extend(outcome.result.clone().unwrap().events);
            let answered = Answered {
                outcome,
                recovered: true,
                missed: events.clone(),
                presence: Some(state.snapshot().sessions),
            };
            assert_eq!(decode::<Answered>(&encode(&answered)).unwrap(), answered);
            let forward = Forward {
                command: c,
                since: Some(Since {
                    seq: 3,
                    epoch: "e".into(),
                }),
            };
            assert_eq!(decode::<Forward>(&encode(&forward)).unwrap(), forward);
        }
        let broadcast = Broadcast {
            epoch: state.epoch().into(),
            events,
        };
        assert_eq!(decode::<Broadcast>(&encode(&broadcast)).unwrap(), broadcast);
    }
}

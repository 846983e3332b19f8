//! Sessions under random interleavings, end to end: several raw WebSocket connections send
//! joins (some refused: the zone is small), leaves, pushes and disconnects, without waiting for
//! answers. Afterwards the zone's sessions are exactly the channels the clients were told they
//! hold, `active_session_count` is their number and never went over the capacity, and the audit
//! log has no event from an agent without a session, with seq 1, 2, 3… and no gap.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::server::{Client, TestServer, start};
use futures_util::StreamExt;
use proptest::prelude::*;
use serde_json::{Value, json};
use tokio::time::Instant;

const CONNECTIONS: usize = 4;
const AGENTS: usize = 3;
const CAPACITY: u64 = 2;

#[derive(Clone, Debug)]
enum Op {
    Join { conn: usize, agent: usize },
    Leave { conn: usize },
    Move { conn: usize },
    Disconnect { conn: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..CONNECTIONS, 0..AGENTS).prop_map(|(conn, agent)| Op::Join { conn, agent }),
        2 => (0..CONNECTIONS).prop_map(|conn| Op::Leave { conn }),
        4 => (0..CONNECTIONS).prop_map(|conn| Op::Move { conn }),
        1 => (0..CONNECTIONS).prop_map(|conn| Op::Disconnect { conn }),
    ]
}

/// One client connection, as the client knows it: what it sent and what it was told.
struct Conn {
    client: Client,
    next: u64,
    /// The join ref of the channel it last asked for, and its agent.
    channel: Option<(String, String)>,
    /// Refs sent and not yet answered.
    waiting: Vec<String>,
    /// Answers to joins, by join ref.
    joins: HashMap<String, bool>,
}

impl Conn {
    async fn open(srv: &TestServer) -> Self {
        Self {
            client: Client::connect(&srv.ws_url()).await,
            next: 0,
            channel: None,
            waiting: Vec::new(),
            joins: HashMap::new(),
        }
    }

    async fn send(
        &mut self,
        join_ref: Option<&str>,
        topic: &str,
        event: &str,
        payload: Value,
    ) -> String {
        self.next += 1;
        let r = self.next.to_string();
        let frame = json!([join_ref, r, topic, event, payload]);
        self.client.send_raw(&frame.to_string()).await;
        self.waiting.push(r.clone());
        r
    }

    /// Reads until every frame sent has its answer.
    async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.waiting.is_empty() {
            let frame = tokio::time::timeout_at(deadline, self.client.ws.next()).await;
            let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) = frame else {
                panic!(
                    "a connection stopped answering; still waiting for {:?}",
                    self.waiting
                );
            };
            let f: Value = serde_json::from_str(&t).unwrap();
            if f[3] != "phx_reply" {
                continue;
            }
            let r = f[1].as_str().unwrap_or("").to_owned();
            self.waiting.retain(|w| *w != r);
            if f[3] == "phx_reply" && f[0].as_str() == Some(r.as_str()) {
                self.joins.insert(r, f[4]["status"] == "ok");
            }
        }
    }

    /// The agent whose session this connection holds, as far as it was told.
    fn holds(&self) -> Option<&str> {
        let (join_ref, agent) = self.channel.as_ref()?;
        self.joins
            .get(join_ref)
            .copied()
            .unwrap_or(false)
            .then_some(agent.as_str())
    }
}

async fn scenario(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let srv = start(None).await;
    let zone = srv
        .zone(json!({"name": "Small", "capacity": CAPACITY, "permissions": 1}))
        .await;
    let id = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{id}");
    let mut tokens = Vec::new();
    for a in 0..AGENTS {
        tokens.push(srv.token(&format!("agent-{a}"), &id, json!(1)).await);
    }
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        conns.push(Conn::open(&srv).await);
    }
    for op in &ops {
        match *op {
            Op::Join { conn, agent } => {
                let c = &mut conns[conn];
                let join_ref = (c.next + 1).to_string();
                let agent_id = format!("agent-{agent}");
                c.send(
                    Some(&join_ref),
                    &topic,
                    "phx_join",
                    json!({"agent_id": agent_id, "token": tokens[agent]}),
                )
                .await;
                c.channel = Some((join_ref, agent_id));
            }
            Op::Leave { conn } => {
                let c = &mut conns[conn];
                let join_ref = c.channel.take().map(|(r, _)| r);
                c.send(join_ref.as_deref(), &topic, "phx_leave", json!({}))
                    .await;
            }
            Op::Move { conn } => {
                let c = &mut conns[conn];
                let join_ref = c.channel.as_ref().map(|(r, _)| r.clone());
                c.send(
                    join_ref.as_deref(),
                    &topic,
                    "agent_move",
                    json!({"position": {"x": 1, "y": 2, "z": 3}}),
                )
                .await;
            }
            Op::Disconnect { conn } => {
                conns[conn] = Conn::open(&srv).await;
            }
        }
    }
    for c in &mut conns {
        c.settle().await;
    }

    // What the clients were told they hold, as a multiset of agents.
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    for c in &conns {
        if let Some(agent) = c.holds() {
            *expected.entry(agent.to_owned()).or_default() += 1;
        }
    }
    // Dropped connections leave on their own time: wait until the zone agrees, or give up
    // (and say how it differs, below).
    let mut held: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = 0;
    common::eventually(5, async || {
        let (_, body) = srv
            .api("GET", &format!("/api/zones/{id}/agents"), None)
            .await;
        held.clear();
        for a in body["agents"].as_array().unwrap() {
            held.insert(
                a["agent_id"].as_str().unwrap().to_owned(),
                a["sessions"].as_array().unwrap().len(),
            );
        }
        let (_, z) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
        count = z["active_session_count"].as_u64().unwrap();
        held == expected
    })
    .await;
    prop_assert_eq!(
        &held,
        &expected,
        "the zone's sessions are the channels clients hold"
    );
    prop_assert_eq!(count as usize, expected.values().sum::<usize>());

    // The log: seq without gaps; sessions never over capacity; no event without a session.
    let zone_id = uuid::Uuid::parse_str(&id).unwrap();
    let store = srv.server.zones.registry.store().clone();
    let (_, z) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
    let last = z["seq"].as_u64().unwrap();
    let mut events = Vec::new();
    // Whether the log caught up within 5 s is checked below, event by event.
    common::eventually(5, async || {
        events = store.zone_events(zone_id, None, None, None).await.unwrap();
        events.len() as u64 >= last
    })
    .await;
    let mut sessions: BTreeMap<(String, String), ()> = BTreeMap::new();
    for (i, e) in events.iter().enumerate() {
        prop_assert_eq!(e.seq, i as u64 + 1);
        match &e.kind {
            // Its creation, first.
            thunderline::zone::EventKind::ZoneCreated(_) => prop_assert_eq!(e.seq, 1),
            thunderline::zone::EventKind::AgentEntered(p) => {
                prop_assert!(
                    sessions
                        .insert((p.connection.clone(), p.agent_id.clone()), ())
                        .is_none()
                );
                prop_assert!(
                    sessions.len() as u64 <= CAPACITY,
                    "over capacity at seq {}",
                    e.seq
                );
                prop_assert_eq!(p.session_count as usize, sessions.len());
            }
            thunderline::zone::EventKind::AgentLeft(p) => {
                prop_assert!(
                    sessions
                        .remove(&(p.connection.clone(), p.agent_id.clone()))
                        .is_some(),
                    "agent_left without a session at seq {}",
                    e.seq
                );
                prop_assert_eq!(p.session_count as usize, sessions.len());
            }
            thunderline::zone::EventKind::AgentMoved(m) => {
                prop_assert!(
                    sessions.keys().any(|(_, a)| *a == m.agent_id),
                    "a move from {} without a session at seq {}",
                    m.agent_id,
                    e.seq
                );
            }
            other => prop_assert!(false, "unexpected event {other:?}"),
        }
    }
    prop_assert_eq!(events.len() as u64, last);
    drop(conns);
    srv.stop().await;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_sessions_exact(ops in prop::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(scenario(ops))?;
    }
}

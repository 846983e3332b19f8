//! A cluster of daemons over NATS, each a child process on a loopback port, sharing NATS and one
//! PostgreSQL schema: any node serves any zone, events and presence cross nodes, the cluster
//! counts sessions as one.

mod common;

use std::path::PathBuf;

use common::binary::{self, ADMIN, Daemon};
use common::server::http;
use serde_json::{Value, json};

const NATS: &str = "nats://127.0.0.1:4222";

/// A cluster of its own (its own name on the shared NATS server) on a fresh schema.
struct Cluster {
    name: String,
    db: common::TestDb,
    dirs: Vec<PathBuf>,
}

impl Cluster {
    async fn new() -> Self {
        let db = common::postgres()
            .await
            .expect("PostgreSQL is needed for a cluster (one database shared by its nodes)");
        Self {
            name: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            db,
            dirs: Vec::new(),
        }
    }

    /// Starts node `node`, waiting until it has joined (ready).
    async fn node(&mut self, node: &str) -> Daemon {
        let dir = std::env::temp_dir().join(format!("thunderline-{}-{node}", self.name));
        self.dirs.push(dir.clone());
        let daemon = binary::start(
            &dir,
            &[
                "--database",
                &self.db.url,
                "--cluster",
                NATS,
                "--node-id",
                node,
                "--cluster-name",
                &self.name,
                "--cluster-heartbeat-ms",
                "100",
            ],
        );
        let ready = common::eventually(10, async || {
            http(daemon.addr, "GET", "/readyz", None, None).await.0 == 200
        })
        .await;
        assert!(ready, "node {node} joined its cluster");
        daemon
    }

    async fn cleanup(self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.db.cleanup().await;
    }
}

async fn zone_json(node: &Daemon, zone: &str) -> Value {
    let (status, body) = http(
        node.addr,
        "GET",
        &format!("/api/zones/{zone}"),
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_zone_and_events_and_presence_cross_nodes() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;

    let zone = a.zone(json!({"name": "shared", "capacity": 10})).await;
    // A token minted on A joins on B (one signing secret); B forwards to the owner.
    let (mut on_a, ref_a, joined_a) = a.joined(&zone, "alice", None).await;
    let (mut on_b, ref_b, joined_b) = b.joined(&zone, "bob", None).await;
    assert_eq!(joined_a["epoch"], joined_b["epoch"]);
    assert!(
        joined_b["agents"]
            .as_array()
            .unwrap()
            .contains(&json!("alice")),
        "{joined_b}"
    );

    // Presence across nodes: bob's presence_state holds alice, alice hears bob join.
    let topic = format!("zone:{zone}");
    let state = on_b.event("presence_state").await;
    assert!(state[4].get("alice").is_some(), "{state}");
    assert!(state[4].get("bob").is_some(), "{state}");
    let diff = on_a
        .until("bob's join", |f| {
            f[3] == "presence_diff" && f[4]["joins"].get("bob").is_some()
        })
        .await;
    assert!(diff[4]["joins"]["bob"]["metas"][0]["phx_ref"].is_string());

    // The cluster counts sessions as one, whichever node is asked.
    for node in [&a, &b] {
        assert_eq!(zone_json(node, &zone).await["active_session_count"], 2);
    }

    // A move pushed on B reaches A's client, and the reverse.
    let r = on_b
        .push(
            Some(&ref_b),
            &topic,
            "agent_move",
            json!({"position": {"x": 1, "y": 2, "z": 0}}),
        )
        .await;
    let reply = on_b.reply_to(&r).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let moved = on_a
        .until("bob's move", |f| {
            f[3] == "agent_moved" && f[4]["agent_id"] == "bob"
        })
        .await;
    assert_eq!(moved[4]["position"]["x"], 1.0);
    let r = on_a
        .push(
            Some(&ref_a),
            &topic,
            "agent_move",
            json!({"position": {"x": 3, "y": 4, "z": 0}}),
        )
        .await;
    let reply = on_a.reply_to(&r).await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let moved = on_b
        .until("alice's move", |f| {
            f[3] == "agent_moved" && f[4]["agent_id"] == "alice"
        })
        .await;
    assert_eq!(moved[4]["position"]["y"], 4.0);

    // `assigned_server` names the owner, the same on both nodes.
    let owner = zone_json(&a, &zone).await["assigned_server"].clone();
    assert_eq!(zone_json(&b, &zone).await["assigned_server"], owner);
    assert!(owner == "a" || owner == "b", "{owner}");

    // Bob leaves: alice sees his presence go.
    let r = on_b
        .push(Some(&ref_b), &topic, "phx_leave", json!({}))
        .await;
    assert_eq!(on_b.reply_to(&r).await["status"], "ok");
    on_a.until("bob's leave", |f| {
        f[3] == "presence_diff" && f[4]["leaves"].get("bob").is_some()
    })
    .await;
    assert_eq!(zone_json(&b, &zone).await["active_session_count"], 1);

    drop((a, b));
    cluster.cleanup().await;
}

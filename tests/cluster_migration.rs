//! Agents moving between zones that different nodes of a cluster own: each step is a command to
//! its zone's owner, with the guarantees of one node: observers on either node see the
//! departure and the arrival, the counts agree whichever node is asked, and a place held for
//! an agent survives the death (`kill -9`) of the node that owns it: the next owner loads it
//! from the log, and the ticket joins there.

mod common;

use common::binary::{ADMIN, Daemon};
use common::cluster::{Cluster, zone_json};
use common::server::{Client, http};
use serde_json::{Value, json};

/// A zone created on `node` that `owner` owns.
async fn zone_owned_by(node: &Daemon, owner: &str) -> String {
    for _ in 0..64 {
        let zone = node
            .zone(json!({"name": "z", "capacity": 10, "permissions": 3}))
            .await;
        if zone_json(node, &zone).await["assigned_server"] == owner {
            return zone;
        }
    }
    panic!("no zone went to node {owner}");
}

fn ws(node: &Daemon) -> String {
    format!("ws://{}/socket/websocket?vsn=2.0.0", node.addr)
}

async fn migrate(client: &mut Client, join_ref: &str, from: &str, payload: Value) -> Value {
    let r = client
        .push(Some(join_ref), &format!("zone:{from}"), "migrate", payload)
        .await;
    client.reply_to(&r).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_between_zones_of_two_nodes_and_its_place_outlives_its_owner() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let za = zone_owned_by(&a, "a").await;
    let zb = zone_owned_by(&a, "b").await;

    // Alice is on node b, in A's zone (owned by a); observers of both zones are on node a.
    let (mut alice, alice_ref, _) = b.joined(&za, "alice", None).await;
    let r = alice
        .push(
            Some(&alice_ref),
            &format!("zone:{za}"),
            "agent_move",
            json!({"position": {"x": 5, "y": 6, "z": 7}}),
        )
        .await;
    assert_eq!(alice.reply_to(&r).await["status"], "ok");
    let (mut watch_a, _, _) = a.joined(&za, "watcher-a", None).await;
    let (mut watch_b, _, _) = a.joined(&zb, "watcher-b", None).await;

    let reply = migrate(
        &mut alice,
        &alice_ref,
        &za,
        json!({"to": zb, "token": a.token("alice", &zb).await}),
    )
    .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["response"]["zone"], json!(zb));
    let ticket = reply["response"]["ticket"].as_str().unwrap().to_owned();
    // Presence leaves, then the event, in the zone's order.
    watch_a
        .until("alice's presence leaving", |f| {
            f[3] == "presence_diff" && f[4]["leaves"].get("alice").is_some()
        })
        .await;
    let left = watch_a
        .until("alice's departure", |f| {
            f[3] == "agent_left" && f[4]["agent_id"] == "alice"
        })
        .await;
    assert_eq!(left[4]["reason"], "migrated");
    assert_eq!(left[4]["to"], json!(zb));
    for node in [&a, &b] {
        assert_eq!(zone_json(node, &za).await["active_session_count"], 1);
        assert_eq!(zone_json(node, &zb).await["active_session_count"], 1);
    }

    // B's owner dies before alice joins with her ticket: the place is in B's log, and the
    // next owner (node a) holds it.
    b.kill_9();
    // Refused `unavailable` only while the zone changes owners (a refused ticket would be
    // final): joined again until it is taken.
    let join = || async {
        let mut client = Client::connect(&ws(&a)).await;
        let (_, reply) = client
            .join(
                &format!("zone:{zb}"),
                json!({"agent_id": "alice", "ticket": ticket}),
            )
            .await;
        (client, reply)
    };
    let (mut alice, joined) = common::read_until(20, join, |(_, reply)| {
        reply["status"] == "ok" || reply["response"]["reason"] != "unavailable"
    })
    .await
    .unwrap_or_else(|last| last);
    assert_eq!(joined["status"], "ok", "{joined}");
    let entered = watch_b
        .until("alice's arrival", |f| {
            f[3] == "agent_entered" && f[4]["agent_id"] == "alice"
        })
        .await;
    assert_eq!(entered[4]["from"], json!(za));
    assert_eq!(
        entered[4]["position"],
        json!({"x": 5.0, "y": 6.0, "z": 7.0})
    );
    assert_eq!(zone_json(&a, &zb).await["active_session_count"], 2);

    // Moved back by the admin API, asked of the one node left.
    let (status, body) = http(
        a.addr,
        "POST",
        &format!("/api/zones/{zb}/agents/alice/migrate"),
        Some(json!({"to": za})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let closed = alice.until("phx_close", |f| f[3] == "phx_close").await;
    assert_eq!(closed[4]["reason"], "migrated");
    assert_eq!(zone_json(&a, &za).await["active_session_count"], 2);
    assert_eq!(zone_json(&a, &zb).await["active_session_count"], 1);
    drop(a);
    cluster.cleanup().await;
}

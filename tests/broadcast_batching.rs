//! Broadcast batching with no floor: on an idle server a broadcast leaves as soon as the
//! broadcast sink is free, not after the batch timeout; under load batches still form.

mod common;

use std::time::{Duration, Instant};

use common::server::{TestServer, metrics, start_with};
use serde_json::{Value, json};
use thunderline::bench::batches::BroadcastBatches;
use thunderline::daemon::config::PipelineFile;

/// A server whose broadcast batches wait up to `timeout` to fill.
async fn server(timeout: Duration) -> TestServer {
    let mut file = PipelineFile::default();
    file.batchers.broadcast = file.batchers.broadcast.clone().batch_timeout(timeout);
    start_with(None, file).await
}

fn zone_body() -> Value {
    json!({"name": "Glade", "capacity": 50, "permissions": 0x03})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_servers_broadcast_does_not_wait_for_the_batch_timeout() {
    // A timeout far longer than any delivery: a broadcast that waited for it is told apart.
    let timeout = Duration::from_secs(10);
    let srv = server(timeout).await;
    let zone = srv.zone(zone_body()).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let (mut alice, alice_ref) = srv.joined(id, "alice", json!(["spawn_agents"])).await;
    let (mut bob, _) = srv.joined(id, "bob", json!(["spawn_agents"])).await;
    // Bob's own join is a broadcast too: it reaches him at once.
    let started = Instant::now();
    bob.until("bob's agent_entered", |f| {
        f[3] == "agent_entered" && f[4]["agent_id"] == "bob"
    })
    .await;
    assert!(
        started.elapsed() < timeout / 4,
        "the join's broadcast waited {:?}",
        started.elapsed()
    );

    for x in 1..=3 {
        let sent = Instant::now();
        let r = alice
            .push(
                Some(&alice_ref),
                &topic,
                "agent_move",
                json!({"position": {"x": x, "y": 0, "z": 0}}),
            )
            .await;
        let moved = bob
            .until("alice's move", |f| {
                f[3] == "agent_moved" && f[4]["agent_id"] == "alice"
            })
            .await;
        let waited = sent.elapsed();
        assert_eq!(moved[4]["position"]["x"], f64::from(x), "{moved}");
        assert!(
            waited < timeout / 4,
            "move {x} was delivered after {waited:?}: it waited for the batch timeout"
        );
        assert_eq!(alice.reply_to(&r).await["status"], "ok");
    }
    // Each of them left because the broadcast sink was free (trigger idle), none by timeout.
    let text = metrics(srv.server.addr).await;
    let b = BroadcastBatches::from_metrics(&text);
    assert!(
        b.idle.batches >= 3,
        "idle-triggered broadcast batches: {b:?}"
    );
    assert_eq!(
        b.timeout.batches, 0,
        "no broadcast batch waited for its timeout"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_broadcast_batches_still_form() {
    let srv = server(Duration::from_secs(10)).await;
    let zone = srv.zone(zone_body()).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(
            srv.joined(id, &format!("agent-{i}"), json!(["spawn_agents"]))
                .await,
        );
    }
    // Every client sends its moves at once, without waiting for a reply: the events reach the
    // broadcast batcher faster than one at a time.
    const MOVES: usize = 100;
    let mut refs = Vec::new();
    for (c, join_ref) in &mut clients {
        let mut mine = Vec::new();
        for x in 0..MOVES {
            mine.push(
                c.push(
                    Some(join_ref),
                    &topic,
                    "agent_move",
                    json!({"position": {"x": x, "y": 1, "z": 0}}),
                )
                .await,
            );
        }
        refs.push(mine);
    }
    for ((c, _), mine) in clients.iter_mut().zip(&refs) {
        for r in mine {
            assert_eq!(c.reply_to(r).await["status"], "ok");
        }
    }
    // Every move reached every client (5 × 100 of them), batched or not.
    for (c, _) in &mut clients {
        let mut seen = 0;
        while seen < 5 * MOVES {
            let f = c.next().await.expect("the socket stays open");
            if f[3] == "agent_moved" {
                seen += 1;
            }
        }
    }
    let b = BroadcastBatches::from_metrics(&metrics(srv.server.addr).await);
    let (batches, events) = [b.idle, b.size, b.timeout, b.flush]
        .iter()
        .fold((0, 0), |t, c| (t.0 + c.batches, t.1 + c.events));
    assert!(
        events >= (5 * MOVES) as u64,
        "every move went through the broadcast batcher: {b:?}"
    );
    assert!(
        events > batches,
        "some broadcast batch held more than one event: {events} events in {batches} batches"
    );
    assert!(
        b.idle.mean_size > 1.0,
        "batches formed while the sink was busy: {b:?}"
    );
    assert_eq!(
        b.timeout.batches, 0,
        "no broadcast batch waited for its timeout"
    );
    srv.stop().await;
}

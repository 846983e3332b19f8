//! A zone's life in memory and across restarts: an idle zone leaves memory once its snapshot
//! is written and comes back exactly as it was (same seq, same epoch); after a crash, the
//! sessions the store still holds are ended (audited `agent_left`) before anyone sees them, and
//! the history goes on where it stopped.

mod common;

use std::num::NonZeroU64;
use std::time::Duration;

use common::binary;
use common::server::{Client, http, start_with};
use serde_json::{Value, json};
use thunderline::daemon::config::PipelineFile;
use tokio::time::Instant;

/// Polls `check` every 20 ms for up to `secs`.
async fn eventually(secs: u64, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_zone_leaves_memory_once_written_and_comes_back_the_same() {
    let mut file = PipelineFile::default();
    file.zones.evict_after_ms = NonZeroU64::new(300).unwrap();
    let srv = start_with(None, file).await;
    let zone = srv
        .zone(json!({"name": "Idle", "permissions": 3, "resources": {"food": {"amount": 50, "max": 50, "regen": 1}}}))
        .await;
    let id = zone["id"].as_str().unwrap().to_owned();
    let zone_id = uuid::Uuid::parse_str(&id).unwrap();
    let topic = format!("zone:{id}");
    let token = srv.token("a", &id, json!(3)).await;
    let mut c = Client::connect(&srv.ws_url()).await;
    let (join_ref, reply) = c
        .join(&topic, json!({"agent_id": "a", "token": token}))
        .await;
    assert_eq!(reply["status"], "ok");
    let epoch = reply["response"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(
        reply["response"]["seq"], 1,
        "the join reply carries the seq it reflects"
    );
    for x in 0..5 {
        let r = c
            .push(
                Some(&join_ref),
                &topic,
                "agent_move",
                json!({"position": {"x": x, "y": 0, "z": 0}}),
            )
            .await;
        assert_eq!(c.reply_to(&r).await["status"], "ok");
    }
    let r = c
        .push(
            Some(&join_ref),
            &topic,
            "consume_resource",
            json!({"resource_type": "food", "amount": 7}),
        )
        .await;
    assert_eq!(c.reply_to(&r).await["status"], "ok");
    let r = c
        .push(Some(&join_ref), &topic, "phx_leave", json!({}))
        .await;
    assert_eq!(c.reply_to(&r).await["status"], "ok");

    // Join, five moves, a consume, a leave: seq 8. Once idle for 300 ms the zone goes.
    let registry = srv.server.zones.registry.clone();
    assert!(registry.live(zone_id).is_some(), "in memory while used");
    assert!(
        eventually(10, async || registry.live(zone_id).is_none()).await,
        "the idle zone left memory"
    );
    let snapshot = registry.store().get_zone(zone_id).await.unwrap();
    assert_eq!(
        snapshot.seq, 8,
        "its latest state was written before it left"
    );
    assert_eq!(snapshot.zone.resources["food"].amount, 43);
    assert!(snapshot.sessions.is_empty());

    // It comes back as it was: the history goes on at seq 9, in the same epoch.
    let token = srv.token("b", &id, json!(3)).await;
    let mut b = Client::connect(&srv.ws_url()).await;
    let (_, reply) = b
        .join(&topic, json!({"agent_id": "b", "token": token}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["response"]["seq"], 9);
    assert_eq!(reply["response"]["epoch"], json!(epoch));
    assert_eq!(reply["response"]["zone"]["resources"]["food"]["amount"], 43);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_the_sessions_of_the_dead_run_end_and_the_history_goes_on() {
    let dir = std::env::temp_dir().join(format!(
        "thunderline-crash-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let admin = Some(binary::ADMIN);
    let mut daemon = binary::start(&dir, &["--replies", "durable"]);
    let addr = daemon.addr;
    let (status, zone) = http(
        addr,
        "POST",
        "/api/zones",
        Some(json!({"name": "Crash", "permissions": 1, "capacity": 5})),
        admin,
    )
    .await;
    assert_eq!(status, 201, "{zone}");
    let id = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{id}");
    let mut clients = Vec::new();
    for agent in ["a", "b"] {
        let (_, token) = http(
            addr,
            "POST",
            "/api/tokens",
            Some(json!({"agent_id": agent, "zone_id": id, "permissions": 1, "ttl_seconds": 600})),
            admin,
        )
        .await;
        let mut c = Client::connect(&format!("ws://{addr}/socket/websocket?vsn=2.0.0")).await;
        let (join_ref, reply) = c
            .join(&topic, json!({"agent_id": agent, "token": token["token"]}))
            .await;
        assert_eq!(reply["status"], "ok", "{reply}");
        let r = c
            .push(
                Some(&join_ref),
                &topic,
                "agent_move",
                json!({"position": {"x": 1, "y": 2, "z": 3}}),
            )
            .await;
        assert_eq!(c.reply_to(&r).await["status"], "ok");
        clients.push(c);
    }
    let (_, before) = http(addr, "GET", &format!("/api/zones/{id}"), None, admin).await;
    assert_eq!(before["active_session_count"], 2);
    assert_eq!(before["seq"], 4);
    let epoch = before["epoch"].clone();
    let pid = daemon.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    daemon.child.wait().unwrap();
    drop(daemon);
    drop(clients);

    let daemon = binary::start(&dir, &["--replies", "durable"]);
    let addr = daemon.addr;
    // Before anyone asks: the listing shows no session of the dead run.
    let ended = eventually(10, async || {
        let (_, page) = http(addr, "GET", "/api/zones", None, admin).await;
        page["zones"][0]["active_session_count"] == 0
    })
    .await;
    assert!(
        ended,
        "the sessions of the crashed run were ended at start-up"
    );
    let (_, after) = http(addr, "GET", &format!("/api/zones/{id}"), None, admin).await;
    assert_eq!(after["active_session_count"], 0);
    assert_eq!(
        after["epoch"], epoch,
        "nothing answered ok was lost: same history"
    );
    let (_, events) = http(
        addr,
        "GET",
        &format!("/api/zones/{id}/events?limit=100"),
        None,
        admin,
    )
    .await;
    let events: Vec<&Value> = events.as_array().unwrap().iter().collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=6).collect::<Vec<_>>(),
        "no gap, no repeat: {events:?}"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "agent_entered",
            "agent_moved",
            "agent_entered",
            "agent_moved",
            "agent_left",
            "agent_left"
        ]
    );
    assert_eq!(after["seq"], 6);
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

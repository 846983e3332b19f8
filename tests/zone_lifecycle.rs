//! A zone's life in memory and across restarts: an idle zone leaves memory once its snapshot
//! is written and comes back exactly as it was (same seq, same epoch); after a crash, the
//! sessions the store still holds are ended (audited `agent_left`) before anyone sees them, and
//! the history goes on where the log stopped, in a new epoch, so that no client is recovered
//! into events the log never got. Its log holds its whole life: `zone_created` at seq 1,
//! `zone_deleted` last, and the log alone rebuilds it.

mod common;

use std::num::NonZeroU64;

use common::server::{Client, http, start_with};
use common::{binary, eventually};
use serde_json::{Value, json};
use thunderline::daemon::config::PipelineFile;
use thunderline::store::StoreError;
use thunderline::zone::{EventKind, ZoneError, ZoneEvent, ZoneState};

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
        reply["response"]["seq"], 2,
        "the join reply carries the seq it reflects (its creation was seq 1)"
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

    // Creation, join, five moves, a consume, a leave: seq 9. Once idle for 300 ms the zone goes.
    let registry = srv.server.zones.registry.clone();
    assert!(registry.live(zone_id).is_some(), "in memory while used");
    assert!(
        eventually(10, async || registry.live(zone_id).is_none()).await,
        "the idle zone left memory"
    );
    let snapshot = registry.store().get_zone(zone_id).await.unwrap();
    assert_eq!(
        snapshot.seq, 9,
        "its latest state was written before it left"
    );
    assert_eq!(snapshot.zone.resources["food"].amount, 43);
    assert!(snapshot.sessions.is_empty());

    // It comes back as it was: the history goes on at seq 10, in the same epoch.
    let token = srv.token("b", &id, json!(3)).await;
    let mut b = Client::connect(&srv.ws_url()).await;
    let (_, reply) = b
        .join(&topic, json!({"agent_id": "b", "token": token}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    assert_eq!(reply["response"]["seq"], 10);
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
    let daemon = binary::start(&dir, &["--replies", "durable"]);
    let addr = daemon.addr;
    let id = daemon
        .zone(json!({"name": "Crash", "permissions": 1, "capacity": 5}))
        .await;
    let topic = format!("zone:{id}");
    let mut clients = Vec::new();
    for agent in ["a", "b"] {
        let (mut c, join_ref, _) = daemon.joined(&id, agent, None).await;
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
    assert_eq!(before["seq"], 5);
    let epoch = before["epoch"].clone();
    daemon.kill_9();
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
    // Nothing answered ok was lost (below), but a writer that stopped uncleanly may have
    // broadcast what the log never got: the history goes on in a new epoch.
    assert_ne!(after["epoch"], epoch, "a crash starts a new epoch");
    let (_, events) = http(
        addr,
        "GET",
        &format!("/api/zones/{id}/events?limit=100"),
        None,
        admin,
    )
    .await;
    let events: Vec<&Value> = events["events"].as_array().unwrap().iter().collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=7).collect::<Vec<_>>(),
        "no gap, no repeat: {events:?}"
    );
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "zone_created",
            "agent_entered",
            "agent_moved",
            "agent_entered",
            "agent_moved",
            "agent_left",
            "agent_left"
        ]
    );
    assert_eq!(after["seq"], 7);
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A zone's creation and deletion are decided by its writer like any change, so its log holds
/// its whole life: `zone_created` (seq 1, with everything it was created with) first,
/// `zone_deleted` last, and the log alone rebuilds the zone that was live. Its row goes only
/// once `zone_deleted` is logged; meanwhile it is gone for every reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zones_log_holds_its_whole_life_from_zone_created_to_zone_deleted() {
    for db in common::backends().await {
        let srv = start_with(Some(db.url.clone()), PipelineFile::default()).await;
        let zone = srv
            .zone(json!({
                "name": "Whole", "capacity": 5, "permissions": 7,
                "resources": {"food": {"amount": 50, "max": 60, "regen": 2}},
                "properties": {"biome": "reef"}
            }))
            .await;
        let id = zone["id"].as_str().unwrap().to_owned();
        let zone_id = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(zone["seq"], 1, "{}: created at seq 1: {zone}", db.name);
        let events = |after: u64| {
            let srv = &srv;
            let id = id.clone();
            async move {
                let (status, body) = srv
                    .api(
                        "GET",
                        &format!("/api/zones/{id}/events?after_seq={after}&limit=1000"),
                        None,
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                serde_json::from_value::<Vec<ZoneEvent>>(body["events"].clone()).unwrap()
            }
        };
        let log = events(0).await;
        assert_eq!(log.len(), 1, "{}", db.name);
        assert_eq!((log[0].name(), log[0].seq), ("zone_created", 1));
        let EventKind::ZoneCreated(created) = &log[0].kind else {
            unreachable!()
        };
        assert_eq!(
            (
                created.name.as_str(),
                created.capacity,
                created.permissions.bits(),
                created.resources["food"].max,
                &created.properties,
                created.epoch.as_str(),
                created.assigned_server.as_str(),
            ),
            (
                "Whole",
                5,
                7,
                60,
                &json!({"biome": "reef"}),
                zone["epoch"].as_str().unwrap(),
                zone["assigned_server"].as_str().unwrap(),
            ),
            "{}: zone_created carries the zone's initial fields",
            db.name
        );

        // A life: an agent comes, moves, consumes; the settings change.
        let topic = format!("zone:{id}");
        let token = srv.token("a", &id, json!(7)).await;
        let mut c = Client::connect(&srv.ws_url()).await;
        let (join_ref, reply) = c
            .join(&topic, json!({"agent_id": "a", "token": token}))
            .await;
        assert_eq!(reply["status"], "ok", "{reply}");
        for (event, payload) in [
            ("agent_move", json!({"position": {"x": 1, "y": 2, "z": 3}})),
            (
                "consume_resource",
                json!({"resource_type": "food", "amount": 4}),
            ),
        ] {
            let r = c.push(Some(&join_ref), &topic, event, payload).await;
            assert_eq!(c.reply_to(&r).await["status"], "ok");
        }
        let (status, patched) = srv
            .api(
                "PATCH",
                &format!("/api/zones/{id}"),
                Some(json!({"name": "Whole II"})),
            )
            .await;
        assert_eq!(status, 200, "{patched}");

        // The log alone, from seq 1 with no snapshot, rebuilds the live zone.
        let log = events(0).await;
        let seqs: Vec<u64> = log.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=log.len() as u64).collect::<Vec<_>>());
        let rebuilt = ZoneState::replay(zone_id, &log).unwrap();
        let live = srv.server.zones.registry.live(zone_id).unwrap();
        assert_eq!(
            rebuilt,
            *live.state(),
            "{}: rebuilt from its log alone",
            db.name
        );
        assert_eq!(rebuilt.zone().name, "Whole II");

        // Deleted: the channel closes, and the log ends with zone_deleted.
        let (status, _) = srv.api("DELETE", &format!("/api/zones/{id}"), None).await;
        assert_eq!(status, 204, "{}", db.name);
        let closed = c.event("phx_close").await;
        assert_eq!(closed[2], json!(topic));
        let log = events(0).await;
        assert_eq!(log.last().unwrap().name(), "zone_deleted", "{}", db.name);
        assert_eq!(log.first().unwrap().name(), "zone_created");
        assert!(ZoneState::replay(zone_id, &log).unwrap().is_deleted());
        // Gone for every reader at once...
        let (status, body) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("zone_not_found"))
        );
        let (_, list) = srv.api("GET", "/api/zones?limit=500", None).await;
        assert!(
            list["zones"]
                .as_array()
                .unwrap()
                .iter()
                .all(|z| z["id"] != json!(id)),
            "{list}"
        );
        let (status, _) = srv
            .api(
                "POST",
                "/api/tokens",
                Some(json!({"agent_id": "a", "zone_id": id, "permissions": 1, "ttl_seconds": 60})),
            )
            .await;
        assert_eq!(status, 404);
        let (status, _) = srv.api("DELETE", &format!("/api/zones/{id}"), None).await;
        assert_eq!(status, 404, "deleting again");
        // ...and its row goes once zone_deleted is in the log.
        let store = srv.server.zones.registry.store().clone();
        assert!(
            eventually(10, async || matches!(
                store.get_zone(zone_id).await,
                Err(StoreError::Zone(ZoneError::ZoneNotFound(_)))
            ))
            .await,
            "{}: the row was removed",
            db.name
        );
        assert!(
            eventually(10, async || srv
                .server
                .zones
                .registry
                .live(zone_id)
                .is_none())
            .await
        );
        let (status, _) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
        assert_eq!(status, 404);
        assert_eq!(events(0).await, log, "the log outlives the zone");
        srv.stop().await;
        db.cleanup().await;
    }
}

/// A creation the zone rules refuse stores nothing: no row, no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_creation_leaves_nothing_behind() {
    let srv = start_with(None, PipelineFile::default()).await;
    let (status, body) = srv
        .api(
            "POST",
            "/api/zones",
            Some(json!({"name": "x", "capacity": 0})),
        )
        .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (422, Some("invalid_zone")),
        "{body}"
    );
    let (status, body) = srv
        .api(
            "POST",
            "/api/zones",
            Some(json!({"name": "x", "colour": "red"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    let (_, list) = srv.api("GET", "/api/zones", None).await;
    assert_eq!(list["total"], 0, "{list}");
    let store = srv.server.zones.registry.store();
    assert_eq!(store.count_events(None).await.unwrap(), 0);
    srv.stop().await;
}

/// A daemon killed (`kill -9`) while its broadcasts ran ahead of the audit log (another process
/// held the SQLite write lock), started again and moved past the last seq a client saw: the
/// zone goes on where its log stopped, in a new epoch, so that client's rejoin with its old
/// `since` is answered `recovered: false` with a fresh snapshot, never with a replay of events
/// that reuse seqs it saw. What the log kept of the old epoch is what was broadcast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_ahead_of_the_log_lost_in_a_crash_start_a_new_epoch() {
    use sqlx::Connection;

    let dir = std::env::temp_dir().join(format!(
        "thunderline-ahead-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let admin = Some(binary::ADMIN);
    let daemon = binary::start(&dir, &["--replies", "applied"]);
    let addr = daemon.addr;
    let id = daemon
        .zone(json!({"name": "Ahead", "permissions": 1, "capacity": 5}))
        .await;
    let topic = format!("zone:{id}");
    let (mut observer, _, joined) = daemon.joined(&id, "observer", None).await;
    let epoch = joined["epoch"].clone();
    let (mut mover, mover_ref, _) = daemon.joined(&id, "mover", None).await;
    // Every event so far is in the log; then another process takes the write lock.
    assert!(
        eventually(10, async || {
            let (_, logged) =
                http(addr, "GET", &format!("/api/zones/{id}/events"), None, admin).await;
            logged["events"].as_array().unwrap().len() >= 3
        })
        .await,
        "its creation and both joins are logged"
    );
    let file = dir.join("thunderline.db");
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();
    for x in 0..20 {
        mover
            .push(
                Some(&mover_ref),
                &topic,
                "agent_move",
                json!({"position": {"x": x, "y": 0, "z": 0}}),
            )
            .await;
    }
    // The observer sees every move broadcast, though none of them can reach the log.
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 20 {
        let moved = observer.event("agent_moved").await;
        seen.insert(
            moved[4]["seq"].as_u64().unwrap(),
            moved[4]["position"].clone(),
        );
    }
    let last_seen = *seen.keys().last().unwrap();
    // The log's end: nothing can be committed while the lock is held (reads go on).
    let (_, logged) = http(addr, "GET", &format!("/api/zones/{id}/events"), None, admin).await;
    let log_end = logged["events"].as_array().unwrap().last().unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert!(
        log_end < last_seen,
        "the moves were broadcast (up to {last_seen}) ahead of the log (up to {log_end})"
    );
    daemon.kill_9();
    drop((observer, mover));
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();

    // Started again: the zone's log ends before what was broadcast.
    let daemon = binary::start(&dir, &["--replies", "applied"]);
    let addr = daemon.addr;
    let (mut mover, mover_ref, rejoined) = daemon.joined(&id, "mover", None).await;
    assert_ne!(rejoined["epoch"], epoch, "a new epoch");
    // Moved past the last seq the observer saw.
    while mover_seq(&mut mover, &mover_ref, &topic).await <= last_seen {}
    let (mut observer, _, reply) = daemon
        .joined(
            &id,
            "observer",
            Some(json!({"seq": last_seen, "epoch": epoch})),
        )
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(reply["epoch"], epoch);
    assert!(reply["seq"].as_u64().unwrap() > last_seen);
    // Nothing old is replayed: the first zone event after the reply is the join's own.
    let first = observer
        .until("a zone event", |f| f[4]["seq"].is_u64())
        .await;
    assert_eq!(first[3], "agent_entered", "{first}");
    assert_eq!(first[4]["seq"], reply["seq"]);
    // What the log kept of the old epoch is what the observer saw under those seqs.
    let (_, log) = http(
        addr,
        "GET",
        &format!("/api/zones/{id}/events?limit=1000"),
        None,
        admin,
    )
    .await;
    for e in log["events"].as_array().unwrap() {
        let seq = e["seq"].as_u64().unwrap();
        if seq <= log_end
            && let Some(position) = seen.get(&seq)
        {
            assert_eq!(&e["payload"]["position"], position, "seq {seq}");
        }
    }
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pushes one move and returns the seq of its broadcast.
async fn mover_seq(mover: &mut Client, join_ref: &str, topic: &str) -> u64 {
    mover
        .push(
            Some(join_ref),
            topic,
            "agent_move",
            json!({"position": {"x": 9, "y": 9, "z": 9}}),
        )
        .await;
    let moved = mover.event("agent_moved").await;
    moved[4]["seq"].as_u64().unwrap()
}

//! A cluster of daemons over NATS, each a child process on a loopback port, sharing NATS and one
//! PostgreSQL schema: any node serves any zone, events and presence cross nodes, the cluster
//! counts sessions as one.

mod common;

use std::time::Duration;

use common::binary::{self, ADMIN, Daemon};
use common::cluster::{Cluster, NATS, Stopped, db, logged_moves, logged_seqs, zone_json};
use common::server::http;
use serde_json::{Value, json};

/// The owner of `zone` (by `assigned_server`) and another node, out of `nodes`.
async fn owner_and_other<'a>(
    nodes: &'a [&'a Daemon; 2],
    names: [&str; 2],
    zone: &str,
) -> (&'a Daemon, &'a Daemon, String) {
    let owner = zone_json(nodes[0], zone).await["assigned_server"]
        .as_str()
        .unwrap()
        .to_owned();
    if owner == names[0] {
        (nodes[0], nodes[1], owner)
    } else {
        assert_eq!(owner, names[1]);
        (nodes[1], nodes[0], owner)
    }
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

/// A client's move with `x` as its mark, answered or not.
async fn push_move(
    client: &mut common::server::Client,
    join_ref: &str,
    zone: &str,
    x: i64,
) -> Value {
    push_move_within(client, join_ref, zone, x, Duration::from_secs(2)).await
}

/// As [`push_move`], waiting up to `wait` for the answer.
async fn push_move_within(
    client: &mut common::server::Client,
    join_ref: &str,
    zone: &str,
    x: i64,
    wait: Duration,
) -> Value {
    let r = client
        .push(
            Some(join_ref),
            &format!("zone:{zone}"),
            "agent_move",
            json!({"position": {"x": x, "y": 0, "z": 0}}),
        )
        .await;
    client.reply_within(&r, wait).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_owner_s_zone_moves_to_a_live_node_with_a_new_epoch_and_nothing_answered_ok_lost_or_doubled()
 {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let zone = a.zone(json!({"name": "crash", "capacity": 10})).await;
    let nodes = [&a, &b];
    let (owner, other, owner_name) = owner_and_other(&nodes, ["a", "b"], &zone).await;
    let epoch = zone_json(other, &zone).await["epoch"].clone();

    // An agent on the owner (its session dies with it), a pusher and a watcher on the other.
    let (_victim, _, _) = owner.joined(&zone, "victim", None).await;
    let (mut pusher, pusher_ref, _) = other.joined(&zone, "pusher", None).await;
    let (mut watcher, _, joined) = other.joined(&zone, "watcher", None).await;
    assert!(
        joined["agents"]
            .as_array()
            .unwrap()
            .contains(&json!("victim"))
    );

    // Pushes through the other node, each waiting for its answer; the owner dies midway.
    let mut answered_ok = Vec::new();
    let mut killed_at: Option<tokio::time::Instant> = None;
    let mut back_at = None;
    let mut x = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while answered_ok.len() < 60 && tokio::time::Instant::now() < deadline {
        x += 1;
        if x == 20 {
            // kill -9: no drain, no goodbye heartbeat (the daemon is reaped when dropped).
            owner.signal("-KILL");
            killed_at = Some(tokio::time::Instant::now());
        }
        let reply = push_move(&mut pusher, &pusher_ref, &zone, x).await;
        match reply["status"].as_str() {
            Some("ok") => {
                if let (Some(at), None) = (killed_at, back_at) {
                    back_at = Some(at.elapsed());
                }
                answered_ok.push(x)
            }
            _ => assert_eq!(reply["response"]["reason"], "unavailable", "{reply}"),
        }
    }
    assert!(killed_at.is_some(), "the owner was killed");
    assert!(
        answered_ok.len() >= 60,
        "pushes work again after the owner died: {answered_ok:?}"
    );
    // Within 3 heartbeats (300 ms) plus a load, with a margin for a busy machine.
    let back_at = back_at.expect("a push was answered ok after the kill");
    assert!(
        back_at < Duration::from_secs(3),
        "pushes worked again after {back_at:?}"
    );

    // The killed node's agent left everyone's presence; the zone is the other node's now, in a
    // new epoch.
    watcher
        .until("the victim's leave", |f| {
            f[3] == "presence_diff" && f[4]["leaves"].get("victim").is_some()
                || f[3] == "presence_state"
                    && f[4].get("victim").is_none()
                    && f[4].get("pusher").is_some()
        })
        .await;
    let now = zone_json(other, &zone).await;
    assert_ne!(
        now["epoch"], epoch,
        "a zone taken over after its owner died starts a new epoch"
    );
    assert_ne!(now["assigned_server"], json!(owner_name));
    assert_eq!(now["active_session_count"], 2, "{now}");

    // A client rejoining with the old epoch gets a fresh snapshot, never a replay of a history
    // the dead owner may have broadcast beyond the log.
    let old = json!({"seq": joined["seq"], "epoch": epoch});
    let (_, _, rejoined) = other.joined(&zone, "watcher", Some(old)).await;
    assert_eq!(rejoined["recovered"], false, "{rejoined}");
    assert_eq!(rejoined["epoch"], now["epoch"]);

    // Every push answered ok is in the audit log exactly once.
    let logged = logged_moves(&cluster, &zone, "pusher").await;
    for x in &answered_ok {
        assert_eq!(
            logged.iter().filter(|l| *l == x).count(),
            1,
            "move {x} once: {logged:?}"
        );
    }
    drop((a, b));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_owner_resumed_after_its_lease_was_taken_over_writes_nothing() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let zone = a.zone(json!({"name": "paused", "capacity": 10})).await;
    let nodes = [&a, &b];
    let (owner, other, _) = owner_and_other(&nodes, ["a", "b"], &zone).await;
    // A client on the owner, whose pushes the owner applies itself.
    let (mut local, local_ref, _) = owner.joined(&zone, "local", None).await;
    assert_eq!(
        push_move(&mut local, &local_ref, &zone, 1).await["status"],
        "ok"
    );
    let (mut remote, remote_ref, _) = other.joined(&zone, "remote", None).await;

    // Moves the owner applies and answers, their events still in its open audit batch (20
    // events or 2 s) when it stops: it would write them once resumed, over the new owner's.
    for x in 100..110 {
        local
            .push(
                Some(&local_ref),
                &format!("zone:{zone}"),
                "agent_move",
                json!({"position": {"x": x, "y": 0, "z": 0}}),
            )
            .await;
    }
    local
        .until("the last move", |f| {
            f[3] == "agent_moved" && f[4]["position"]["x"] == 109.0
        })
        .await;
    {
        owner.signal("-STOP");
        let _resume = Stopped(owner);
        // The other node declares it dead and takes the zone over on the next push (stopped
        // inside an audit write, the owner holds the zone's row until the server ends that
        // transaction, 15 heartbeats later).
        let took = common::eventually(15, async || {
            let wait = Duration::from_secs(10);
            push_move_within(&mut remote, &remote_ref, &zone, 2, wait).await["status"] == "ok"
        })
        .await;
        assert!(took, "the other node took the zone over");
    }
    // Resumed: whatever it still believes, the store takes nothing from it.
    let row = |c: &Cluster| {
        let zone = zone.clone();
        let url = c.db.url.clone();
        async move {
            use sqlx::Connection;
            let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_as::<_, (i64, String, i64)>(
                "SELECT seq, epoch, fence FROM zones WHERE id = $1::uuid",
            )
            .bind(&zone)
            .fetch_one(&mut db)
            .await
            .unwrap()
        }
    };
    let new_owner = zone_json(other, &zone).await;
    // Its client pushes on: the resumed node must not apply them as the zone's writer.
    for x in 10..20 {
        let _ = push_move(&mut local, &local_ref, &zone, x).await;
    }
    let after = push_move(&mut remote, &remote_ref, &zone, 3).await;
    assert_eq!(after["status"], "ok", "{after}");
    let (_, epoch, fence) = row(&cluster).await;
    assert_eq!(json!(epoch), new_owner["epoch"]);
    assert!(fence > 0);
    let mut conn = db(&cluster).await;
    let dead: i64 =
        sqlx::query_scalar("SELECT count(*) FROM audit_dead_letters WHERE zone_id = $1::uuid")
            .bind(&zone)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(
        dead, 0,
        "no stale write reached the log, not even as a refused row"
    );
    // The log holds one history: each seq once, in order, and the moves after the takeover are
    // the new owner's (those the resumed node answered, if any, went through the new owner).
    // Consecutive, but for one hole at most: an audit write the owner was inside of when it
    // stopped is ended by the server (it would hold the zone's row from the next owner), and
    // a later batch of its, written by another of its audit writers, may be in: a crash's
    // hole, after which the next owner begins a new epoch.
    let seqs = logged_seqs(&cluster, &zone).await;
    let holes = seqs.windows(2).filter(|w| w[1] != w[0] + 1).count();
    assert!(
        seqs.windows(2).all(|w| w[1] > w[0]) && holes <= 1,
        "{seqs:?}"
    );
    drop((a, b));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_paused_inside_its_audit_transaction_does_not_hold_the_zone_from_its_next_owner() {
    use sqlx::Connection;
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let zone = a.zone(json!({"name": "locked", "capacity": 10})).await;
    let nodes = [&a, &b];
    let (owner, other, _) = owner_and_other(&nodes, ["a", "b"], &zone).await;
    let (mut local, local_ref, _) = owner.joined(&zone, "local", None).await;
    let (mut remote, remote_ref, _) = other.joined(&zone, "remote", None).await;
    // The owner's next audit write takes the zone's row, then waits for this lock on the log.
    let mut blocker = db(&cluster).await;
    let mut lock = blocker.begin().await.unwrap();
    sqlx::query("LOCK TABLE audit_events IN SHARE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    let stalled = local
        .push(
            Some(&local_ref),
            &format!("zone:{zone}"),
            "agent_move",
            json!({"position": {"x": 1, "y": 0, "z": 0}}),
        )
        .await;
    // This test's connections (other than the one asking) waiting for a lock.
    let waiting = || {
        let tag = cluster.db.tag.clone();
        let url = cluster.db.url.clone();
        async move {
            let mut watch = sqlx::PgConnection::connect(&url).await.unwrap();
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE application_name = $1 AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
            )
            .bind(&tag)
            .fetch_one(&mut watch)
            .await
            .unwrap()
        }
    };
    assert!(
        common::eventually(10, async || waiting().await >= 1).await,
        "the owner's audit write waits for the lock"
    );
    {
        // Paused with its transaction open: once the lock goes, its insert is done and its
        // connection sits idle in the transaction, the zone's row still locked by it (until
        // the server ends a transaction idle that long: too soon to watch for it here).
        owner.signal("-STOP");
        let _resume = Stopped(owner);
        lock.commit().await.unwrap();
        assert!(
            common::eventually(10, async || waiting().await == 0).await,
            "the paused owner's insert is done"
        );
        // The other node declares it dead and takes the zone over, while it is still paused.
        let took = common::eventually(20, async || {
            let wait = Duration::from_secs(20);
            push_move_within(&mut remote, &remote_ref, &zone, 2, wait).await["status"] == "ok"
        })
        .await;
        assert!(
            took,
            "the other node took the zone over while its owner was paused"
        );
    }
    // Resumed: the stalled write is not the log's any more; nothing it answered ok is lost.
    let answer = local.reply_within(&stalled, Duration::from_secs(20)).await;
    let logged = logged_moves(&cluster, &zone, "local").await;
    if answer["status"] == "ok" {
        assert_eq!(logged, [1], "{answer}");
    }
    assert_eq!(
        logged_moves(&cluster, &zone, "remote").await.last(),
        Some(&2)
    );
    let seqs = logged_seqs(&cluster, &zone).await;
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    drop((a, b));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observers_on_three_nodes_see_one_order_while_senders_on_two_push_without_waiting() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let c = cluster.node("c").await;
    let zone = a.zone(json!({"name": "order", "capacity": 10})).await;
    let (mut sender_a, ref_a, _) = a.joined(&zone, "sa", None).await;
    let (mut sender_b, ref_b, _) = b.joined(&zone, "sb", None).await;
    let mut observers = Vec::new();
    for (node, name) in [(&a, "oa"), (&b, "ob"), (&c, "oc")] {
        observers.push(node.joined(&zone, name, None).await.0);
    }
    let topic = format!("zone:{zone}");
    // Both senders fire 100 moves each without waiting for answers.
    for x in 0..100 {
        sender_a
            .push(
                Some(&ref_a),
                &topic,
                "agent_move",
                json!({"position": {"x": x, "y": 0, "z": 0}}),
            )
            .await;
        sender_b
            .push(
                Some(&ref_b),
                &topic,
                "agent_move",
                json!({"position": {"x": x, "y": 1, "z": 0}}),
            )
            .await;
    }
    let mut orders = Vec::new();
    for observer in &mut observers {
        let mut seen = Vec::new();
        while seen.len() < 200 {
            let Some(f) = observer.next().await else {
                break;
            };
            if f[3] == "agent_moved" {
                seen.push((
                    f[4]["seq"].as_u64().unwrap(),
                    f[4]["agent_id"].as_str().unwrap().to_owned(),
                    f[4]["position"]["x"].as_f64().unwrap() as i64,
                ));
            }
        }
        assert_eq!(seen.len(), 200, "every move reached every observer");
        assert!(
            seen.windows(2).all(|w| w[1].0 == w[0].0 + 1),
            "in seq order, no gap"
        );
        // Each sender's moves in the order it sent them.
        for sender in ["sa", "sb"] {
            let xs: Vec<i64> = seen.iter().filter(|s| s.1 == sender).map(|s| s.2).collect();
            assert_eq!(xs, (0..100).collect::<Vec<_>>(), "{sender}");
        }
        orders.push(seen);
    }
    assert_eq!(orders[0], orders[1]);
    assert_eq!(orders[1], orders[2]);
    drop((a, b, c));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_in_a_node_s_broadcasts_is_healed_in_order() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    // b drops every third broadcast message its feeds receive.
    let b = cluster
        .node_with("b", &[("THUNDERLINE_FAULT_DROP_BROADCASTS", "3")])
        .await;
    // A zone a writes, observed on b.
    let mut zone = a.zone(json!({"name": "gaps", "capacity": 10})).await;
    for _ in 0..20 {
        if zone_json(&a, &zone).await["assigned_server"] == "a" {
            break;
        }
        zone = a.zone(json!({"name": "gaps", "capacity": 10})).await;
    }
    assert_eq!(zone_json(&a, &zone).await["assigned_server"], "a");
    let (mut sender, sender_ref, _) = a.joined(&zone, "sender", None).await;
    let (mut observer, _, _) = b.joined(&zone, "observer", None).await;
    for x in 0..60 {
        assert_eq!(
            push_move(&mut sender, &sender_ref, &zone, x).await["status"],
            "ok"
        );
    }
    let mut xs = Vec::new();
    let mut seqs = Vec::new();
    while xs.len() < 60 {
        let Some(f) = observer.next().await else {
            break;
        };
        if f[3] == "agent_moved" {
            xs.push(f[4]["position"]["x"].as_f64().unwrap() as i64);
            seqs.push(f[4]["seq"].as_u64().unwrap());
        }
    }
    assert_eq!(
        xs,
        (0..60).collect::<Vec<_>>(),
        "every move, in order, none skipped"
    );
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
    let healed =
        common::server::metric_now(b.addr, "thunderline_cluster_broadcast_gaps_healed_total")
            .await
            .unwrap_or(0.0);
    assert!(healed > 0.0, "the gaps were healed, not avoided");
    drop((a, b));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_not_ready_until_it_has_listened_to_the_cluster_for_three_heartbeats() {
    let mut cluster = Cluster::new().await;
    let dir = std::env::temp_dir().join(format!("thunderline-{}-slow", cluster.name));
    cluster.dirs.push(dir.clone());
    let node = binary::start(
        &dir,
        &[
            "--database",
            &cluster.db.url,
            "--cluster",
            NATS,
            "--node-id",
            "slow",
            "--cluster-name",
            &cluster.name,
            "--cluster-heartbeat-ms",
            "1000",
        ],
    );
    let (status, body) = http(node.addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "not_joined");
    assert!(
        common::eventually(10, async || http(node.addr, "GET", "/readyz", None, None)
            .await
            .0
            == 200)
        .await
    );
    let metrics = common::server::metrics(node.addr).await;
    assert_eq!(
        common::server::metric(&metrics, "thunderline_cluster_nodes"),
        Some(1.0)
    );
    drop(node);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_agent_session_cap_counts_the_whole_cluster() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let zone = a.zone(json!({"name": "capped", "capacity": 10})).await;
    let (_on_a, _, _) = a.joined(&zone, "twin", None).await;
    let (_also_a, _, _) = a.joined(&zone, "twin", None).await;
    let (_on_b, _, _) = b.joined(&zone, "twin", None).await;
    let (_again_b, _, _) = b.joined(&zone, "twin", None).await;
    // The default cap is 4 sessions per agent in a zone: a fifth, on either node, is refused.
    let (status, token) = http(
        b.addr,
        "POST",
        "/api/tokens",
        Some(json!({"agent_id": "twin", "zone_id": zone, "permissions": 1, "ttl_seconds": 600})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    let mut fifth =
        common::server::Client::connect(&format!("ws://{}/socket/websocket?vsn=2.0.0", b.addr))
            .await;
    let (_, reply) = fifth
        .join(
            &format!("zone:{zone}"),
            json!({"agent_id": "twin", "token": token["token"]}),
        )
        .await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["response"]["reason"], "too_many_sessions");
    assert_eq!(zone_json(&b, &zone).await["active_session_count"], 4);
    drop((a, b));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_joining_at_once_on_a_node_that_follows_the_zone_each_hear_it() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let zone = a.zone(json!({"name": "crowd", "capacity": 50})).await;
    let nodes = [&a, &b];
    let (owner, follower, _) = owner_and_other(&nodes, ["a", "b"], &zone).await;
    // Tokens first, then every join on the follower at once: their answers may come back in
    // any order, and the first answer starts the node's copy of the zone.
    let mut tokens = Vec::new();
    for n in 0..20 {
        let (status, token) = http(
            owner.addr,
            "POST",
            "/api/tokens",
            Some(json!({"agent_id": format!("c{n}"), "zone_id": zone, "permissions": 1, "ttl_seconds": 600})),
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 200, "{token}");
        tokens.push(token["token"].as_str().unwrap().to_owned());
    }
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0", follower.addr);
    let joins = tokens.into_iter().enumerate().map(|(n, token)| {
        let (url, zone) = (url.clone(), zone.clone());
        tokio::spawn(async move {
            let mut client = common::server::Client::connect(&url).await;
            let (_, reply) = client
                .join(
                    &format!("zone:{zone}"),
                    json!({"agent_id": format!("c{n}"), "token": token}),
                )
                .await;
            assert_eq!(reply["status"], "ok", "{reply}");
            client
        })
    });
    let mut clients = Vec::new();
    for join in joins {
        clients.push(join.await.unwrap());
    }
    // A move on the owner reaches every one of them.
    let (mut mover, mover_ref, _) = owner.joined(&zone, "mover", None).await;
    let r = mover
        .push(
            Some(&mover_ref),
            &format!("zone:{zone}"),
            "agent_move",
            json!({"position": {"x": 7, "y": 0, "z": 0}}),
        )
        .await;
    assert_eq!(mover.reply_to(&r).await["status"], "ok");
    for (n, client) in clients.iter_mut().enumerate() {
        let mut heard = false;
        while let Some(f) = client.next().await {
            if f[3] == "agent_moved" && f[4]["agent_id"] == "mover" {
                heard = true;
                break;
            }
        }
        assert!(heard, "client c{n} on the following node heard the move");
    }
    drop((a, b));
    cluster.cleanup().await;
}

//! Operating a cluster: rolling restarts and new nodes lose no one. A node stopped with SIGTERM
//! hands its zones to their next owners (same epoch), answers every push it read, and closes its
//! clients with 1012; they rejoin elsewhere and recover exactly what they missed.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::binary::{ADMIN, Daemon};
use common::cluster::{Cluster, logged_moves, zone_json};
use common::pushers::{Crowd, SharedNodes, lock};
use common::server::http;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_no_push_no_event_and_no_epoch() {
    let mut cluster = Cluster::new().await;
    let names = ["a", "b", "c"];
    let mut daemons: BTreeMap<String, Daemon> = BTreeMap::new();
    let nodes: SharedNodes = Arc::default();
    for name in names {
        let d = cluster.node(name).await;
        lock(&nodes).up.insert(name.into(), d.addr);
        daemons.insert(name.into(), d);
    }
    let a = &daemons["a"];
    let mut zones = Vec::new();
    for i in 0..3 {
        zones.push(
            a.zone(json!({"name": format!("rolling-{i}"), "capacity": 20}))
                .await,
        );
    }
    let mut epochs = Vec::new();
    for zone in &zones {
        epochs.push(zone_json(a, zone).await["epoch"].clone());
    }
    // A pusher on every node in every zone.
    let crowd = Crowd::start(&nodes, a.addr, &zones, &names).await;
    crowd.progress(50).await;

    // Each node in turn    progress(50).await;

    // Each node in turn: SIGTERM, and started again under the same name.
    for name in names {
        lock(&nodes).stopping = Some(name.into());
        let daemon = daemons.remove(name).unwrap();
        let (status, _) = tokio::task::spawn_blocking(move || daemon.terminate())
            .await
            .unwrap();
        assert!(status.success(), "node {name} stopped cleanly: {status}");
        {
            let mut n = lock(&nodes);
            n.up.remove(name);
            n.stopping = None;
        }
        crowd.progress(30).await;
        let again = cluster.node(name).await;
        lock(&nodes).up.insert(name.into(), again.addr);
        daemons.insert(name.into(), again);
        crowd.progress(30).await;
    }
    let finished = crowd.finish().await;

    for (_, run) in &finished {
        assert!(run.wrong.is_empty(), "{}: {:#?}", run.agent, run.wrong);
        assert!(
            run.rejoins.iter().all(|r| *r),
            "{}: every rejoin recovered: {:?}",
            run.agent,
            run.rejoins
        );
        // Closed only by a node that was stopping (clients of the others stay connected), and
        // then with 1012.
        for (node, code, stopping) in &run.closed {
            assert_eq!(
                stopping.as_deref(),
                Some(node.as_str()),
                "{}: closed by {node} while {stopping:?} stopped",
                run.agent
            );
            assert_eq!(*code, Some(1012), "{}: closed by {node}", run.agent);
        }
        let first = &run.agent[2..];
        assert!(
            run.closed.iter().any(|(n, _, _)| n == first),
            "{}: its first node restarted and closed it",
            run.agent
        );
    }
    // Every move answered ok is in the log once; none that was refused or unanswered is.
    let b = &daemons["b"];
    for (i, run) in &finished {
        let i = *i;
        let mut logged = logged_moves(&cluster, &zones[i], &run.agent).await;
        logged.sort_unstable();
        let mut ok = run.ok.clone();
        ok.sort_unstable();
        assert_eq!(logged, ok, "{}'s moves in the log", run.agent);
    }
    for (zone, epoch) in zones.iter().zip(&epochs) {
        assert_eq!(
            &zone_json(b, zone).await["epoch"],
            epoch,
            "a zone handed over keeps its epoch"
        );
    }
    drop(daemons);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_push_whose_answer_died_with_its_node_is_applied_once_when_retried_elsewhere() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let zone = a.zone(json!({"name": "retry", "capacity": 10})).await;
    let owner_name = zone_json(&a, &zone).await["assigned_server"]
        .as_str()
        .unwrap()
        .to_owned();
    let (owner, other) = if owner_name == "a" { (a, b) } else { (b, a) };
    // The client is on the owner: its node applies the push, writes it, and dies before the
    // client reads the answer.
    let (mut client, join_ref, _) = owner.joined(&zone, "carol", None).await;
    let topic = format!("zone:{zone}");
    let keyed = json!({"position": {"x": 42, "y": 0, "z": 0}, "idempotency_key": "move-42"});
    client
        .push(Some(&join_ref), &topic, "agent_move", keyed.clone())
        .await;
    let logged = common::eventually(10, async || {
        logged_moves(&cluster, &zone, "carol").await == vec![42]
    })
    .await;
    assert!(logged, "the push is in the log");
    owner.kill_9();
    drop(client);

    // Retried through the other node, which takes the zone over: applied once, said so.
    let (mut again, again_ref, _) = other.joined(&zone, "carol", None).await;
    let r = again
        .push(Some(&again_ref), &topic, "agent_move", keyed)
        .await;
    let retry = again.reply_to(&r).await;
    assert_eq!(retry["status"], "ok", "{retry}");
    assert_eq!(retry["response"]["duplicate"], true, "{retry}");
    assert_eq!(logged_moves(&cluster, &zone, "carol").await, vec![42]);
    // A new key is a new move.
    let r = again
        .push(
            Some(&again_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 43, "y": 0, "z": 0}, "idempotency_key": "move-43"}),
        )
        .await;
    let fresh = again.reply_to(&r).await;
    assert_eq!(fresh["status"], "ok", "{fresh}");
    assert!(fresh["response"].get("duplicate").is_none(), "{fresh}");
    let logged = common::eventually(10, async || {
        logged_moves(&cluster, &zone, "carol").await == vec![42, 43]
    })
    .await;
    assert!(logged, "{:?}", logged_moves(&cluster, &zone, "carol").await);
    drop(other);
    cluster.cleanup().await;
}

/// `GET /api/cluster` on `node`.
async fn cluster_view(node: &Daemon) -> Value {
    let (status, body) = http(node.addr, "GET", "/api/cluster", None, Some(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The owner of `zone` in a cluster view.
fn owner_in(view: &Value, zone: &str) -> Option<String> {
    view["zones"]
        .as_array()?
        .iter()
        .find(|z| z["zone_id"] == zone)
        .and_then(|z| z["owner"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_drained_through_another_hands_its_zones_over_and_keeps_its_clients() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let c = cluster.node("c").await;
    let nodes = [&a, &b, &c];
    let zone = a.zone(json!({"name": "drained", "capacity": 10})).await;
    let before = zone_json(&a, &zone).await;
    let owner = before["assigned_server"].as_str().unwrap().to_owned();
    let owner_node = match owner.as_str() {
        "a" => &a,
        "b" => &b,
        _ => &c,
    };
    let asker = if owner == "a" { &b } else { &a };
    // A client on the owner, and one elsewhere.
    let (mut local, local_ref, _) = owner_node.joined(&zone, "local", None).await;
    let (mut remote, _, _) = asker.joined(&zone, "remote", None).await;

    // Every node shows itself and the others, alive.
    let view = common::read_until(
        10,
        || cluster_view(asker),
        |v| {
            v["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["alive"] == true))
        },
    )
    .await
    .expect("three nodes alive");
    assert_eq!(
        owner_in(&view, &zone).as_deref(),
        Some(owner.as_str()),
        "{view}"
    );
    for n in view["nodes"].as_array().unwrap() {
        assert!(
            n["incarnation"].as_str().is_some_and(|i| i.len() == 32),
            "{n}"
        );
        assert!(
            n["zones_owned"].is_u64() && n["connections"].is_u64(),
            "{n}"
        );
        assert!(n["forwarded_per_sec"].is_number(), "{n}");
    }
    // The zones' owners are paged as every list is.
    assert_eq!(
        (view["limit"].clone(), view["offset"].clone()),
        (json!(1000), json!(0))
    );
    let total = view["total"].as_u64().expect("a total");
    assert!(
        total >= 1 && view["zones"].as_array().unwrap().len() as u64 == total,
        "{view}"
    );
    let (_, paged) = http(
        asker.addr,
        "GET",
        &format!("/api/cluster?limit=1&offset={total}"),
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(
        (paged["zones"].clone(), paged["limit"].clone()),
        (json!([]), json!(1)),
        "{paged}"
    );
    let (status, refused) =
        http(asker.addr, "GET", "/api/cluster?limit=0", None, Some(ADMIN)).await;
    assert_eq!(
        (status, refused["error"].clone()),
        (400, json!("bad_request")),
        "{refused}"
    );

    // Drained through another node: its zone goes, the node stays, its clients stay.
    let (status, body) = http(
        asker.addr,
        "POST",
        "/api/cluster/drain",
        Some(json!({"node": owner})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["zones_handed_over"], 1, "{body}");
    let moved = common::read_until(
        10,
        || cluster_view(asker),
        |v| {
            owner_in(v, &zone).is_some_and(|o| o != owner)
                && v["nodes"].as_array().unwrap().iter().any(|n| {
                    n["name"] == json!(owner) && n["draining"] == true && n["zones_owned"] == 0
                })
        },
    )
    .await;
    assert!(moved.is_ok(), "{moved:?}");
    let after = zone_json(asker, &zone).await;
    assert_eq!(
        after["epoch"], before["epoch"],
        "a zone handed over keeps its epoch"
    );
    assert_ne!(after["assigned_server"], json!(owner));
    // The drained node's client pushes on (through the new owner) and hears the zone.
    let topic = format!("zone:{zone}");
    let r = local
        .push(
            Some(&local_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 5, "y": 0, "z": 0}}),
        )
        .await;
    assert_eq!(local.reply_to(&r).await["status"], "ok");
    local
        .until("its own move", |f| {
            f[3] == "agent_moved" && f[4]["agent_id"] == "local"
        })
        .await;
    remote
        .until("the drained node's client's move", |f| {
            f[3] == "agent_moved" && f[4]["agent_id"] == "local"
        })
        .await;
    // Both agents are listed by any node (the owner's sessions).
    for node in nodes {
        let (status, agents) = http(
            node.addr,
            "GET",
            &format!("/api/zones/{zone}/agents"),
            None,
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 200, "{agents}");
        let names: Vec<&str> = agents["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["agent_id"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["local", "remote"], "{agents}");
    }
    // An unknown node is refused.
    let (status, body) = http(
        a.addr,
        "POST",
        "/api/cluster/drain",
        Some(json!({"node": "nobody"})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("node_not_found"))
    );
    drop((a, b, c));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_node_ends_the_session_on_another_within_a_second() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let c = cluster.node("c").await;
    let zone = a.zone(json!({"name": "revoked", "capacity": 10})).await;
    let (mut on_c, _, _) = c.joined(&zone, "mallory", None).await;
    let revoked_at = tokio::time::Instant::now();
    let (status, body) = http(
        a.addr,
        "POST",
        "/api/tokens/revoke",
        Some(json!({"agent_id": "mallory", "zone_id": zone})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let closed = on_c
        .until("the revoked session's close", |f| {
            f[3] == "phx_close" && f[4]["reason"] == "token_revoked"
        })
        .await;
    assert!(closed[2] == json!(format!("zone:{zone}")));
    assert!(
        revoked_at.elapsed() < Duration::from_secs(1),
        "closed after {:?}",
        revoked_at.elapsed()
    );
    let gone = common::eventually(5, async || {
        zone_json(&a, &zone).await["active_session_count"] == 0
    })
    .await;
    assert!(gone, "the agent left the zone");
    drop((a, c));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_joins_under_load_takes_its_zones_over_and_loses_no_one() {
    use thunderline::cluster::node::NodeId;
    use thunderline::cluster::ownership::rendezvous;
    let mut cluster = Cluster::new().await;
    let names = ["a", "b", "c"];
    let mut daemons: BTreeMap<String, Daemon> = BTreeMap::new();
    let nodes: SharedNodes = Arc::default();
    for name in names {
        let d = cluster.node(name).await;
        lock(&nodes).up.insert(name.into(), d.addr);
        daemons.insert(name.into(), d);
    }
    let a = &daemons["a"];
    // Two zones that rendezvous hashing gives the fourth node once it is there, two it does not.
    let four: Vec<NodeId> = ["a", "b", "c", "d"]
        .into_iter()
        .map(NodeId::start)
        .collect();
    let (mut to_d, mut stay) = (Vec::new(), Vec::new());
    while to_d.len() < 2 || stay.len() < 2 {
        let zone = a.zone(json!({"name": "growing", "capacity": 20})).await;
        let id: uuid::Uuid = zone.parse().unwrap();
        let goes = rendezvous(id, four.iter()).unwrap().name == "d";
        match (goes, to_d.len() < 2, stay.len() < 2) {
            (true, true, _) => to_d.push(zone),
            (false, _, true) => stay.push(zone),
            _ => {}
        }
    }
    let zones: Vec<String> = to_d.iter().chain(&stay).cloned().collect();
    let mut epochs = Vec::new();
    for zone in &zones {
        epochs.push(zone_json(a, zone).await["epoch"].clone());
    }
    let crowd = Crowd::start(&nodes, a.addr, &zones, &names).await;
    crowd.progress(50).await;
    let d = cluster.node("d").await;
    let took = common::read_until(
        20,
        || cluster_view(&d),
        |v| {
            to_d.iter().all(|z| owner_in(v, z).as_deref() == Some("d"))
                && stay
                    .iter()
                    .all(|z| owner_in(v, z).is_some_and(|o| o != "d"))
        },
    )
    .await;
    assert!(took.is_ok(), "the new node owns its zones: {took:?}");
    crowd.progress(50).await;
    for (i, run) in crowd.finish().await {
        assert!(run.wrong.is_empty(), "{}: {:#?}", run.agent, run.wrong);
        assert!(
            run.closed.is_empty(),
            "{}: no client is disconnected: {:?}",
            run.agent,
            run.closed
        );
        let mut logged = logged_moves(&cluster, &zones[i], &run.agent).await;
        logged.sort_unstable();
        let mut ok = run.ok;
        ok.sort_unstable();
        assert_eq!(logged, ok, "{}'s moves in the log", run.agent);
    }
    for (zone, epoch) in zones.iter().zip(&epochs) {
        assert_eq!(
            &zone_json(&d, zone).await["epoch"],
            epoch,
            "a zone handed over keeps its epoch"
        );
    }
    drop((daemons, d));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_of_any_node_reaches_each_zone_s_owner() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let c = cluster.node("c").await;
    let nodes = [&a, &b, &c];
    let mut zones = Vec::new();
    for i in 0..6 {
        zones.push(
            a.zone(json!({"name": format!("admin-{i}"), "capacity": 10, "permissions": 1}))
                .await,
        );
    }
    // Every node lists every zone, each with its owner.
    let mut owners = BTreeMap::new();
    for zone in &zones {
        owners.insert(
            zone.clone(),
            zone_json(&a, zone).await["assigned_server"].clone(),
        );
    }
    for node in nodes {
        let (status, page) = http(node.addr, "GET", "/api/zones?limit=50", None, Some(ADMIN)).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["total"], 6, "{page}");
        for z in page["zones"].as_array().unwrap() {
            let id = z["id"].as_str().unwrap();
            assert_eq!(z["assigned_server"], owners[id], "{z}");
        }
    }
    // Each change through a node that does not own the zone: applied by the owner, seen by all.
    for (i, zone) in zones.iter().enumerate() {
        let owner = owners[zone].as_str().unwrap();
        let other = [("a", &a), ("b", &b), ("c", &c)]
            .into_iter()
            .find(|(name, _)| *name != owner)
            .unwrap()
            .1;
        let (status, patched) = http(
            other.addr,
            "PATCH",
            &format!("/api/zones/{zone}"),
            Some(json!({"name": format!("renamed-{i}")})),
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 200, "{patched}");
        let (status, granted) = http(
            other.addr,
            "POST",
            &format!("/api/zones/{zone}/permissions"),
            Some(json!({"grant": ["broadcast_events"]})),
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 200, "{granted}");
        let (status, sent) = http(
            other.addr,
            "POST",
            &format!("/api/zones/{zone}/broadcast"),
            Some(json!({"event_type": "storm", "payload": {"n": i}})),
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 200, "{sent}");
        for node in nodes {
            let z = zone_json(node, zone).await;
            assert_eq!(z["name"], json!(format!("renamed-{i}")), "{z}");
            assert_eq!(z["seq"], sent["seq"], "{z}");
        }
    }
    // Deleted through another node: gone everywhere.
    let zone = &zones[0];
    let (status, _) = http(
        b.addr,
        "DELETE",
        &format!("/api/zones/{zone}"),
        None,
        Some(ADMIN),
    )
    .await;
    assert!(status == 200 || status == 204, "{status}");
    for node in nodes {
        let (status, _) = http(
            node.addr,
            "GET",
            &format!("/api/zones/{zone}"),
            None,
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 404);
    }
    drop((a, b, c));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_s_pipelined_pushes_keep_their_order_through_a_hand_over() {
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let c = cluster.node("c").await;
    let zone = a.zone(json!({"name": "ordered", "capacity": 10})).await;
    let owner = zone_json(&a, &zone).await["assigned_server"]
        .as_str()
        .unwrap()
        .to_owned();
    let client_node = [("a", &a), ("b", &b), ("c", &c)]
        .into_iter()
        .find(|(n, _)| *n != owner)
        .unwrap()
        .1;
    let (mut client, join_ref, _) = client_node.joined(&zone, "orderly", None).await;
    let topic = format!("zone:{zone}");
    // Batches of 50 pushes sent without waiting, their answers read after each batch; the owner
    // is drained (its zone handed over) through the admin API once the first batch is on its way.
    let mut drain = None;
    let mut ok = Vec::new();
    let mut x = 0;
    let mut after_drain = 0;
    while after_drain < 3 {
        let mut refs = Vec::new();
        for _ in 0..50 {
            x += 1;
            let r = client
                .push(
                    Some(&join_ref),
                    &topic,
                    "agent_move",
                    json!({"position": {"x": x, "y": 0, "z": 0}}),
                )
                .await;
            refs.push((x, r));
        }
        let drain = drain.get_or_insert_with(|| {
            let (addr, owner) = (client_node.addr, owner.clone());
            tokio::spawn(async move {
                http(
                    addr,
                    "POST",
                    "/api/cluster/drain",
                    Some(json!({"node": owner})),
                    Some(ADMIN),
                )
                .await
            })
        });
        for (x, r) in refs {
            if client.reply_to(&r).await["status"] == "ok" {
                ok.push(x);
            }
        }
        if drain.is_finished() {
            after_drain += 1;
        }
    }
    let drain = drain.unwrap();
    let (status, body) = drain.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["zones_handed_over"], 1, "{body}");
    let logged = logged_moves(&cluster, &zone, "orderly").await;
    assert_eq!(
        logged, ok,
        "every move answered ok, once, in the order sent"
    );
    assert!(ok.len() >= 150, "{ok:?}");
    drop((a, b, c));
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_stopped_at_once_and_started_again_keeps_every_epoch() {
    let mut cluster = Cluster::new().await;
    let mut daemons = Vec::new();
    for name in ["a", "b", "c"] {
        daemons.push(cluster.node(name).await);
    }
    let mut zones = Vec::new();
    for i in 0..6 {
        zones.push(
            daemons[0]
                .zone(json!({"name": format!("all-{i}"), "capacity": 10}))
                .await,
        );
    }
    let mut before = Vec::new();
    for (i, zone) in zones.iter().enumerate() {
        // A session and a move in each, through different nodes.
        let (mut client, join_ref, _) = daemons[i % 3].joined(zone, "walker", None).await;
        let r = client
            .push(
                Some(&join_ref),
                &format!("zone:{zone}"),
                "agent_move",
                json!({"position": {"x": i, "y": 0, "z": 0}}),
            )
            .await;
        assert_eq!(client.reply_to(&r).await["status"], "ok");
        before.push(zone_json(&daemons[0], zone).await["epoch"].clone());
    }
    // SIGTERM to all three at once (a whole deployment stopped), then all started again.
    let stops: Vec<_> = daemons
        .into_iter()
        .map(|d| tokio::task::spawn_blocking(move || d.terminate().0))
        .collect();
    for stop in stops {
        assert!(stop.await.unwrap().success());
    }
    let mut again = Vec::new();
    for name in ["a", "b", "c"] {
        again.push(cluster.node(name).await);
    }
    for (zone, epoch) in zones.iter().zip(&before) {
        let now = zone_json(&again[1], zone).await;
        assert_eq!(&now["epoch"], epoch, "a clean stop keeps the epoch: {now}");
    }
    // Then stopped one after another, each while the one before is still handing its zones on
    // (so zones are taken for a command by a node that starts draining meanwhile), and one
    // started again.
    let [a, b, c]: [Daemon; 3] = again.try_into().ok().unwrap();
    for (stopping, watcher, name) in [(&a, &c, "a"), (&b, &c, "b")] {
        stopping.signal("-TERM");
        let seen = common::eventually(10, async || {
            let view = cluster_view(watcher).await;
            view["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["name"] == name && (n["draining"] == true || n["alive"] == false))
        })
        .await;
        assert!(seen, "node {name} is seen draining");
    }
    c.signal("-TERM");
    let stops: Vec<_> = [a, b, c]
        .into_iter()
        .map(|d| tokio::task::spawn_blocking(move || d.terminate().0))
        .collect();
    for stop in stops {
        assert!(stop.await.unwrap().success());
    }
    let a = cluster.node("a").await;
    for (zone, epoch) in zones.iter().zip(&before) {
        let now = zone_json(&a, zone).await;
        assert_eq!(&now["epoch"], epoch, "stops in turn keep the epoch: {now}");
    }
    drop(a);
    cluster.cleanup().await;
}

//! NATS restarted under a cluster's load: the nodes keep their clients and their leases (nobody
//! is declared dead for NATS's silence), pushes wait or are refused meanwhile, and nothing
//! answered `ok` is lost. This test stops the machine's NATS server for 5 s and starts it again,
//! whatever happens (a guard starts it when the test ends).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::binary::{ADMIN, Daemon};
use common::cluster::{Cluster, logged_moves, zone_json};
use common::pushers::{SharedNodes, lock, push_until_stopped};
use common::server::http;
use common::services::{NatsBack, start_nats, stop_nats};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_for_five_seconds_under_load_loses_nothing_answered_ok() {
    let _back = NatsBack;
    let mut cluster = Cluster::new().await;
    let names = ["a", "b"];
    let mut daemons: BTreeMap<String, Daemon> = BTreeMap::new();
    let nodes: SharedNodes = Arc::default();
    for name in names {
        let d = cluster.node(name).await;
        lock(&nodes).up.insert(name.into(), d.addr);
        daemons.insert(name.into(), d);
    }
    let a = &daemons["a"];
    let mut zones = Vec::new();
    for i in 0..2 {
        zones.push(
            a.zone(json!({"name": format!("outage-{i}"), "capacity": 20}))
                .await,
        );
    }
    let mut before = Vec::new();
    for zone in &zones {
        before.push(zone_json(a, zone).await);
    }
    let answered = Arc::new(AtomicU64::new(0));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let mut runs = Vec::new();
    for (i, zone) in zones.iter().enumerate() {
        for name in names {
            let agent = format!("z{i}{name}");
            let (status, token) = http(
                a.addr,
                "POST",
                "/api/tokens",
                Some(json!({"agent_id": agent, "zone_id": zone, "permissions": 1, "ttl_seconds": 600})),
                Some(ADMIN),
            )
            .await;
            assert_eq!(status, 200, "{token}");
            runs.push((
                i,
                tokio::spawn(push_until_stopped(
                    nodes.clone(),
                    name.into(),
                    zone.clone(),
                    agent,
                    token["token"].as_str().unwrap().to_owned(),
                    answered.clone(),
                    stop_rx.clone(),
                )),
            ));
        }
    }
    let progress = async |at_least: u64| {
        let from = answered.load(Ordering::Relaxed);
        let moved = common::eventually(60, async || {
            answered.load(Ordering::Relaxed) >= from + at_least
        })
        .await;
        assert!(moved, "the pushers are answered");
    };
    progress(40).await;
    // The outage is the scenario: NATS away for 5 s, under load.
    tokio::task::spawn_blocking(|| {
        stop_nats();
        std::thread::sleep(Duration::from_secs(5));
        start_nats();
    })
    .await
    .unwrap();
    // Pushes work again on every node, across nodes too.
    progress(80).await;
    stop.send_replace(true);
    for (i, run) in runs {
        let run = run.await.unwrap();
        assert!(
            run.closed.is_empty(),
            "{}: stayed connected: {:?}",
            run.agent,
            run.closed
        );
        assert!(run.wrong.is_empty(), "{}: {:#?}", run.agent, run.wrong);
        let mut logged = logged_moves(&cluster, &zones[i], &run.agent).await;
        logged.sort_unstable();
        let mut ok = run.ok;
        ok.sort_unstable();
        assert!(!ok.is_empty(), "{} was answered", run.agent);
        assert_eq!(
            logged, ok,
            "{}'s moves in the log: every ok once, nothing else",
            run.agent
        );
    }
    // Nobody took a zone over: the same owners, the same epochs.
    for (zone, was) in zones.iter().zip(&before) {
        let now = zone_json(a, zone).await;
        assert_eq!(now["epoch"], was["epoch"], "{now}");
        assert_eq!(now["assigned_server"], was["assigned_server"], "{now}");
    }
    drop(daemons);
    cluster.cleanup().await;
}

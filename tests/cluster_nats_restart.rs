//! NATS restarted under a cluster's load: the nodes keep their clients and their leases (nobody
//! is declared dead for NATS's silence), pushes wait or are refused meanwhile, and nothing
//! answered `ok` is lost. This test stops the machine's NATS server for 5 s and starts it again,
//! whatever happens (a guard starts it when the test ends).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::binary::Daemon;
use common::cluster::{Cluster, logged_moves, zone_json};
use common::pushers::{Crowd, SharedNodes, lock};
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
    let crowd = Crowd::start(&nodes, a.addr, &zones, &names).await;
    crowd.progress(40).await;
    // The outage is the scenario: NATS away for 5 s, under load.
    tokio::task::spawn_blocking(|| {
        stop_nats();
        std::thread::sleep(Duration::from_secs(5));
        start_nats();
    })
    .await
    .unwrap();
    // Pushes work again on every node, across nodes too.
    crowd.progress(80).await;
    for (i, run) in crowd.finish().await {
        // Known and open (issue 24's note): the events a follower heals at once after the
        // outage can overflow a client's outbound queue, which is then closed as a slow
        // consumer (1011) and rejoins, recovered. Any other close fails the test.
        let closed: Vec<_> = run
            .closed
            .iter()
            .filter(|(_, code, _)| *code != Some(1011))
            .collect();
        assert!(
            closed.is_empty(),
            "{}: stayed connected: {:?}",
            run.agent,
            run.closed
        );
        assert!(
            run.rejoins.iter().all(|r| *r),
            "{}: {:?}",
            run.agent,
            run.rejoins
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

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

/// One NATS outage at a time: the tests of this file stop the same server.
static OUTAGE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stopped_for_five_seconds_under_load_loses_nothing_answered_ok() {
    let _one = OUTAGE.lock().await;
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
        assert!(
            run.closed.is_empty(),
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

/// What a zone's owner applied while NATS was away reaches a client on another node when NATS
/// is back: every event, in order, and the client stays connected however many came at once (a
/// client reading as fast as it can is not a slow consumer because its node heard a backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_after_a_nats_outage_reaches_a_follower_s_client_in_order_without_closing_it() {
    // Ten senders of 300 moves each (within a client's burst of frames): 3,000 events, three
    // times a client's outbound queue.
    const SENDERS: i64 = 10;
    const MOVES: i64 = 300;
    let _one = OUTAGE.lock().await;
    let _back = NatsBack;
    let mut cluster = Cluster::new().await;
    let a = cluster.node("a").await;
    let b = cluster.node("b").await;
    let mut zone = a.zone(json!({"name": "backlog", "capacity": 20})).await;
    for _ in 0..20 {
        if zone_json(&a, &zone).await["assigned_server"] == "a" {
            break;
        }
        zone = a.zone(json!({"name": "backlog", "capacity": 20})).await;
    }
    assert_eq!(zone_json(&a, &zone).await["assigned_server"], "a");
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        senders.push(a.joined(&zone, &format!("sender-{s}"), None).await);
    }
    let (mut observer, _, _) = b.joined(&zone, "observer", None).await;
    let topic = format!("zone:{zone}");
    // The owner applies moves while NATS is away (pipelined, a window at a time).
    let outage = tokio::task::spawn_blocking(|| {
        stop_nats();
        std::thread::sleep(Duration::from_secs(3));
        start_nats();
    });
    let mut pushing = Vec::new();
    for (s, (mut sender, sender_ref, _)) in (0..SENDERS).zip(senders) {
        let topic = topic.clone();
        pushing.push(tokio::spawn(async move {
            let mut answered = 0;
            for window in (0..MOVES).collect::<Vec<_>>().chunks(100) {
                let mut refs = std::collections::HashSet::new();
                for x in window {
                    let position = json!({"position": {"x": s * 1000 + x, "y": 0, "z": 0}});
                    refs.insert(
                        sender
                            .push(Some(&sender_ref), &topic, "agent_move", position)
                            .await,
                    );
                }
                while !refs.is_empty() {
                    let f = sender
                        .next_within(Duration::from_secs(20))
                        .await
                        .expect("the sender stays connected");
                    if f[3] == "phx_reply" && refs.remove(f[1].as_str().unwrap()) {
                        assert_eq!(f[4]["status"], "ok", "{f}");
                        answered += 1;
                    }
                }
            }
            answered
        }));
    }
    let mut heard: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    let mut moves = 0;
    // Every event's seq (ticks come between the moves).
    let mut seqs = Vec::new();
    while moves < SENDERS * MOVES {
        let Some(f) = observer.next_within(Duration::from_secs(20)).await else {
            break;
        };
        if let Some(seq) = f[4]["seq"].as_u64() {
            seqs.push(seq);
        }
        if f[3] == "agent_moved" {
            let x = f[4]["position"]["x"].as_f64().unwrap() as i64;
            heard.entry(x / 1000).or_default().push(x % 1000);
            moves += 1;
        }
    }
    outage.await.unwrap();
    for p in pushing {
        assert_eq!(p.await.unwrap(), MOVES);
    }
    assert_eq!(
        moves,
        SENDERS * MOVES,
        "every move reached the observer, which stayed connected"
    );
    for (s, xs) in &heard {
        assert_eq!(
            xs,
            &(0..MOVES).collect::<Vec<_>>(),
            "sender {s}: in order, none twice"
        );
    }
    let gaps: Vec<_> = seqs.windows(2).filter(|w| w[1] != w[0] + 1).collect();
    assert!(gaps.is_empty(), "no gap in seq: {gaps:?}");
    drop((a, b));
    cluster.cleanup().await;
}

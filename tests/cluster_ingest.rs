//! Broker commands into a cluster: three nodes consume one JetStream consumer (or one RabbitMQ
//! queue), each forwards a command for a zone another node owns to the owner and settles the
//! broker message by the owner's outcome. One node is killed with `-9` mid-stream: every valid
//! command is in the audit log exactly once, every poisoned one in the dead letters.

mod common;

use std::collections::{HashMap, HashSet};

use common::binary::ADMIN;
use common::cluster::Cluster;
use common::server::http;
use serde_json::json;
use uuid::Uuid;

mod brokers;
use brokers::{Broker, Kind, Sent, audited, command};

const TOTAL: usize = 3_000;
const ZONES: usize = 3;

async fn a_node_killed_mid_stream_loses_and_doubles_nothing(kind: Kind) {
    let mut cluster = Cluster::new().await;
    let broker = Broker::new(kind).await;
    let dir = std::env::temp_dir().join(format!("thunderline-ingest-{}", cluster.name));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("pipeline.toml");
    std::fs::write(&config, broker.pipeline_file()).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let a = cluster.node_args("a", &args).await;
    let b = cluster.node_args("b", &args).await;
    let c = cluster.node_args("c", &args).await;

    let mut zones = Vec::new();
    for _ in 0..ZONES {
        let (status, zone) = http(
            a.addr,
            "POST",
            "/api/zones",
            Some(json!({
                "name": "Quarry",
                "capacity": 100,
                "permissions": 0x03,
                "resources": {"stone": {"amount": 1000000, "max": 1000000, "regen": 0}}
            })),
            Some(ADMIN),
        )
        .await;
        assert_eq!(status, 201, "{zone}");
        zones.push(zone["id"].as_str().unwrap().to_owned());
    }
    let commands: Vec<(Uuid, Vec<u8>, Sent, String)> = (0..TOTAL)
        .map(|i| {
            let zone = &zones[i % ZONES];
            let (id, body, sent) = command(i, zone);
            (id, body, sent, zone.clone())
        })
        .collect();
    let publisher = {
        let broker = broker.clone();
        let commands = commands.clone();
        tokio::spawn(async move {
            for (id, body, _, zone) in &commands {
                broker.publish(zone, *id, body).await;
            }
        })
    };
    // Killed once a fifth of the commands are in, while the others are still coming.
    let started = common::eventually(60, async || {
        audited(&cluster.db.url).await.len() >= TOTAL / 5
    })
    .await;
    assert!(started, "the cluster consumes the commands");
    b.kill_9();
    publisher.await.unwrap();

    let valid: HashSet<Uuid> = commands
        .iter()
        .filter(|c| c.2 == Sent::Valid)
        .map(|c| c.0)
        .collect();
    let poisoned: HashMap<Uuid, Sent> = commands
        .iter()
        .filter(|c| c.2 != Sent::Valid)
        .map(|c| (c.0, c.2))
        .collect();
    // Until everything is in (what the killed node held comes back after the broker's ack
    // wait), read every quarter second: the dead letters are a stream or a queue to read.
    // Everything is in once the broker holds nothing more either: a command logged may still
    // be on its way again (a redelivery of what the killed node held, one given back by a
    // node that could not decide it then), and must be settled by the nodes before they stop.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut poll = tokio::time::interval(std::time::Duration::from_millis(250));
    let (log, dead) = loop {
        poll.tick().await;
        let log = audited(&cluster.db.url).await;
        let dead = broker.dead_letters().await;
        let done = valid.iter().all(|id| log.contains_key(id))
            && poisoned.keys().all(|id| dead.contains_key(id))
            && broker.unsettled().await.is_none();
        if done || tokio::time::Instant::now() > deadline {
            break (log, dead);
        }
    };
    let missing: Vec<_> = valid.iter().filter(|id| !log.contains_key(id)).collect();
    let twice: Vec<_> = log.iter().filter(|(_, n)| **n != 1).collect();
    let stray: Vec<_> = log.keys().filter(|id| !valid.contains(id)).collect();
    // Which way each went: dead-lettered (with the reason) or lost (neither logged nor
    // dead-lettered: acknowledged unapplied, or still with the broker).
    let (dead_lettered, lost): (Vec<&Uuid>, Vec<&Uuid>) =
        missing.iter().partition(|id| dead.contains_key(id));
    assert!(
        missing.is_empty(),
        "{} valid commands not audited: {} lost, e.g. {:?}; {} dead-lettered, e.g. {:?}",
        missing.len(),
        lost.len(),
        &lost[..lost.len().min(5)],
        dead_lettered.len(),
        dead_lettered
            .iter()
            .take(5)
            .map(|id| (id, &dead[id]))
            .collect::<Vec<_>>()
    );
    assert!(
        twice.is_empty(),
        "{} commands audited more than once (id, times): {:?}",
        twice.len(),
        &twice[..twice.len().min(5)]
    );
    assert!(stray.is_empty(), "poisoned commands audited: {stray:?}");
    for (id, sent) in &poisoned {
        let reason = dead
            .get(id)
            .unwrap_or_else(|| panic!("poisoned command {id} ({sent:?}) is not dead-lettered"));
        let expected = match sent {
            Sent::NotJson => "not_json",
            _ => "invalid_payload",
        };
        assert!(reason.starts_with(expected), "{id}: {reason}");
    }
    let unknown: Vec<_> = dead
        .iter()
        .filter(|(id, _)| !poisoned.contains_key(id))
        .collect();
    assert!(
        unknown.is_empty(),
        "valid commands dead-lettered: {unknown:?}"
    );

    for node in [a, c] {
        let (status, _) = tokio::task::spawn_blocking(move || node.terminate())
            .await
            .unwrap();
        assert!(status.success());
    }
    broker.assert_settled().await;
    broker.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
    cluster.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_commands_into_a_cluster_survive_a_node_killed_mid_stream() {
    a_node_killed_mid_stream_loses_and_doubles_nothing(Kind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_commands_into_a_cluster_survive_a_node_killed_mid_stream() {
    a_node_killed_mid_stream_loses_and_doubles_nothing(Kind::Rabbitmq).await;
}

//! Zone commands from real brokers into the daemon: `thunderline serve` with a `[sources.*]`
//! section, PostgreSQL for the audit log, and the broker at its usual address.
//!
//! - 3,000 commands over 3 zones, 1 in 50 poisoned (half an invalid payload, half not JSON),
//!   with the daemon killed (`kill -9`) while it consumes them and started again: every valid
//!   command is in the audit log exactly once, every poisoned one is in the dead letters.
//! - A broker command's events reach the zone's WebSocket subscribers, with their seq.
//!
//! Each test declares streams or queues of its own and removes them at the end.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::binary;
use common::server::{self, Client, http};
use serde_json::{Value, json};
use tokio::time::Instant;
use uuid::Uuid;

mod brokers;
use brokers::{Broker, Kind, Sent, audited, command};

const TOTAL: usize = 3_000;
const ZONES: usize = 3;

fn zone_body() -> Value {
    json!({
        "name": "Quarry",
        "capacity": 100,
        "permissions": 0x03,
        "resources": {"stone": {"amount": 1000000, "max": 1000000, "regen": 0}}
    })
}

async fn kill_9_mid_stream_loses_nothing_and_applies_nothing_twice(kind: Kind) {
    let Some(db) = common::postgres().await else {
        return;
    };
    let broker = Broker::new(kind).await;
    let dir = std::env::temp_dir().join(format!("thunderline-broker-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // A data directory: its owner's only, or serve refuses it.
    #[cfg(unix)]
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let config = dir.join("pipeline.toml");
    std::fs::write(&config, broker.pipeline_file()).unwrap();
    let args = ["--config", config.to_str().unwrap(), "--database", &db.url];
    let mut daemon = binary::start(&dir, &args);

    let mut zones = Vec::new();
    for _ in 0..ZONES {
        let (status, zone) = http(
            daemon.addr,
            "POST",
            "/api/zones",
            Some(zone_body()),
            Some(binary::ADMIN),
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

    // Published over about 3 s; the daemon is killed 1.2 s in, while it consumes them.
    let publisher = {
        let broker = broker.clone();
        let commands = commands.clone();
        tokio::spawn(async move {
            for chunk in commands.chunks(100) {
                for (id, body, _, zone) in chunk {
                    broker.publish(zone, *id, body).await;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let status = std::process::Command::new("kill")
        .args(["-9", &daemon.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    daemon.child.wait().unwrap();
    drop(daemon);
    let before = audited(&db.url).await.len();
    publisher.await.unwrap();

    let daemon = binary::start(&dir, &args);
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
    let deadline = Instant::now() + Duration::from_secs(60);
    let (log, dead) = loop {
        let log = audited(&db.url).await;
        let dead = broker.dead_letters().await;
        let done = valid.iter().all(|id| log.contains_key(id))
            && poisoned.keys().all(|id| dead.contains_key(id));
        if done || Instant::now() > deadline {
            break (log, dead);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "{kind:?}: {before} commands audited before the kill, {} after the restart; {} dead letters",
        log.len(),
        dead.len()
    );
    let (status, _) = daemon.terminate();
    assert!(status.success());

    let missing: Vec<_> = valid.iter().filter(|id| !log.contains_key(id)).collect();
    let twice: Vec<_> = log.iter().filter(|(_, n)| **n != 1).collect();
    let stray: Vec<_> = log.keys().filter(|id| !valid.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} valid commands not audited: {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        twice.is_empty(),
        "commands audited more than once: {twice:?}"
    );
    assert!(stray.is_empty(), "poisoned commands audited: {stray:?}");
    for (id, sent) in &poisoned {
        let Some(reason) = dead.get(id) else {
            panic!("poisoned command {id} ({sent:?}) is not in the dead letters");
        };
        let expected = match sent {
            Sent::NotJson => "not_json",
            _ => "invalid_payload",
        };
        assert!(reason.starts_with(expected), "{id}: {reason}");
    }
    let unknown: Vec<_> = dead
        .keys()
        .filter(|id| !poisoned.contains_key(id))
        .collect();
    assert!(
        unknown.is_empty(),
        "valid commands dead-lettered: {unknown:?}"
    );
    broker.assert_settled().await;
    broker.cleanup().await;
    db.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn broker_commands_are_broadcast_to_the_zone(kind: Kind) {
    let broker = Broker::new(kind).await;
    let mut file: thunderline::daemon::config::PipelineFile =
        toml::from_str(&broker.pipeline_file()).unwrap();
    file.tick_interval_ms = std::num::NonZeroU64::new(3_600_000).unwrap();
    let srv = server::start_with(None, file).await;
    let zone = srv.zone(zone_body()).await;
    let zone = zone["id"].as_str().unwrap().to_owned();
    let token = srv.token("watcher", &zone, json!(["spawn_agents"])).await;
    let mut client = Client::connect(&srv.ws_url()).await;
    let topic = format!("zone:{zone}");
    let (_, reply) = client
        .join(&topic, json!({"agent_id": "watcher", "token": token}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let first_seq = reply["response"]["seq"].as_u64().unwrap();
    for i in 0..10 {
        let id = Uuid::now_v7();
        let body = json!({"id": id, "zone_id": zone, "agent_id": "npc", "type": "agent_move", "payload": {"position": {"x": i, "y": 1, "z": 2}}});
        broker.publish(&zone, id, body.to_string().as_bytes()).await;
    }
    let mut seqs = Vec::new();
    for i in 0..10 {
        let moved = client.until("agent_moved", |f| f[3] == "agent_moved").await;
        assert_eq!(moved[4]["agent_id"], "npc");
        assert_eq!(moved[4]["position"]["x"].as_f64(), Some(f64::from(i)));
        seqs.push(moved[4]["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, (first_seq + 1..first_seq + 11).collect::<Vec<_>>());
    srv.stop().await;
    broker.cleanup().await;
}

/// A service moves its agent with the broker command `migrate`: the agent's session in A ends
/// (its channel closed as `migrated`), it begins in B (`agent_entered` with `from`); the same
/// message again moves nothing; one for an agent not in A is dead-lettered `not_joined`.
async fn broker_migrate_moves_a_services_agent(kind: Kind) {
    let broker = Broker::new(kind).await;
    let file: thunderline::daemon::config::PipelineFile =
        toml::from_str(&broker.pipeline_file()).unwrap();
    let srv = server::start_with(None, file).await;
    let a = srv.zone(zone_body()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = srv.zone(zone_body()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut rover = Client::connect(&srv.ws_url()).await;
    let token = srv.token("rover", &a, json!(["spawn_agents"])).await;
    let (_, reply) = rover
        .join(
            &format!("zone:{a}"),
            json!({"agent_id": "rover", "token": token}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut watcher = Client::connect(&srv.ws_url()).await;
    let token = srv.token("watcher", &b, json!(["spawn_agents"])).await;
    let (_, reply) = watcher
        .join(
            &format!("zone:{b}"),
            json!({"agent_id": "watcher", "token": token}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");

    let id = Uuid::now_v7();
    let body = json!({"id": id, "zone_id": a, "agent_id": "rover", "type": "migrate", "payload": {"to": b}});
    broker.publish(&a, id, body.to_string().as_bytes()).await;
    let entered = watcher
        .until("rover's arrival", |f| {
            f[3] == "agent_entered" && f[4]["agent_id"] == "rover"
        })
        .await;
    assert_eq!(entered[4]["from"], json!(a));
    let closed = rover.until("phx_close", |f| f[3] == "phx_close").await;
    assert_eq!(closed[4]["reason"], "migrated");
    assert_eq!(closed[4]["to"], json!(b));
    // Delivered again: the same migration, done already.
    broker.publish(&a, id, body.to_string().as_bytes()).await;
    let stray = Uuid::now_v7();
    let body = json!({"id": stray, "zone_id": a, "agent_id": "nobody", "type": "migrate", "payload": {"to": b}});
    broker.publish(&a, stray, body.to_string().as_bytes()).await;
    let dead = common::read_until(10, || broker.dead_letters(), |d| d.contains_key(&stray))
        .await
        .expect("the stray migrate is dead-lettered");
    assert!(dead[&stray].starts_with("not_joined"), "{}", dead[&stray]);
    assert!(
        !dead.contains_key(&id),
        "the migration is not dead-lettered: {:?}",
        dead.get(&id)
    );
    broker.assert_settled().await;
    let (_, events) = srv
        .api("GET", &format!("/api/zones/{b}/events?limit=1000"), None)
        .await;
    let reserved = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "migration_reserved")
        .count();
    assert_eq!(reserved, 1, "moved once");
    let (_, zone_b) = srv.api("GET", &format!("/api/zones/{b}"), None).await;
    assert_eq!(zone_b["active_session_count"], 2);
    let (_, zone_a) = srv.api("GET", &format!("/api/zones/{a}"), None).await;
    assert_eq!(zone_a["active_session_count"], 0);
    srv.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_migrate_moves_a_services_agent() {
    broker_migrate_moves_a_services_agent(Kind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_migrate_moves_a_services_agent() {
    broker_migrate_moves_a_services_agent(Kind::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_kill_9_mid_stream_loses_nothing_and_applies_nothing_twice() {
    kill_9_mid_stream_loses_nothing_and_applies_nothing_twice(Kind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_commands_are_broadcast_to_the_zone() {
    broker_commands_are_broadcast_to_the_zone(Kind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_kill_9_mid_stream_loses_nothing_and_applies_nothing_twice() {
    kill_9_mid_stream_loses_nothing_and_applies_nothing_twice(Kind::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_commands_are_broadcast_to_the_zone() {
    broker_commands_are_broadcast_to_the_zone(Kind::Rabbitmq).await;
}

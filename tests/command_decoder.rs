//! One command decoder for every front door: a socket push and a broker command with the same
//! type and payload get the same answer — the socket's error reply `{reason, details}`, and the
//! broker's dead letter with the reason `<reason>: <details>` — whether the decoder refuses them
//! (an unknown field, a value of another type, a name that is no command) or the zone does.
//! Against the real daemon, NATS JetStream and RabbitMQ.

mod common;

use std::time::Duration;

use common::eventually;
use common::server::{self, Client};
use serde_json::{Value, json};
use uuid::Uuid;

mod brokers;
use brokers::{Broker, Kind};

/// (command type, payload) pairs that are refused, each for its own reason.
fn refused() -> Vec<(&'static str, Value)> {
    vec![
        // Unknown fields, at the top and inside.
        (
            "agent_move",
            json!({"position": {"x": 1, "y": 2, "z": 3}, "speed": 9}),
        ),
        (
            "agent_move",
            json!({"position": {"x": 1, "y": 2, "z": 3, "w": 4}}),
        ),
        (
            "broadcast_event",
            json!({"event_type": "storm", "payload": {}, "loud": true}),
        ),
        ("get_zone_state", json!({"verbose": true})),
        // Values of another type, or missing.
        (
            "consume_resource",
            json!({"resource_type": "food", "amount": 1.5}),
        ),
        ("agent_interact", json!({"kind": "wave"})),
        // The zone's own refusals: an amount below 1, a resource it does not have.
        (
            "consume_resource",
            json!({"resource_type": "food", "amount": 0}),
        ),
        (
            "consume_resource",
            json!({"resource_type": "gold", "amount": 1}),
        ),
        // No command at all.
        ("teleport", json!({"to": "moon"})),
    ]
}

async fn a_socket_push_and_a_broker_command_get_the_same_answer(kind: Kind) {
    let broker = Broker::new(kind).await;
    let file = toml::from_str(&broker.pipeline_file()).unwrap();
    let srv = server::start_with(None, file).await;
    let zone = srv
        .zone(json!({
            "name": "Same", "permissions": 7,
            "resources": {"food": {"amount": 10, "max": 10, "regen": 0}}
        }))
        .await;
    let zone = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{zone}");
    let token = srv.token("a", &zone, json!(7)).await;
    let mut client = Client::connect(&srv.ws_url()).await;
    let (join_ref, reply) = client
        .join(&topic, json!({"agent_id": "a", "token": token}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");

    let mut expected = Vec::new();
    for (event, payload) in refused() {
        let r = client
            .push(Some(&join_ref), &topic, event, payload.clone())
            .await;
        let answer = client.reply_to(&r).await;
        assert_eq!(answer["status"], "error", "{event} {payload}: {answer}");
        let reason = answer["response"]["reason"].as_str().unwrap().to_owned();
        let details = answer["response"]["details"].as_str().unwrap().to_owned();
        let id = Uuid::now_v7();
        let body =
            json!({"id": id, "zone_id": zone, "agent_id": "a", "type": event, "payload": payload});
        broker.publish(&zone, id, body.to_string().as_bytes()).await;
        expected.push((id, format!("{reason}: {details}"), event, payload));
    }
    let mut dead = Default::default();
    let all_dead = eventually(30, async || {
        dead = broker.dead_letters().await;
        expected.iter().all(|(id, ..)| dead.contains_key(id))
    })
    .await;
    assert!(
        all_dead,
        "{kind:?}: not every command was dead-lettered: {dead:?}"
    );
    for (id, answer, event, payload) in &expected {
        assert_eq!(
            &dead[id], answer,
            "{kind:?}: {event} {payload}: the broker's dead letter and the socket's reply differ"
        );
    }
    let reasons: Vec<&str> = expected
        .iter()
        .map(|(_, answer, ..)| answer.split(':').next().unwrap())
        .collect();
    assert_eq!(
        reasons,
        [
            "invalid_payload",
            "invalid_payload",
            "invalid_payload",
            "invalid_payload",
            "invalid_payload",
            "invalid_payload",
            "invalid_payload",
            "unknown_resource",
            "unknown_event"
        ]
    );
    // Nothing refused reached the zone's log: its creation and the join only.
    let (_, events) = srv
        .api("GET", &format!("/api/zones/{zone}/events"), None)
        .await;
    assert_eq!(events["events"].as_array().unwrap().len(), 2, "{events}");
    tokio::time::timeout(Duration::from_secs(30), srv.stop())
        .await
        .expect("the server stops");
    broker.assert_settled().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_commands_are_decoded_as_socket_pushes_are() {
    a_socket_push_and_a_broker_command_get_the_same_answer(Kind::Nats).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_commands_are_decoded_as_socket_pushes_are() {
    a_socket_push_and_a_broker_command_get_the_same_answer(Kind::Rabbitmq).await;
}

//! The zone channels over a real WebSocket, driven by a tokio-tungstenite client against the
//! real daemon: joins and their errors, pushes and replies, broadcasts and their reach,
//! presence, permissions re-checked on every push, leaves, duplicate joins, bad input.

mod common;

use std::time::Duration;

use common::server::{Client, TestServer, http, start};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn server() -> TestServer {
    start(None).await
}

fn zone_body(capacity: u32, permissions: u32) -> Value {
    json!({
        "name": "Glade",
        "capacity": capacity,
        "permissions": permissions,
        "resources": {"food": {"amount": 100, "max": 100, "regen": 5}},
        "properties": {"biome": "forest"}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_replies_with_the_zone_then_presence_and_refuses_precisely() {
    let srv = server().await;
    let zone = srv.zone(zone_body(1, 0x03)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");

    let token = srv.token("alice", id, json!(["spawn_agents"])).await;
    let mut alice = Client::connect(&srv.ws_url()).await;
    let (join_ref, reply) = alice
        .join(&topic, json!({"agent_id": "alice", "token": token}))
        .await;
    assert_eq!(reply["status"], "ok");
    assert_eq!(reply["response"]["agents"], json!(["alice"]));
    assert_eq!(reply["response"]["zone"]["id"], json!(id));
    assert_eq!(reply["response"]["zone"]["active_session_count"], 1);
    let state = alice.event("presence_state").await;
    assert_eq!(state[0], json!(join_ref), "pushed to this join");
    assert_eq!(state[4]["alice"]["metas"].as_array().unwrap().len(), 1);
    assert!(state[4]["alice"]["metas"][0]["phx_ref"].is_string());

    // Bad token, token for someone else, a zone that does not exist, a full zone.
    let mut bob = Client::connect(&srv.ws_url()).await;
    let (_, r) = bob
        .join(&topic, json!({"agent_id": "bob", "token": "forged.token"}))
        .await;
    assert_eq!(
        (r["status"].clone(), r["response"]["reason"].clone()),
        (json!("error"), json!("unauthorized"))
    );
    let (_, r) = bob
        .join(&topic, json!({"agent_id": "bob", "token": token}))
        .await;
    assert_eq!(r["response"]["reason"], "unauthorized");
    let (_, r) = bob.join(&topic, json!({"agent_id": "bob"})).await;
    assert_eq!(r["response"]["reason"], "unauthorized");
    let bob_token = srv.token("bob", id, json!(1)).await;
    let (_, r) = bob
        .join(&topic, json!({"agent_id": "bob", "token": bob_token}))
        .await;
    assert_eq!(r["response"]["reason"], "zone_full");
    let (_, r) = bob
        .join(
            "zone:not-a-uuid",
            json!({"agent_id": "bob", "token": bob_token}),
        )
        .await;
    assert_eq!(r["response"]["reason"], "zone_not_found");
    let (_, r) = bob.join("room:lobby", json!({})).await;
    assert_eq!(r["response"]["reason"], "unmatched topic");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reply_and_broadcast_to_the_zone_only() {
    let srv = server().await;
    let zone = srv.zone(zone_body(10, 0x03)).await;
    let other = srv.zone(zone_body(10, 0x03)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let (mut alice, alice_ref) = srv
        .joined(id, "alice", json!(["spawn_agents", "modify_zone"]))
        .await;
    let (mut bob, _) = srv.joined(id, "bob", json!(["spawn_agents"])).await;
    let (mut carol, _) = srv
        .joined(
            other["id"].as_str().unwrap(),
            "carol",
            json!(["spawn_agents"]),
        )
        .await;

    // Alice sees Bob arrive: his presence at once, then the zone's agent_entered event.
    let diff = alice
        .until("bob's presence", |f| {
            f[3] == "presence_diff" && f[4]["joins"]["bob"].is_object()
        })
        .await;
    assert_eq!(diff[4]["leaves"], json!({}));
    let entered = alice
        .until("bob entered", |f| {
            f[3] == "agent_entered" && f[4]["agent_id"] == "bob"
        })
        .await;
    assert_eq!(entered[4]["session_count"], 2);
    assert_eq!(entered[0], Value::Null, "broadcasts carry no join_ref");

    let r = alice
        .push(
            Some(&alice_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 10, "y": 5, "z": 0}}),
        )
        .await;
    assert_eq!(
        alice.reply_to(&r).await,
        json!({"status": "ok", "response": {}})
    );
    let moved = bob.event("agent_moved").await;
    // The zone's creation was seq 1, Alice's join 2, Bob's 3: every broadcast carries its place
    // in the zone's history.
    assert_eq!(
        moved[4],
        json!({"agent_id": "alice", "position": {"x": 10.0, "y": 5.0, "z": 0.0}, "seq": 4})
    );
    assert_eq!(moved[2], json!(topic));

    let r = alice
        .push(
            Some(&alice_ref),
            &topic,
            "consume_resource",
            json!({"resource_type": "food", "amount": 5}),
        )
        .await;
    assert_eq!(
        alice.reply_to(&r).await,
        json!({"status": "ok", "response": {"new_resources": {"food": 95}}})
    );
    let changed = bob.event("resource_changed").await;
    assert_eq!(
        changed[4],
        json!({"agent_id": "alice", "changes": {"food": -5}, "new_resources": {"food": 95}, "seq": 5})
    );

    // Refusals change nothing and name their reason.
    for (payload, reason) in [
        (
            json!({"resource_type": "food", "amount": 500}),
            "insufficient_resources",
        ),
        (
            json!({"resource_type": "gold", "amount": 1}),
            "unknown_resource",
        ),
        (
            json!({"resource_type": "food", "amount": "lots"}),
            "invalid_payload",
        ),
        (
            json!({"resource_type": "food", "amount": -3}),
            "invalid_payload",
        ),
    ] {
        let r = alice
            .push(Some(&alice_ref), &topic, "consume_resource", payload)
            .await;
        let reply = alice.reply_to(&r).await;
        assert_eq!(
            (reply["status"].clone(), reply["response"]["reason"].clone()),
            (json!("error"), json!(reason))
        );
        assert!(reply["response"]["details"].is_string());
    }
    let r = alice
        .push(Some(&alice_ref), &topic, "get_zone_state", json!({}))
        .await;
    let state = alice.reply_to(&r).await;
    assert_eq!(state["response"]["zone"]["resources"]["food"]["amount"], 95);
    assert_eq!(state["response"]["agents"], json!(["alice", "bob"]));

    // Carol, in another zone, saw none of it.
    while let Some(f) = carol.next().await {
        assert_ne!(f[2], json!(topic), "leaked to another zone: {f}");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_are_checked_on_every_push() {
    let srv = server().await;
    let zone = srv.zone(zone_body(10, 0x03)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let (mut bob, bob_ref) = srv.joined(id, "bob", json!(["spawn_agents"])).await;

    let r = bob
        .push(
            Some(&bob_ref),
            &topic,
            "consume_resource",
            json!({"resource_type": "food", "amount": 1}),
        )
        .await;
    assert_eq!(
        bob.reply_to(&r).await["response"]["reason"],
        "forbidden",
        "the token lacks modify_zone"
    );
    let r = bob
        .push(
            Some(&bob_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 1, "y": 1, "z": 1}}),
        )
        .await;
    assert_eq!(bob.reply_to(&r).await["status"], "ok");

    // Revoking spawn_agents on the zone stops an agent already inside.
    let (status, z) = srv
        .api(
            "POST",
            &format!("/api/zones/{id}/permissions"),
            Some(json!({"revoke": ["spawn_agents"]})),
        )
        .await;
    assert_eq!(status, 200, "{z}");
    assert_eq!(z["permissions"], 0x02);
    let r = bob
        .push(
            Some(&bob_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 1, "y": 1, "z": 1}}),
        )
        .await;
    let reply = bob.reply_to(&r).await;
    assert_eq!(reply["response"]["reason"], "forbidden");
    assert!(
        reply["response"]["details"]
            .as_str()
            .unwrap()
            .contains("the zone")
    );

    // admin_zone in the token allows everything the zone allows.
    let (mut root, root_ref) = srv.joined(id, "root", json!(["admin_zone"])).await;
    let r = root
        .push(
            Some(&root_ref),
            &topic,
            "consume_resource",
            json!({"resource_type": "food", "amount": 1}),
        )
        .await;
    assert_eq!(root.reply_to(&r).await["status"], "ok");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_duplicate_join_and_disconnect_keep_presence_and_counts_exact() {
    let srv = server().await;
    let zone = srv.zone(zone_body(10, 0x01)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let (mut alice, _) = srv.joined(id, "alice", json!(1)).await;
    let token = srv.token("bob", id, json!(1)).await;
    let mut bob = Client::connect(&srv.ws_url()).await;
    let (first_ref, _) = bob
        .join(&topic, json!({"agent_id": "bob", "token": token}))
        .await;

    // A duplicate join closes the old channel first.
    let r = bob.next_ref();
    bob.send_raw(
        &json!([r, r, topic, "phx_join", {"agent_id": "bob", "token": token}]).to_string(),
    )
    .await;
    let close = bob.until("phx_close", |f| f[3] == "phx_close").await;
    assert_eq!(close[0], json!(first_ref));
    assert_eq!(bob.reply_to(&r).await["status"], "ok");
    let state = bob
        .until("fresh presence_state", |f| {
            f[3] == "presence_state" && f[0] == json!(r)
        })
        .await;
    assert_eq!(state[4]["bob"]["metas"].as_array().unwrap().len(), 1);

    // Leave: ok, then phx_close; Alice sees Bob's presence go.
    let leave_ref = bob.push(Some(&r), &topic, "phx_leave", json!({})).await;
    assert_eq!(bob.reply_to(&leave_ref).await["status"], "ok");
    bob.until("phx_close after leave", |f| f[3] == "phx_close")
        .await;
    alice
        .until("bob left", |f| {
            f[3] == "presence_diff" && f[4]["leaves"]["bob"].is_object()
        })
        .await;
    let (_, z) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
    assert_eq!(z["active_session_count"], 1);

    // A disconnect counts as leaving.
    drop(alice);
    let mut count = Value::Null;
    let left = common::eventually(5, async || {
        let (_, z) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
        count = z["active_session_count"].clone();
        count == 0
    })
    .await;
    assert!(
        left,
        "alice's disconnect did not end her session within 5 s: active_session_count {count}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_the_connection_stays_usable() {
    let srv = server().await;
    let mut c = Client::connect(&srv.ws_url()).await;
    c.send_raw("{not json").await;
    let err = c.event("phx_error").await;
    assert_eq!(err[4]["reason"], "malformed_frame");
    c.send_raw("[1,2]").await;
    assert!(
        c.event("phx_error").await[4]["details"]
            .as_str()
            .unwrap()
            .contains("5 elements")
    );
    c.send_raw(r#"[null,"7","phoenix","heartbeat",null]"#).await;
    assert_eq!(
        c.reply_to("7").await["response"]["reason"],
        "malformed_frame"
    );
    c.send_raw(r#"[null,8,"phoenix","heartbeat",{}]"#).await;
    assert_eq!(
        c.event("phx_error").await[4]["details"],
        "ref must be a string or null"
    );
    let r = c
        .push(
            None,
            "zone:00000000-0000-0000-0000-000000000000",
            "agent_move",
            json!({}),
        )
        .await;
    assert_eq!(
        c.reply_to(&r).await["response"]["reason"],
        "unmatched topic"
    );
    // Still usable: a heartbeat is answered.
    let r = c.push(None, "phoenix", "heartbeat", json!({})).await;
    assert_eq!(
        c.reply_to(&r).await,
        json!({"status": "ok", "response": {}})
    );

    // An unknown event on a joined channel.
    let zone = srv.zone(zone_body(10, 0x01)).await;
    let id = zone["id"].as_str().unwrap();
    let (mut a, a_ref) = srv.joined(id, "a", json!(1)).await;
    let r = a
        .push(Some(&a_ref), &format!("zone:{id}"), "teleport", json!({}))
        .await;
    assert_eq!(a.reply_to(&r).await["response"]["reason"], "unknown_event");
    let r = a
        .push(
            Some(&a_ref),
            &format!("zone:{id}"),
            "agent_move",
            json!({"position": {"x": 1}}),
        )
        .await;
    assert_eq!(
        a.reply_to(&r).await["response"]["reason"],
        "invalid_payload"
    );

    // Over 64 KiB: closed with 1009.
    let big = format!(
        r#"[null,"9","phoenix","heartbeat",{{"pad":"{}"}}]"#,
        "x".repeat(70 * 1024)
    );
    c.send_raw(&big).await;
    assert_eq!(c.close_code().await, Some(1009));

    // Only the V2 protocol is spoken.
    let old = format!("ws://{}/socket/websocket?vsn=1.0.0", srv.server.addr);
    let refused = tokio_tungstenite::connect_async(old).await.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_gets_error_replies_then_a_disconnect() {
    let srv = server().await;
    let mut c = Client::connect(&srv.ws_url()).await;
    // A burst of a few hundred is fine.
    for _ in 0..300 {
        c.push(None, "phoenix", "heartbeat", json!({})).await;
    }
    let mut ok = 0;
    while ok < 300 {
        let f = c.next().await.expect("replies to the burst");
        if f[4]["status"] == "ok" {
            ok += 1;
        }
    }
    // Thousands at once: rate-limited replies, then the connection is closed.
    let mut limited = 0;
    for i in 0..3000 {
        let frame = json!([null, format!("f{i}"), "phoenix", "heartbeat", {}]).to_string();
        // The server may close the connection before all of them are sent.
        if futures_util::SinkExt::send(
            &mut c.ws,
            tokio_tungstenite::tungstenite::Message::text(frame),
        )
        .await
        .is_err()
        {
            break;
        }
    }
    let code = loop {
        match tokio::time::timeout(
            Duration::from_secs(3),
            futures_util::StreamExt::next(&mut c.ws),
        )
        .await
        {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))) => {
                let f: Value = serde_json::from_str(&t).unwrap();
                if f[4]["response"]["reason"] == "rate_limited" {
                    limited += 1;
                }
            }
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame)))) => {
                break frame.map(|f| u16::from(f.code));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert!(limited > 0, "some frames were refused with rate_limited");
    assert_eq!(code, Some(1008), "then the flood closes the connection");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_its_token_and_answers_in_json() {
    let srv = server().await;
    let addr = srv.server.addr;
    let (status, body) = http(addr, "GET", "/api/zones", None, None).await;
    assert_eq!(
        (status, body["error"].clone()),
        (401, json!("unauthorized"))
    );
    let (status, _) = http(addr, "GET", "/api/zones", None, Some("wrong")).await;
    assert_eq!(status, 401);
    let (status, body) = srv
        .api("POST", "/api/zones", Some(json!({"name": ""})))
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (422, json!("invalid_zone"))
    );
    let (status, body) = srv
        .api("POST", "/api/zones", Some(json!({"nme": "x"})))
        .await;
    assert_eq!(status, 400, "{body}");
    let zone = srv.zone(json!({"name": "Plaza"})).await;
    let keys: Vec<String> = zone.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "active_session_count",
            "assigned_server",
            "capacity",
            "epoch",
            "id",
            "inserted_at",
            "interest_radius",
            "name",
            "permissions",
            "properties",
            "resources",
            "seq",
            "updated_at"
        ]
    );
    let id = zone["id"].as_str().unwrap();
    let (status, page) = srv.api("GET", "/api/zones?limit=10", None).await;
    assert_eq!((status, page["total"].clone()), (200, json!(1)));
    let (status, _) = srv.api("GET", "/api/zones/not-a-uuid", None).await;
    assert_eq!(status, 400);
    let (status, _) = srv
        .api(
            "GET",
            "/api/zones/00000000-0000-7000-8000-000000000000",
            None,
        )
        .await;
    assert_eq!(status, 404);
    let (status, z) = srv
        .api(
            "PATCH",
            &format!("/api/zones/{id}"),
            Some(json!({"name": "Square", "capacity": 5})),
        )
        .await;
    assert_eq!(
        (status, z["name"].clone(), z["capacity"].clone()),
        (200, json!("Square"), json!(5))
    );
    let (status, body) = srv
        .api(
            "POST",
            "/api/tokens",
            Some(
                json!({"agent_id": "a", "zone_id": id, "permissions": ["fly"], "ttl_seconds": 60}),
            ),
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("unknown_permission"))
    );
    let (status, body) = srv
        .api(
            "POST",
            "/api/tokens",
            Some(json!({"agent_id": "a", "zone_id": id, "permissions": 3, "ttl_seconds": 60})),
        )
        .await;
    assert_eq!(status, 200);
    assert!(body["token"].is_string() && body["expires_at"].is_string());
    // A token's lifetime as the CLI takes it ("1h"), or the default hour when absent.
    let lifetime = |body: &Value| {
        let at =
            chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
        (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).num_seconds()
    };
    for (ttl, seconds) in [
        (json!("90m"), 5400),
        (json!("1h"), 3600),
        (Value::Null, 3600),
    ] {
        let mut request =
            json!({"agent_id": "a", "zone_id": id, "permissions": "spawn_agents,modify_zone"});
        if !ttl.is_null() {
            request["ttl_seconds"] = ttl.clone();
        }
        let (status, body) = srv.api("POST", "/api/tokens", Some(request)).await;
        assert_eq!(status, 200, "{ttl}: {body}");
        assert!(
            (seconds - 5..=seconds).contains(&lifetime(&body)),
            "{ttl}: {body}"
        );
    }
    for ttl in [json!("soon"), json!(-1), json!("0h")] {
        let (status, body) = srv
            .api(
                "POST",
                "/api/tokens",
                Some(json!({"agent_id": "a", "zone_id": id, "ttl_seconds": ttl})),
            )
            .await;
        assert_eq!(
            (status, body["error"].clone()),
            (400, json!("bad_request")),
            "{ttl}: {body}"
        );
    }
    // Zone permissions by name, as tokens take them; the zone shows its bits.
    let (status, named) = srv
        .api(
            "POST",
            "/api/zones",
            Some(json!({"name": "Named", "permissions": ["spawn_agents", "broadcast_events"]})),
        )
        .await;
    assert_eq!(
        (status, named["permissions"].clone()),
        (201, json!(5)),
        "{named}"
    );
    let named_id = named["id"].as_str().unwrap();
    let (status, changed) = srv
        .api(
            "POST",
            &format!("/api/zones/{named_id}/permissions"),
            Some(json!({"grant": ["modify_zone"], "revoke": "broadcast_events"})),
        )
        .await;
    assert_eq!(
        (status, changed["permissions"].clone()),
        (200, json!(3)),
        "{changed}"
    );
    let (status, body) = srv
        .api(
            "POST",
            &format!("/api/zones/{named_id}/permissions"),
            Some(json!({"grant": ["fly"]})),
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("unknown_permission"))
    );
    // Every answer of the API is JSON with an error and details, a path it does not serve too.
    let (status, body) = srv.api("GET", "/api/nothing", None).await;
    assert_eq!(
        (status, body["error"].clone()),
        (404, json!("not_found")),
        "{body}"
    );
    assert!(body["details"].as_str().unwrap().contains("/api/nothing"));
    let (status, body) = srv.api("PUT", "/api/zones", None).await;
    assert_eq!(
        (status, body["error"].clone()),
        (405, json!("method_not_allowed")),
        "{body}"
    );
    let (status, _) = srv
        .api("DELETE", &format!("/api/zones/{named_id}"), None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = srv.api("DELETE", &format!("/api/zones/{id}"), None).await;
    assert_eq!(status, 204);
    let (status, _) = srv.api("DELETE", &format!("/api/zones/{id}"), None).await;
    assert_eq!(status, 404);
    let (status, health) = http(addr, "GET", "/healthz", None, None).await;
    assert_eq!((status, health["status"].clone()), (200, json!("ok")));
    let (status, _) = http(addr, "GET", "/readyz", None, None).await;
    assert_eq!(status, 200);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_at_most_100_channels_and_metrics_move() {
    let srv = server().await;
    let mut c = Client::connect(&srv.ws_url()).await;
    for i in 0..101 {
        let zone = srv.zone(zone_body(10, 0x01)).await;
        let id = zone["id"].as_str().unwrap().to_owned();
        let token = srv.token("many", &id, json!(1)).await;
        let (_, reply) = c
            .join(
                &format!("zone:{id}"),
                json!({"agent_id": "many", "token": token}),
            )
            .await;
        if i < 100 {
            assert_eq!(reply["status"], "ok", "join {i}: {reply}");
        } else {
            assert_eq!(reply["response"]["reason"], "too many channels joined");
        }
    }
    let (status, _) = http(srv.server.addr, "GET", "/metrics", None, None).await;
    assert_eq!(status, 200);
    common::server::metrics_showing(
        srv.server.addr,
        &[
        "thunderline_socket_connections 1",
        "thunderline_channel_joins_total{outcome=\"too_many_channels_joined\"} 1",
        "thunderline_channel_subscriptions 100",
        "thunderline_presence_metas 100",
        "thunderline_zone_command_seconds_count{command=\"join\"} 100",
        // 101 creations (each through its zone's writer) and 100 joins.
        "thunderline_pipeline_messages_total{outcome=\"in\",pipeline=\"zones\",stage=\"processor\"} 201",
        "thunderline_channel_slow_consumer_disconnects_total 0",
    ],
    )
    .await;
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_queries_is_exported() {
    let srv = server().await;
    // Enough activity that every labelled family has a series.
    let zone = srv.zone(zone_body(10, 0x03)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let (mut a, a_ref) = srv.joined(id, "a", json!(3)).await;
    let r = a
        .push(
            Some(&a_ref),
            &topic,
            "consume_resource",
            json!({"resource_type": "gold", "amount": 1}),
        )
        .await;
    a.reply_to(&r).await;
    let r = a
        .push(
            Some(&a_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 1, "y": 1, "z": 1}}),
        )
        .await;
    a.reply_to(&r).await;
    let r = a.push(Some(&a_ref), &topic, "teleport", json!({})).await;
    // Its refusal is counted before it is answered: wait for the answer, not for the scrape.
    a.reply_to(&r).await;
    a.event("agent_moved").await;
    let text = common::server::metrics(srv.server.addr).await;
    // What any exporter of a daemon shows: the process, and the build running.
    for line in [
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        concat!(
            "thunderline_build_info{version=\"",
            env!("CARGO_PKG_VERSION"),
            "\"} 1"
        ),
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "{line} in {text}"
        );
    }
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("# TYPE "))
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/dashboards/thunderline.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                // The broker sources' families exist only on a server with a source configured
                // (src/sources/mod.rs registers them as a source starts).
                if !word.starts_with("thunderline_") || word.starts_with("thunderline_source_") {
                    continue;
                }
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|f| exported.contains(f))
                    .unwrap_or(word);
                assert!(
                    exported.contains(family),
                    "the dashboard queries {word}, which is not exported"
                );
                queried += 1;
            }
        }
    }
    assert!(queried >= 15, "the dashboard queries {queried} metrics");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_with_agents_tick_through_the_pipeline() {
    let srv = common::server::start_ticking(None, 100).await;
    let zone = srv
        .zone(json!({
            "name": "Ticking",
            "resources": {"food": {"amount": 50, "max": 60, "regen": 7}},
            "properties": {"season": "spring"}
        }))
        .await;
    let id = zone["id"].as_str().unwrap();
    let idle = srv.zone(json!({"name": "Empty"})).await;
    let (mut a, _) = srv.joined(id, "a", json!(1)).await;
    let first = a.event("environment_tick").await;
    assert_eq!(first[4]["tick"], 1);
    assert_eq!(first[4]["properties"], json!({"season": "spring"}));
    assert_eq!(first[4]["new_resources"], json!({"food": 57}));
    assert!(first[4]["timestamp"].is_string());
    let second = a.event("environment_tick").await;
    assert_eq!(
        second[4]["new_resources"],
        json!({"food": 60}),
        "regeneration stops at max"
    );
    // Audited like any other event. And a zone nobody is in does not tick: a negative, so it is
    // shown over a window, counted in ticks rather than in wall-clock time: every tick round
    // the zone with an agent has audited also passed over the empty one.
    const ROUNDS: usize = 20;
    audited(&srv, id, |events| {
        events
            .iter()
            .filter(|e| e["type"] == "environment_tick")
            .count()
            >= ROUNDS
    })
    .await;
    let (_, none) = srv
        .api(
            "GET",
            &format!("/api/zones/{}/events", idle["id"].as_str().unwrap()),
            None,
        )
        .await;
    let types: Vec<&str> = none["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        types,
        ["zone_created"],
        "nothing ticks a zone without agents"
    );
    srv.stop().await;
}

/// Zones tick once per interval each, but not all at the same instant: a hundred zones' ticks
/// to every session at once would be a burst every other broadcast queues behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zones_tick_once_an_interval_each_spread_over_the_interval() {
    const ZONES: usize = 10;
    let srv = common::server::start_ticking(None, 1_000).await;
    let mut clients = Vec::new();
    for i in 0..ZONES {
        let zone = srv.zone(json!({"name": format!("z{i}")})).await;
        clients.push(
            srv.joined(zone["id"].as_str().unwrap(), "a", json!(1))
                .await
                .0,
        );
    }
    let at = |frame: &Value| {
        chrono::DateTime::parse_from_rfc3339(frame[4]["timestamp"].as_str().unwrap())
            .unwrap()
            .timestamp_millis()
    };
    let mut firsts = Vec::new();
    for client in &mut clients {
        let first = client.event("environment_tick").await;
        let second = client.event("environment_tick").await;
        assert_eq!(second[4]["tick"], first[4]["tick"].as_u64().unwrap() + 1);
        let apart = at(&second) - at(&first);
        assert!(
            (700..=1_300).contains(&apart),
            "a zone ticks once a second: {apart} ms"
        );
        firsts.push(at(&first));
    }
    // Each zone's place in the second, from its first tick.
    let mut phases: Vec<i64> = firsts.iter().map(|t| t.rem_euclid(1_000)).collect();
    phases.sort_unstable();
    let widest_gap = phases
        .windows(2)
        .map(|w| w[1] - w[0])
        .chain([phases[0] + 1_000 - phases[ZONES - 1]])
        .max()
        .unwrap();
    // All at one instant, the rest of the circle is one gap of nearly a second; spread over
    // fifty phases, ten zones leave no gap near that.
    assert!(widest_gap < 800, "the zones' ticks are spread: {phases:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_the_zone_goes_on() {
    const PUSHERS: usize = 10;
    // Within each connection's rate allowance (200/s, bursts of 500): no push is refused.
    const MOVES_EACH: usize = 450;
    let srv = server().await;
    let zone = srv.zone(zone_body(20, 0x03)).await;
    let id = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{id}");
    let (mut slow, _) = srv.joined(&id, "slow", json!(["spawn_agents"])).await;

    let mut pushers = Vec::new();
    for p in 0..PUSHERS {
        let (c, join_ref) = srv
            .joined(&id, &format!("pusher-{p}"), json!(["spawn_agents"]))
            .await;
        pushers.push((c, join_ref));
    }
    let mut tasks = Vec::new();
    for (c, join_ref) in pushers {
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = c.ws.split();
            let push = async {
                // 2,500 moves a second in all: readers keep up, the one that does not read
                // falls a thousand frames behind within about a second.
                let mut pace = tokio::time::interval(Duration::from_millis(4));
                for i in 0..MOVES_EACH {
                    pace.tick().await;
                    let frame = json!([join_ref, i.to_string(), topic, "agent_move",
                        {"position": {"x": i, "y": 0, "z": 0}}]);
                    tx.send(Message::text(frame.to_string())).await.unwrap();
                }
            };
            // Every pusher reads as it pushes, and sees every move in the zone.
            let read = async {
                let mut moved = 0;
                while moved < PUSHERS * MOVES_EACH {
                    match tokio::time::timeout(Duration::from_secs(5), rx.next()).await {
                        Ok(Some(Ok(Message::Text(t)))) => {
                            if t.contains("\"agent_moved\"") {
                                moved += 1;
                            }
                        }
                        other => {
                            panic!("a reading client lost broadcasts after {moved}: {other:?}")
                        }
                    }
                }
            };
            tokio::join!(push, read);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The client that never read was closed as a slow consumer; what reached its socket before
    // that is still there to read, then the close frame.
    assert_eq!(slow.close_code().await, Some(1011));
    common::server::metrics_showing(
        srv.server.addr,
        &["thunderline_channel_slow_consumer_disconnects_total 1"],
    )
    .await;
}

/// Frames until `done` holds for all of them so far; panics with what came if the socket goes
/// quiet (2 s) or closes first.
async fn collect(c: &mut Client, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut seen = Vec::new();
    while !done(&seen) {
        match c.next().await {
            Some(f) => seen.push(f),
            None => panic!("no {what}; got {seen:#?}"),
        }
    }
    seen
}

fn reply_in<'a>(frames: &'a [Value], r: &str) -> Option<&'a Value> {
    frames
        .iter()
        .find(|f| f[3] == "phx_reply" && f[1] == json!(r))
        .map(|f| &f[4])
}

/// The zone's audit log, polled (up to 10 s) until `check` accepts it.
async fn audited(srv: &TestServer, zone: &str, check: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let mut events = Vec::new();
    let shown = common::eventually(10, async || {
        let (status, body) = srv
            .api("GET", &format!("/api/zones/{zone}/events?limit=1000"), None)
            .await;
        assert_eq!(status, 200, "{body}");
        events = body["events"].as_array().unwrap().clone();
        check(&events)
    })
    .await;
    assert!(shown, "the audit log never showed it: {events:#?}");
    events
}

/// The zone's broadcast window: 20 custom broadcasts a second (`zones.broadcast_rate_limit`).
const BROADCAST_WINDOW: Duration = Duration::from_millis(1000);

/// Waits out the zone's current broadcast window, so the next burst starts a fresh one. Not a
/// wait for anything the test could observe instead: the window is kept on the server's wall
/// clock (`chrono::Utc`, not tokio's), shows in no reply, metric or API, and probing it would
/// spend it. It began at or before the last accepted broadcast, whose reply has come, so once
/// its length (and a margin) has passed from here it is over.
async fn wait_out_the_broadcast_window() {
    tokio::time::sleep(BROADCAST_WINDOW + Duration::from_millis(100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_event_and_its_refusals_over_raw_frames() {
    let srv = server().await;
    // spawn_agents, modify_zone, broadcast_events; the default limit: 20 a second per zone.
    let zone = srv.zone(zone_body(10, 0x07)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    let with_bit = json!(["spawn_agents", "broadcast_events"]);
    let (mut ann, ann_ref) = srv.joined(id, "ann", with_bit.clone()).await;
    let (mut ben, ben_ref) = srv.joined(id, "ben", with_bit).await;
    let (mut cy, cy_ref) = srv.joined(id, "cy", json!(["spawn_agents"])).await;
    // Every frame Ann reads goes through `ann_seen`, to check the seqs at the end.
    let mut ann_seen: Vec<Value> = Vec::new();

    // A broadcast reaches every member, the sender included, with one seq.
    let payload = json!({"level": 3, "tags": ["hail"], "nested": {"wind": 12.5}});
    let r = ann
        .push(
            Some(&ann_ref),
            &topic,
            "broadcast_event",
            json!({"event_type": "storm", "payload": payload}),
        )
        .await;
    let frames = collect(&mut ann, "the reply and the storm", |fs| {
        reply_in(fs, &r).is_some() && fs.iter().any(|f| f[3] == "storm")
    })
    .await;
    assert_eq!(
        reply_in(&frames, &r).unwrap(),
        &json!({"status": "ok", "response": {}})
    );
    let storm = frames.iter().find(|f| f[3] == "storm").unwrap().clone();
    ann_seen.extend(frames);
    let seq = storm[4]["seq"].as_u64().expect("seq is a number");
    assert!(seq > 3, "after three joins, seq {seq}");
    let expected =
        json!([null, null, topic, "storm", {"agent_id": "ann", "payload": payload, "seq": seq}]);
    assert_eq!(storm, expected);
    assert_eq!(ben.event("storm").await, expected);
    assert_eq!(cy.event("storm").await, expected);
    audited(&srv, id, |events| {
        events.iter().any(|e| {
            e["type"] == "storm"
                && e["seq"] == seq
                && e["payload"] == json!({"agent_id": "ann", "payload": payload})
        })
    })
    .await;

    // Without the bit on the token.
    let r = cy
        .push(
            Some(&cy_ref),
            &topic,
            "broadcast_event",
            json!({"event_type": "storm", "payload": {}}),
        )
        .await;
    let reply = cy.reply_to(&r).await;
    assert_eq!(
        (reply["status"].clone(), reply["response"]["reason"].clone()),
        (json!("error"), json!("forbidden"))
    );
    let details = reply["response"]["details"].as_str().unwrap();
    assert!(details.contains("token"), "{details}");

    // Bad event types and payloads: invalid_payload, and nothing is broadcast.
    let long = "x".repeat(65);
    for payload in [
        json!({"event_type": "agent_moved", "payload": {}}),
        json!({"event_type": "zone_deleted", "payload": {}}),
        json!({"event_type": "phx_reply", "payload": {}}),
        json!({"event_type": "phx_custom", "payload": {}}),
        json!({"event_type": "presence_diff", "payload": {}}),
        json!({"event_type": "has space", "payload": {}}),
        json!({"event_type": long, "payload": {}}),
        json!({"event_type": "", "payload": {}}),
        json!({"event_type": "storm", "payload": [1, 2]}),
        json!({"payload": {}}),
    ] {
        let r = ann
            .push(Some(&ann_ref), &topic, "broadcast_event", payload.clone())
            .await;
        let frames = collect(&mut ann, "the reply", |fs| reply_in(fs, &r).is_some()).await;
        let reply = reply_in(&frames, &r).unwrap().clone();
        assert_eq!(
            (reply["status"].clone(), reply["response"]["reason"].clone()),
            (json!("error"), json!("invalid_payload")),
            "{payload}"
        );
        assert!(reply["response"]["details"].is_string());
        ann_seen.extend(frames);
    }
    // 64 characters is the longest name allowed.
    let r = ann
        .push(
            Some(&ann_ref),
            &topic,
            "broadcast_event",
            json!({"event_type": "x".repeat(64), "payload": {}}),
        )
        .await;
    let frames = collect(&mut ann, "the reply", |fs| reply_in(fs, &r).is_some()).await;
    assert_eq!(reply_in(&frames, &r).unwrap()["status"], "ok");
    ann_seen.extend(frames);

    // Without the bit on the zone: refused to an agent whose token holds it, and to the admin.
    let (status, z) = srv
        .api(
            "POST",
            &format!("/api/zones/{id}/permissions"),
            Some(json!({"revoke": ["broadcast_events"]})),
        )
        .await;
    assert_eq!((status, z["permissions"].clone()), (200, json!(0x03)));
    let r = ann
        .push(
            Some(&ann_ref),
            &topic,
            "broadcast_event",
            json!({"event_type": "storm", "payload": {}}),
        )
        .await;
    let frames = collect(&mut ann, "the reply", |fs| reply_in(fs, &r).is_some()).await;
    let reply = reply_in(&frames, &r).unwrap().clone();
    ann_seen.extend(frames);
    assert_eq!(reply["response"]["reason"], "forbidden");
    let details = reply["response"]["details"].as_str().unwrap();
    assert!(details.contains("the zone"), "{details}");
    let (status, body) = srv
        .api(
            "POST",
            &format!("/api/zones/{id}/broadcast"),
            Some(json!({"event_type": "storm", "payload": {}})),
        )
        .await;
    assert_eq!((status, body["error"].clone()), (403, json!("forbidden")));
    let (status, z) = srv
        .api(
            "POST",
            &format!("/api/zones/{id}/permissions"),
            Some(json!({"grant": ["broadcast_events"]})),
        )
        .await;
    assert_eq!((status, z["permissions"].clone()), (200, json!(0x07)));

    // 25 at once from two members: the limit is the zone's. Wait out the current window first.
    wait_out_the_broadcast_window().await;
    let started = std::time::Instant::now();
    let mut ann_refs = Vec::new();
    let mut ben_refs = Vec::new();
    for i in 0..25 {
        let frame = json!({"event_type": "storm", "payload": {"burst": i}});
        if i % 2 == 0 {
            ann_refs.push(
                ann.push(Some(&ann_ref), &topic, "broadcast_event", frame)
                    .await,
            );
        } else {
            ben_refs.push(
                ben.push(Some(&ben_ref), &topic, "broadcast_event", frame)
                    .await,
            );
        }
    }
    let ann_frames = collect(&mut ann, "replies to the burst", |fs| {
        ann_refs.iter().all(|r| reply_in(fs, r).is_some())
    })
    .await;
    let ben_frames = collect(&mut ben, "replies to the burst", |fs| {
        ben_refs.iter().all(|r| reply_in(fs, r).is_some())
    })
    .await;
    let elapsed = started.elapsed();
    let replies: Vec<Value> = ann_refs
        .iter()
        .map(|r| reply_in(&ann_frames, r).unwrap().clone())
        .chain(
            ben_refs
                .iter()
                .map(|r| reply_in(&ben_frames, r).unwrap().clone()),
        )
        .collect();
    ann_seen.extend(ann_frames);
    let ok = replies.iter().filter(|r| r["status"] == "ok").count();
    let limited = replies
        .iter()
        .filter(|r| r["response"]["reason"] == "rate_limited")
        .count();
    assert_eq!(ok + limited, 25, "{replies:#?}");
    if elapsed < Duration::from_millis(1000) {
        // All of them were decided within one window.
        assert_eq!((ok, limited), (20, 5), "in {elapsed:?}");
        // The admin API counts against the same limit.
        let (status, body) = srv
            .api(
                "POST",
                &format!("/api/zones/{id}/broadcast"),
                Some(json!({"event_type": "storm", "payload": {}})),
            )
            .await;
        if started.elapsed() < Duration::from_millis(1000) {
            assert_eq!(
                (status, body["error"].clone()),
                (429, json!("rate_limited"))
            );
        }
    } else {
        eprintln!("the burst took {elapsed:?}: only its totals were checked");
    }
    // Cy gets exactly the accepted ones: the audit log has them, and so does Cy's socket.
    let burst_logged = |events: &[Value]| {
        events
            .iter()
            .filter(|e| e["type"] == "storm" && e["payload"]["payload"]["burst"].is_number())
            .count()
    };
    audited(&srv, id, |events| burst_logged(events) == ok).await;
    let got = collect(&mut cy, "the accepted burst", |fs| {
        fs.iter()
            .filter(|f| f[3] == "storm" && f[4]["payload"]["burst"].is_number())
            .count()
            == ok
    })
    .await;
    for f in got
        .iter()
        .filter(|f| f[3] == "storm" && f[4]["payload"]["burst"].is_number())
    {
        assert!(
            f[4]["agent_id"] == "ann" || f[4]["agent_id"] == "ben",
            "{f}"
        );
    }

    // The admin API: agent_id null, and its seq.
    wait_out_the_broadcast_window().await;
    let notice = json!({"text": "rain soon"});
    let (status, body) = srv
        .api(
            "POST",
            &format!("/api/zones/{id}/broadcast"),
            Some(json!({"event_type": "weather.notice", "payload": notice})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let notice_seq = body["seq"].as_u64().expect("the seq of the broadcast");
    assert_eq!(body, json!({"seq": notice_seq}));
    let expected = json!([null, null, topic, "weather.notice",
        {"agent_id": null, "payload": notice, "seq": notice_seq}]);
    assert_eq!(ben.event("weather.notice").await, expected);
    assert_eq!(cy.event("weather.notice").await, expected);
    let frames = collect(&mut ann, "the admin broadcast", |fs| {
        fs.iter().any(|f| f[3] == "weather.notice")
    })
    .await;
    assert!(frames.contains(&expected));
    ann_seen.extend(frames);
    for (event_type, status, error) in [
        (json!("agent_moved"), 422, "invalid_payload"),
        (json!("phx_reply"), 422, "invalid_payload"),
        (json!("has space"), 422, "invalid_payload"),
        (json!("x".repeat(65)), 422, "invalid_payload"),
    ] {
        let (s, body) = srv
            .api(
                "POST",
                &format!("/api/zones/{id}/broadcast"),
                Some(json!({"event_type": event_type, "payload": {}})),
            )
            .await;
        assert_eq!(
            (s, body["error"].clone()),
            (status, json!(error)),
            "{event_type}"
        );
    }
    let (status, body) = srv
        .api(
            "POST",
            "/api/zones/00000000-0000-7000-8000-000000000000/broadcast",
            Some(json!({"event_type": "storm", "payload": {}})),
        )
        .await;
    assert_eq!(status, 404, "{body}");

    // 25 admin broadcasts at once: 429 past the zone's limit.
    wait_out_the_broadcast_window().await;
    let started = std::time::Instant::now();
    let path = format!("/api/zones/{id}/broadcast");
    let posted = futures_util::future::join_all((0..25).map(|i| {
        srv.api(
            "POST",
            &path,
            Some(json!({"event_type": "storm", "payload": {"admin": i}})),
        )
    }))
    .await;
    let elapsed = started.elapsed();
    let accepted: Vec<u64> = posted
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, b)| b["seq"].as_u64().expect("a seq"))
        .collect();
    let too_many = posted
        .iter()
        .filter(|(s, b)| *s == 429 && b["error"] == "rate_limited")
        .count();
    assert_eq!(accepted.len() + too_many, 25, "{posted:?}");
    let distinct: std::collections::BTreeSet<u64> = accepted.iter().copied().collect();
    assert_eq!(distinct.len(), accepted.len(), "one seq each");
    if elapsed < Duration::from_millis(1000) {
        assert_eq!((accepted.len(), too_many), (20, 5), "in {elapsed:?}");
    } else {
        eprintln!("the admin burst took {elapsed:?}: only its totals were checked");
    }
    let frames = collect(&mut ann, "the accepted admin burst", |fs| {
        fs.iter()
            .filter(|f| f[3] == "storm" && f[4]["payload"]["admin"].is_number())
            .count()
            == accepted.len()
    })
    .await;
    for f in frames.iter().filter(|f| f[3] == "storm") {
        assert_eq!(f[4]["agent_id"], Value::Null);
        assert!(distinct.contains(&f[4]["seq"].as_u64().unwrap()));
    }
    ann_seen.extend(frames);

    // The audit log has every custom event with its type and seq.
    let events = audited(&srv, id, |events| {
        events
            .iter()
            .any(|e| e["type"] == "weather.notice" && e["seq"] == notice_seq)
            && accepted.iter().all(|s| {
                events
                    .iter()
                    .any(|e| e["type"] == "storm" && e["seq"] == *s)
            })
    })
    .await;
    let notice_logged = events
        .iter()
        .find(|e| e["type"] == "weather.notice")
        .unwrap();
    assert_eq!(
        notice_logged["payload"],
        json!({"agent_id": null, "payload": notice})
    );
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    // Every zone event Ann saw carries seq, strictly increasing.
    let seen: Vec<u64> = ann_seen
        .iter()
        .filter(|f| f[3] != "phx_reply" && f[2] == json!(topic))
        .filter_map(|f| f[4]["seq"].as_u64())
        .collect();
    assert!(seen.len() >= 1 + ok + 1 + accepted.len(), "{seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_lists_agents_with_their_sessions_and_dead_letters() {
    let srv = server().await;
    let zone = srv.zone(zone_body(10, 0x01)).await;
    let id = zone["id"].as_str().unwrap();
    let topic = format!("zone:{id}");
    // Joined in this order: a, b, then a again on another connection.
    let (mut a1, a1_ref) = srv.joined(id, "a", json!(1)).await;
    let (_b, _) = srv.joined(id, "b", json!(1)).await;
    let (_a2, _) = srv.joined(id, "a", json!(1)).await;

    let (status, body) = srv
        .api("GET", &format!("/api/zones/{id}/agents"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["zone_id"], json!(id));
    assert_eq!(body["seq"], 4, "its creation and three joins: {body}");
    let agents = body["agents"].as_array().unwrap();
    let ids: Vec<&str> = agents
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"], "one entry per agent: {body:#}");
    let sessions = |agent: &Value| -> Vec<String> {
        agent["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert!(
                    s["joined_at"]
                        .as_str()
                        .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok()),
                    "{s}"
                );
                assert_eq!(s.as_object().unwrap().len(), 2, "{s}");
                s["connection"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    let a_sessions = sessions(&agents[0]);
    let b_sessions = sessions(&agents[1]);
    assert_eq!((a_sessions.len(), b_sessions.len()), (2, 1), "{body:#}");
    let all: std::collections::BTreeSet<&String> = a_sessions.iter().chain(&b_sessions).collect();
    assert_eq!(
        all.len(),
        3,
        "each session's connection is its own: {body:#}"
    );

    // One of a's connections leaves: a has one session left, on the other connection.
    let r = a1.push(Some(&a1_ref), &topic, "phx_leave", json!({})).await;
    assert_eq!(a1.reply_to(&r).await["status"], "ok");
    let (status, body) = srv
        .api("GET", &format!("/api/zones/{id}/agents"), None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["seq"], 5, "and the leave: {body}");
    let agents = body["agents"].as_array().unwrap();
    let ids: Vec<&str> = agents
        .iter()
        .map(|a| a["agent_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"], "{body:#}");
    let left = sessions(&agents[0]);
    assert_eq!(left.len(), 1, "{body:#}");
    assert!(a_sessions.contains(&left[0]), "{body:#}");
    assert_eq!(sessions(&agents[1]), b_sessions);

    // Unknown and malformed zones.
    let (status, body) = srv
        .api(
            "GET",
            "/api/zones/00000000-0000-7000-8000-000000000000/agents",
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"].clone()),
        (404, json!("zone_not_found"))
    );
    let (status, _) = srv.api("GET", "/api/zones/not-a-uuid/agents", None).await;
    assert_eq!(status, 400);

    // Nothing refused by the audit log: no dead letters, however asked.
    for path in [
        "/api/dead_letters".to_owned(),
        format!("/api/dead_letters?zone_id={id}"),
        format!("/api/dead_letters?zone_id={id}&limit=5&offset=0"),
        "/api/dead_letters?limit=1000&offset=10".to_owned(),
    ] {
        let (status, body) = srv.api("GET", &path, None).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(body["dead_letters"], json!([]), "{path}");
        assert_eq!(body["total"], 0, "{path}");
    }
    let (_, body) = srv
        .api("GET", "/api/dead_letters?limit=5&offset=3", None)
        .await;
    assert_eq!(
        (body["limit"].clone(), body["offset"].clone()),
        (json!(5), json!(3))
    );
    let (status, body) = srv.api("GET", "/api/dead_letters?limit=1001", None).await;
    assert_eq!(
        (status, body["error"].clone()),
        (400, json!("bad_request")),
        "{body}"
    );
    let (status, body) = srv
        .api("GET", "/api/dead_letters?zone_id=not-a-uuid", None)
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = srv.api("GET", "/api/dead_letters?limit=lots", None).await;
    assert_eq!(status, 400);
    let (status, _) = http(srv.server.addr, "GET", "/api/dead_letters", None, None).await;
    assert_eq!(status, 401, "the admin token is needed");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_retried_with_its_idempotency_key_is_applied_once_and_answered_as_first() {
    let srv = server().await;
    let zone = srv.zone(zone_body(10, 0x03)).await;
    let id = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{id}");
    let perms = json!(["spawn_agents", "modify_zone"]);
    let (mut alice, a_ref) = srv.joined(&id, "alice", perms.clone()).await;
    let consume =
        |key: Value| json!({"resource_type": "food", "amount": 7, "idempotency_key": key});

    let r = alice
        .push(
            Some(&a_ref),
            &topic,
            "consume_resource",
            consume(json!("k-1")),
        )
        .await;
    let first = alice.reply_to(&r).await;
    assert_eq!(first["status"], "ok", "{first}");
    assert_eq!(first["response"]["new_resources"]["food"], 93);
    assert!(first["response"].get("duplicate").is_none(), "{first}");
    // Another consume moves the amount on; the retry of the first is answered as it was.
    let r = alice
        .push(
            Some(&a_ref),
            &topic,
            "consume_resource",
            consume(json!("k-2")),
        )
        .await;
    assert_eq!(
        alice.reply_to(&r).await["response"]["new_resources"]["food"],
        86
    );
    // Retried on another connection of the same agent (a reconnect): the same key is the
    // same command.
    let (mut again, again_ref) = srv.joined(&id, "alice", perms.clone()).await;
    let r = again
        .push(
            Some(&again_ref),
            &topic,
            "consume_resource",
            consume(json!("k-1")),
        )
        .await;
    let retry = again.reply_to(&r).await;
    assert_eq!(retry["status"], "ok", "{retry}");
    assert_eq!(retry["response"]["duplicate"], true, "{retry}");
    assert_eq!(
        retry["response"]["new_resources"]["food"], 93,
        "the first outcome"
    );
    // The same key of another agent is another command.
    let (mut bob, b_ref) = srv.joined(&id, "bob", perms).await;
    let r = bob
        .push(
            Some(&b_ref),
            &topic,
            "consume_resource",
            consume(json!("k-1")),
        )
        .await;
    let bobs = bob.reply_to(&r).await;
    assert!(bobs["response"].get("duplicate").is_none(), "{bobs}");
    assert_eq!(bobs["response"]["new_resources"]["food"], 79);

    // Keys that are not 1 to 64 characters are refused, and nothing is applied.
    for bad in [json!(""), json!("x".repeat(65)), json!(7), json!(null)] {
        let r = alice
            .push(
                Some(&a_ref),
                &topic,
                "consume_resource",
                consume(bad.clone()),
            )
            .await;
        let reply = alice.reply_to(&r).await;
        assert_eq!(reply["status"], "error", "{bad}: {reply}");
        assert_eq!(reply["response"]["reason"], "invalid_payload", "{reply}");
    }
    let r = alice
        .push(
            Some(&a_ref),
            &topic,
            "consume_resource",
            consume(json!("é".repeat(64))),
        )
        .await;
    assert_eq!(
        alice.reply_to(&r).await["response"]["new_resources"]["food"],
        72
    );
    let (_, state) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
    assert_eq!(state["resources"]["food"]["amount"], 72, "{state}");
    srv.stop().await;
}

/// A client frame as RFC 6455 wants it: final, masked.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The server's frames on the wire: (opcode, payload), in order, up to the end of the stream.
fn server_frames(mut wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while !wire.is_empty() {
        assert_eq!(wire[1] & 0x80, 0, "server frames are not masked");
        let (len, at) = match wire[1] & 0x7f {
            126 => (u16::from_be_bytes([wire[2], wire[3]]) as usize, 4),
            127 => panic!("no frame here is that long"),
            n => (n as usize, 2),
        };
        frames.push((wire[0] & 0x0f, wire[at..at + len].to_vec()));
        wire = &wire[at + len..];
    }
    frames
}

/// The socket is served on the upgraded connection itself: what a client sends right behind its
/// upgrade request is read, a ping is answered with its payload before what follows it, and a
/// client's close is answered with exactly one close frame (its code), then the server hangs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_are_answered_in_order_and_a_client_s_close_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let srv = server().await;
    let mut tcp = tokio::net::TcpStream::connect(srv.server.addr)
        .await
        .unwrap();
    let mut out = b"GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: localhost\r\n\
        Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Protocol: chat, phoenix\r\n\r\n"
        .to_vec();
    out.extend(masked(0x9, b"ping-1"));
    out.extend(masked(0x1, br#"["1","1","phoenix","heartbeat",{}]"#));
    out.extend(masked(0x8, &[0x03, 0xe8, b'o', b'k']));
    tcp.write_all(&out).await.unwrap();
    let mut wire = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut wire))
        .await
        .expect("the server hangs up after the close")
        .unwrap();
    let head_end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer")
        + 4;
    let head = String::from_utf8_lossy(&wire[..head_end]).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "RFC 6455's example key and answer: {head}"
    );
    assert!(head.contains("sec-websocket-protocol: phoenix"), "{head}");
    let frames = server_frames(&wire[head_end..]);
    let reply: Value = serde_json::from_slice(&frames[1].1).unwrap();
    assert_eq!(
        (frames[0].0, &frames[0].1[..]),
        (0xa, &b"ping-1"[..]),
        "the pong first: {frames:?}"
    );
    assert_eq!(
        (frames[1].0, &reply[3], &reply[4]["status"]),
        (0x1, &json!("phx_reply"), &json!("ok"))
    );
    assert_eq!(frames.len(), 3, "one close, nothing after it: {frames:?}");
    assert_eq!(frames[2].0, 0x8);
    assert_eq!(
        &frames[2].1[..2],
        &[0x03, 0xe8],
        "the client's code, answered"
    );
    srv.stop().await;
}

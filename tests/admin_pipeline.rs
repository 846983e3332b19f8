//! The pipeline's run-time controls through the daemon's admin API: resizing the zone writers
//! and the audit sink workers, and changing the rate limit, under load, with every push still
//! answered and logged once, and `/metrics` showing the new values.

mod common;

use common::server::{Client, TestServer, http, metrics_showing, start};
use serde_json::{Value, json};

/// A client joined to a new zone.
async fn joined_zone(srv: &TestServer, agent: &str) -> (Client, String, String) {
    let zone = srv.zone(json!({"name": "Yard", "capacity": 10})).await;
    let id = zone["id"].as_str().unwrap().to_owned();
    let token = srv.token(agent, &id, json!(["spawn_agents"])).await;
    let mut c = Client::connect(&srv.ws_url()).await;
    let topic = format!("zone:{id}");
    let (join_ref, reply) = c
        .join(&topic, json!({"agent_id": agent, "token": token}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    (c, join_ref, id)
}

/// Sends `n` moves and waits for every reply; returns how many were ok.
async fn moves(c: &mut Client, join_ref: &str, zone: &str, from: u32, n: u32) -> u32 {
    let topic = format!("zone:{zone}");
    let mut refs = Vec::new();
    for x in from..from + n {
        let payload = json!({"position": {"x": x, "y": 0, "z": 0}});
        refs.push(c.push(Some(join_ref), &topic, "agent_move", payload).await);
    }
    let mut ok = 0;
    for r in refs {
        if c.reply_to(&r).await["status"] == "ok" {
            ok += 1;
        }
    }
    ok
}

fn stage<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["topology"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no stage {name} in {view}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resizes_and_rate_limits_apply_under_load_and_show_in_metrics() {
    let srv = start(None).await;
    let addr = srv.server.addr;
    let (status, view) = srv.api("GET", "/api/pipeline", None).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(view["rate_limit"], Value::Null);
    let writers = stage(&view, "processor")["concurrency"].as_u64().unwrap();

    let (mut a, a_ref, zone_a) = joined_zone(&srv, "ann").await;
    let (mut b, b_ref, zone_b) = joined_zone(&srv, "ben").await;
    let mut sent = 0;
    for (i, writers) in [writers + 2, 1, 3].into_iter().enumerate() {
        // Pushes in flight while the pool changes under them.
        let from = i as u32 * 100;
        let load = async {
            tokio::join!(
                moves(&mut a, &a_ref, &zone_a, from, 100),
                moves(&mut b, &b_ref, &zone_b, from, 100)
            )
        };
        let resize = async {
            let body = json!({"concurrency": writers});
            let (status, view) = srv
                .api("POST", "/api/pipeline/processors", Some(body))
                .await;
            assert_eq!(status, 200, "{view}");
            assert_eq!(stage(&view, "processor")["concurrency"], json!(writers));
            let audit = json!({"concurrency": i + 1});
            let (status, view) = srv
                .api("POST", "/api/pipeline/batchers/audit", Some(audit))
                .await;
            assert_eq!(status, 200, "{view}");
            assert_eq!(stage(&view, "sink:audit")["concurrency"], json!(i + 1));
        };
        let ((ok_a, ok_b), ()) = tokio::join!(load, resize);
        assert_eq!((ok_a, ok_b), (100, 100), "every push answered ok");
        sent += 100;
        metrics_showing(
            addr,
            &[
                &format!(
                    "thunderline_pipeline_concurrency{{pipeline=\"zones\",stage=\"processor\"}} {writers}"
                ),
                &format!(
                    "thunderline_pipeline_concurrency{{pipeline=\"zones\",stage=\"sink:audit\"}} {}",
                    i + 1
                ),
            ],
        )
        .await;
    }

    // Each move is in the audit log once, in the order it was sent.
    for zone in [&zone_a, &zone_b] {
        let (status, events) = srv
            .api("GET", &format!("/api/zones/{zone}/events?limit=1000"), None)
            .await;
        assert_eq!(status, 200);
        let xs: Vec<u64> = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "agent_moved")
            .map(|e| e["payload"]["position"]["x"].as_f64().unwrap() as u64)
            .collect();
        assert_eq!(xs, (0..sent).collect::<Vec<_>>(), "zone {zone}");
    }

    let limit = json!({"allowed": 5000, "interval_ms": 250});
    let (status, view) = srv
        .api("POST", "/api/pipeline/rate_limit", Some(limit))
        .await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(
        view["rate_limit"],
        json!({"allowed": 5000, "interval_ms": 250})
    );
    metrics_showing(
        addr,
        &[
            "thunderline_pipeline_rate_limit_allowed{pipeline=\"zones\"} 5000",
            "thunderline_pipeline_rate_limit_interval_seconds{pipeline=\"zones\"} 0.25",
        ],
    )
    .await;
    assert_eq!(moves(&mut a, &a_ref, &zone_a, 1000, 20).await, 20);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_changes_get_clear_errors_and_change_nothing() {
    let srv = start(None).await;
    let addr = srv.server.addr;
    let cases = [
        ("/api/pipeline/processors", json!({"concurrency": 0}), 422),
        ("/api/pipeline/processors", json!({"concurrency": -1}), 400),
        ("/api/pipeline/processors", json!({"workers": 2}), 400),
        (
            "/api/pipeline/batchers/audit",
            json!({"concurrency": 0}),
            422,
        ),
        (
            "/api/pipeline/batchers/nope",
            json!({"concurrency": 2}),
            404,
        ),
        // One broadcast worker keeps each zone's events in seq order.
        (
            "/api/pipeline/batchers/broadcast",
            json!({"concurrency": 2}),
            422,
        ),
        (
            "/api/pipeline/rate_limit",
            json!({"allowed": 0, "interval_ms": 100}),
            422,
        ),
        (
            "/api/pipeline/rate_limit",
            json!({"allowed": 10, "interval_ms": 0}),
            422,
        ),
        ("/api/pipeline/rate_limit", json!({"allowed": 10}), 400),
    ];
    let (_, before) = srv.api("GET", "/api/pipeline", None).await;
    for (path, body, expected) in cases {
        let (status, reply) = srv.api("POST", path, Some(body.clone())).await;
        assert_eq!(status, expected, "{path} {body}: {reply}");
        assert!(
            reply["error"].is_string() && reply["details"].is_string(),
            "{reply}"
        );
    }
    let (_, after) = srv.api("GET", "/api/pipeline", None).await;
    let concurrency = |v: &Value| {
        v["topology"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["name"].clone(), s["concurrency"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(concurrency(&before), concurrency(&after));
    assert_eq!(after["rate_limit"], Value::Null);

    // Only with the admin token.
    let body = json!({"concurrency": 2});
    for path in ["/api/pipeline/processors", "/api/pipeline/batchers/audit"] {
        let (status, _) = http(addr, "POST", path, Some(body.clone()), None).await;
        assert_eq!(status, 401, "{path}");
    }
    let (status, _) = http(addr, "GET", "/api/pipeline", None, Some("wrong")).await;
    assert_eq!(status, 401);
    srv.stop().await;
}

//! PostgreSQL stopped for 8 s under load. The zones go on: pushes are answered (ok, or
//! `overloaded` if the pipeline ever fills), heartbeats within 2 s, broadcasts keep flowing, no
//! client is disconnected; once the database is back, every push answered ok is in the audit
//! log exactly once.
//!
//! This test stops the machine's PostgreSQL, so it is alone in its test binary (cargo runs test
//! binaries one at a time), and it starts PostgreSQL again whatever happens, panics included.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use common::server::{Client, start};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: usize = 8;
/// Each client pushes a move every 25 ms: 320 a second in all.
const PUSH_EVERY: Duration = Duration::from_millis(25);
const HEARTBEAT_EVERY: Duration = Duration::from_millis(500);
const OUTAGE: Duration = Duration::from_secs(8);

/// `pg_ctlcluster` for the machine's one cluster.
fn pg_ctl(action: &str) -> bool {
    let version = std::fs::read_dir("/etc/postgresql")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .expect("a PostgreSQL cluster under /etc/postgresql");
    let mut args = vec!["--skip-systemctl-redirect", &version, "main", action];
    if action == "stop" {
        args.extend(["-m", "fast"]);
    }
    Command::new("pg_ctlcluster")
        .args(&args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts PostgreSQL again when dropped: on success, on failure, on panic.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        for _ in 0..10 {
            if pg_ctl("start")
                || Command::new("pg_isready")
                    .args(["-h", "127.0.0.1", "-q"])
                    .status()
                    .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!("*** could not start PostgreSQL again after the outage test");
    }
}

#[derive(Default, Debug)]
struct Seen {
    /// Moves answered ok, by x.
    ok: Vec<i64>,
    overloaded: usize,
    other_errors: Vec<Value>,
    /// Slowest heartbeat reply.
    worst_heartbeat: Duration,
    heartbeats: usize,
    closed: Option<String>,
    broadcasts: usize,
    unanswered: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_8_s_postgres_outage_under_load_disconnects_no_one_and_loses_nothing() {
    if Command::new("pg_ctlcluster")
        .arg("--help")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "pg_ctlcluster is needed under CI=true"
        );
        eprintln!("*** SKIPPED: pg_ctlcluster is not installed here");
        return;
    }
    let Some(db) = common::postgres().await else {
        return;
    };
    let srv = start(Some(db.url.clone())).await;
    let zone = srv
        .zone(json!({"name": "Outage", "capacity": 50, "permissions": 1}))
        .await;
    let id = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{id}");
    let mut clients = Vec::new();
    for n in 0..CLIENTS {
        let agent = format!("agent-{n}");
        let token = srv.token(&agent, &id, json!(1)).await;
        let mut c = Client::connect(&srv.ws_url()).await;
        let (join_ref, reply) = c
            .join(&topic, json!({"agent_id": agent, "token": token}))
            .await;
        assert_eq!(reply["status"], "ok", "{reply}");
        clients.push((c, join_ref));
    }

    let started = Instant::now();
    let pushing_until = started + Duration::from_secs(2) + OUTAGE + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for (n, (c, join_ref)) in clients.into_iter().enumerate() {
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = c.ws.split();
            let mut seen = Seen::default();
            let mut heartbeats: HashMap<String, Instant> = HashMap::new();
            let mut pending = 0usize;
            let mut push = tokio::time::interval(PUSH_EVERY);
            let mut beat = tokio::time::interval(HEARTBEAT_EVERY);
            let mut i = 0i64;
            // Push until the end of the load, then read until every push is answered (the log
            // may take a while to catch up, replies do not).
            let drain_until = pushing_until + Duration::from_secs(10);
            loop {
                let pushing = Instant::now() < pushing_until;
                if !pushing && pending == 0 {
                    break;
                }
                tokio::select! {
                    _ = push.tick(), if pushing => {
                        let x = (n as i64) * 1_000_000 + i;
                        i += 1;
                        let frame = json!([join_ref, format!("m{x}"), topic, "agent_move", {"position": {"x": x, "y": 0, "z": 0}}]);
                        if tx.send(Message::text(frame.to_string())).await.is_err() {
                            seen.closed = Some("send failed".into());
                            break;
                        }
                        pending += 1;
                    }
                    _ = beat.tick() => {
                        let r = format!("h{i}");
                        heartbeats.insert(r.clone(), Instant::now());
                        let frame = json!([null, r, "phoenix", "heartbeat", {}]);
                        if tx.send(Message::text(frame.to_string())).await.is_err() {
                            seen.closed = Some("send failed".into());
                            break;
                        }
                    }
                    () = tokio::time::sleep_until(drain_until) => break,
                    frame = rx.next() => match frame {
                        Some(Ok(Message::Text(t))) => {
                            let f: Value = serde_json::from_str(&t).unwrap();
                            let r = f[1].as_str().unwrap_or("");
                            if f[3] == "phx_reply" && r.starts_with('h') {
                                if let Some(at) = heartbeats.remove(r) {
                                    seen.worst_heartbeat = seen.worst_heartbeat.max(at.elapsed());
                                    seen.heartbeats += 1;
                                }
                            } else if f[3] == "phx_reply" && r.starts_with('m') {
                                pending -= 1;
                                match (f[4]["status"].as_str(), f[4]["response"]["reason"].as_str()) {
                                    (Some("ok"), _) => seen.ok.push(r[1..].parse().unwrap()),
                                    (_, Some("overloaded")) => seen.overloaded += 1,
                                    _ => seen.other_errors.push(f[4].clone()),
                                }
                            } else if f[3] == "agent_moved" {
                                seen.broadcasts += 1;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            seen.closed = Some(format!("{frame:?}"));
                            break;
                        }
                        Some(Ok(_)) => {}
                        other => {
                            seen.closed = Some(format!("{other:?}"));
                            break;
                        }
                    },
                }
            }
            // Heartbeats sent but never answered count as answered too late.
            if let Some(at) = heartbeats.values().min() {
                seen.worst_heartbeat = seen.worst_heartbeat.max(at.elapsed());
            }
            seen.unanswered = pending;
            seen
        }));
    }

    // The outage, 2 s into the load.
    tokio::time::sleep_until(started + Duration::from_secs(2)).await;
    let restart = Restart;
    assert!(
        tokio::task::spawn_blocking(|| pg_ctl("stop"))
            .await
            .unwrap(),
        "stop PostgreSQL"
    );
    let stopped_at = Instant::now();
    tokio::time::sleep_until(stopped_at + OUTAGE).await;
    drop(restart);
    eprintln!("PostgreSQL was down for {:?}", stopped_at.elapsed());

    let mut ok = Vec::new();
    let mut problems = Vec::new();
    for (n, t) in tasks.into_iter().enumerate() {
        let seen = t.await.unwrap();
        eprintln!(
            "client {n}: {} ok, {} overloaded, {} other errors, {} broadcasts, {} heartbeats (worst {:?}), {} unanswered, closed: {:?}",
            seen.ok.len(),
            seen.overloaded,
            seen.other_errors.len(),
            seen.broadcasts,
            seen.heartbeats,
            seen.worst_heartbeat,
            seen.unanswered,
            seen.closed
        );
        if let Some(why) = &seen.closed {
            problems.push(format!("client {n} was disconnected: {why}"));
        }
        if seen.worst_heartbeat > Duration::from_secs(2) {
            problems.push(format!(
                "client {n}: a heartbeat took {:?} to be answered",
                seen.worst_heartbeat
            ));
        }
        if seen.unanswered > 0 || !seen.other_errors.is_empty() {
            problems.push(format!(
                "client {n}: {} pushes unanswered, errors {:?}",
                seen.unanswered, seen.other_errors
            ));
        }
        ok.extend(seen.ok);
    }

    // The log catches up once the database is back: every ok-answered move, exactly once.
    let store = thunderline::store::Store::connect(&db.url).await.unwrap();
    let zone_id = uuid::Uuid::parse_str(&id).unwrap();
    let mut logged: HashMap<i64, usize> = HashMap::new();
    // Whether it caught up within 40 s is reported below, with what is missing.
    let _ = common::eventually(40, async || {
        logged.clear();
        for e in store.zone_events(zone_id, None, None, None).await.unwrap() {
            if let thunderline::zone::EventKind::AgentMoved(m) = &e.kind {
                *logged.entry(m.position.x as i64).or_default() += 1;
            }
        }
        ok.iter().all(|x| logged.contains_key(x))
    })
    .await;
    let missing: Vec<&i64> = ok.iter().filter(|x| !logged.contains_key(x)).collect();
    let twice: Vec<(&i64, &usize)> = logged.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "{} moves answered ok, {} logged, {} missing, {} logged twice",
        ok.len(),
        logged.len(),
        missing.len(),
        twice.len()
    );
    if !missing.is_empty() {
        problems.push(format!(
            "{} ok-answered moves are not in the log (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(5)]
        ));
    }
    if !twice.is_empty() {
        problems.push(format!("moves logged twice: {twice:?}"));
    }
    assert!(
        ok.len() > 1000,
        "the load ran: {} moves answered ok",
        ok.len()
    );
    store.close().await;
    srv.stop().await;
    db.cleanup().await;
    assert!(problems.is_empty(), "{problems:#?}");
}

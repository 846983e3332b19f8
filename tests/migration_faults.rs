//! Migrations between zones through a crash: twenty agents move from A to B at once, each
//! `migrate` under an idempotency key, with durable replies (the default), and the daemon is
//! killed (`kill -9`) as soon as the first is answered, the others part way. After a restart:
//!
//! - the two logs agree for every agent: a departure from A (`agent_left`, `reason:
//!   "migrated"`, `to: B`) only after B reserved its place (`migration_reserved`, earlier in
//!   time), an arrival in B (`agent_entered` with `from`) only after that departure, and each
//!   of these at most once;
//! - every agent is in exactly one of {A, reserved in B, B}: a ticket answered before the
//!   crash joins B; an agent that got no answer retries the same `migrate` (same key): if it
//!   left A, it is told its ticket (`duplicate`) and joins B; if not, it is refused
//!   `not_joined` (the restart ended its session in A), and a place B held for it runs out.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::binary::{self, ADMIN};
use common::server::{Client, http};
use serde_json::{Value, json};

const AGENTS: usize = 20;

async fn events(addr: std::net::SocketAddr, zone: &str) -> Vec<Value> {
    let (status, body) = http(
        addr,
        "GET",
        &format!("/api/zones/{zone}/events?limit=1000"),
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["events"].as_array().unwrap().clone()
}

/// Each agent's events of one type in a log, by agent.
fn by_agent<'a>(log: &'a [Value], kind: &str) -> HashMap<String, Vec<&'a Value>> {
    let mut found: HashMap<String, Vec<&Value>> = HashMap::new();
    for e in log.iter().filter(|e| e["type"] == kind) {
        let agent = e["payload"]["agent_id"].as_str().unwrap().to_owned();
        found.entry(agent).or_default().push(e);
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_steps_leaves_every_agent_in_exactly_one_place() {
    let dir = std::env::temp_dir().join(format!(
        "thunderline-migration-kill-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let daemon = binary::start(&dir, &[]);
    let zone = json!({"name": "z", "capacity": 100, "permissions": 3});
    let a = daemon.zone(zone.clone()).await;
    let b = daemon.zone(zone).await;

    let mut clients = Vec::new();
    for i in 0..AGENTS {
        let agent = format!("agent-{i}");
        let (client, join_ref, _) = daemon.joined(&a, &agent, None).await;
        let token_b = daemon.token(&agent, &b).await;
        clients.push((agent, client, join_ref, token_b));
    }
    // Every migrate sent at once; the daemon dies when the first is answered.
    let (answered_tx, mut answered_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (agent, mut client, join_ref, token_b) in clients {
        let (a, b, answered) = (a.clone(), b.clone(), answered_tx.clone());
        tasks.push(tokio::spawn(async move {
            let payload =
                json!({"to": b, "token": token_b, "idempotency_key": format!("move-{agent}")});
            let r = client
                .push(Some(&join_ref), &format!("zone:{a}"), "migrate", payload)
                .await;
            // Only what is answered before the crash counts.
            let mut ticket = None;
            while let Some(f) = client.next_within(Duration::from_secs(5)).await {
                if f[1] == json!(r) && f[3] == "phx_reply" {
                    if f[4]["status"] == "ok" {
                        ticket = f[4]["response"]["ticket"].as_str().map(str::to_owned);
                    }
                    break;
                }
            }
            let _ = answered.send(());
            (agent, token_b, ticket)
        }));
    }
    drop(answered_tx);
    let _ = answered_rx.recv().await;
    daemon.kill_9();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    let answered = outcomes.iter().filter(|o| o.2.is_some()).count();

    let daemon = binary::start(&dir, &[]);
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0", daemon.addr);
    let log_a = events(daemon.addr, &a).await;
    let log_b = events(daemon.addr, &b).await;
    let left = by_agent(&log_a, "agent_left");
    let reserved = by_agent(&log_b, "migration_reserved");
    let mut moved = 0;
    let mut stayed = 0;
    for (agent, token_b, ticket) in outcomes {
        let departures: Vec<&&Value> = left
            .get(&agent)
            .map(|l| {
                l.iter()
                    .filter(|e| e["payload"]["reason"] == "migrated")
                    .collect()
            })
            .unwrap_or_default();
        let reservations = reserved.get(&agent).cloned().unwrap_or_default();
        assert!(
            departures.len() <= 1,
            "{agent} left A twice: {departures:?}"
        );
        assert!(
            reservations.len() <= 1,
            "{agent} reserved twice: {reservations:?}"
        );
        if let Some(departure) = departures.first() {
            assert_eq!(departure["payload"]["to"], json!(b));
            let reservation = reservations
                .first()
                .unwrap_or_else(|| panic!("{agent} left A with no place held in B"));
            let at = |e: &Value| {
                chrono::DateTime::parse_from_rfc3339(e["occurred_at"].as_str().unwrap()).unwrap()
            };
            assert!(
                at(reservation) <= at(departure),
                "{agent}: B reserved before A ended the session"
            );
        }
        if ticket.is_some() {
            assert_eq!(departures.len(), 1, "{agent} was answered ok: it left A");
        }
        // The agent comes back: with its ticket, or by asking the same migrate again.
        let mut client = Client::connect(&url).await;
        let ticket = match ticket {
            Some(ticket) => Some(ticket),
            None => {
                let payload =
                    json!({"to": b, "token": token_b, "idempotency_key": format!("move-{agent}")});
                let r = client
                    .push(None, &format!("zone:{a}"), "migrate", payload)
                    .await;
                let reply = client.reply_to(&r).await;
                if departures.is_empty() {
                    assert_eq!(reply["status"], "error", "{agent}: {reply}");
                    assert_eq!(
                        reply["response"]["reason"], "not_joined",
                        "{agent}: {reply}"
                    );
                    None
                } else {
                    assert_eq!(reply["status"], "ok", "{agent} left A: told again: {reply}");
                    assert_eq!(reply["response"]["duplicate"], true);
                    reply["response"]["ticket"].as_str().map(str::to_owned)
                }
            }
        };
        match ticket {
            Some(ticket) => {
                let (_, reply) = client
                    .join(
                        &format!("zone:{b}"),
                        json!({"agent_id": agent, "ticket": ticket}),
                    )
                    .await;
                assert_eq!(
                    reply["status"], "ok",
                    "{agent}'s place in B was held: {reply}"
                );
                moved += 1;
            }
            // A place B held for it (the crash came between the steps) is never used, and
            // runs out.
            None => stayed += 1,
        }
    }
    eprintln!("{answered} answered before the kill; {moved} moved, {stayed} stayed");
    assert_eq!(moved + stayed, AGENTS);
    // Each arrival in B once, after its departure from A (a join is answered before its
    // event is logged: read until the last is there).
    let entered = |log: &Vec<Value>| log.iter().filter(|e| e["type"] == "agent_entered").count();
    let log_b = common::read_until(10, || events(daemon.addr, &b), |log| entered(log) >= moved)
        .await
        .unwrap_or_else(|log| log);
    let arrived = by_agent(&log_b, "agent_entered");
    assert_eq!(arrived.values().map(Vec::len).sum::<usize>(), moved);
    for (agent, entries) in &arrived {
        assert_eq!(entries.len(), 1, "{agent} arrived once");
        assert_eq!(entries[0]["payload"]["from"], json!(a));
    }
    let (exit, _) = daemon.terminate();
    assert!(exit.success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A retry under the same key that arrives while the first is still under way (a client that
/// timed out, a broker that redelivered) is the same migration: it waits for it and is answered
/// as it is, never refused `migration_pending`, and the agent moves once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_under_the_same_key_while_the_first_is_under_way_is_answered_as_the_first() {
    let srv = common::server::start(None).await;
    let zone = json!({"name": "z", "capacity": 100, "permissions": 3});
    let a = srv.zone(zone.clone()).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = srv.zone(zone).await["id"].as_str().unwrap().to_owned();
    let mut clients = Vec::new();
    for i in 0..AGENTS {
        clients.push(srv.joined(&a, &format!("agent-{i}"), json!(3)).await);
    }
    let migrate = |agent: String| {
        let (a, b) = (a.clone(), b.clone());
        let srv = &srv;
        async move {
            let body = json!({"to": b, "idempotency_key": format!("move-{agent}")});
            srv.api(
                "POST",
                &format!("/api/zones/{a}/agents/{agent}/migrate"),
                Some(body),
            )
            .await
        }
    };
    // Each agent's migration sent twice at once.
    let answers = futures_util::future::join_all((0..AGENTS).map(|i| {
        let agent = format!("agent-{i}");
        let (first, retry) = (migrate(agent.clone()), migrate(agent));
        async move { tokio::join!(first, retry) }
    }))
    .await;
    for ((status, first), (again, retry)) in &answers {
        assert_eq!((*status, *again), (200, 200), "{first} / {retry}");
        assert_eq!(first["zone"], json!(b));
        assert_eq!(first["agent_id"], retry["agent_id"]);
    }
    let (_, log) = srv
        .api("GET", &format!("/api/zones/{b}/events?limit=1000"), None)
        .await;
    let reserved = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "migration_reserved")
        .count();
    let (_, zone_a) = srv.api("GET", &format!("/api/zones/{a}"), None).await;
    let (_, zone_b) = srv.api("GET", &format!("/api/zones/{b}"), None).await;
    assert_eq!(reserved, AGENTS, "each agent moved once");
    assert_eq!(zone_a["active_session_count"], 0);
    assert_eq!(zone_b["active_session_count"], AGENTS);
    drop(clients);
    srv.stop().await;
}

//! The daemon binary as a user runs it: SIGTERM mid-stream loses nothing that was accepted,
//! tells clients it is going away (1001, never 1000), exits 0, and a restart on the same data
//! directory serves the same zone with every accepted event in its audit log.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::binary;
use common::server::{Client, http};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Creates a zone over the admin API and joins it as `agent`; returns the client, the zone id,
/// the topic and the join ref.
async fn join_new_zone(
    addr: std::net::SocketAddr,
    name: &str,
    agent: &str,
) -> (Client, String, String, String) {
    let admin = Some(binary::ADMIN);
    let (status, zone) = http(
        addr,
        "POST",
        "/api/zones",
        Some(json!({"name": name, "permissions": 1})),
        admin,
    )
    .await;
    assert_eq!(status, 201, "{zone}");
    let id = zone["id"].as_str().unwrap().to_owned();
    let (status, token) = http(
        addr,
        "POST",
        "/api/tokens",
        Some(json!({"agent_id": agent, "zone_id": id, "permissions": 1, "ttl_seconds": 600})),
        admin,
    )
    .await;
    assert_eq!(status, 200, "{token}");
    let mut client = Client::connect(&format!("ws://{addr}/socket/websocket?vsn=2.0.0")).await;
    let topic = format!("zone:{id}");
    let (join_ref, reply) = client
        .join(&topic, json!({"agent_id": agent, "token": token["token"]}))
        .await;
    assert_eq!(reply["status"], "ok");
    (client, id, topic, join_ref)
}

/// Moves the daemon has accepted (answered ok) when it is sent SIGTERM: halfway through the
/// second burst of 50, while the rest of it is still being answered.
const MIDSTREAM: u64 = 75;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_loses_no_accepted_event() {
    let dir = std::env::temp_dir().join(format!(
        "thunderline-daemon-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let daemon = binary::start(&dir, &[]);
    let addr = daemon.addr;
    let admin = Some(binary::ADMIN);
    let (client, id, topic, join_ref) = join_new_zone(addr, "Durable", "mover").await;

    let (mut sink, mut stream) = client.ws.split();
    // Count every ok reply to a move, and the close code, as they come.
    let accepted_so_far = Arc::new(AtomicU64::new(0));
    let counted = accepted_so_far.clone();
    let reader = tokio::spawn(async move {
        let mut ok = 0u64;
        let mut code = None;
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Text(t) => {
                    let f: Value = serde_json::from_str(&t).unwrap();
                    if f[3] == "phx_reply"
                        && f[1].as_str().is_some_and(|r| r.starts_with('m'))
                        && f[4]["status"] == "ok"
                    {
                        ok += 1;
                        counted.store(ok, Ordering::SeqCst);
                    }
                }
                Message::Close(frame) => {
                    code = frame.map(|f| u16::from(f.code));
                    break;
                }
                _ => {}
            }
        }
        (ok, code)
    });
    // Moves keep coming until the daemon has exited (or stops taking them).
    let exited = Arc::new(AtomicBool::new(false));
    let done = exited.clone();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        for i in 0..100_000u64 {
            let frame = json!([join_ref, format!("m{i}"), topic, "agent_move", {"position": {"x": i, "y": 0, "z": 0}}]);
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
            sent += 1;
            if i % 50 == 0 {
                // Stay under the per-connection rate limit (200/s with bursts of 500).
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            if done.load(Ordering::SeqCst) {
                break;
            }
        }
        sent
    });
    // SIGTERM mid-stream: once the daemon has accepted some moves, while more keep coming.
    let midstream = common::eventually(20, async || {
        accepted_so_far.load(Ordering::SeqCst) >= MIDSTREAM
    })
    .await;
    let (status, printed) = tokio::task::spawn_blocking(move || daemon.terminate())
        .await
        .unwrap();
    exited.store(true, Ordering::SeqCst);
    let sent = sender.await.unwrap();
    let (accepted, code) = reader.await.unwrap();
    assert!(
        midstream,
        "the daemon had not accepted {MIDSTREAM} moves within 20 s (it accepted {accepted}, of {sent} sent)"
    );
    assert!(status.success(), "exit {status:?}; printed {printed:?}");
    assert_eq!(
        code,
        Some(1001),
        "clients are told the server is going away"
    );
    assert!(
        accepted > 0 && accepted <= sent,
        "accepted {accepted} of {sent}"
    );
    eprintln!("sent {sent}, accepted {accepted} before the shutdown");

    // Restart on the same data directory: the zone is there, and so is every accepted move.
    let daemon = binary::start(&dir, &[]);
    let (status, again) = http(daemon.addr, "GET", &format!("/api/zones/{id}"), None, admin).await;
    assert_eq!(status, 200);
    assert_eq!(again["name"], "Durable");
    assert_eq!(
        again["active_session_count"], 0,
        "sessions do not survive a restart"
    );
    let (_, events) = http(
        daemon.addr,
        "GET",
        &format!("/api/zones/{id}/events?limit=1000"),
        None,
        admin,
    )
    .await;
    let events = events["events"].as_array().unwrap();
    let moves = events.iter().filter(|e| e["type"] == "agent_moved").count() as u64;
    assert!(
        moves >= accepted,
        "{moves} moves audited, {accepted} accepted"
    );
    assert!(moves <= sent);
    assert_eq!(
        events[0]["type"], "zone_created",
        "the log starts with the creation"
    );
    assert_eq!(events[1]["type"], "agent_entered");
    assert_eq!(
        events.last().unwrap()["type"],
        "agent_left",
        "the disconnect was audited too"
    );
    let (status, _) = daemon.terminate();
    assert!(status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_start_generates_and_keeps_its_secrets() {
    let dir = std::env::temp_dir().join(format!(
        "thunderline-fresh-{}",
        uuid::Uuid::now_v7().simple()
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args([
            "token",
            "--agent",
            "a",
            "--zone",
            "not-a-zone",
            "--data-dir",
        ])
        .arg(&dir)
        .env_remove("THUNDERLINE_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a UUID"));
    // `token` never makes a server: only `serve` generates the secrets, on its first start.
    assert!(!dir.exists(), "a refused token created nothing");
    let fresh_start = || {
        use std::io::BufRead;
        let mut serve = std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .env_remove("THUNDERLINE_SECRET")
            .env_remove("THUNDERLINE_ADMIN_TOKEN")
            .env_remove("THUNDERLINE_DATABASE_URL")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let listening = std::io::BufReader::new(serve.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("thunderline listening on "));
        let _ = serve.kill();
        let _ = serve.wait();
        assert!(listening, "serve started");
    };
    fresh_start();
    let zone = uuid::Uuid::now_v7().to_string();
    let mint = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
            .args([
                "token",
                "--agent",
                "a",
                "--zone",
                &zone,
                "--perms",
                "spawn_agents,modify_zone",
                "--ttl",
                "1h",
                "--data-dir",
            ])
            .arg(&dir)
            .env_remove("THUNDERLINE_SECRET")
            .output()
            .unwrap()
    };
    let first = mint();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let secret = std::fs::read_to_string(dir.join("secret")).unwrap();
    assert_eq!(
        secret.len(),
        64,
        "a generated secret is kept in the data dir"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("secret"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "readable by its owner only");
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o700,
            "a created data directory is its owner's only"
        );
    }
    let signer = thunderline::realtime::TokenSigner::new(secret.as_bytes()).unwrap();
    let token = String::from_utf8(first.stdout).unwrap();
    let claims = signer.verify(token.trim(), chrono::Utc::now()).unwrap();
    assert_eq!(claims.perms.bits(), 3);
    fresh_start();
    assert!(mint().status.success());
    assert_eq!(
        std::fs::read_to_string(dir.join("secret")).unwrap(),
        secret,
        "kept, not regenerated"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_validates_pipeline_files_without_starting_anything() {
    let run = |file: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
            .arg("check")
            .arg(file)
            .output()
            .unwrap()
    };
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/zones.toml");
    let out = run(&shipped);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("zones.toml: ok\n"));

    let bad = std::env::temp_dir().join(format!("bad-{}.toml", uuid::Uuid::now_v7().simple()));
    std::fs::write(
        &bad,
        "tick_interval_ms = 1000\n\n[batchers.audit]\nbatch_size = 0\nbatch_timeout_ms = 10\n",
    )
    .unwrap();
    let out = run(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&bad.display().to_string()),
        "names the file: {err}"
    );
    assert!(err.contains("line 4"), "names the line: {err}");
    assert!(err.contains("nonzero"), "says what was expected: {err}");

    // Sources have no retry settings any more: a file that still has them says where they went.
    std::fs::write(
        &bad,
        "[sources.nats]\nstream = \"S\"\n\n[sources.nats.retry]\nmax_attempts = 5\n",
    )
    .unwrap();
    let out = run(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(err.contains("line 4"), "{err}");
    assert!(err.contains("[processors.retry]"), "{err}");
    let _ = std::fs::remove_file(&bad);
}

/// With a pipeline file, PostgreSQL and JSON logs: a zone over the API, a join and a push over a
/// WebSocket, and the metrics move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_a_config_and_postgres_and_json_logs() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let dir =
        std::env::temp_dir().join(format!("thunderline-pg-{}", uuid::Uuid::now_v7().simple()));
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/zones.toml");
    let daemon = binary::start_with(
        &dir,
        &[
            "--config",
            config.to_str().unwrap(),
            "--database",
            &db.url,
            "--log-format",
            "json",
        ],
        std::process::Stdio::piped(),
    );
    let addr = daemon.addr;
    let (mut c, id, topic, join_ref) = join_new_zone(addr, "On Postgres", "pg").await;
    let r = c
        .push(
            Some(&join_ref),
            &topic,
            "agent_move",
            json!({"position": {"x": 1, "y": 2, "z": 3}}),
        )
        .await;
    assert_eq!(c.reply_to(&r).await["status"], "ok");
    common::server::metrics_showing(
        addr,
        &[
            "thunderline_channel_joins_total{outcome=\"ok\"} 1",
            "thunderline_channel_pushes_total 1",
            "thunderline_zone_command_seconds_count{command=\"agent_move\"} 1",
            "thunderline_socket_connections 1",
        ],
    )
    .await;
    drop(c);
    let (status, logs) = daemon.terminate();
    assert!(status.success());
    let first: Value =
        serde_json::from_str(logs.first().expect("it logged")).expect("JSON log lines");
    assert_eq!(first["fields"]["message"], "thunderline listening");
    for line in &logs {
        serde_json::from_str::<Value>(line).expect("every log line is JSON");
    }
    // Everything reached the Postgres audit log.
    let store = thunderline::store::Store::connect(&db.url).await.unwrap();
    let events = store
        .zone_events(uuid::Uuid::parse_str(&id).unwrap(), None, None, None)
        .await
        .unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.name()).collect();
    assert_eq!(
        kinds,
        ["zone_created", "agent_entered", "agent_moved", "agent_left"]
    );
    store.close().await;
    db.cleanup().await;
    let _ = std::fs::remove_dir_all(&dir);
}

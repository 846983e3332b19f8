//! Hardening against hostile clients, over real sockets: what an upgrade must carry to become
//! a WebSocket.

mod common;

use common::server::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status code the server answers an upgrade request with `key` (none: no key header).
async fn upgrade_status(addr: std::net::SocketAddr, key: Option<&str>) -> u16 {
    upgrade(addr, "127.0.0.1".parse().unwrap(), key).await.0
}

/// An upgrade request from `from` (a loopback address) with `key`: the status it is answered
/// with, and the stream, to keep the connection open.
async fn upgrade(
    addr: std::net::SocketAddr,
    from: std::net::IpAddr,
    key: Option<&str>,
) -> (u16, TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::new(from, 0)).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let key = key
        .map(|k| format!("Sec-WebSocket-Key: {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /socket/websocket?vsn=2.0.0 HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n{key}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 1024];
    let n = tcp.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    (status, tcp)
}

/// RFC 6455 §4.2.1: the key is the base64 of 16 bytes; anything else is a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_whose_key_is_not_16_bytes_of_base64_is_refused_400() {
    let srv = start(None).await;
    let addr = srv.server.addr;
    assert_eq!(
        upgrade_status(addr, Some("dGhlIHNhbXBsZSBub25jZQ==")).await,
        101,
        "the RFC's own sample key"
    );
    let long = "A".repeat(4096);
    for key in [
        "c2hvcnQ=",                 // 5 bytes
        "dGhlIHNhbXBsZSBub25jZQ",   // no padding: not canonical base64
        "dGhlIHNhbXBsZSBub25jZSE=", // 17 bytes
        "!!!!!!!!!!!!!!!!!!!!!!!!", // not base64
        long.as_str(),
    ] {
        assert_eq!(upgrade_status(addr, Some(key)).await, 400, "key {key:.40}");
    }
    assert_eq!(upgrade_status(addr, None).await, 400, "no key at all");
    srv.stop().await;
}

/// Tokens live at most `--max-token-ttl` (default 24 h): a longer TTL is refused with 422 by the
/// admin API and with an error by `thunderline token`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_ttl_above_the_maximum_is_refused() {
    let srv = start(None).await;
    let zone = srv
        .zone(serde_json::json!({"name": "ttl", "permissions": 3}))
        .await;
    let zone = zone["id"].as_str().unwrap();
    let mint = |ttl: i64| {
        let body = serde_json::json!({
            "agent_id": "a", "zone_id": zone, "permissions": ["spawn_agents"], "ttl_seconds": ttl
        });
        srv.api("POST", "/api/tokens", Some(body))
    };
    assert_eq!(mint(24 * 3600).await.0, 200, "exactly the maximum");
    let (status, body) = mint(24 * 3600 + 1).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"], "ttl_too_long", "{body}");
    let (status, _) = mint(10 * 365 * 24 * 3600).await;
    assert_eq!(status, 422);
    srv.stop().await;

    let cli = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
            .args(["token", "--agent", "a", "--zone"])
            .arg(uuid::Uuid::now_v7().to_string())
            .args(extra)
            .env(
                "THUNDERLINE_SECRET",
                "a-test-secret-that-is-long-enough-0123456789",
            )
            .env_remove("THUNDERLINE_MAX_TOKEN_TTL")
            .output()
            .unwrap()
    };
    let refused = cli(&["--ttl", "90000"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("above the maximum of 86400"), "{said}");
    assert!(cli(&["--ttl", "86400"]).status.success());
    assert!(
        cli(&["--ttl", "90000", "--max-token-ttl", "100000"])
            .status
            .success()
    );
    // Durations may carry a unit.
    assert!(cli(&["--ttl", "24h"]).status.success());
    assert!(!cli(&["--ttl", "25h"]).status.success());
    assert!(
        !cli(&["--ttl", "2h", "--max-token-ttl", "1h"])
            .status
            .success()
    );
    let refused = cli(&["--ttl", "1 fortnight"]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("is not a duration"), "{said}");
}

/// A zone for 100 agents that may spawn and move: (zone id, topic).
async fn zone_for_100(srv: &common::server::TestServer) -> (String, String) {
    let zone = srv
        .zone(serde_json::json!({"name": "guarded", "capacity": 100, "permissions": 3}))
        .await;
    let zone = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{zone}");
    (zone, topic)
}

/// A new connection with `agent` joined to `topic` with `token`.
async fn joined(
    srv: &common::server::TestServer,
    topic: &str,
    agent: &str,
    token: &str,
) -> common::server::Client {
    let mut client = common::server::Client::connect(&srv.ws_url()).await;
    let (_, reply) = client
        .join(
            topic,
            serde_json::json!({"agent_id": agent, "token": token}),
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    client
}

/// One agent may hold at most `--max-sessions-per-agent` sessions (default 4) in a zone: one
/// agent's token alone cannot fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_past_its_session_cap_is_refused_too_many_sessions() {
    use common::server::Client;
    let srv = start(None).await;
    let (zone, topic) = zone_for_100(&srv).await;
    let token = srv
        .token("a", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(joined(&srv, &topic, "a", &token).await);
    }
    let mut fifth = Client::connect(&srv.ws_url()).await;
    let (_, reply) = fifth
        .join(&topic, serde_json::json!({"agent_id": "a", "token": token}))
        .await;
    assert_eq!(reply["status"], "error", "{reply}");
    assert_eq!(reply["response"]["reason"], "too_many_sessions", "{reply}");
    // Another agent is not held back, and the zone counts the four.
    let other = srv
        .token("b", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let (_, reply) = fifth
        .join(&topic, serde_json::json!({"agent_id": "b", "token": other}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let (_, view) = srv.api("GET", &format!("/api/zones/{zone}"), None).await;
    assert_eq!(view["active_session_count"], 5);
    // One of the four leaves: the agent may join again.
    drop(held.pop());
    let mut again = Client::connect(&srv.ws_url()).await;
    let mut reply = serde_json::Value::Null;
    let joined = common::eventually(5, async || {
        (_, reply) = again
            .join(&topic, serde_json::json!({"agent_id": "a", "token": token}))
            .await;
        reply["status"] == "ok"
    })
    .await;
    assert!(
        joined,
        "a freed session can be taken again; within 5 s the join was still answered {reply}"
    );
    drop(held);
    srv.stop().await;
}

#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Generated secrets are private from their first byte, in a private data directory; a secret
/// file others can read, or a short admin token from the environment, stops the server at
/// start with the reason.
#[cfg(unix)]
#[test]
fn secrets_are_private_and_a_shared_or_short_one_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    use thunderline::daemon::server::load_secrets;
    let dir = std::env::temp_dir().join(format!("thunderline-secrets-{}", uuid::Uuid::now_v7()));
    let data = dir.join("data");
    // Only when neither variable is set are files used; this test's process sets neither.
    if std::env::var("THUNDERLINE_SECRET").is_ok()
        || std::env::var("THUNDERLINE_ADMIN_TOKEN").is_ok()
    {
        return;
    }
    let secrets = load_secrets(&data).unwrap();
    let kept = std::path::absolute(data.join("admin_token")).unwrap();
    assert_eq!(
        secrets.admin_token_origin,
        thunderline::daemon::server::SecretOrigin::Generated(kept.clone())
    );
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(mode(&data.join("secret")), 0o600);
    assert_eq!(mode(&data.join("admin_token")), 0o600);
    // Read again: the same, nothing generated.
    let again = load_secrets(&data).unwrap();
    assert_eq!(again.admin_token, secrets.admin_token);
    assert_eq!(
        again.admin_token_origin,
        thunderline::daemon::server::SecretOrigin::File(kept)
    );

    // Readable by the group: refused, saying how to fix it.
    let token = data.join("admin_token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let Err(err) = load_secrets(&data) else {
        panic!("a secret file others can read was taken");
    };
    let err = err.to_string();
    assert!(
        err.contains("readable by its group") && err.contains("chmod 600"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env_remove("THUNDERLINE_SECRET")
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

    // A short admin token from the environment: refused.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("THUNDERLINE_ADMIN_TOKEN", "short-token")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("THUNDERLINE_ADMIN_TOKEN must be at least 32 characters"),
        "{said}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The admin API takes bodies up to 128 KiB (a zone's 64 KiB of properties fit): past it, 413
/// with a reason, and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_body_over_the_limit_is_refused_413() {
    let srv = start(None).await;
    let fits = serde_json::json!({"name": "big", "properties": {"blob": "x".repeat(60 * 1024)}});
    assert_eq!(srv.api("POST", "/api/zones", Some(fits)).await.0, 201);
    let over =
        serde_json::json!({"name": "bigger", "properties": {"blob": "x".repeat(200 * 1024)}});
    let (status, body) = srv.api("POST", "/api/zones", Some(over)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"], "payload_too_large", "{body}");
    let (_, page) = srv.api("GET", "/api/zones?q=bigger", None).await;
    assert_eq!(page["total"], 0, "nothing created");
    srv.stop().await;
}

/// `GET path` on `addr`, with a bearer token if given: the status and the body.
async fn get(addr: std::net::SocketAddr, path: &str, bearer: Option<&str>) -> (u16, String) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let auth = bearer
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, response)
}

/// `/metrics` can require a bearer token (`--metrics-token`), or move to its own address
/// (`--metrics-listen`), where the public address no longer serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_protected_by_a_token_or_moved_off_the_public_address() {
    let dir = std::env::temp_dir().join(format!("thunderline-metrics-{}", uuid::Uuid::now_v7()));
    let token = "a-metrics-token-that-is-long-enough-42";
    let daemon = common::binary::start(&dir, &["--metrics-token", token]);
    assert_eq!(get(daemon.addr, "/metrics", None).await.0, 401);
    assert_eq!(get(daemon.addr, "/metrics", Some("wrong")).await.0, 401);
    let (status, body) = get(daemon.addr, "/metrics", Some(token)).await;
    assert_eq!(status, 200);
    assert!(body.contains("thunderline_"), "{body:.200}");
    let _ = daemon.terminate();

    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let metrics_at = free.local_addr().unwrap();
    drop(free);
    let daemon = common::binary::start(&dir, &["--metrics-listen", &metrics_at.to_string()]);
    assert_eq!(
        get(daemon.addr, "/metrics", None).await.0,
        404,
        "not on the public address"
    );
    let (status, body) = get(metrics_at, "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("thunderline_"));
    assert_eq!(
        get(metrics_at, "/api/zones", None).await.0,
        404,
        "only /metrics there"
    );
    let _ = daemon.terminate();

    // A short metrics token is refused at start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-token",
            "short",
            "--data-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--metrics-token must be at least 32"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Pings and binary frames count against the per-connection rate limit like any frame: a flood
/// of them is closed with 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_pings_or_binary_frames_is_closed_like_any_flood() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let srv = start(None).await;
    for flood in [
        Message::Ping(vec![1].into()),
        Message::Binary(vec![1].into()),
    ] {
        let (mut ws, _) = tokio_tungstenite::connect_async(srv.ws_url())
            .await
            .unwrap();
        let mut closed = None;
        'send: for _ in 0..2_000 {
            if ws.send(flood.clone()).await.is_err() {
                break;
            }
            // Read whatever came back so far (pongs, errors, the close).
            while let Ok(Some(msg)) =
                tokio::time::timeout(std::time::Duration::ZERO, ws.next()).await
            {
                match msg {
                    Ok(Message::Close(frame)) => {
                        closed = frame.map(|f| u16::from(f.code));
                        break 'send;
                    }
                    Ok(_) => {}
                    Err(_) => break 'send,
                }
            }
        }
        while closed.is_none() {
            match tokio::time::timeout(std::time::Duration::from_secs(5), ws.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => closed = frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
        }
        assert_eq!(closed, Some(1008), "{flood:?} flood");
    }
    srv.stop().await;
}

/// The next frame matching `pred` within `secs`, skipping others; None if none came.
async fn frame_within(
    client: &mut common::server::Client,
    secs: u64,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Option<serde_json::Value> {
    tokio::time::timeout(std::time::Duration::from_secs(secs), async {
        loop {
            match client.next().await {
                Some(f) if pred(&f) => return Some(f),
                Some(_) | None => {}
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// A zone, with an observer `b` joined to it: (zone id, topic, observer).
async fn observed_zone(
    srv: &common::server::TestServer,
) -> (String, String, common::server::Client) {
    let (zone, topic) = zone_for_100(srv).await;
    let token = srv
        .token("b", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let observer = joined(srv, &topic, "b", &token).await;
    (zone, topic, observer)
}

/// Whether `frame` says that agent `a` left the zone.
fn a_left(frame: &serde_json::Value) -> bool {
    frame[3] == "agent_left" && frame[4]["agent_id"] == "a"
}

/// A session lasts no longer than its token: at expiry the server closes the channel
/// (`phx_close`, reason `token_expired`) and the agent leaves as on any leave; the connection
/// stays open and takes a join with a fresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_token_expires_is_closed_and_its_agent_leaves() {
    use common::server::Client;
    let srv = start(None).await;
    let (zone, topic, mut observer) = observed_zone(&srv).await;
    let (status, body) = srv
        .api(
            "POST",
            "/api/tokens",
            Some(serde_json::json!({"agent_id": "a", "zone_id": zone,
                "permissions": ["spawn_agents"], "ttl_seconds": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let short = body["token"].as_str().unwrap().to_owned();
    let mut a = Client::connect(&srv.ws_url()).await;
    let (join_ref, reply) = a
        .join(&topic, serde_json::json!({"agent_id": "a", "token": short}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let expires_at: chrono::DateTime<chrono::Utc> = body["expires_at"]
        .as_str()
        .and_then(|t| t.parse().ok())
        .expect("the token's expiry");
    let close = frame_within(&mut a, 5, |f| f[3] == "phx_close")
        .await
        .expect("the channel is closed when its token expires");
    let closed_at = chrono::Utc::now();
    assert_eq!(close[0], serde_json::json!(join_ref), "{close}");
    assert_eq!(close[2], serde_json::json!(topic));
    assert_eq!(close[4]["reason"], "token_expired", "{close}");
    let late = closed_at - expires_at;
    assert!(
        late >= chrono::Duration::zero() && late <= chrono::Duration::milliseconds(700),
        "closed {late:?} after the token's expiry at {expires_at}"
    );
    assert!(
        frame_within(&mut observer, 3, a_left).await.is_some(),
        "the others see the agent leave"
    );
    let (_, view) = srv.api("GET", &format!("/api/zones/{zone}"), None).await;
    assert_eq!(view["active_session_count"], 1, "{view}");
    // The old token no longer joins; a fresh one does, on the same connection.
    let (_, reply) = a
        .join(&topic, serde_json::json!({"agent_id": "a", "token": short}))
        .await;
    assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");
    let fresh = srv
        .token("a", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let (_, reply) = a
        .join(&topic, serde_json::json!({"agent_id": "a", "token": fresh}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let metrics = common::server::metrics(srv.server.addr).await;
    assert!(
        metrics.contains("thunderline_channel_sessions_ended_total{reason=\"token_expired\"} 1"),
        "{metrics}"
    );
    srv.stop().await;
}

/// `POST /api/tokens/revoke` refuses later joins with the agent's tokens minted before it and
/// ends the agent's live sessions in the zone within a second; other agents and tokens minted
/// afterwards are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_an_agents_tokens_ends_its_sessions_and_refuses_the_old_tokens() {
    let srv = start(None).await;
    let (zone, topic, mut observer) = observed_zone(&srv).await;
    let token = srv
        .token("a", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let mut sessions = Vec::new();
    for _ in 0..2 {
        sessions.push(joined(&srv, &topic, "a", &token).await);
    }
    // Bad requests change nothing.
    for (body, want) in [
        (serde_json::json!({"agent_id": "a"}), 400),
        (serde_json::json!({"agent_id": "a", "zone_id": "nope"}), 400),
        (
            serde_json::json!({"agent_id": "a", "zone_id": uuid::Uuid::now_v7()}),
            404,
        ),
        (serde_json::json!({"agent_id": "", "zone_id": zone}), 400),
    ] {
        let (status, reply) = srv.api("POST", "/api/tokens/revoke", Some(body)).await;
        assert_eq!(status, want, "{reply}");
    }
    let (status, _) = common::server::http(
        srv.server.addr,
        "POST",
        "/api/tokens/revoke",
        Some(serde_json::json!({"agent_id": "a", "zone_id": zone})),
        None,
    )
    .await;
    assert_eq!(status, 401, "the admin token is needed");

    let revoked_at = std::time::Instant::now();
    let (status, reply) = srv
        .api(
            "POST",
            "/api/tokens/revoke",
            Some(serde_json::json!({"agent_id": "a", "zone_id": zone})),
        )
        .await;
    assert_eq!(status, 200, "{reply}");
    for a in &mut sessions {
        let close = frame_within(a, 2, |f| f[3] == "phx_close")
            .await
            .expect("each live session is closed");
        assert_eq!(close[4]["reason"], "token_revoked", "{close}");
    }
    let took = revoked_at.elapsed();
    assert!(
        took < std::time::Duration::from_secs(1),
        "sessions ended {took:?} after the revocation"
    );
    assert!(frame_within(&mut observer, 3, a_left).await.is_some());
    assert!(frame_within(&mut observer, 3, a_left).await.is_some());
    let (_, view) = srv.api("GET", &format!("/api/zones/{zone}"), None).await;
    assert_eq!(view["active_session_count"], 1, "only b is left: {view}");
    // The old token is refused; one minted now works; b was never touched.
    let (_, reply) = sessions[0]
        .join(&topic, serde_json::json!({"agent_id": "a", "token": token}))
        .await;
    assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");
    let fresh = srv
        .token("a", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let (_, reply) = sessions[0]
        .join(&topic, serde_json::json!({"agent_id": "a", "token": fresh}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let r = observer
        .push(None, &topic, "get_zone_state", serde_json::json!({}))
        .await;
    assert_eq!(observer.reply_to(&r).await["status"], "ok");
    srv.stop().await;
}

/// A revocation is recorded: after a restart the revoked token still opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_outlives_a_restart() {
    use common::binary::{ADMIN, start as daemon};
    use common::server::{Client, http};
    let dir = std::env::temp_dir().join(format!("thunderline-revoke-{}", uuid::Uuid::now_v7()));
    let first = daemon(&dir, &[]);
    let (status, zone) = http(
        first.addr,
        "POST",
        "/api/zones",
        Some(serde_json::json!({"name": "kept", "permissions": 3})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 201, "{zone}");
    let zone = zone["id"].as_str().unwrap().to_owned();
    let body = serde_json::json!({"agent_id": "a", "zone_id": zone,
        "permissions": ["spawn_agents"], "ttl_seconds": 600});
    let mint = |addr| {
        let body = body.clone();
        async move {
            let (status, body) = http(addr, "POST", "/api/tokens", Some(body), Some(ADMIN)).await;
            assert_eq!(status, 200, "{body}");
            body["token"].as_str().unwrap().to_owned()
        }
    };
    let old = mint(first.addr).await;
    let (status, _) = http(
        first.addr,
        "POST",
        "/api/tokens/revoke",
        Some(serde_json::json!({"agent_id": "a", "zone_id": zone})),
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = first.terminate();
    assert!(status.success());

    let second = daemon(&dir, &[]);
    let url = format!("ws://{}/socket/websocket?vsn=2.0.0", second.addr);
    let topic = format!("zone:{zone}");
    let mut client = Client::connect(&url).await;
    let (_, reply) = client
        .join(&topic, serde_json::json!({"agent_id": "a", "token": old}))
        .await;
    assert_eq!(reply["response"]["reason"], "unauthorized", "{reply}");
    let fresh = mint(second.addr).await;
    let (_, reply) = client
        .join(&topic, serde_json::json!({"agent_id": "a", "token": fresh}))
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    drop(client);
    let _ = second.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

/// An upgrade from `from` with a good key.
async fn upgrade_from(addr: std::net::SocketAddr, from: std::net::IpAddr) -> (u16, TcpStream) {
    upgrade(addr, from, Some("dGhlIHNhbXBsZSBub25jZQ==")).await
}

/// `--max-connections` and `--max-connections-per-ip` refuse upgrades past them with 503,
/// counted in `/metrics`; a closed connection frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_caps_refuse_upgrades_with_503_and_count_them() {
    let dir = std::env::temp_dir().join(format!("thunderline-caps-{}", uuid::Uuid::now_v7()));
    let daemon = common::binary::start(
        &dir,
        &["--max-connections", "3", "--max-connections-per-ip", "2"],
    );
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    let (s1, first) = upgrade_from(daemon.addr, ip("127.0.0.1")).await;
    let (s2, _second) = upgrade_from(daemon.addr, ip("127.0.0.1")).await;
    assert_eq!((s1, s2), (101, 101));
    let (s3, _) = upgrade_from(daemon.addr, ip("127.0.0.1")).await;
    assert_eq!(s3, 503, "a third from one address");
    let (s4, _other) = upgrade_from(daemon.addr, ip("127.0.0.2")).await;
    assert_eq!(s4, 101, "another address still may");
    let (s5, _) = upgrade_from(daemon.addr, ip("127.0.0.3")).await;
    assert_eq!(s5, 503, "past three in all");
    common::server::metrics_showing(
        daemon.addr,
        &[
            "thunderline_socket_connections_refused_total{reason=\"max_connections\"} 1",
            "thunderline_socket_connections_refused_total{reason=\"max_connections_per_ip\"} 1",
            // A socket is counted once its task starts, a moment after the 101.
            "thunderline_socket_connections 3",
        ],
    )
    .await;
    // A connection that goes frees its place.
    drop(first);
    let mut again = 0;
    let freed = common::eventually(5, async || {
        again = upgrade_from(daemon.addr, ip("127.0.0.1")).await.0;
        again == 101
    })
    .await;
    assert!(
        freed,
        "the closed connection's place was not freed within 5 s: an upgrade is still answered {again}"
    );
    let _ = daemon.terminate();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that stops reading while asking for large replies is cut off by the bytes it has
/// waiting (1011, as for too many frames), long before it has 1,024 frames waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_by_the_bytes_waiting() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let srv = start(None).await;
    // Properties near their 64 KiB cap: every get_zone_state reply carries them.
    let filler = "x".repeat(60 * 1024);
    let zone = srv
        .zone(serde_json::json!({"name": "heavy", "permissions": 3,
            "properties": {"filler": filler}}))
        .await;
    let zone = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{zone}");
    let token = srv
        .token("a", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    // A small receive window, so what the client does not read backs up on the server soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(srv.server.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(srv.ws_url(), tcp)
        .await
        .unwrap();
    let join = serde_json::json!(["1", "1", topic, "phx_join", {"agent_id": "a", "token": token}]);
    ws.send(Message::text(join.to_string())).await.unwrap();
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else {
            panic!("no join reply")
        };
        if t.contains("phx_reply") {
            assert!(t.contains("\"ok\""), "{t}");
            break;
        }
    }
    // 100 replies of 60 KiB: 6 MiB, but only 100 frames.
    for n in 0..100 {
        let ask = serde_json::json!(["1", format!("q{n}"), topic, "get_zone_state", {}]);
        ws.send(Message::text(ask.to_string())).await.unwrap();
    }
    // Read nothing until the server has cut this client off; then what reached the socket
    // before that, and the close frame.
    let mut cut = None;
    let cut_off = common::eventually(10, async || {
        cut = common::server::metric_now(
            srv.server.addr,
            "thunderline_channel_slow_consumer_disconnects_total",
        )
        .await;
        cut == Some(1.0)
    })
    .await;
    assert!(
        cut_off,
        "the client that stopped reading was not cut off within 10 s (slow-consumer disconnects: {cut:?})"
    );
    let mut replies = 0;
    let close = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    if t.contains("phx_reply") {
                        replies += 1;
                    }
                }
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the server closes the connection");
    assert_eq!(close, Some(1011), "closed as a slow consumer");
    assert!(replies < 100, "cut off before all 100 replies ({replies})");
    let metrics = common::server::metrics(srv.server.addr).await;
    assert!(
        metrics.contains("thunderline_channel_slow_consumer_disconnects_total 1"),
        "{metrics}"
    );
    srv.stop().await;
}

/// How long a server that has printed its last start-up line is watched for anything more
/// before it is stopped. A negative (nothing else, no token in particular, is printed), so it
/// can only be shown over a window: the start-up lines are printed one after the other, at once.
#[cfg(unix)]
const QUIET_AFTER_START: std::time::Duration = std::time::Duration::from_secs(1);

/// Runs `thunderline serve` on a fresh port with `data_dir` (through `script`, on a terminal,
/// when `on_terminal`) until it has printed a line containing `last` (its last start-up line
/// here), watches it for [`QUIET_AFTER_START`] more, then stops it; everything it wrote.
#[cfg(unix)]
fn serve_output(data_dir: &std::path::Path, on_terminal: bool, last: &str) -> String {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let serve = format!(
        "exec {} serve --listen 127.0.0.1:0 --data-dir {}",
        env!("CARGO_BIN_EXE_thunderline"),
        data_dir.display()
    );
    let mut command = if on_terminal {
        let mut c = Command::new("script");
        c.args(["-qfec", &serve, "/dev/null"]);
        c
    } else {
        let mut c = Command::new("sh");
        c.args(["-c", &serve]);
        c
    };
    let mut child = command
        .env_remove("THUNDERLINE_SECRET")
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starts");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // What it prints, as it prints it.
    let (chunks, printed) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || chunks.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut all = Vec::new();
    let has_last_line = |all: &[u8]| {
        String::from_utf8_lossy(all)
            .split_inclusive('\n')
            .any(|l| l.ends_with('\n') && l.contains(last))
    };
    // Read until the line comes (20 s at most), then through the quiet window.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut quiet_until = None;
    loop {
        let until = quiet_until.unwrap_or(deadline);
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        match printed.recv_timeout(left) {
            Ok(chunk) => all.extend(chunk),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if quiet_until.is_none() && has_last_line(&all) {
            quiet_until = Some(Instant::now() + QUIET_AFTER_START);
        }
    }
    let started = quiet_until.is_some();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    // The rest, up to the end of its output.
    all.extend(printed.iter().flatten());
    let said = format!("{}{}", String::from_utf8_lossy(&all), err.join().unwrap());
    assert!(
        started,
        "the server did not print a line with {last:?} within 20 s; it printed {said}"
    );
    said
}

/// A generated admin token is shown once, on the terminal that started the server: never when
/// the output goes to a pipe or a file (a log), and never again on later starts.
#[cfg(unix)]
#[test]
fn a_generated_admin_token_is_printed_only_once_and_only_on_a_terminal() {
    if std::process::Command::new("script")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(
            std::env::var("CI").is_err(),
            "`script` (util-linux) is needed"
        );
        return;
    }
    let dir = std::env::temp_dir().join(format!("thunderline-print-{}", uuid::Uuid::now_v7()));
    let piped = dir.join("piped");
    let said = serve_output(
        &piped,
        false,
        "not printed, since this output is not a terminal",
    );
    let token = std::fs::read_to_string(piped.join("admin_token")).unwrap();
    assert!(said.contains("listening on"), "{said}");
    assert!(!said.contains(token.trim()), "printed to a pipe: {said}");
    assert!(said.contains("not printed"), "{said}");

    let tty = dir.join("tty");
    let said = serve_output(&tty, true, "shown only this once");
    let token = std::fs::read_to_string(tty.join("admin_token")).unwrap();
    assert_eq!(said.matches(token.trim()).count(), 1, "{said}");
    // Nothing generated this time: the store line is the last.
    let said = serve_output(&tty, true, "  store: ");
    assert!(said.contains("listening on"), "{said}");
    assert!(!said.contains(token.trim()), "printed again: {said}");
    let _ = std::fs::remove_dir_all(&dir);
}

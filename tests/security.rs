//! Hardening against hostile clients, over real sockets: what an upgrade must carry to become
//! a WebSocket.

mod common;

use common::server::start;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The status code the server answers an upgrade request with `key` (none: no key header).
async fn upgrade_status(addr: std::net::SocketAddr, key: Option<&str>) -> u16 {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
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
    head.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"))
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
}

/// One agent may hold at most `--max-sessions-per-agent` sessions (default 4) in a zone: one
/// agent's token alone cannot fill it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_past_its_session_cap_is_refused_too_many_sessions() {
    use common::server::Client;
    let srv = start(None).await;
    let zone = srv
        .zone(serde_json::json!({"name": "cap", "capacity": 100, "permissions": 3}))
        .await;
    let zone = zone["id"].as_str().unwrap().to_owned();
    let topic = format!("zone:{zone}");
    let token = srv
        .token("a", &zone, serde_json::json!(["spawn_agents"]))
        .await;
    let mut held = Vec::new();
    for n in 0..4 {
        let mut c = Client::connect(&srv.ws_url()).await;
        let (_, reply) = c
            .join(&topic, serde_json::json!({"agent_id": "a", "token": token}))
            .await;
        assert_eq!(reply["status"], "ok", "session {n}: {reply}");
        held.push(c);
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
    let mut joined = false;
    for _ in 0..100 {
        let (_, reply) = again
            .join(&topic, serde_json::json!({"agent_id": "a", "token": token}))
            .await;
        if reply["status"] == "ok" {
            joined = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(joined, "a freed session can be taken again");
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
    assert!(secrets.admin_token_generated);
    assert_eq!(mode(&data), 0o700, "the data directory");
    assert_eq!(mode(&data.join("secret")), 0o600);
    assert_eq!(mode(&data.join("admin_token")), 0o600);
    // Read again: the same, nothing generated.
    let again = load_secrets(&data).unwrap();
    assert_eq!(again.admin_token, secrets.admin_token);
    assert!(!again.admin_token_generated);

    // Readable by the group: refused, saying how to fix it.
    let token = data.join("admin_token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).unwrap();
    let Err(err) = load_secrets(&data) else {
        panic!("a secret file others can read was taken");
    };
    let err = err.to_string();
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
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

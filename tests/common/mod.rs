//! Databases for the store's tests: a fresh SQLite file, and a fresh schema in the PostgreSQL
//! at `THUNDERLINE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Without a reachable PostgreSQL the Postgres half is skipped, loudly; under `CI=true`, or when
//! the variable is set, an unreachable PostgreSQL fails the test instead.

#![allow(dead_code)]

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

pub mod cluster;
pub mod pushers;
pub mod services;

/// As [`eventually`], for a test without a runtime (one that drives processes): whether `check`
/// comes to hold within `secs` seconds, polled every 20 ms.
pub fn eventually_blocking(secs: u64, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if check() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `check` comes to hold within `secs` seconds, polled every 20 ms. Tests wait for the
/// condition they assert, never for a fixed time.
pub async fn eventually(secs: u64, mut check: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads with `read` (every 20 ms) until `accept` takes a read, for `secs` seconds at most:
/// `Ok` with the read it took, or `Err` with the last one, to say what did not happen. For a
/// test body run on a task of its own (`tokio::spawn` needs `Send`, which [`eventually`]'s
/// async closure cannot promise), and wherever the caller wants what was read.
pub async fn read_until<T, F: std::future::Future<Output = T>>(
    secs: u64,
    mut read: impl FnMut() -> F,
    accept: impl Fn(&T) -> bool,
) -> Result<T, T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let value = read().await;
        if accept(&value) {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(value);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One database a test runs against.
pub struct TestDb {
    pub name: &'static str,
    pub url: String,
    /// The tag in `application_name`, to find this test's connections.
    pub tag: String,
    schema: Option<(String, String)>,
    file: Option<std::path::PathBuf>,
}

impl TestDb {
    pub async fn cleanup(self) {
        if let Some((base, schema)) = &self.schema
            && let Ok(mut c) = PgConnection::connect(base).await
        {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&mut c)
                .await;
        }
        if let Some(file) = &self.file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
    }
}

pub fn sqlite() -> TestDb {
    let tag = format!("t{}", uuid::Uuid::now_v7().simple());
    let file = std::env::temp_dir().join(format!("thunderline-{tag}.db"));
    TestDb {
        name: "sqlite",
        url: format!("sqlite://{}", file.display()),
        tag,
        schema: None,
        file: Some(file),
    }
}

/// A fresh schema in the test PostgreSQL, or None (after saying so) when there is none.
pub async fn postgres() -> Option<TestDb> {
    let explicit = std::env::var("THUNDERLINE_TEST_DATABASE_URL").ok();
    let base = explicit.clone().unwrap_or_else(|| DEFAULT_PG.to_owned());
    let must = explicit.is_some() || std::env::var("CI").is_ok_and(|v| v == "true");
    let conn = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&base)).await;
    let mut conn = match conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) if must => panic!("PostgreSQL at {base} is required here and failed: {e}"),
        Err(_) if must => panic!("PostgreSQL at {base} is required here and did not answer"),
        _ => {
            eprintln!(
                "\n*** SKIPPED the PostgreSQL half of this test: no server answers at {base}.\n\
                 *** Start one or set THUNDERLINE_TEST_DATABASE_URL; CI=true makes this a failure.\n"
            );
            return None;
        }
    };
    let tag = format!("t{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE SCHEMA {tag}"))
        .execute(&mut conn)
        .await
        .expect("create a test schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options[search_path]={tag}&application_name={tag}");
    Some(TestDb {
        name: "postgres",
        url,
        tag: tag.clone(),
        schema: Some((base, tag)),
        file: None,
    })
}

/// Every backend this machine can test.
/// Zones outside a daemon, decided as the runtime decides them: fresh ids, the time now.
pub mod zones {
    use thunderline::runtime::{Limits, command, now};
    use thunderline::store::Store;
    use thunderline::zone::{
        Actor, CommandKind, NewZone, Outcome, ZoneCommand, ZoneEvent, ZoneState,
    };

    /// What a zone named `name` on server `n` is created from.
    pub fn spec(name: &str) -> NewZone {
        NewZone {
            name: name.into(),
            assigned_server: Some("n".into()),
            ..NewZone::default()
        }
    }

    /// Executes `command` now, without limits.
    pub fn execute(zone: &mut ZoneState, command: &ZoneCommand) -> Outcome {
        zone.execute(command, &Limits::default().context(now()))
    }

    /// The events `actor` asking `kind` causes; panics on a refusal.
    pub fn run(zone: &mut ZoneState, actor: &Actor, kind: CommandKind) -> Vec<ZoneEvent> {
        let command = command(zone.id(), actor.clone(), kind);
        execute(zone, &command).result.unwrap().events
    }

    /// A zone created from `spec`, with its `zone_created`.
    pub fn create(spec: NewZone) -> (ZoneState, ZoneEvent) {
        let mut zone = ZoneState::absent(uuid::Uuid::now_v7());
        let mut events = run(
            &mut zone,
            &Actor::Admin,
            CommandKind::CreateZone(Box::new(spec)),
        );
        (zone, events.remove(0))
    }

    /// A zone created from `spec` and stored as its writer stores one: its row and its
    /// `zone_created`.
    pub async fn stored(store: &Store, spec: NewZone) -> (ZoneState, ZoneEvent) {
        let (zone, creation) = create(spec);
        store
            .create_zone(&zone.snapshot(), std::slice::from_ref(&creation))
            .await
            .unwrap();
        (zone, creation)
    }
}

pub async fn backends() -> Vec<TestDb> {
    let mut all = vec![sqlite()];
    all.extend(postgres().await);
    all
}

/// A daemon in this process on a free loopback port, with its own SQLite file and data dir.
pub mod server {
    use std::path::PathBuf;
    use std::time::Duration;

    use futures_util::{SinkExt, StreamExt};
    use serde_json::{Value, json};
    use thunderline::daemon::server::{ServeArgs, Server};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::Message;

    pub struct TestServer {
        pub server: Server,
        pub dir: PathBuf,
    }

    pub async fn start(database: Option<String>) -> TestServer {
        start_ticking(database, 3_600_000).await
    }

    /// As [`start`], with zones ticking every `tick_ms`.
    pub async fn start_ticking(database: Option<String>, tick_ms: u64) -> TestServer {
        let file = thunderline::daemon::config::PipelineFile {
            tick_interval_ms: std::num::NonZeroU64::new(tick_ms).unwrap(),
            ..Default::default()
        };
        start_with(database, file).await
    }

    /// As [`start`], with this pipeline file.
    pub async fn start_with(
        database: Option<String>,
        file: thunderline::daemon::config::PipelineFile,
    ) -> TestServer {
        start_tuned(database, file, |_| {}).await
    }

    /// As [`start_with`], with the flags `tune` sets.
    pub async fn start_tuned(
        database: Option<String>,
        file: thunderline::daemon::config::PipelineFile,
        tune: impl FnOnce(&mut ServeArgs),
    ) -> TestServer {
        let dir =
            std::env::temp_dir().join(format!("thunderline-srv-{}", uuid::Uuid::now_v7().simple()));
        let mut args = ServeArgs::local(database, dir.clone());
        tune(&mut args);
        TestServer {
            server: Server::start(&args, &file)
                .await
                .expect("the server starts"),
            dir,
        }
    }

    impl TestServer {
        pub fn ws_url(&self) -> String {
            format!("ws://{}/socket/websocket?vsn=2.0.0", self.server.addr)
        }

        /// An HTTP request with the admin token; returns (status, JSON body or Null).
        pub async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
            let token = self.server.secrets.admin_token.clone();
            http(self.server.addr, method, path, body, Some(&token)).await
        }

        pub async fn zone(&self, body: Value) -> Value {
            let (status, zone) = self.api("POST", "/api/zones", Some(body)).await;
            assert_eq!(status, 201, "{zone}");
            zone
        }

        /// A client joined to `zone` as `agent` with `perms`; returns it with its join_ref.
        pub async fn joined(&self, zone: &str, agent: &str, perms: Value) -> (Client, String) {
            let token = self.token(agent, zone, perms).await;
            let mut c = Client::connect(&self.ws_url()).await;
            let (join_ref, reply) = c
                .join(
                    &format!("zone:{zone}"),
                    json!({"agent_id": agent, "token": token}),
                )
                .await;
            assert_eq!(reply["status"], "ok", "{reply}");
            (c, join_ref)
        }

        pub async fn token(&self, agent: &str, zone: &str, perms: Value) -> String {
            let (status, body) = self
                .api("POST", "/api/tokens", Some(json!({"agent_id": agent, "zone_id": zone, "permissions": perms, "ttl_seconds": 600})))
                .await;
            assert_eq!(status, 200, "{body}");
            body["token"].as_str().unwrap().to_owned()
        }

        pub async fn stop(self) {
            self.server.shutdown().await.expect("a clean shutdown");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// Plain HTTP/1.1 over a TCP stream: enough for the admin API's JSON.
    pub async fn http(
        addr: std::net::SocketAddr,
        method: &str,
        path: &str,
        body: Option<Value>,
        bearer: Option<&str>,
    ) -> (u16, Value) {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = bearer
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        let text = String::from_utf8_lossy(&response);
        let status: u16 = text.split(' ').nth(1).unwrap().parse().unwrap();
        let (head, payload) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let payload = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(payload)
        } else {
            payload.to_owned()
        };
        (
            status,
            serde_json::from_str(&payload).unwrap_or(Value::Null),
        )
    }

    /// The daemon's `/metrics` text.
    pub async fn metrics(addr: std::net::SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).await.unwrap();
        text
    }

    /// The value of an unlabelled metric in `/metrics` text (exactly `name`, not a longer name
    /// it begins).
    pub fn metric(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// The daemon's current value of the unlabelled metric `name`.
    pub async fn metric_now(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
        metric(&metrics(addr).await, name)
    }

    /// Waits (up to 3 s) until `/metrics` shows every one of `needles`; panics naming the first
    /// missing one. Replies can reach a client a moment before the metrics are updated.
    pub async fn metrics_showing(addr: std::net::SocketAddr, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let text = metrics(addr).await;
            match needles.iter().find(|n| !text.contains(**n)) {
                None => return text,
                Some(missing) if tokio::time::Instant::now() > deadline => {
                    panic!("missing {missing} in\n{text}")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn dechunk(mut s: &str) -> String {
        let mut out = String::new();
        while let Some((size, rest)) = s.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&rest[..n]);
            s = &rest[n + 2..];
        }
        out
    }

    pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

    /// A Phoenix client speaking raw frames.
    pub struct Client {
        pub ws: Ws,
        next_ref: u64,
        /// Frames read while waiting for a reply, for the reads that come next: with durable
        /// replies, what a command caused (presence, broadcasts) can arrive before its `ok`.
        early: std::collections::VecDeque<Value>,
    }

    impl Client {
        pub async fn connect(url: &str) -> Self {
            let (ws, _) = tokio_tungstenite::connect_async(url)
                .await
                .expect("connects");
            Self {
                ws,
                next_ref: 0,
                early: Default::default(),
            }
        }

        pub fn next_ref(&mut self) -> String {
            self.next_ref += 1;
            self.next_ref.to_string()
        }

        pub async fn send_raw(&mut self, text: &str) {
            self.ws.send(Message::text(text)).await.unwrap();
        }

        /// Sends `[join_ref, ref, topic, event, payload]`; returns the ref.
        pub async fn push(
            &mut self,
            join_ref: Option<&str>,
            topic: &str,
            event: &str,
            payload: Value,
        ) -> String {
            let r = self.next_ref();
            let frame = json!([join_ref, r, topic, event, payload]);
            self.send_raw(&frame.to_string()).await;
            r
        }

        /// Joins; returns (join_ref, reply payload).
        pub async fn join(&mut self, topic: &str, params: Value) -> (String, Value) {
            let r = self.next_ref();
            let frame = json!([r, r, topic, "phx_join", params]);
            self.send_raw(&frame.to_string()).await;
            let reply = self.reply_to(&r).await;
            (r, reply)
        }

        /// The next frame, or None after 2 s or when the socket closes.
        pub async fn next(&mut self) -> Option<Value> {
            self.next_within(Duration::from_secs(2)).await
        }

        /// The next frame, or None after `wait` or when the socket closes.
        pub async fn next_within(&mut self, wait: Duration) -> Option<Value> {
            if let Some(f) = self.early.pop_front() {
                return Some(f);
            }
            loop {
                match tokio::time::timeout(wait, self.ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        return Some(serde_json::from_str(&t).unwrap());
                    }
                    Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                        return None;
                    }
                    Ok(Some(Ok(_))) => continue,
                }
            }
        }

        /// Frames until one matches; panics with what came instead.
        pub async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
            let mut seen = Vec::new();
            while let Some(f) = self.next().await {
                if pred(&f) {
                    return f;
                }
                seen.push(f);
            }
            panic!("no {what}; got {seen:#?}");
        }

        /// The reply to `r`; the frames before it stay to be read next.
        pub async fn reply_to(&mut self, r: &str) -> Value {
            self.reply_within(r, Duration::from_secs(2)).await
        }

        /// As [`reply_to`](Self::reply_to), waiting up to `wait` for each frame.
        pub async fn reply_within(&mut self, r: &str, wait: Duration) -> Value {
            let mut before = Vec::new();
            while let Some(f) = self.next_within(wait).await {
                if f[1] == json!(r) && f[3] == "phx_reply" {
                    // Put back what came first, ahead of anything still buffered.
                    for f in before.into_iter().rev() {
                        self.early.push_front(f);
                    }
                    return f[4].clone();
                }
                before.push(f);
            }
            panic!("no reply to {r}; got {before:#?}");
        }

        pub async fn event(&mut self, event: &str) -> Value {
            let e = event.to_owned();
            self.until(event, move |f| f[3] == json!(e)).await
        }

        /// The close frame's code, once the server closes.
        pub async fn close_code(&mut self) -> Option<u16> {
            loop {
                match tokio::time::timeout(Duration::from_secs(3), self.ws.next()).await {
                    Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code.into()),
                    Ok(Some(Ok(_))) => continue,
                    _ => return None,
                }
            }
        }
    }
}

/// The real `thunderline serve` binary, as a user starts it.
pub mod binary {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Child, Command, Stdio};
    use std::thread::JoinHandle;

    pub const ADMIN: &str = "test-admin-token-long-enough-0123456789";
    pub const SECRET: &str = "test-signing-secret-of-at-least-32-bytes";

    pub struct Daemon {
        pub child: Child,
        pub url: String,
        pub addr: std::net::SocketAddr,
        output: Option<JoinHandle<Vec<String>>>,
    }

    /// Starts `thunderline serve` on a free port with `data_dir`, and waits until it listens.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Daemon {
        start_with(data_dir, extra, Stdio::inherit())
    }

    /// As [`start`], choosing where its standard error (the logs) goes; with
    /// `--log-format json` the logs are read instead, and [`Daemon::terminate`] returns them.
    pub fn start_with(data_dir: &Path, extra: &[&str], stderr: Stdio) -> Daemon {
        start_env(data_dir, extra, stderr, &[])
    }

    /// As [`start_with`], with more environment variables.
    pub fn start_env(
        data_dir: &Path,
        extra: &[&str],
        stderr: Stdio,
        envs: &[(&str, &str)],
    ) -> Daemon {
        // With JSON logs the address is in the "thunderline listening" log line (standard
        // error) and nothing is printed; with text logs, in the banner's first line.
        let json = extra.windows(2).any(|w| w == ["--log-format", "json"]);
        let mut child = Command::new(env!("CARGO_BIN_EXE_thunderline"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .envs(envs.iter().copied())
            .env_remove("THUNDERLINE_DATABASE_URL")
            .env("THUNDERLINE_ADMIN_TOKEN", ADMIN)
            .env("THUNDERLINE_SECRET", SECRET)
            .stdout(if json { Stdio::null() } else { Stdio::piped() })
            .stderr(if json { Stdio::piped() } else { stderr })
            .spawn()
            .expect("the daemon starts");
        let read: Box<dyn std::io::Read + Send> = if json {
            Box::new(child.stderr.take().unwrap())
        } else {
            Box::new(child.stdout.take().unwrap())
        };
        let mut lines = BufReader::new(read).lines();
        let mut seen = Vec::new();
        let url = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("the daemon exited before listening; it printed {seen:?}");
            };
            let listening = if json {
                serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .filter(|l| l["fields"]["message"] == "thunderline listening")
                    .and_then(|l| l["fields"]["url"].as_str().map(str::to_owned))
            } else {
                line.strip_prefix("thunderline listening on ")
                    .map(|url| url.trim().to_owned())
            };
            seen.push(line);
            if let Some(url) = listening {
                break url;
            }
        };
        let addr = url.trim_start_matches("http://").parse().unwrap();
        // Keep reading its output so it never blocks on a full pipe; what it printed (or, with
        // JSON logs, logged) is kept for `terminate`.
        let output = std::thread::spawn(move || {
            seen.extend(lines.map_while(Result::ok));
            seen
        });
        Daemon {
            child,
            url,
            addr,
            output: Some(output),
        }
    }

    impl Daemon {
        /// SIGTERM, then the exit status and what it printed.
        pub fn terminate(mut self) -> (std::process::ExitStatus, Vec<String>) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let status = self.child.wait().expect("the daemon exits");
            let printed = self
                .output
                .take()
                .and_then(|h| h.join().ok())
                .unwrap_or_default();
            (status, printed)
        }
    }

    impl Daemon {
        /// Sends `signal` (`-STOP`, `-CONT`, …) to the daemon.
        pub fn signal(&self, signal: &str) {
            let sent = Command::new("kill")
                .args([signal, &self.child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(sent.success(), "kill {signal}");
        }

        /// `kill -9`: no drain, no close, as a crash or a power loss leaves things.
        pub fn kill_9(mut self) {
            let killed = Command::new("kill")
                .args(["-9", &self.child.id().to_string()])
                .status()
                .expect("kill runs");
            assert!(killed.success(), "the daemon was killed");
            self.child.wait().expect("the daemon is reaped");
        }

        /// Creates a zone through the admin API; its id.
        pub async fn zone(&self, body: serde_json::Value) -> String {
            let (status, zone) =
                super::server::http(self.addr, "POST", "/api/zones", Some(body), Some(ADMIN)).await;
            assert_eq!(status, 201, "{zone}");
            zone["id"].as_str().unwrap().to_owned()
        }

        /// A join token (bit 1, ten minutes) for `agent` in `zone`, minted by the admin API.
        pub async fn token(&self, agent: &str, zone: &str) -> String {
            let (status, body) = super::server::http(
                self.addr,
                "POST",
                "/api/tokens",
                Some(serde_json::json!({"agent_id": agent, "zone_id": zone, "permissions": 1, "ttl_seconds": 600})),
                Some(ADMIN),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            body["token"].as_str().unwrap().to_owned()
        }

        /// A client of `agent` joined to `zone` (with `since`, if given, in its params): the
        /// client, its join ref and the join's reply.
        pub async fn joined(
            &self,
            zone: &str,
            agent: &str,
            since: Option<serde_json::Value>,
        ) -> (super::server::Client, String, serde_json::Value) {
            let (status, token) = super::server::http(
                self.addr,
                "POST",
                "/api/tokens",
                Some(serde_json::json!({"agent_id": agent, "zone_id": zone, "permissions": 1, "ttl_seconds": 600})),
                Some(ADMIN),
            )
            .await;
            assert_eq!(status, 200, "{token}");
            let url = format!("ws://{}/socket/websocket?vsn=2.0.0", self.addr);
            let mut client = super::server::Client::connect(&url).await;
            let mut params = serde_json::json!({"agent_id": agent, "token": token["token"]});
            if let Some(since) = since {
                params["since"] = since;
            }
            let (join_ref, reply) = client.join(&format!("zone:{zone}"), params).await;
            assert_eq!(reply["status"], "ok", "{reply}");
            (client, join_ref, reply["response"].clone())
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.child.kill();
        }
    }
}

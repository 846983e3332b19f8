//! Clients that push moves without pause against a cluster, moving to another node whenever
//! theirs closes them, and what each saw: for the tests of rolling restarts, new nodes and NATS
//! restarts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use super::server::Ws;

/// Which nodes take connections now (by name), and which one is stopping, if any.
#[derive(Default)]
pub struct Nodes {
    pub up: BTreeMap<String, SocketAddr>,
    pub stopping: Option<String>,
}

pub type SharedNodes = Arc<Mutex<Nodes>>;

pub fn lock(nodes: &SharedNodes) -> std::sync::MutexGuard<'_, Nodes> {
    nodes.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one client saw while it pushed moves without pause.
#[derive(Debug, Default)]
pub struct Run {
    pub agent: String,
    /// The marks of the moves answered `ok`.
    pub ok: Vec<i64>,
    /// Each time the server closed the connection: the node, its close code, and the node
    /// stopping at the time.
    pub closed: Vec<(String, Option<u16>, Option<String>)>,
    /// Every rejoin's `recovered`.
    pub rejoins: Vec<bool>,
    /// What must not happen: a gap or a repeat in seq, an error on the channel, another epoch.
    pub wrong: Vec<String>,
}

/// One client of `agent` in `zone`, on a node.
struct Pusher {
    ws: Ws,
    node: String,
    topic: String,
    join_ref: String,
    epoch: String,
    seq: u64,
    next_ref: u64,
    /// How it joined last: for what a gap right after a rejoin says.
    joined: String,
}

impl Pusher {
    /// Connects to `node` and joins (with `since`, after the first time).
    async fn join(
        node: &str,
        addr: SocketAddr,
        zone: &str,
        agent: &str,
        token: &str,
        since: Option<(String, u64)>,
        run: &mut Run,
    ) -> Self {
        let url = format!("ws://{addr}/socket/websocket?vsn=2.0.0");
        let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("connects");
        let topic = format!("zone:{zone}");
        let mut params = json!({"agent_id": agent, "token": token});
        if let Some((epoch, seq)) = &since {
            params["since"] = json!({"epoch": epoch, "seq": seq});
        }
        let frame = json!(["1", "1", topic, "phx_join", params]);
        ws.send(Message::text(frame.to_string())).await.unwrap();
        // What comes before the reply: nothing of the zone's history may (a join's reply goes
        // before its own event and anything it missed).
        let mut early = Vec::new();
        let reply = loop {
            let f = next_frame(&mut ws).await.expect("the join is answered");
            if f[1] == "1" && f[3] == "phx_reply" {
                break f[4].clone();
            }
            if f[4]["seq"].is_u64() {
                early.push(f);
            }
        };
        if !early.is_empty() {
            run.wrong.push(format!(
                "events before the join's reply on {node}: {early:?}"
            ));
        }
        assert_eq!(reply["status"], "ok", "{agent} joins on {node}: {reply}");
        let response = &reply["response"];
        let epoch = response["epoch"].as_str().unwrap().to_owned();
        // The first event it is sent is its join's own, the zone's seq in the reply.
        let mut seq = response["seq"].as_u64().unwrap() - 1;
        let since_seq = since.as_ref().map(|(_, s)| *s);
        if let Some((before, last)) = since {
            run.rejoins.push(response["recovered"] == true);
            if epoch != before {
                run.wrong.push(format!(
                    "the epoch changed from {before} to {epoch} on {node}"
                ));
            }
            // What it missed follows the reply: it goes on from where it left off.
            seq = last;
        }
        let joined = format!("joined {node} with since {since_seq:?}: {response}");
        Self {
            ws,
            node: node.to_owned(),
            topic,
            join_ref: "1".into(),
            epoch,
            seq,
            next_ref: 1,
            joined,
        }
    }

    /// Takes a frame in: a zone event must be the next seq.
    fn saw(&mut self, f: &Value, run: &mut Run) {
        if f[2] != json!(self.topic) {
            return;
        }
        if f[3] == "phx_error" || f[3] == "phx_close" {
            run.wrong.push(format!("{} on {}: {f}", f[3], self.node));
            return;
        }
        if let Some(seq) = f[4]["seq"].as_u64()
            && f[3] != "phx_reply"
        {
            if seq != self.seq + 1 {
                run.wrong.push(format!(
                    "seq {seq} after {} on {} ({f}); {}",
                    self.seq, self.node, self.joined
                ));
            }
            self.seq = self.seq.max(seq);
        }
    }
}

/// The next frame, `Err` with the close code once the server closes (None after 20 s of
/// silence).
async fn next_frame(ws: &mut Ws) -> Result<Value, Option<u16>> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Ok(serde_json::from_str(&t).unwrap()),
            Ok(Some(Ok(Message::Close(frame)))) => return Err(frame.map(|f| f.code.into())),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) | Err(_) => return Err(None),
        }
    }
}

/// Pushes moves (marked 1, 2, 3, …) one after the other until `stop`, moving to another node
/// whenever its node closes the connection.
pub async fn push_until_stopped(
    nodes: SharedNodes,
    first: String,
    zone: String,
    agent: String,
    token: String,
    answered: Arc<AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Run {
    let mut run = Run {
        agent: agent.clone(),
        ..Run::default()
    };
    let addr = lock(&nodes).up[&first];
    let mut pusher = Pusher::join(&first, addr, &zone, &agent, &token, None, &mut run).await;
    let mut x = 0;
    // A client that pushes again as soon as it is answered would pass the server's rate limit
    // (200 frames a second) whenever replies take under 5 ms, and be closed for flooding: a
    // pusher keeps to 100 a second.
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        pace.tick().await;
        x += 1;
        pusher.next_ref += 1;
        let r = pusher.next_ref.to_string();
        let frame = json!([
            pusher.join_ref,
            r,
            pusher.topic,
            "agent_move",
            {"position": {"x": x, "y": 0, "z": 0}}
        ]);
        let sent = pusher.ws.send(Message::text(frame.to_string())).await;
        let closed = loop {
            if sent.is_err() {
                break None;
            }
            match next_frame(&mut pusher.ws).await {
                Ok(f) if f[1] == json!(r) && f[3] == "phx_reply" => {
                    if f[4]["status"] == "ok" {
                        run.ok.push(x);
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    break Some(());
                }
                Ok(f) => pusher.saw(&f, &mut run),
                Err(code) => {
                    let stopping = lock(&nodes).stopping.clone();
                    run.closed.push((pusher.node.clone(), code, stopping));
                    break None;
                }
            }
        };
        if closed.is_some() {
            continue;
        }
        // Its node closed the connection: rejoin on another one, from where it left off.
        let since = (pusher.epoch.clone(), pusher.seq);
        let other = || {
            let nodes = lock(&nodes);
            nodes
                .up
                .iter()
                .find(|(n, _)| **n != pusher.node && nodes.stopping.as_ref() != Some(*n))
                .map(|(n, a)| (n.clone(), *a))
        };
        let (node, addr) = super::read_until(60, || std::future::ready(other()), Option::is_some)
            .await
            .expect("another node takes connections")
            .expect("checked");
        pusher = Pusher::join(&node, addr, &zone, &agent, &token, Some(since), &mut run).await;
    }
    run
}

/// A pusher on each of `names`' nodes in each of `zones` (agent `z<zone index><node>`), with
/// tokens minted through `admin`, until [`finish`](Self::finish).
pub struct Crowd {
    answered: Arc<AtomicU64>,
    stop: tokio::sync::watch::Sender<bool>,
    runs: Vec<(usize, tokio::task::JoinHandle<Run>)>,
}

impl Crowd {
    pub async fn start(
        nodes: &SharedNodes,
        admin: SocketAddr,
        zones: &[String],
        names: &[&str],
    ) -> Self {
        let answered = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let mut runs = Vec::new();
        for (i, zone) in zones.iter().enumerate() {
            for name in names {
                let agent = format!("z{i}{name}");
                let (status, token) = super::server::http(
                    admin,
                    "POST",
                    "/api/tokens",
                    Some(json!({"agent_id": agent, "zone_id": zone, "permissions": 1, "ttl_seconds": 600})),
                    Some(super::binary::ADMIN),
                )
                .await;
                assert_eq!(status, 200, "{token}");
                let run = tokio::spawn(push_until_stopped(
                    nodes.clone(),
                    (*name).into(),
                    zone.clone(),
                    agent,
                    token["token"].as_str().unwrap().to_owned(),
                    answered.clone(),
                    stop_rx.clone(),
                ));
                runs.push((i, run));
            }
        }
        Self {
            answered,
            stop,
            runs,
        }
    }

    /// Waits (up to 60 s) until `at_least` more pushes are answered `ok`.
    pub async fn progress(&self, at_least: u64) {
        let from = self.answered.load(Ordering::Relaxed);
        let moved = super::eventually(60, async || {
            self.answered.load(Ordering::Relaxed) >= from + at_least
        })
        .await;
        assert!(moved, "the pushers are answered");
    }

    /// Stops the pushers; what each saw, with its zone's index.
    pub async fn finish(self) -> Vec<(usize, Run)> {
        self.stop.send_replace(true);
        let mut finished = Vec::new();
        for (i, run) in self.runs {
            finished.push((i, run.await.unwrap()));
        }
        finished
    }
}

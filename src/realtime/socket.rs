//! One WebSocket connection speaking Phoenix Channels V2: heartbeats, joins, leaves and zone
//! events in; replies, pushes and broadcasts out.
//!
//! A reader loop checks every frame (shape, rate, topic, token, payload) and hands each valid
//! one to the zone pipeline as a [`ZoneCommand`]; a writer task drains the connection's bounded
//! queue, writing every frame that is waiting before it flushes. Nothing a client sends can
//! stall or crash the server: a bad frame gets an error reply and the connection stays usable;
//! a flood or an oversize frame closes it.
//!
//! The reader never waits for the pipeline. While it is full, commands wait in a short queue of
//! the connection's own, in order, and the reader goes on answering heartbeats; a push that
//! cannot be handed over within `push_wait` is answered `overloaded` (joins too; leaves always
//! wait, even past a disconnect, so that a session is never left behind). A channel counts as joined only once the zone
//! accepted the join; pushes sent before that are applied only if it is accepted, since the
//! zone sees them after the join, in the order they were sent.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use uuid::Uuid;

use super::admission::{Admission, Slot};
use super::channel::{Asked, Channels, Joined, SocketReply};
use super::console::{CONSOLE_TOPIC, ConsoleFeed};
use super::hub::{CloseReason, Hub, Peer, topic_name};
use super::outlet::{self, ANSWERED, Answering, Outlet};
use super::protocol::{self, Frame};
use super::revocation::Revocations;
use super::token::TokenSigner;
use crate::pipeline::{Message as PipelineMessage, PushError, PushHandle, PushPermit};
use crate::runtime::{
    IDEMPOTENCY_KEY_CHARS, Migrations, ReplyTo, Since, command, keyed_command_id,
};
use crate::zone::{Actor, CommandKind, ZoneCommand, parse_zone_id};

/// Per-connection limits.
#[derive(Clone, Debug)]
pub struct SocketConfig {
    /// Phoenix's cap on channels per connection.
    pub max_channels: usize,
    /// A connection that sends nothing (not even a heartbeat) for this long is closed.
    pub idle_timeout: Duration,
    /// Larger frames close the connection with 1009.
    pub max_frame_bytes: usize,
    /// Frames waiting to be written; past it the client is a slow consumer.
    pub outbound_queue: usize,
    /// Bytes waiting to be written; past it, too, the client is a slow consumer (a few large
    /// replies weigh more than many small broadcasts).
    pub outbound_bytes: usize,
    /// Open connections in all; past it, upgrades are refused with 503.
    pub max_connections: usize,
    /// Open connections from one client address; past it, upgrades are refused with 503.
    pub max_connections_per_ip: Option<usize>,
    /// Frames per second a client may send, on average...
    pub rate_per_sec: f64,
    /// ...with bursts of up to this many.
    pub burst: f64,
    /// Frames refused (rate-limited) within one second before the connection is closed. Counted
    /// per second rather than in a row: the tokens a flood earns back as it goes must not reset
    /// the count, or the flood's own error replies would fill its queue first.
    pub flood_limit: u32,
    /// Longest a push waits for room in the pipeline before it is answered `overloaded`.
    pub push_wait: Duration,
    /// Commands a connection may have waiting for the pipeline at once; past it, pushes are
    /// answered `overloaded` at once.
    pub max_waiting: usize,
}

impl Default for SocketConfig {
    fn default() -> Self {
        Self {
            max_channels: 100,
            idle_timeout: Duration::from_secs(60),
            max_frame_bytes: 64 * 1024,
            outbound_queue: 1024,
            outbound_bytes: 1024 * 1024,
            max_connections: 100_000,
            max_connections_per_ip: None,
            rate_per_sec: 200.0,
            burst: 500.0,
            flood_limit: 200,
            push_wait: Duration::from_secs(5),
            max_waiting: 256,
        }
    }
}

pub const GOING_AWAY: CloseReason = CloseReason {
    code: 1001,
    reason: "server shutting down",
};
/// A node of a cluster stops: its zones went on elsewhere, and the client reconnects to
/// another node (recovering what it missed with `since`).
pub const SERVICE_RESTART: CloseReason = CloseReason {
    code: 1012,
    reason: "service restart",
};
/// How long a stopping server waits for the answers to the commands a connection sent before it
/// closes the connection.
const STOP_ANSWER_WAIT: Duration = Duration::from_secs(10);
const TOO_BIG: CloseReason = CloseReason {
    code: 1009,
    reason: "frame larger than 64 KiB",
};
const FLOOD: CloseReason = CloseReason {
    code: 1008,
    reason: "too many frames",
};
const IDLE: CloseReason = CloseReason {
    code: 1001,
    reason: "idle timeout",
};

/// Why the server ends a session on a live connection, as `phx_close`'s `reason`.
const TOKEN_EXPIRED: &str = "token_expired";
const TOKEN_REVOKED: &str = "token_revoked";

#[derive(Clone)]
pub struct SocketMetrics {
    pub connections: IntGauge,
    pub joins: IntCounterVec,
    pub pushes: IntCounter,
    pub refused: IntCounterVec,
    /// Upgrades refused by a connection cap, by cap.
    pub connections_refused: IntCounterVec,
    /// Sessions the server ended (token expired or revoked), by reason.
    pub sessions_ended: IntCounterVec,
}

impl SocketMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            connections: IntGauge::new(
                "thunderline_socket_connections",
                "Open WebSocket connections.",
            )?,
            joins: IntCounterVec::new(
                Opts::new(
                    "thunderline_channel_joins_total",
                    "Channel joins by outcome.",
                ),
                &["outcome"],
            )?,
            pushes: IntCounter::new(
                "thunderline_channel_pushes_total",
                "Client events accepted into the pipeline.",
            )?,
            refused: IntCounterVec::new(
                Opts::new(
                    "thunderline_channel_refused_total",
                    "Client frames refused before the pipeline (overloaded among them), by reason.",
                ),
                &["reason"],
            )?,
            connections_refused: IntCounterVec::new(
                Opts::new(
                    "thunderline_socket_connections_refused_total",
                    "WebSocket upgrades refused with 503 by a connection cap, by cap.",
                ),
                &["reason"],
            )?,
            sessions_ended: IntCounterVec::new(
                Opts::new(
                    "thunderline_channel_sessions_ended_total",
                    "Sessions the server closed because their token expired or was revoked.",
                ),
                &["reason"],
            )?,
        };
        for reason in [TOKEN_EXPIRED, TOKEN_REVOKED] {
            m.sessions_ended.with_label_values(&[reason]);
        }
        registry.register(Box::new(m.connections.clone()))?;
        registry.register(Box::new(m.connections_refused.clone()))?;
        registry.register(Box::new(m.sessions_ended.clone()))?;
        registry.register(Box::new(m.joins.clone()))?;
        registry.register(Box::new(m.pushes.clone()))?;
        registry.register(Box::new(m.refused.clone()))?;
        Ok(m)
    }
}

/// Makes the pipeline's message for a socket's command: the daemon's envelope, with its
/// acknowledger.
/// With a join, where a rejoining client left off (its `since`).
pub type Envelope<W> =
    Arc<dyn Fn(ZoneCommand, Arc<dyn ReplyTo>, Option<Since>) -> PipelineMessage<W> + Send + Sync>;

/// What every connection shares.
pub struct SocketContext<W> {
    pub hub: Arc<Hub>,
    pub signer: TokenSigner,
    pub work: PushHandle<W>,
    pub envelope: Envelope<W>,
    pub config: SocketConfig,
    pub metrics: SocketMetrics,
    /// Flips to true when the server shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// The console's topic, when the server offers it.
    pub console: Option<ConsoleFeed>,
    /// The connection caps.
    pub admission: Admission,
    /// Revoked tokens: refused at join, and their sessions ended.
    pub revocations: Arc<Revocations>,
    /// What carries out `migrate` pushes (none: they are refused `unavailable`).
    pub migrations: Option<Arc<Migrations>>,
    /// This run's random prefix for connection names.
    run: String,
    next_id: AtomicU64,
    /// How connections are closed when the server stops.
    stop_close: CloseReason,
}

impl<W: Send + 'static> SocketContext<W> {
    /// Offers the console topic ([`CONSOLE_TOPIC`]) with `feed`.
    pub fn with_console(mut self, feed: ConsoleFeed) -> Self {
        self.console = Some(feed);
        self
    }

    /// Names this run's connections `<run>.<n>` (by default `run` is random): in a cluster, the
    /// node's incarnation, so that the sessions of a node that dies can be told from the others.
    pub fn with_run(mut self, run: String) -> Self {
        self.run = run;
        self
    }

    /// Closes connections with `reason` when the server stops (by default [`GOING_AWAY`]).
    pub fn with_stop_close(mut self, reason: CloseReason) -> Self {
        self.stop_close = reason;
        self
    }

    /// Refuses and ends what `revocations` revokes (by default, nothing is revoked).
    /// Moves agents between zones with `migrations`.
    pub fn with_migrations(mut self, migrations: Arc<Migrations>) -> Self {
        self.migrations = Some(migrations);
        self
    }

    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = revocations;
        self
    }

    pub fn new(
        hub: Arc<Hub>,
        signer: TokenSigner,
        work: PushHandle<W>,
        envelope: Envelope<W>,
        config: SocketConfig,
        metrics: SocketMetrics,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        let admission = Admission::new(
            config.max_connections,
            config.max_connections_per_ip,
            metrics.connections_refused.clone(),
        );
        Self {
            admission,
            revocations: Arc::default(),
            migrations: None,
            hub,
            signer,
            work,
            envelope,
            config,
            metrics,
            shutdown,
            console: None,
            run: Uuid::new_v4().simple().to_string()[..12].to_owned(),
            next_id: AtomicU64::new(1),
            stop_close: GOING_AWAY,
        }
    }
}

/// What a command from a frame carries besides its kind: the frame's ref (to answer it), a
/// rejoin's `since`, a push's idempotency key.
#[derive(Default)]
struct Carried {
    msg_ref: Option<String>,
    since: Option<Since>,
    key: Option<String>,
}

/// The token bucket behind the per-connection rate limit.
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A command waiting for room in the pipeline.
struct Waiting<W> {
    message: PipelineMessage<W>,
    reply: Arc<SocketReply>,
    /// None for leaves: they wait as long as it takes.
    deadline: Option<Instant>,
}

struct Connection<W> {
    ctx: Arc<SocketContext<W>>,
    peer: Peer,
    channels: Arc<Mutex<Channels>>,
    bucket: Bucket,
    /// Refusals in the current one-second window, and when it began.
    refused: (u32, Instant),
    waiting: VecDeque<Waiting<W>>,
    /// The console topic's pushes, while it is joined.
    console: Option<JoinHandle<()>>,
    /// The soonest a joined channel's token expires.
    expiry: Option<Instant>,
    /// Held by each of its commands until it is answered (or abandoned): one count per command
    /// not answered yet, beyond this one.
    unanswered: Arc<()>,
}

impl<W> Drop for Connection<W> {
    fn drop(&mut self) {
        if let Some(task) = self.console.take() {
            task.abort();
        }
    }
}

/// Serves one upgraded WebSocket until either side closes it, holding its admission `slot`
/// until then.
pub async fn serve<W, S>(socket: S, ctx: Arc<SocketContext<W>>, slot: Slot)
where
    W: Send + 'static,
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let n = ctx.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("{}.{n:x}", ctx.run);
    let (read, write) = tokio::io::split(socket);
    let outlet = Outlet::new(
        ctx.config.outbound_queue,
        ctx.config.outbound_bytes,
        ctx.hub.metrics.slow_consumers.clone(),
    );
    let peer = Peer::new(id, outlet.clone());
    ctx.metrics.connections.inc();
    let writer = tokio::spawn(outlet::write_out(write, outlet.clone()));
    let max = ctx.config.max_frame_bytes;
    let config = WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        // What a client sends is small (pushes, heartbeats): reads of up to 512 bytes at a time
        // into a buffer that starts there and grows only for a larger frame.
        .read_buffer_size(512)
        // Its writes are the answers to pings and closes, handed to the outlet at once.
        .write_buffer_size(0);
    let mut stream = WebSocketStream::from_raw_socket(
        Answering::new(read, outlet.clone()),
        Role::Server,
        Some(config),
    )
    .await;

    let channels = Arc::new(Mutex::new(Channels::new()));
    ctx.hub.connect(&peer, channels.clone());
    let mut conn = Connection {
        ctx: ctx.clone(),
        peer: peer.clone(),
        channels,
        bucket: Bucket {
            tokens: ctx.config.burst,
            at: Instant::now(),
        },
        refused: (0, Instant::now()),
        waiting: VecDeque::new(),
        console: None,
        expiry: None,
        unanswered: Arc::new(()),
    };
    let mut revoked = ctx.revocations.subscribe();
    let mut listening = true;
    // One timer for the soonest token expiry, moved only when that changes.
    let expiry = tokio::time::sleep_until(Instant::now());
    tokio::pin!(expiry);
    let mut armed: Option<Instant> = None;
    let mut shutdown = ctx.shutdown.clone();
    // Whether the server started the closing handshake (and should wait for the client's half).
    let mut closing = false;
    // Whether the client did (and tungstenite answered).
    let mut answered = false;
    // Whether the server is stopping: the connection is closed once its commands are answered.
    let mut stopping = false;
    let mut reservation: Option<BoxFuture<'_, Option<PushPermit<'_, W>>>> = None;
    // One timer for the whole connection, pushed back as frames arrive.
    let idle = tokio::time::sleep(ctx.config.idle_timeout);
    tokio::pin!(idle);
    loop {
        if conn.expiry != armed {
            armed = conn.expiry;
            if let Some(at) = armed {
                expiry.as_mut().reset(at);
            }
        }
        let deadline = conn.waiting.iter().filter_map(|w| w.deadline).min();
        // The wait for room is kept across frames: a new wait would queue behind every other
        // connection's, and a connection that keeps sending would never get its turn.
        if reservation.is_none() && !conn.waiting.is_empty() {
            reservation = Some(Box::pin(ctx.work.reserve()));
        }
        tokio::select! {
            biased;
            () = outlet.closed() => {
                closing = true;
                break;
            }
            () = async { let _ = shutdown.wait_for(|&s| s).await; } => {
                stopping = true;
                break;
            }
            permit = async { reservation.as_mut().expect("checked").await }, if reservation.is_some() => {
                reservation = None;
                match permit {
                    // What it was for may have been answered `overloaded` meanwhile.
                    Some(permit) => match conn.waiting.pop_front() {
                        Some(waiting) => permit.push(waiting.message),
                        None => drop(permit),
                    },
                    None => conn.refuse_waiting(|_| true, "unavailable", "the server is shutting down"),
                }
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                let now = Instant::now();
                conn.refuse_waiting(
                    |w| w.deadline.is_some_and(|d| d <= now),
                    "overloaded",
                    "the server is busy: the push waited too long for room; try again later",
                );
            }
            () = &mut idle => {
                peer.close(IDLE);
                closing = true;
                break;
            }
            () = &mut expiry, if conn.expiry.is_some() => {
                let now = Instant::now();
                conn.end_sessions(|_, joined| joined.expires_at <= now, TOKEN_EXPIRED);
            }
            changed = revoked.changed(), if listening => {
                match changed {
                    Ok(()) => {
                        let revocations = &ctx.revocations;
                        conn.end_sessions(
                            |zone, joined| revocations.revoked_for(&joined.agent_id, zone, joined.minted_us),
                            TOKEN_REVOKED,
                        );
                    }
                    // Cannot happen (the sender lives in the context this connection holds);
                    // if it did, there would be nothing more to hear.
                    Err(_) => listening = false,
                }
            }
            next = stream.next() => {
                idle.as_mut().reset(Instant::now() + ctx.config.idle_timeout);
                match next {
                    None => break,
                    Some(Ok(Message::Close(_))) => {
                        // tungstenite has answered it: this hands the answer to the outlet.
                        let _ = stream.flush().await;
                        answered = true;
                        break;
                    }
                    Some(Err(e)) => {
                        if is_too_big(&e) {
                            peer.close(TOO_BIG);
                            closing = true;
                        }
                        break;
                    }
                    Some(Ok(Message::Text(text))) => conn.on_text(&text),
                    Some(Ok(Message::Binary(_))) => {
                        if conn.charge() {
                            conn.refuse("binary_unsupported");
                            peer.send_text(protocol::encode(None, None, "phoenix", "phx_error", &json!({
                                "reason": "binary_unsupported",
                                "details": "this server speaks the V2 JSON serializer only"
                            })));
                        }
                    }
                    // Answered by the WebSocket layer itself, but not for free: they count.
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                        conn.charge();
                    }
                    // Only a client of ours would make tungstenite read a raw frame.
                    Some(Ok(Message::Frame(_))) => {}
                }
            }
        }
    }

    // A wait for room nobody will poll again would keep the room it is given, and the leaves
    // below would queue behind it forever.
    drop(reservation);
    if stopping {
        // Every push the client sent is answered before its socket closes: those still waiting
        // for room are refused (an error means not applied: the client may retry them
        // elsewhere), and those in the pipeline are waited for (their zones may be on their way
        // to another node, which answers them).
        conn.refuse_waiting(
            |w| w.deadline.is_some(),
            "unavailable",
            "the server is restarting: try again (on another node)",
        );
        let deadline = Instant::now() + STOP_ANSWER_WAIT;
        let mut poll = tokio::time::interval(Duration::from_millis(5));
        while Arc::strong_count(&conn.unanswered) > 1 && Instant::now() < deadline {
            poll.tick().await;
        }
    }
    // Leave every channel this connection held or asked for. Of what still waits for room,
    // the leaves go (their channels are already out of the map) and the rest is dropped: nobody
    // is left to answer, and a leave of a session that never began changes nothing.
    let mut leaves: Vec<PipelineMessage<W>> = std::mem::take(&mut conn.waiting)
        .into_iter()
        .filter(|w| matches!(w.reply.asked, Asked::Leave { .. }))
        .map(|w| w.message)
        .collect();
    let held: Vec<(Uuid, Joined)> = conn
        .channels
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .collect();
    for (zone, joined) in held {
        let (message, _) = conn.message(
            zone,
            CommandKind::Leave,
            Asked::Leave { reply: false },
            &joined,
            Carried::default(),
        );
        leaves.push(message);
    }
    for message in leaves {
        // Boxed: the wait for room is 1.5 KiB, and inline it would be in every connection's
        // task for the connection's whole life, not just for its last moments.
        if let Err(PushError::Closed(_)) = Box::pin(ctx.work.push(message)).await {
            break;
        }
    }
    if stopping {
        peer.close(ctx.stop_close);
        closing = true;
    }
    ctx.hub.disconnect(&peer.id);
    if closing {
        // Read (and drop) what the client still sends until it answers our close frame: closing
        // the socket with unread data would reset the connection, and the client would never see
        // the close code that tells it why.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Close(_))) | None => break,
                    Some(Ok(_)) => {}
                    // The stream cannot be read past an oversize frame: linger instead, so the
                    // close frame is read before the socket goes.
                    Some(Err(_)) => tokio::time::sleep(Duration::from_secs(2)).await,
                }
            }
        })
        .await;
    }
    peer.close(if answered {
        ANSWERED
    } else {
        CloseReason {
            code: 1000,
            reason: "bye",
        }
    });
    let _ = writer.await;
    ctx.metrics.connections.dec();
    drop(slot);
}

fn is_too_big(e: &WsError) -> bool {
    let text = e.to_string();
    text.contains("too long") || text.contains("too big") || text.contains("Space limit")
}

impl<W: Send + 'static> Connection<W> {
    fn refuse(&mut self, reason: &str) {
        self.ctx.metrics.refused.with_label_values(&[reason]).inc();
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let cfg = &self.ctx.config;
        let refill = now.duration_since(self.bucket.at).as_secs_f64() * cfg.rate_per_sec;
        self.bucket.tokens = (self.bucket.tokens + refill).min(cfg.burst);
        self.bucket.at = now;
        if self.bucket.tokens >= 1.0 {
            self.bucket.tokens -= 1.0;
            true
        } else {
            if now.duration_since(self.refused.1) >= Duration::from_secs(1) {
                self.refused = (0, now);
            }
            self.refused.0 += 1;
            false
        }
    }

    /// Charges a frame that is not a Phoenix message (binary, ping, pong) to the rate limit,
    /// closing a flood as for any frame; whether it was within the limit.
    fn charge(&mut self) -> bool {
        if self.allow() {
            return true;
        }
        self.refuse("rate_limited");
        if self.refused.0 > self.ctx.config.flood_limit {
            self.peer.close(FLOOD);
        }
        false
    }

    fn on_text(&mut self, text: &str) {
        if !self.allow() {
            self.refuse("rate_limited");
            if self.refused.0 > self.ctx.config.flood_limit {
                self.peer.close(FLOOD);
                return;
            }
            if let Ok(frame) = protocol::decode(text) {
                self.peer.send_text(protocol::error_reply(
                    frame.join_ref.as_deref(),
                    frame.msg_ref.as_deref(),
                    &frame.topic,
                    "rate_limited",
                    "too many frames: slow down",
                ));
            }
            return;
        }
        let frame = match protocol::decode(text) {
            Ok(frame) => frame,
            Err((error, msg_ref)) => {
                self.refuse("malformed_frame");
                let details = error.to_string();
                let reply = match msg_ref {
                    Some(r) => protocol::error_reply(
                        None,
                        Some(&r),
                        "phoenix",
                        "malformed_frame",
                        &details,
                    ),
                    None => protocol::encode(
                        None,
                        None,
                        "phoenix",
                        "phx_error",
                        &json!({
                            "reason": "malformed_frame", "details": details
                        }),
                    ),
                };
                self.peer.send_text(reply);
                return;
            }
        };
        match (frame.topic.as_str(), frame.event.as_str()) {
            ("phoenix", "heartbeat") => {
                self.peer.send_text(protocol::reply(
                    None,
                    frame.msg_ref.as_deref(),
                    "phoenix",
                    true,
                    &json!({}),
                ));
            }
            (CONSOLE_TOPIC, "phx_join") => self.join_console(frame),
            (CONSOLE_TOPIC, "phx_leave") => self.leave_console(frame),
            (CONSOLE_TOPIC, _) => self.reply_error(
                &frame,
                "read_only",
                "the console topic takes no events: it only pushes stats",
            ),
            (_, "phx_join") => self.join(frame),
            (_, "phx_leave") => self.leave(frame),
            (_, "migrate") => self.migrate(frame),
            _ => self.event(frame),
        }
    }

    /// Joins the console topic with the admin token, and starts its pushes.
    fn join_console(&mut self, frame: Frame) {
        let Some(feed) = &self.ctx.console else {
            return self.refuse_join(&frame, "unmatched topic", "this server has no console");
        };
        let token = frame.payload.get("token").and_then(Value::as_str);
        if !token.is_some_and(|t| feed.admits(t)) {
            return self.refuse_join(&frame, "unauthorized", "the console needs the admin token");
        }
        if let Some(old) = self.console.take() {
            old.abort();
        }
        self.ctx.metrics.joins.with_label_values(&["ok"]).inc();
        self.peer.send_text(protocol::reply(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            CONSOLE_TOPIC,
            true,
            &json!({"every_ms": feed.every.as_millis() as u64}),
        ));
        self.console = Some(feed.start(self.peer.clone(), frame.join_ref));
    }

    fn leave_console(&mut self, frame: Frame) {
        if let Some(task) = self.console.take() {
            task.abort();
        }
        self.peer.send_text(protocol::reply(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            CONSOLE_TOPIC,
            true,
            &json!({}),
        ));
    }

    /// Refuses a join before it reaches the pipeline, and counts why.
    fn refuse_join(&self, frame: &Frame, reason: &'static str, details: &str) {
        let label = reason.replace(' ', "_");
        self.ctx.metrics.joins.with_label_values(&[&label]).inc();
        self.reply_error(frame, reason, details);
    }

    fn reply_error(&self, frame: &Frame, reason: &str, details: &str) {
        self.peer.send_text(protocol::error_reply(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            reason,
            details,
        ));
    }

    /// The zone a `zone:<uuid>` topic names, or why not.
    fn zone_of(topic: &str) -> Result<Uuid, (&'static str, String)> {
        let Some(id) = topic.strip_prefix("zone:") else {
            return Err((
                "unmatched topic",
                format!("{topic:?} is not a topic of this server (zone:<uuid>)"),
            ));
        };
        parse_zone_id(id).map_err(|e| ("zone_not_found", e.to_string()))
    }

    fn join(&mut self, frame: Frame) {
        let zone = match Self::zone_of(&frame.topic) {
            Ok(zone) => zone,
            Err((reason, details)) => {
                return self.refuse_join(&frame, reason, &details);
            }
        };
        let text =
            |p: &Map<String, Value>, k: &str| p.get(k).and_then(Value::as_str).map(str::to_owned);
        let agent_id = text(&frame.payload, "agent_id");
        let (token, ticket) = (
            text(&frame.payload, "token"),
            text(&frame.payload, "ticket"),
        );
        let (Some(agent_id), true) = (agent_id, token.is_some() != ticket.is_some()) else {
            return self.refuse_join(
                &frame,
                "unauthorized",
                "join params need agent_id and a token (or, after a migrate, its ticket)",
            );
        };
        let since = match frame.payload.get("since") {
            None | Some(Value::Null) => None,
            Some(v) => match Since::deserialize(v) {
                Ok(since) => Some(since),
                Err(e) => {
                    return self.refuse_join(
                        &frame,
                        "invalid_payload",
                        &format!(
                            "since must be {{\"seq\": <last seq seen>, \"epoch\": \"…\"}}: {e}"
                        ),
                    );
                }
            },
        };
        // A ticket stands for the join token its migration was asked with, for one agent, one
        // zone and one place there: the zone takes the place (once) or refuses the ticket.
        let (claims, arrival) = match (token, ticket) {
            (_, Some(ticket)) => match self.ctx.signer.verify_ticket(&ticket, chrono::Utc::now()) {
                Ok(c) if c.agent_id != agent_id => {
                    return self.refuse_join(
                        &frame,
                        "invalid_ticket",
                        "the ticket was issued to another agent",
                    );
                }
                Ok(c) if c.zone_id != zone => {
                    return self.refuse_join(
                        &frame,
                        "invalid_ticket",
                        "the ticket is for another zone",
                    );
                }
                Ok(c) => (c.token(), Some(c.ticket)),
                Err(e) => {
                    return self.refuse_join(
                        &frame,
                        "invalid_ticket",
                        &format!("the ticket is refused: {e}"),
                    );
                }
            },
            (Some(token), None) => match self.ctx.signer.verify(&token, chrono::Utc::now()) {
                Ok(c) => (c, None),
                Err(e) => {
                    return self.refuse_join(&frame, "unauthorized", &e.to_string());
                }
            },
            (None, None) => unreachable!("one of them, checked above"),
        };
        if claims.agent_id != agent_id || claims.zone_id != zone {
            return self.refuse_join(
                &frame,
                "unauthorized",
                "the token was minted for another agent or zone",
            );
        }
        if self.ctx.revocations.revoked(&claims) {
            return self.refuse_join(
                &frame,
                "unauthorized",
                "the token was revoked: join with a token minted since",
            );
        }
        // The signer caps lifetimes at years; the cap here only keeps the sum in range.
        let left = (claims.expires_at() - chrono::Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(100 * 365 * 24 * 3600));
        let expires_at = Instant::now() + left;
        let joined = Joined {
            join_ref: frame.join_ref.clone(),
            agent_id,
            perms: claims.perms,
            expires_at,
            minted_us: claims.minted_us,
            migrating: false,
        };
        let (previous, too_many) = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            let previous = channels.remove(&zone);
            let too_many = channels.len() >= self.ctx.config.max_channels;
            if !too_many {
                channels.insert(zone, joined.clone());
            }
            (previous, too_many)
        };
        if let Some(old) = previous {
            // A duplicate join closes the old channel first.
            self.close_channel(zone, &old, json!({}));
        }
        if too_many {
            return self.refuse_join(
                &frame,
                "too many channels joined",
                "at most 100 channels per connection",
            );
        }
        self.expiry = Some(self.expiry.map_or(expires_at, |e| e.min(expires_at)));
        let kind = match arrival {
            Some(reservation) => CommandKind::Arrive {
                reservation,
                connections: Vec::new(),
            },
            None => CommandKind::Join,
        };
        self.submit(
            zone,
            kind,
            Asked::Join,
            &joined,
            Carried {
                msg_ref: frame.msg_ref,
                since,
                key: None,
            },
        );
    }

    /// A `migrate` push: see [`super::migrate`].
    fn migrate(&mut self, mut frame: Frame) {
        let zone = match Self::zone_of(&frame.topic) {
            Ok(zone) => zone,
            Err((reason, details)) => {
                self.refuse("unmatched_topic");
                return self.reply_error(&frame, reason, &details);
            }
        };
        let Some(key) = self.idempotency_key(&mut frame) else {
            return;
        };
        self.ctx.metrics.pushes.inc();
        super::migrate::start(
            super::migrate::Asker {
                peer: &self.peer,
                channels: &self.channels,
                hub: &self.ctx.hub,
                signer: &self.ctx.signer,
                revocations: &self.ctx.revocations,
                migrations: self.ctx.migrations.as_ref(),
                unanswered: self.unanswered.clone(),
            },
            zone,
            frame,
            key,
        );
    }

    /// Takes a push's `idempotency_key` out of its payload: `Some(None)` without one, `None`
    /// (answered `invalid_payload`) for one that is not a string of 1 to 64 characters.
    fn idempotency_key(&mut self, frame: &mut Frame) -> Option<Option<String>> {
        match frame.payload.remove("idempotency_key") {
            None => Some(None),
            Some(Value::String(key))
                if (1..=IDEMPOTENCY_KEY_CHARS).contains(&key.chars().count()) =>
            {
                Some(Some(key))
            }
            Some(_) => {
                self.refuse("invalid_payload");
                self.reply_error(
                    frame,
                    "invalid_payload",
                    &format!(
                        "idempotency_key must be a string of 1 to {IDEMPOTENCY_KEY_CHARS} characters"
                    ),
                );
                None
            }
        }
    }

    fn leave(&mut self, frame: Frame) {
        let zone = Self::zone_of(&frame.topic).ok();
        let joined = zone.and_then(|z| {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            channels.remove(&z).map(|j| (z, j))
        });
        match joined {
            Some((zone, joined)) => {
                let joined = Joined {
                    join_ref: frame.join_ref.clone().or(joined.join_ref),
                    ..joined
                };
                self.submit(
                    zone,
                    CommandKind::Leave,
                    Asked::Leave { reply: true },
                    &joined,
                    Carried {
                        msg_ref: frame.msg_ref,
                        ..Carried::default()
                    },
                );
            }
            None => {
                self.peer.send_text(protocol::reply(
                    frame.join_ref.as_deref(),
                    frame.msg_ref.as_deref(),
                    &frame.topic,
                    true,
                    &json!({}),
                ));
            }
        }
    }

    fn event(&mut self, mut frame: Frame) {
        let joined = Self::zone_of(&frame.topic).ok().and_then(|zone| {
            let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            channels
                .get(&zone)
                .filter(|j| frame.join_ref.is_none() || j.join_ref == frame.join_ref)
                .cloned()
                .map(|j| (zone, j))
        });
        let Some((zone, joined)) = joined else {
            self.refuse("unmatched_topic");
            self.peer.send_text(protocol::error_reply(
                None,
                frame.msg_ref.as_deref(),
                &frame.topic,
                "unmatched topic",
                "join the topic before sending events to it",
            ));
            return;
        };
        let Some(key) = self.idempotency_key(&mut frame) else {
            return;
        };
        let payload = Value::Object(std::mem::take(&mut frame.payload));
        match CommandKind::from_value(&frame.event, payload) {
            Ok(command) => {
                self.ctx.metrics.pushes.inc();
                self.submit(
                    zone,
                    command,
                    Asked::Push,
                    &joined,
                    Carried {
                        msg_ref: frame.msg_ref,
                        since: None,
                        key,
                    },
                );
            }
            Err(refusal) => {
                self.refuse(refusal.reason());
                self.reply_error(&frame, refusal.reason(), &refusal.to_string());
            }
        }
    }

    /// Ends the sessions of the channels `which` picks, as a leave would, and tells their
    /// clients with `phx_close` and `reason` (a client then rejoins with a fresh token).
    fn end_sessions(&mut self, which: impl Fn(Uuid, &Joined) -> bool, reason: &'static str) {
        let ended: Vec<(Uuid, Joined)> = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            let picked: Vec<Uuid> = channels
                .iter()
                .filter(|(zone, joined)| which(**zone, joined))
                .map(|(zone, _)| *zone)
                .collect();
            let ended = picked
                .into_iter()
                .filter_map(|zone| channels.remove(&zone).map(|j| (zone, j)))
                .collect();
            self.expiry = channels.values().map(|j| j.expires_at).min();
            ended
        };
        for (zone, joined) in ended {
            self.ctx
                .metrics
                .sessions_ended
                .with_label_values(&[reason])
                .inc();
            // What it sent that still waits for room is not applied under the ended token, and
            // the zone's broadcasts stop now rather than when the leave reaches the topic sink.
            self.refuse_waiting(
                |w| w.reply.zone == zone && !matches!(w.reply.asked, Asked::Leave { .. }),
                reason,
                "the channel was closed: its token expired or was revoked",
            );
            self.ctx.hub.unsubscribe_now(zone, &self.peer.id);
            self.close_channel(zone, &joined, json!({"reason": reason}));
        }
    }

    /// Tells the client its channel on `zone` is closed (`phx_close` with `payload`), and ends
    /// its session as a leave would.
    fn close_channel(&mut self, zone: Uuid, joined: &Joined, payload: Value) {
        self.peer.send_text(protocol::encode(
            joined.join_ref.as_deref(),
            joined.join_ref.as_deref(),
            &topic_name(zone),
            "phx_close",
            &payload,
        ));
        self.submit(
            zone,
            CommandKind::Leave,
            Asked::Leave { reply: false },
            joined,
            Carried::default(),
        );
    }

    /// The pipeline message for a command on one of this connection's channels, and where its
    /// answer goes.
    fn message(
        &self,
        zone: Uuid,
        kind: CommandKind,
        asked: Asked,
        joined: &Joined,
        carried: Carried,
    ) -> (PipelineMessage<W>, Arc<SocketReply>) {
        let Carried {
            msg_ref,
            since,
            key,
        } = carried;
        let reply = Arc::new(SocketReply {
            unanswered: self.unanswered.clone(),
            peer: self.peer.clone(),
            zone,
            join_ref: joined.join_ref.clone(),
            msg_ref,
            asked,
            channels: self.channels.clone(),
            joins: self.ctx.metrics.joins.clone(),
        });
        let actor = Actor::Agent {
            agent_id: joined.agent_id.clone(),
            connection: self.peer.id.to_string(),
            permissions: joined.perms,
        };
        // A push marked with an idempotency key is the same command whenever it is retried.
        let command = match key {
            Some(key) => ZoneCommand::new(
                keyed_command_id(zone, &joined.agent_id, &key),
                zone,
                actor,
                kind,
            ),
            None => command(zone, actor, kind),
        };
        ((self.ctx.envelope)(command, reply.clone(), since), reply)
    }

    /// Hands a command to the pipeline, or queues it behind those already waiting for room.
    fn submit(
        &mut self,
        zone: Uuid,
        kind: CommandKind,
        asked: Asked,
        joined: &Joined,
        carried: Carried,
    ) {
        let (message, reply) = self.message(zone, kind, asked, joined, carried);
        let deadline = match asked {
            Asked::Leave { .. } => None,
            Asked::Join | Asked::Push => Some(Instant::now() + self.ctx.config.push_wait),
        };
        if !self.waiting.is_empty() {
            if deadline.is_some() && self.waiting.len() >= self.ctx.config.max_waiting {
                self.refuse("overloaded");
                reply.refuse("overloaded", "the server is busy: try again later");
                return;
            }
            self.waiting.push_back(Waiting {
                message,
                reply,
                deadline,
            });
            return;
        }
        match self.ctx.work.try_push(message) {
            Ok(()) => {}
            Err(PushError::Full(message)) => self.waiting.push_back(Waiting {
                message,
                reply,
                deadline,
            }),
            Err(PushError::Closed(_)) => {
                reply.refuse("unavailable", "the server is shutting down");
            }
        }
    }

    /// Answers the waiting commands that `which` picks with `reason`, and forgets them.
    fn refuse_waiting(&mut self, which: impl Fn(&Waiting<W>) -> bool, reason: &str, details: &str) {
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        for w in self.waiting.drain(..) {
            if which(&w) {
                self.ctx.metrics.refused.with_label_values(&[reason]).inc();
                w.reply.refuse(reason, details);
            } else {
                kept.push_back(w);
            }
        }
        self.waiting = kept;
    }
}

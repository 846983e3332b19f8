//! NATS JetStream: a durable pull consumer whose pulls follow the pipeline's demand, settled
//! message by message once the pipeline is done with each.
//!
//! At start the source declares what it needs, or checks what is there: the stream (`THUNDERLINE`,
//! subjects `thunderline.commands.>`), the dead-letter stream (`THUNDERLINE_DEAD`,
//! `thunderline.dead.>`) and the durable pull consumer (`thunderline`) with explicit acks and
//! `max_ack_pending` set to the pipeline's in-flight bound. An existing consumer that cannot
//! serve (push-based, another ack policy, another filter) is a start-up error that says what to
//! change; its tunables (ack wait, `max_ack_pending`) are brought to the configured values.
//!
//! Messages are pulled only while the pipeline asks for them: the pull requests follow what
//! `produce` takes, and the server stops at `max_ack_pending` unsettled messages. Settlement runs
//! on tasks of the source's own, so that the pipeline's stages never wait on the network:
//!
//! - success: `+ACK`;
//! - a retryable failure with attempts left (the delivery count is the attempt number, the
//!   policy's `max_attempts` the most): `-NAK` with the policy's delay. JetStream's consumer
//!   `backoff` list applies to ack timeouts only, not to naks, so the delay travels with the nak;
//! - a permanent failure, attempts used up, or bytes the decoder refuses: the message is
//!   published to `thunderline.dead.<rest of its subject>` in the dead-letter stream, with
//!   headers `Nats-Msg-Id` (the original's, so that a dead letter published twice, after a
//!   crash, is stored once), [`REASON_HEADER`] and [`ATTEMPTS_HEADER`]; once the stream has
//!   confirmed it, `+TERM`. If it cannot be published, the message is nakked instead, and comes
//!   back.
//!
//! A message held longer than half the ack wait gets progress acks (`+WPI`) until it is settled,
//! so a slow batch is not redelivered while it is still being handled. The client reconnects by
//! itself; pulls resume after a reconnect, a missed idle heartbeat is counted and waited out, and
//! slow-consumer events are counted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::redact::redact_url;
use super::{ATTEMPTS_HEADER, Decoder, Delivery, REASON_HEADER, SourceMetrics};
use crate::pipeline::{Acknowledger, Demand, Failure, Message, Produced, Producer, RetryPolicy};

/// Where the source reads, where it dead-letters, and how it settles.
#[derive(Clone)]
pub struct JetStreamConfig {
    /// The server, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    pub stream: String,
    /// The subjects the stream takes, when the source creates it.
    pub subjects: Vec<String>,
    /// The durable pull consumer's name.
    pub consumer: String,
    /// Only messages on these subjects are consumed (empty: all of the stream's). The part of a
    /// subject after this prefix (its last `>` dropped) names the dead letter's subject.
    pub filter_subject: String,
    pub dead_stream: String,
    /// Dead letters go to `<dead_subject>.<rest of the subject>`.
    pub dead_subject: String,
    /// How long the server waits for a settlement before it delivers a message again.
    pub ack_wait: Duration,
    /// Most messages delivered and not yet settled: the pipeline's in-flight bound.
    pub max_ack_pending: usize,
    /// Most messages one pull request asks for.
    pub pull_batch: usize,
    /// How often the server says it is alive while it has nothing to deliver.
    pub idle_heartbeat: Duration,
    /// Attempts (deliveries) and the delays between them.
    pub retry: RetryPolicy,
    pub metrics: SourceMetrics,
}

impl JetStreamConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "THUNDERLINE".into(),
            subjects: vec!["thunderline.commands.>".into()],
            consumer: "thunderline".into(),
            filter_subject: "thunderline.commands.>".into(),
            dead_stream: "THUNDERLINE_DEAD".into(),
            dead_subject: "thunderline.dead".into(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            pull_batch: 512,
            idle_heartbeat: Duration::from_secs(5),
            retry: RetryPolicy::exponential(
                5,
                Duration::from_millis(100),
                2.0,
                Duration::from_secs(10),
            ),
            metrics: SourceMetrics::unregistered("jetstream"),
        }
    }
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        url: String,
        source: async_nats::ConnectError,
    },
    #[error("JetStream refused {what}: {reason}")]
    Declare { what: String, reason: String },
    #[error(
        "the existing consumer {consumer:?} on stream {stream:?} cannot be used: {conflict}. Delete it (`nats consumer rm {stream} {consumer}`) or name another consumer"
    )]
    ConsumerConflict {
        stream: String,
        consumer: String,
        conflict: String,
    },
    #[error(
        "the existing stream {stream:?} does not take {subject:?} (its subjects: {subjects:?}): add the subject to it or name another stream"
    )]
    StreamConflict {
        stream: String,
        subject: String,
        subjects: Vec<String>,
    },
    #[error("invalid JetStream source settings: {0}")]
    Invalid(String),
}

/// A JetStream pull consumer as a pipeline producer; see the module documentation.
pub struct JetStreamSource<T> {
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    config: JetStreamConfig,
    decoder: Arc<dyn Decoder<T>>,
    settler: Arc<Settler<T>>,
    tasks: Vec<JoinHandle<()>>,
    client: Client,
    /// The next delivery's key in the held table (its `ack_data`).
    next_key: u64,
}

/// Waits for a source's last settlements to reach the server, once its pipeline has finished.
pub struct Settled {
    tasks: Vec<JoinHandle<()>>,
    client: Client,
}

impl Settled {
    /// Waits (at most `timeout`) until every settlement made so far has been sent, then flushes
    /// the connection. Call it after the pipeline's `join`: settlements made later are not
    /// waited for.
    pub async fn wait(self, timeout: Duration) {
        let all = async {
            for task in self.tasks {
                let _ = task.await;
            }
            let _ = self.client.flush().await;
        };
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(
                "JetStream settlements were still being sent at shutdown: the server delivers those messages again"
            );
        }
    }
}

impl<T: Send + 'static> JetStreamSource<T> {
    /// Connects, declares (or checks) the streams and the consumer, and starts pulling.
    pub async fn connect(
        config: JetStreamConfig,
        decoder: impl Decoder<T>,
    ) -> Result<Self, JetStreamError> {
        if config.max_ack_pending == 0 || config.pull_batch == 0 {
            return Err(JetStreamError::Invalid(
                "max_ack_pending and pull_batch must be at least 1".into(),
            ));
        }
        if config.ack_wait < Duration::from_secs(1) {
            return Err(JetStreamError::Invalid(
                "ack_wait must be at least 1 s".into(),
            ));
        }
        let client = connect(&config).await?;
        let context = jetstream::new(client.clone());
        let consumer = declare(&context, &config).await?;
        let messages = open(&consumer, &config).await?;
        let (acks, acks_rx) = mpsc::unbounded_channel();
        let (dead, dead_rx) = mpsc::unbounded_channel();
        let settler = Arc::new(Settler {
            held: Mutex::new(HashMap::new()),
            then: OnceLock::new(),
            acks,
            dead,
            retry: config.retry.clone(),
            metrics: config.metrics.clone(),
        });
        // Ends by itself once the settler is gone; nothing waits for it.
        tokio::spawn(progress(
            Arc::downgrade(&settler),
            client.clone(),
            config.ack_wait,
            config.metrics.clone(),
        ));
        let tasks = vec![
            tokio::spawn(send_acks(client.clone(), acks_rx)),
            tokio::spawn(send_dead_letters(
                context,
                config.clone(),
                dead_rx,
                settler.acks.clone(),
            )),
        ];
        Ok(Self {
            consumer,
            messages: Some(messages),
            config,
            decoder: Arc::new(decoder),
            settler,
            tasks,
            client,
            next_key: 1,
        })
    }

    /// Has `acker` told how each message ended, after the broker's settlement is decided: how a
    /// user keeps bookkeeping of their own (the daemon's zones do). Set once; later calls are
    /// ignored.
    pub fn then_acknowledge(self, acker: Arc<dyn Acknowledger<T>>) -> Self {
        let _ = self.settler.then.set(acker);
        self
    }

    /// What to wait on at shutdown, after the pipeline has finished: see [`Settled::wait`].
    pub fn settled(&mut self) -> Settled {
        Settled {
            tasks: std::mem::take(&mut self.tasks),
            client: self.client.clone(),
        }
    }

    pub fn metrics(&self) -> &SourceMetrics {
        &self.config.metrics
    }

    /// Takes one delivery: the message for the pipeline if it decodes; to the dead letters if
    /// not.
    fn take(&mut self, msg: jetstream::Message) -> Option<Message<T>> {
        let metrics = &self.config.metrics;
        metrics.message("received", 1);
        let Some(ack_subject) = msg.reply.clone() else {
            // Not a JetStream delivery: nothing could settle it.
            tracing::warn!(subject = %msg.subject, "a message without an ack subject was ignored");
            return None;
        };
        let info = msg.info().ok();
        if let Some(info) = &info {
            metrics.set_lag(info.pending);
        }
        let attempt = info
            .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX).max(1))
            .unwrap_or(1);
        if attempt > 1 {
            metrics.message("redelivered", 1);
        }
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
        };
        let decoded = self.decoder.decode(&Delivery {
            payload: &msg.payload,
            content_type: header("Content-Type"),
            message_id: header("Nats-Msg-Id"),
            subject: msg.subject.as_str(),
            attempt,
        });
        // The delivery itself is kept (moved, not copied): what a settlement, a progress ack or
        // a dead letter needs.
        let held = Held {
            ack_subject,
            message: msg.message,
            attempt,
            since: Instant::now(),
        };
        match decoded {
            Ok(data) => {
                let key = self.next_key;
                self.next_key += 1;
                self.settler.hold(key, held);
                Some(Message::with_ack_data(data, self.settler.clone(), key))
            }
            Err(failure) => {
                metrics.message("undecodable", 1);
                let _ = self.settler.dead.send(DeadLetter {
                    held,
                    reason: failure.reason().to_owned(),
                });
                None
            }
        }
    }

    /// Opens the pull stream again after it ended (the consumer was deleted, the client closed),
    /// declaring the consumer again if it has to.
    async fn reopen(&mut self) {
        let mut wait = Duration::from_millis(100);
        loop {
            let context = jetstream::new(self.client.clone());
            let opened = match declare(&context, &self.config).await {
                Ok(consumer) => {
                    self.consumer = consumer;
                    open(&self.consumer, &self.config).await
                }
                Err(e) => Err(e),
            };
            match opened {
                Ok(stream) => {
                    self.messages = Some(stream);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot pull from JetStream yet; trying again");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl<T: Send + 'static> Producer<T> for JetStreamSource<T> {
    async fn produce(&mut self, demand: &mut Demand<T>) -> Produced {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                self.reopen().await;
                continue;
            };
            // Waiting for the first message is cancel-safe: until it is taken it stays in the
            // client's queue. What is already there is then taken without waiting.
            let mut next = Some(messages.next().await);
            let mut handed = 0;
            while let Some(item) = next.take() {
                match item {
                    Some(Ok(msg)) => {
                        if let Some(message) = self.take(msg) {
                            // There is room: the loop stops when the demand is filled.
                            let _ = demand.push(message);
                            handed += 1;
                        }
                    }
                    Some(Err(e)) => {
                        use pull::MessagesErrorKind as Kind;
                        match e.kind() {
                            Kind::MissingHeartbeat => {
                                self.config.metrics.event("missed_heartbeat");
                                tracing::debug!(
                                    "JetStream missed an idle heartbeat; still pulling"
                                );
                            }
                            Kind::ConsumerDeleted
                            | Kind::PushBasedConsumer
                            | Kind::RequestLimitExceeded => {
                                tracing::warn!(error = %e, "the JetStream pull ended; declaring the consumer again");
                                self.messages = None;
                            }
                            _ => tracing::warn!(error = %e, "JetStream pull error; still pulling"),
                        }
                    }
                    None => self.messages = None,
                }
                if demand.is_filled() {
                    break;
                }
                if let Some(messages) = self.messages.as_mut() {
                    next = messages.next().now_or_never();
                }
            }
            if handed > 0 {
                return Produced::More;
            }
        }
    }

    async fn drain(&mut self, held: &mut Vec<Message<T>>) {
        // What the client already has is handed over; what is still on its way when the pull
        // subscription closes, the server delivers again after the ack wait.
        let Some(mut messages) = self.messages.take() else {
            return;
        };
        while let Some(Some(item)) = messages.next().now_or_never() {
            if let Ok(msg) = item
                && let Some(message) = self.take(msg)
            {
                held.push(message);
            }
        }
    }
}

async fn connect(config: &JetStreamConfig) -> Result<Client, JetStreamError> {
    let metrics = config.metrics.clone();
    // The credentials go to the client apart from the address: the client logs the address of
    // every server it tries (at debug level), and a password must not go with it.
    let (address, credentials) = split_credentials(&config.url);
    let options = match credentials {
        Some((user, Some(password))) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some((token, None)) => async_nats::ConnectOptions::with_token(token),
        None => async_nats::ConnectOptions::new(),
    };
    options
        .name("thunderline")
        .event_callback(move |event| {
            let metrics = metrics.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        metrics.event("reconnected");
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        metrics.event("disconnected");
                        tracing::warn!("disconnected from NATS; reconnecting");
                    }
                    async_nats::Event::SlowConsumer(_) => metrics.event("slow_consumer"),
                    other => tracing::info!(event = %other, "NATS"),
                }
            }
        })
        .connect(address.as_str())
        .await
        .map_err(|source| JetStreamError::Connect {
            url: redact_url(&config.url),
            source,
        })
}

/// `nats://user:password@host` as `nats://host` and `(user, Some(password))`; a lone
/// `nats://token@host` gives `(token, None)`. The parts stay as written (percent-encoded), as
/// the client would have taken them from the URL.
fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let credentials = match userinfo.split_once(':') {
                Some((user, password)) => (user.to_owned(), Some(password.to_owned())),
                None => (userinfo.to_owned(), None),
            };
            (format!("{scheme}://{}", &rest[at + 1..]), Some(credentials))
        }
        None => (url.to_owned(), None),
    }
}

/// Declares the two streams and the consumer, or checks the ones that exist.
async fn declare(
    context: &Context,
    config: &JetStreamConfig,
) -> Result<PullConsumer, JetStreamError> {
    let refused = |what: &str| {
        let what = what.to_owned();
        move |e: &dyn std::fmt::Display| JetStreamError::Declare {
            what: what.clone(),
            reason: e.to_string(),
        }
    };
    let stream = ensure_stream(
        context,
        &config.stream,
        &config.subjects,
        &config.filter_subject,
    )
    .await?;
    let dead_subjects = vec![format!("{}.>", config.dead_subject)];
    ensure_stream(
        context,
        &config.dead_stream,
        &dead_subjects,
        &dead_subjects[0],
    )
    .await?;
    let wanted = pull::Config {
        durable_name: Some(config.consumer.clone()),
        description: Some("thunderline: broker commands into the pipeline".into()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: config.ack_wait,
        // Unlimited: the source counts attempts and dead-letters; a server that stopped
        // delivering on its own would drop a message nobody dead-lettered.
        max_deliver: -1,
        filter_subject: config.filter_subject.clone(),
        max_ack_pending: i64::try_from(config.max_ack_pending).unwrap_or(i64::MAX),
        ..pull::Config::default()
    };
    match stream.consumer_info(&config.consumer).await {
        Ok(info) => {
            let have = &info.config;
            let conflict = if have.deliver_subject.is_some() {
                Some(
                    "it is a push consumer (it has a deliver subject); a pull consumer is needed"
                        .to_owned(),
                )
            } else if have.ack_policy != AckPolicy::Explicit {
                Some(format!(
                    "its ack policy is {:?}; explicit acks are needed",
                    have.ack_policy
                ))
            } else if have.filter_subject != config.filter_subject {
                Some(format!(
                    "it filters {:?}, not {:?}",
                    have.filter_subject, config.filter_subject
                ))
            } else {
                None
            };
            if let Some(conflict) = conflict {
                return Err(JetStreamError::ConsumerConflict {
                    stream: config.stream.clone(),
                    consumer: config.consumer.clone(),
                    conflict,
                });
            }
            if have.ack_wait != wanted.ack_wait
                || have.max_ack_pending != wanted.max_ack_pending
                || have.max_deliver != wanted.max_deliver
            {
                // Creating a durable that exists with other tunables updates them.
                stream.create_consumer(wanted.clone()).await.map_err(|e| {
                    JetStreamError::ConsumerConflict {
                        stream: config.stream.clone(),
                        consumer: config.consumer.clone(),
                        conflict: format!("its settings cannot be updated: {e}"),
                    }
                })?;
            }
        }
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {}
        Err(e) => return Err(refused(&format!("consumer {}", config.consumer))(&e)),
    }
    stream
        .create_consumer(wanted)
        .await
        .map_err(|e| refused(&format!("consumer {}", config.consumer))(&e))
}

async fn ensure_stream(
    context: &Context,
    name: &str,
    subjects: &[String],
    needed: &str,
) -> Result<stream::Stream, JetStreamError> {
    match context.get_stream(name).await {
        Ok(mut stream) => {
            let info = stream.info().await.map_err(|e| JetStreamError::Declare {
                what: format!("stream {name}"),
                reason: e.to_string(),
            })?;
            let have = info.config.subjects.clone();
            if !needed.is_empty() && !have.iter().any(|s| covers(s, needed)) {
                return Err(JetStreamError::StreamConflict {
                    stream: name.to_owned(),
                    subject: needed.to_owned(),
                    subjects: have,
                });
            }
            Ok(stream)
        }
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {
            context
                .create_stream(stream::Config {
                    name: name.to_owned(),
                    subjects: subjects.to_vec(),
                    storage: StorageType::File,
                    ..stream::Config::default()
                })
                .await
                .map_err(|e| JetStreamError::Declare {
                    what: format!("stream {name}"),
                    reason: e.to_string(),
                })
        }
        Err(e) => Err(JetStreamError::Declare {
            what: format!("stream {name}"),
            reason: e.to_string(),
        }),
    }
}

/// Whether subject pattern `pattern` takes every subject `wanted` does.
fn covers(pattern: &str, wanted: &str) -> bool {
    let mut p = pattern.split('.');
    let mut w = wanted.split('.');
    loop {
        match (p.next(), w.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(t)) if t != ">" => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

async fn open(
    consumer: &PullConsumer,
    config: &JetStreamConfig,
) -> Result<pull::Stream, JetStreamError> {
    consumer
        .stream()
        .max_messages_per_batch(config.pull_batch.min(config.max_ack_pending))
        .heartbeat(config.idle_heartbeat)
        .expires(config.idle_heartbeat * 4)
        .messages()
        .await
        .map_err(|e| JetStreamError::Declare {
            what: format!("a pull from consumer {}", config.consumer),
            reason: e.to_string(),
        })
}

/// A delivery the pipeline holds: what a settlement, a dead letter or a progress ack needs.
struct Held {
    ack_subject: Subject,
    message: async_nats::Message,
    attempt: u32,
    since: Instant,
}

impl Held {
    fn header(&self, name: &str) -> Option<&str> {
        self.message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    }
}

struct DeadLetter {
    held: Held,
    reason: String,
}

/// The source's acknowledger: turns how each message ended into what the server is told.
struct Settler<T> {
    /// Deliveries in the pipeline, by their messages' `ack_data`.
    held: Mutex<HashMap<u64, Held>>,
    /// The user's acknowledger, told after the settlement is decided.
    then: OnceLock<Arc<dyn Acknowledger<T>>>,
    /// (ack subject, what to publish on it): acks, naks, terms, progress.
    acks: mpsc::UnboundedSender<(Subject, Bytes)>,
    dead: mpsc::UnboundedSender<DeadLetter>,
    retry: RetryPolicy,
    metrics: SourceMetrics,
}

impl<T> Settler<T> {
    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn hold(&self, key: u64, held: Held) {
        self.held().insert(key, held);
    }
}

impl<T: Send + 'static> Acknowledger<T> for Settler<T> {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>) {
        // Taken out of the table under one lock for the whole group.
        let (done, failed_held): (Vec<Held>, Vec<(Held, Failure)>) = {
            let mut held = self.held();
            let done = successful
                .iter()
                .filter_map(|m| held.remove(&m.ack_data()))
                .collect();
            let failed_held = failed
                .iter()
                .filter_map(|m| {
                    let failure = m
                        .failure()
                        .cloned()
                        .unwrap_or_else(|| Failure::permanent("failed"));
                    held.remove(&m.ack_data()).map(|h| (h, failure))
                })
                .collect();
            (done, failed_held)
        };
        self.metrics.message("acked", done.len() as u64);
        for held in done {
            let _ = self
                .acks
                .send((held.ack_subject, Bytes::from_static(b"+ACK")));
        }
        for (held, failure) in failed_held {
            if failure.is_retryable() && held.attempt < self.retry.max_attempts {
                let delay = self.retry.delay(held.attempt - 1);
                let nak = format!("-NAK {{\"delay\": {}}}", delay.as_nanos());
                let _ = self.acks.send((held.ack_subject, Bytes::from(nak)));
                self.metrics.message("retried", 1);
            } else {
                let _ = self.dead.send(DeadLetter {
                    held,
                    reason: failure.reason().to_owned(),
                });
            }
        }
        if let Some(then) = self.then.get() {
            then.ack(successful, failed);
        }
    }
}

/// Publishes acks, naks and terms in the order they were decided.
async fn send_acks(client: Client, mut rx: mpsc::UnboundedReceiver<(Subject, Bytes)>) {
    let mut batch = Vec::with_capacity(256);
    while rx.recv_many(&mut batch, 256).await > 0 {
        for (subject, payload) in batch.drain(..) {
            // Fails only once the client is closed: the server then delivers again.
            if let Err(e) = client.publish(subject, payload).await {
                tracing::warn!(error = %e, "a JetStream settlement could not be sent");
            }
        }
    }
}

/// Publishes dead letters, waiting for the stream to store each before the original is
/// terminated.
async fn send_dead_letters(
    context: Context,
    config: JetStreamConfig,
    mut rx: mpsc::UnboundedReceiver<DeadLetter>,
    acks: mpsc::UnboundedSender<(Subject, Bytes)>,
) {
    let prefix = config
        .filter_subject
        .trim_end_matches('>')
        .trim_end_matches('.');
    while let Some(dead) = rx.recv().await {
        let held = &dead.held;
        let original = held.message.subject.as_str();
        let rest = original
            .strip_prefix(prefix)
            .map(|r| r.trim_start_matches('.'))
            .filter(|r| !r.is_empty())
            .unwrap_or(original);
        let subject = format!("{}.{rest}", config.dead_subject);
        let ack_subject = held.ack_subject.clone();
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            held.header("Nats-Msg-Id").unwrap_or(ack_subject.as_str()),
        );
        if let Some(content_type) = held.header("Content-Type") {
            headers.insert("Content-Type", content_type);
        }
        headers.insert(REASON_HEADER, one_line(&dead.reason).as_str());
        headers.insert(ATTEMPTS_HEADER, dead.held.attempt.to_string().as_str());
        let stored = match context
            .publish_with_headers(subject, headers, held.message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(()) => {
                config.metrics.message("dead_lettered", 1);
                let _ = acks.send((ack_subject, Bytes::from_static(b"+TERM")));
            }
            Err(e) => {
                config.metrics.message("settle_failed", 1);
                tracing::warn!(error = %e, "a dead letter could not be stored; the message will come back");
                let delay = config.retry.max_delay.as_nanos();
                let nak = format!("-NAK {{\"delay\": {delay}}}");
                let _ = acks.send((ack_subject, Bytes::from(nak)));
            }
        }
    }
}

/// Header values are one line.
fn one_line(reason: &str) -> String {
    let line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if line.is_empty() {
        "failed".into()
    } else {
        line
    }
}

/// Sends `+WPI` for every message held longer than half the ack wait, so that the server does
/// not deliver again what is still being handled.
async fn progress<T>(
    settler: std::sync::Weak<Settler<T>>,
    client: Client,
    ack_wait: Duration,
    metrics: SourceMetrics,
) {
    let half = ack_wait / 2;
    let mut tick = tokio::time::interval(ack_wait / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(settler) = settler.upgrade() else {
            return;
        };
        let now = Instant::now();
        let due: Vec<Subject> = settler
            .held()
            .values_mut()
            .filter(|h| now.duration_since(h.since) >= half)
            .map(|h| {
                h.since = now;
                h.ack_subject.clone()
            })
            .collect();
        drop(settler);
        for subject in due {
            metrics.event("progress_ack");
            let _ = client.publish(subject, Bytes::from_static(b"+WPI")).await;
        }
    }
}

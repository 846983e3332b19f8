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
//! `produce` takes, and the server stops at `max_ack_pending` unsettled messages. Settlement
//! (the [module](super) table) runs on a task of the source's own, so that the pipeline's
//! stages never wait on the network:
//!
//! - success: `+ACK`;
//! - failure (the stage already retried it in process, so its attempts are used up, or it was
//!   permanent), or bytes the decoder refuses: the message is published to
//!   `thunderline.dead.<rest of its subject>` in the dead-letter stream, with headers
//!   `Nats-Msg-Id` (the original's, so that a dead letter published twice, after a crash, is
//!   stored once), [`REASON_HEADER`] and [`ATTEMPTS_HEADER`] (the message's attempts; none for
//!   bytes the decoder refused); once the stream has confirmed it, `+TERM`. If it cannot be
//!   stored, the message is given back with `-NAK` after the [`reconnect`](JetStreamConfig::reconnect)
//!   policy's delay for its delivery count (JetStream's consumer `backoff` list applies to ack
//!   timeouts only, not to naks, so the delay travels with the nak), and comes back;
//! - failure with [`Redeliver`](super::Redeliver) (it could not be decided where and when it
//!   was handled), or abandoned by a pipeline that stopped before finishing it: `-NAK` after
//!   the same delay, and no dead letter.
//!
//! A message held longer than half the ack wait gets progress acks (`+WPI`) until it is settled,
//! so a slow batch is not redelivered while it is still being handled. The client reconnects by
//! itself, waiting as the `reconnect` policy says between attempts; pulls resume after a
//! reconnect, a pull that ended is opened again under the same policy, a missed idle heartbeat
//! is counted and waited out, and slow-consumer events are counted.

use std::fmt;
use std::num::{NonZeroU64, NonZeroUsize};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, StorageType};
use async_nats::jetstream::{self, Context};
use async_nats::{Client, HeaderMap, Subject};
use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use super::settlement::{BrokerIo, DeadLetter, Settler, decode};
use super::{
    ATTEMPTS_HEADER, Counted, Decoder, Delivery, InvalidConfig, NoRetry, REASON_HEADER,
    SourceMetrics, check_name, default_reconnect,
};
use crate::pipeline::{Acknowledger, Demand, Message, Produced, Producer, RetryPolicy};
use crate::redact::redact_url;

/// Where the source reads, where it dead-letters, and how it reconnects.
///
/// In a pipeline file (`[sources.nats]`) the keys are `url`, `stream`, `subjects`, `consumer`,
/// `filter_subject`, `dead_stream`, `dead_subject`, `ack_wait_ms`, `pull_batch`,
/// `idle_heartbeat_ms` and a `reconnect` table (a [`RetryPolicy`]); an omitted key takes the
/// default. Its `Debug` shows the URL without credentials.
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(from = "JetStreamFile", into = "JetStreamFile")]
pub struct JetStreamConfig {
    url: String,
    stream: String,
    subjects: Vec<String>,
    consumer: String,
    filter_subject: Option<String>,
    dead_stream: String,
    dead_subject: String,
    ack_wait: Duration,
    max_ack_pending: usize,
    pull_batch: usize,
    idle_heartbeat: Duration,
    reconnect: RetryPolicy,
    metrics: Counted,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            stream: "THUNDERLINE".into(),
            subjects: vec!["thunderline.commands.>".into()],
            consumer: "thunderline".into(),
            filter_subject: None,
            dead_stream: "THUNDERLINE_DEAD".into(),
            dead_subject: "thunderline.dead".into(),
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 20_000,
            pull_batch: 512,
            idle_heartbeat: Duration::from_secs(5),
            reconnect: default_reconnect(),
            metrics: Counted(SourceMetrics::unregistered("jetstream")),
        }
    }
}

impl JetStreamConfig {
    /// The defaults, at another server (`nats://host:port`; credentials as
    /// `nats://user:password@host` or, for token auth, `nats://token@host`).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// The stream to read. Default: `THUNDERLINE`.
    pub fn stream(mut self, name: impl Into<String>) -> Self {
        self.stream = name.into();
        self
    }

    /// The subjects the stream takes, when the source creates it. Default:
    /// `thunderline.commands.>`.
    pub fn subjects(mut self, subjects: Vec<String>) -> Self {
        self.subjects = subjects;
        self
    }

    /// The durable pull consumer's name. Default: `thunderline`.
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// Only messages on this subject are consumed. Default: the stream's one subject. The part
    /// of a subject after it (its last `>` dropped) names the dead letter's subject.
    pub fn filter_subject(mut self, subject: impl Into<String>) -> Self {
        self.filter_subject = Some(subject.into());
        self
    }

    /// The stream dead letters go to. Default: `THUNDERLINE_DEAD`.
    pub fn dead_stream(mut self, name: impl Into<String>) -> Self {
        self.dead_stream = name.into();
        self
    }

    /// Dead letters go to `<dead_subject>.<rest of the subject>`. Default: `thunderline.dead`.
    pub fn dead_subject(mut self, prefix: impl Into<String>) -> Self {
        self.dead_subject = prefix.into();
        self
    }

    /// How long the server waits for a settlement before it delivers a message again (progress
    /// acks keep a slow message from that). At least 1 s. Default: 30 s.
    pub fn ack_wait(mut self, wait: Duration) -> Self {
        self.ack_wait = wait;
        self
    }

    /// Most messages delivered and not yet settled: the pipeline's in-flight bound, or the
    /// source's share of it. Default: 20,000.
    pub fn max_ack_pending(mut self, n: usize) -> Self {
        self.max_ack_pending = n;
        self
    }

    /// Most messages one pull request asks for. Default: 512.
    pub fn pull_batch(mut self, n: usize) -> Self {
        self.pull_batch = n;
        self
    }

    /// How often the server says it is alive while it has nothing to deliver. Default: 5 s.
    pub fn idle_heartbeat(mut self, every: Duration) -> Self {
        self.idle_heartbeat = every;
        self
    }

    /// The waits between reconnection attempts (the first is made at once), between attempts
    /// to open a pull that ended, and before a message whose dead letter could not be stored
    /// comes back. A policy with limited attempts gives up once they are used: the source then
    /// ends. Default: unlimited, 100 ms doubling to 10 s, full jitter.
    pub fn reconnect(mut self, policy: RetryPolicy) -> Self {
        self.reconnect = policy;
        self
    }

    /// Where the source counts. Default: counters nobody scrapes.
    pub fn metrics(mut self, metrics: SourceMetrics) -> Self {
        self.metrics = Counted(metrics);
        self
    }

    pub fn get_url(&self) -> &str {
        &self.url
    }

    pub fn get_stream(&self) -> &str {
        &self.stream
    }

    pub fn get_subjects(&self) -> &[String] {
        &self.subjects
    }

    pub fn get_consumer(&self) -> &str {
        &self.consumer
    }

    pub fn get_dead_stream(&self) -> &str {
        &self.dead_stream
    }

    pub fn get_pull_batch(&self) -> usize {
        self.pull_batch
    }

    pub fn get_idle_heartbeat(&self) -> Duration {
        self.idle_heartbeat
    }

    pub fn get_reconnect(&self) -> &RetryPolicy {
        &self.reconnect
    }

    /// The subject the consumer filters on.
    fn filter(&self) -> &str {
        match &self.filter_subject {
            Some(subject) => subject,
            None => self.subjects.first().map_or("", String::as_str),
        }
    }

    /// Whether the settings can be used: [`JetStreamSource::connect`] checks them first, and the
    /// daemon while it reads a pipeline file.
    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let invalid = |m: String| Err(InvalidConfig(m));
        if !(self.url.starts_with("nats://") || self.url.starts_with("tls://")) {
            return invalid(format!(
                "url {:?} must start with nats:// (e.g. nats://127.0.0.1:4222)",
                redact_url(&self.url)
            ));
        }
        check_name("stream", &self.stream, false)?;
        check_name("dead_stream", &self.dead_stream, false)?;
        check_name("consumer", &self.consumer, false)?;
        check_name("dead_subject", &self.dead_subject, true)?;
        if self.dead_subject.contains(['*', '>']) {
            return invalid("dead_subject is a subject prefix: no wildcards".into());
        }
        match (&self.filter_subject, self.subjects.as_slice()) {
            (None, [_]) => {}
            (None, subjects) => {
                return invalid(format!(
                    "subjects must name exactly one subject (the consumer's filter), not {}; or \
                     set filter_subject",
                    subjects.len()
                ));
            }
            (Some(_), []) => return invalid("subjects must name at least one subject".into()),
            (Some(filter), _) => check_name("filter_subject", filter, true)?,
        }
        for subject in &self.subjects {
            check_name("subject", subject, true)?;
        }
        if self.ack_wait < Duration::from_secs(1) {
            return invalid("ack_wait_ms must be at least 1000 (an ack wait of 1 s)".into());
        }
        if self.max_ack_pending == 0 || self.pull_batch == 0 || self.idle_heartbeat.is_zero() {
            return invalid(
                "max_ack_pending, pull_batch and idle_heartbeat must be above zero".into(),
            );
        }
        self.reconnect
            .validate()
            .map_err(|e| InvalidConfig(format!("reconnect: {e}")))
    }
}

impl fmt::Debug for JetStreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JetStreamConfig")
            .field("url", &redact_url(&self.url))
            .field("stream", &self.stream)
            .field("subjects", &self.subjects)
            .field("consumer", &self.consumer)
            .field("filter_subject", &self.filter_subject)
            .field("dead_stream", &self.dead_stream)
            .field("dead_subject", &self.dead_subject)
            .field("ack_wait", &self.ack_wait)
            .field("max_ack_pending", &self.max_ack_pending)
            .field("pull_batch", &self.pull_batch)
            .field("idle_heartbeat", &self.idle_heartbeat)
            .field("reconnect", &self.reconnect)
            .finish_non_exhaustive()
    }
}

/// `[sources.nats]` as a file writes it: durations in whole milliseconds, counts nonzero (a
/// wrong value is refused at its line). `max_ack_pending` is not a file key: the daemon gives
/// the source its share of the in-flight bound.
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct JetStreamFile {
    url: String,
    stream: String,
    subjects: Vec<String>,
    consumer: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter_subject: Option<String>,
    dead_stream: String,
    dead_subject: String,
    ack_wait_ms: NonZeroU64,
    pull_batch: NonZeroUsize,
    idle_heartbeat_ms: NonZeroU64,
    reconnect: RetryPolicy,
    /// Gone: refused with where retries went.
    #[serde(skip_serializing)]
    retry: Option<NoRetry>,
}

impl Default for JetStreamFile {
    fn default() -> Self {
        JetStreamConfig::default().into()
    }
}

fn nonzero_millis(d: Duration) -> NonZeroU64 {
    NonZeroU64::new(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(NonZeroU64::MIN)
}

impl From<JetStreamConfig> for JetStreamFile {
    fn from(c: JetStreamConfig) -> Self {
        Self {
            url: c.url,
            stream: c.stream,
            subjects: c.subjects,
            consumer: c.consumer,
            filter_subject: c.filter_subject,
            dead_stream: c.dead_stream,
            dead_subject: c.dead_subject,
            ack_wait_ms: nonzero_millis(c.ack_wait),
            pull_batch: NonZeroUsize::new(c.pull_batch).unwrap_or(NonZeroUsize::MIN),
            idle_heartbeat_ms: nonzero_millis(c.idle_heartbeat),
            reconnect: c.reconnect,
            retry: None,
        }
    }
}

impl From<JetStreamFile> for JetStreamConfig {
    fn from(f: JetStreamFile) -> Self {
        Self {
            url: f.url,
            stream: f.stream,
            subjects: f.subjects,
            consumer: f.consumer,
            filter_subject: f.filter_subject,
            dead_stream: f.dead_stream,
            dead_subject: f.dead_subject,
            ack_wait: Duration::from_millis(f.ack_wait_ms.get()),
            pull_batch: f.pull_batch.get(),
            idle_heartbeat: Duration::from_millis(f.idle_heartbeat_ms.get()),
            reconnect: f.reconnect,
            ..Self::default()
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
    Invalid(#[from] InvalidConfig),
}

/// A JetStream pull consumer as a pipeline producer; see the module documentation.
pub struct JetStreamSource<T> {
    consumer: PullConsumer,
    messages: Option<pull::Stream>,
    config: JetStreamConfig,
    decoder: Arc<dyn Decoder<T>>,
    settler: Arc<Settler<T, Held>>,
    tasks: Vec<JoinHandle<()>>,
    client: Client,
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
    /// Checks the settings, connects, declares (or checks) the streams and the consumer, and
    /// starts pulling.
    pub async fn connect(
        config: JetStreamConfig,
        decoder: impl Decoder<T>,
    ) -> Result<Self, JetStreamError> {
        config.validate()?;
        let client = connect(&config).await?;
        let context = jetstream::new(client.clone());
        let consumer = declare(&context, &config).await?;
        let messages = open(&consumer, &config).await?;
        let io = Nats {
            client: client.clone(),
            context,
            prefix: config
                .filter()
                .trim_end_matches('>')
                .trim_end_matches('.')
                .to_owned(),
            dead_subject: config.dead_subject.clone(),
        };
        let (settler, task) =
            Settler::start(io, config.reconnect.clone(), config.metrics.0.clone());
        // Ends by itself once the settler is gone; nothing waits for it.
        tokio::spawn(progress(
            Arc::downgrade(&settler),
            client.clone(),
            config.ack_wait,
            config.metrics.0.clone(),
        ));
        Ok(Self {
            consumer,
            messages: Some(messages),
            config,
            decoder: Arc::new(decoder),
            settler,
            tasks: vec![task],
            client,
        })
    }

    /// Has `acker` told how each message ended, after the broker's settlement is decided: how a
    /// user keeps bookkeeping of their own (the daemon's zones do). Set once; later calls are
    /// ignored.
    pub fn then_acknowledge(self, acker: Arc<dyn Acknowledger<T>>) -> Self {
        self.settler.then_acknowledge(acker);
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
        &self.config.metrics.0
    }

    /// Takes one delivery: the message for the pipeline if it decodes; to the dead letters if
    /// not.
    fn take(&mut self, msg: jetstream::Message) -> Option<Message<T>> {
        let Some(ack_subject) = msg.reply.clone() else {
            // Not a JetStream delivery: nothing could settle it.
            tracing::warn!(subject = %msg.subject, "a message without an ack subject was ignored");
            return None;
        };
        let info = msg.info().ok();
        if let Some(info) = &info {
            self.config.metrics.0.set_lag(info.pending);
        }
        let delivery = info
            .map(|i| u32::try_from(i.delivered).unwrap_or(u32::MAX).max(1))
            .unwrap_or(1);
        self.settler.received(delivery);
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str())
        };
        let decoded = decode(
            &*self.decoder,
            &Delivery {
                payload: &msg.payload,
                content_type: header("Content-Type"),
                message_id: header("Nats-Msg-Id"),
                subject: msg.subject.as_str(),
                attempt: delivery,
            },
        );
        // The delivery itself is kept (moved, not copied): what a settlement, a progress ack or
        // a dead letter needs.
        let held = Held {
            ack_subject,
            message: msg.message,
            since: Instant::now(),
        };
        match decoded {
            Ok(data) => Some(self.settler.message(data, held, delivery)),
            Err(failure) => {
                self.settler.undecodable(held, delivery, &failure);
                None
            }
        }
    }

    /// Opens the pull stream again after it ended (the consumer was deleted, the client closed),
    /// declaring the consumer again if it has to, waiting as the `reconnect` policy says between
    /// attempts; false once the policy's attempts are used up.
    async fn reopen(&mut self) -> bool {
        let mut delays = self.config.reconnect.delays();
        loop {
            let context = jetstream::new(self.client.clone());
            let opened = match declare(&context, &self.config).await {
                Ok(consumer) => {
                    self.consumer = consumer;
                    open(&self.consumer, &self.config).await
                }
                Err(e) => Err(e),
            };
            let e = match opened {
                Ok(stream) => {
                    self.messages = Some(stream);
                    return true;
                }
                Err(e) => e,
            };
            let Some(wait) = delays.next() else {
                tracing::error!(error = %e, "cannot pull from JetStream; gave up: the source ends");
                return false;
            };
            tracing::warn!(error = %e, "cannot pull from JetStream yet; trying again in {wait:?}");
            tokio::time::sleep(wait).await;
        }
    }
}

impl<T: Send + 'static> Producer<T> for JetStreamSource<T> {
    async fn produce(&mut self, demand: &mut Demand<T>) -> Produced {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                if !self.reopen().await {
                    return Produced::Exhausted;
                }
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
                                self.config.metrics.0.event("missed_heartbeat");
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
    let metrics = config.metrics.0.clone();
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
    // The client counts its attempts from 1, the first made at once.
    let policy = config.reconnect.clone();
    let max_reconnects = (!policy.is_unlimited()).then(|| policy.max_attempts() as usize);
    options
        .name("thunderline")
        .reconnect_delay_callback(move |attempt| match attempt {
            0 | 1 => Duration::ZERO,
            n => policy.delay(u32::try_from(n - 2).unwrap_or(u32::MAX)),
        })
        .max_reconnects(max_reconnects)
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
    let stream = ensure_stream(context, &config.stream, &config.subjects, config.filter()).await?;
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
        filter_subject: config.filter().to_owned(),
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
            } else if have.filter_subject != config.filter() {
                Some(format!(
                    "it filters {:?}, not {:?}",
                    have.filter_subject,
                    config.filter()
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
    /// When it was taken, or last given a progress ack.
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

/// JetStream's side of the settlement: acks, terms and naks are published on a delivery's ack
/// subject; dead letters to the dead-letter stream, each waited for until the stream has it.
struct Nats {
    client: Client,
    context: Context,
    /// The filter subject without its last `>`: what a dead letter's subject drops.
    prefix: String,
    dead_subject: String,
}

impl Nats {
    /// Fails only once the client is closed: the server then delivers again.
    async fn reply(&self, held: &Held, what: Bytes) -> bool {
        match self.client.publish(held.ack_subject.clone(), what).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "a JetStream settlement could not be sent");
                false
            }
        }
    }

    /// Publishes one dead letter and waits until the stream has stored it.
    async fn dead_letter(&self, held: &Held, letter: &DeadLetter) -> bool {
        let original = held.message.subject.as_str();
        let rest = original
            .strip_prefix(self.prefix.as_str())
            .map(|r| r.trim_start_matches('.'))
            .filter(|r| !r.is_empty())
            .unwrap_or(original);
        let subject = format!("{}.{rest}", self.dead_subject);
        let mut headers = HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            held.header("Nats-Msg-Id")
                .unwrap_or(held.ack_subject.as_str()),
        );
        if let Some(content_type) = held.header("Content-Type") {
            headers.insert("Content-Type", content_type);
        }
        headers.insert(REASON_HEADER, one_line(&letter.reason).as_str());
        if let Some(attempts) = letter.attempts {
            headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
        }
        let stored = match self
            .context
            .publish_with_headers(subject, headers, held.message.payload.clone())
            .await
        {
            Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = &stored {
            tracing::warn!(error = %e, "a JetStream dead letter was not stored");
        }
        stored.is_ok()
    }
}

impl BrokerIo for Nats {
    type Held = Held;

    async fn ack(&mut self, held: Vec<Held>) -> u64 {
        let mut taken = 0;
        for h in &held {
            taken += u64::from(self.reply(h, Bytes::from_static(b"+ACK")).await);
        }
        taken
    }

    async fn store(&mut self, dead: Vec<(Held, DeadLetter)>) -> Vec<(Held, bool)> {
        let this = &*self;
        let stored = join_all(dead.iter().map(|(h, letter)| this.dead_letter(h, letter))).await;
        dead.into_iter().map(|(h, _)| h).zip(stored).collect()
    }

    async fn finish(&mut self, held: Held) -> bool {
        self.reply(&held, Bytes::from_static(b"+TERM")).await
    }

    async fn give_back(&mut self, held: Held, delay: Duration) -> bool {
        let nak = format!("-NAK {{\"delay\": {}}}", delay.as_nanos());
        self.reply(&held, Bytes::from(nak)).await
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
async fn progress<T: Send + 'static>(
    settler: std::sync::Weak<Settler<T, Held>>,
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
            .table()
            .values_mut()
            .filter(|h| now.duration_since(h.io.since) >= half)
            .map(|h| {
                h.io.since = now;
                h.io.ack_subject.clone()
            })
            .collect();
        drop(settler);
        for subject in due {
            metrics.event("progress_ack");
            let _ = client.publish(subject, Bytes::from_static(b"+WPI")).await;
        }
    }
}

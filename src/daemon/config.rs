//! Pipeline files (`pipelines/zones.toml`): the zone pipeline `serve` runs, declared in TOML.
//!
//! Every setting maps onto the library's public API (`ProcessorConfig`, `BatcherConfig`,
//! `RetryPolicy`, the builder's rate limit and bounds), so nothing a file can say is out of a
//! library user's reach. A bad file is refused before anything starts, with the file, the line
//! and what was expected: unknown keys, wrong types and impossible values (a batch size of 0)
//! are all caught while parsing, where the line is known.

use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::pipeline::{BatcherConfig, Jitter, ProcessorConfig, RetryPolicy};
use crate::runtime::{HistoryConfig, Replies};
use crate::sources::jetstream::JetStreamConfig;
use crate::sources::rabbitmq::RabbitMqConfig;
use crate::zone::BroadcastLimit;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineFile {
    /// Milliseconds between environment ticks of every zone with agents in it.
    pub tick_interval_ms: NonZeroU64,
    /// Most messages in the pipeline at once.
    pub in_flight_bound: NonZeroUsize,
    /// How long a drain may take at shutdown.
    pub shutdown_timeout_ms: NonZeroU64,
    pub producer: ProducerSection,
    pub processors: ProcessorSection,
    pub batchers: BatcherSections,
    pub replies: RepliesSection,
    pub zones: ZonesSection,
    /// Broker ingest: zone commands from NATS JetStream and/or RabbitMQ, beside the sockets.
    pub sources: SourceSections,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceSections {
    pub nats: Option<NatsSection>,
    pub rabbitmq: Option<RabbitMqSection>,
}

/// `[sources.nats]`: a JetStream durable pull consumer (the stream, the dead-letter stream and
/// the consumer are declared at start when absent).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsSection {
    pub url: String,
    pub stream: String,
    pub subjects: Vec<String>,
    pub consumer: String,
    pub dead_stream: String,
    pub dead_subject: String,
    /// How long the server waits for a settlement before delivering again (progress acks keep
    /// a slow message from being delivered again while it is handled).
    pub ack_wait_ms: NonZeroU64,
    /// Most messages one pull asks for.
    pub pull_batch: NonZeroUsize,
    pub idle_heartbeat_ms: NonZeroU64,
    /// Deliveries in all (the first included) and the delays of the naks between them.
    pub retry: RetrySection,
}

impl Default for NatsSection {
    /// The source's own defaults, but for the retry delays: a command given back waits longer.
    fn default() -> Self {
        let source = JetStreamConfig::default();
        let ms = |d: Duration| {
            NonZeroU64::new(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).expect("nonzero")
        };
        Self {
            url: source.url,
            stream: source.stream,
            subjects: source.subjects,
            consumer: source.consumer,
            dead_stream: source.dead_stream,
            dead_subject: source.dead_subject,
            ack_wait_ms: ms(source.ack_wait),
            pull_batch: NonZeroUsize::new(source.pull_batch).expect("nonzero"),
            idle_heartbeat_ms: ms(source.idle_heartbeat),
            retry: RetrySection {
                max_attempts: Attempts::Count(NonZeroU32::new(5).expect("nonzero")),
                initial_delay_ms: 500,
                multiplier: 2.0,
                max_delay_ms: 30_000,
                jitter: true,
            },
        }
    }
}

/// `[sources.rabbitmq]`: a durable queue with a dead-letter exchange (declared at start).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitMqSection {
    pub url: String,
    pub queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    /// Unacknowledged deliveries the broker sends ahead; omitted: what the processors can ask
    /// for (workers × max_demand), at most the in-flight bound.
    pub prefetch: Option<std::num::NonZeroU16>,
}

impl Default for RabbitMqSection {
    fn default() -> Self {
        let source = RabbitMqConfig::default();
        Self {
            url: source.url,
            queue: source.queue,
            dead_exchange: source.dead_exchange,
            dead_queue: source.dead_queue,
            prefetch: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepliesSection {
    /// `applied`: `ok` once the zone applied the command; `durable`: once its events are in the
    /// audit log.
    pub after: Replies,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZonesSection {
    /// A zone without sessions for this long leaves memory, once its snapshot is written.
    pub evict_after_ms: NonZeroU64,
    /// Custom broadcasts (`broadcast_event`) allowed per zone; omitted means no limit.
    pub broadcast_rate_limit: Option<RateLimitSection>,
    /// Recent events each zone keeps in memory for clients that rejoin (`since`); 0 keeps none
    /// (every rejoin reads the audit log).
    pub history_events: usize,
    /// How long an event stays in that memory.
    pub history_ms: u64,
    /// The most events a rejoin may have missed and still get them all (from memory and the
    /// audit log); `serve --history-max` overrides it.
    pub history_max: u64,
}

impl Default for ZonesSection {
    fn default() -> Self {
        Self {
            evict_after_ms: NonZeroU64::new(600_000).expect("nonzero"),
            broadcast_rate_limit: Some(RateLimitSection {
                allowed: NonZeroUsize::new(20).expect("nonzero"),
                interval_ms: NonZeroU64::new(1_000).expect("nonzero"),
            }),
            history_events: HistoryConfig::default().events,
            history_ms: HistoryConfig::default().age.as_millis() as u64,
            history_max: HistoryConfig::default().max,
        }
    }
}

impl ZonesSection {
    pub fn history(&self) -> HistoryConfig {
        HistoryConfig {
            events: self.history_events,
            age: Duration::from_millis(self.history_ms),
            max: self.history_max,
        }
    }

    pub fn broadcast_limit(&self) -> Option<BroadcastLimit> {
        self.broadcast_rate_limit.as_ref().map(|r| BroadcastLimit {
            allowed: u32::try_from(r.allowed.get()).unwrap_or(u32::MAX),
            interval_ms: r.interval_ms.get(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProducerSection {
    /// Client events waiting for the pipeline before pushes wait.
    pub queue: NonZeroUsize,
    pub rate_limit: Option<RateLimitSection>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub allowed: NonZeroUsize,
    pub interval_ms: NonZeroU64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessorSection {
    /// Workers; omitted means one per core.
    pub concurrency: Option<NonZeroUsize>,
    pub max_demand: NonZeroUsize,
    /// Omitted means half of max_demand.
    pub min_demand: Option<usize>,
    /// Partition by zone id: each zone has one writer, which applies its commands one at a time
    /// in the order they came. The zone core needs it, so `false` is refused.
    pub partition_by_zone: bool,
    pub timeout_ms: Option<NonZeroU64>,
    pub retry: RetrySection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatcherSections {
    pub broadcast: BatcherSection,
    pub audit: BatcherSection,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatcherSection {
    pub batch_size: NonZeroUsize,
    pub batch_timeout_ms: NonZeroU64,
    #[serde(default = "one")]
    pub concurrency: NonZeroUsize,
    /// A batch also leaves as soon as a sink worker is free (size and timeout stay the bounds).
    #[serde(default)]
    pub group_commit: bool,
    #[serde(default)]
    pub retry: RetrySection,
}

fn one() -> NonZeroUsize {
    NonZeroUsize::MIN
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrySection {
    /// Attempts in all, the first included; omitted means no retry... unless "unlimited".
    pub max_attempts: Attempts,
    pub initial_delay_ms: u64,
    #[serde(deserialize_with = "multiplier")]
    pub multiplier: f32,
    pub max_delay_ms: u64,
    pub jitter: bool,
}

/// A number of attempts, or `"unlimited"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Attempts {
    Count(NonZeroU32),
    Unlimited(Unlimited),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unlimited {
    Unlimited,
}

fn multiplier<'de, D: Deserializer<'de>>(d: D) -> Result<f32, D::Error> {
    let m = f32::deserialize(d)?;
    if m.is_finite() && m >= 1.0 {
        Ok(m)
    } else {
        Err(serde::de::Error::custom(format!(
            "multiplier must be a number of at least 1.0, not {m}"
        )))
    }
}

impl Default for RetrySection {
    fn default() -> Self {
        Self {
            max_attempts: Attempts::Count(NonZeroU32::MIN),
            initial_delay_ms: 100,
            multiplier: 2.0,
            max_delay_ms: 10_000,
            jitter: true,
        }
    }
}

impl Default for PipelineFile {
    /// The same pipeline `pipelines/zones.toml` declares.
    fn default() -> Self {
        let nz = |n: usize| NonZeroUsize::new(n).expect("nonzero");
        let ms = |n: u64| NonZeroU64::new(n).expect("nonzero");
        Self {
            tick_interval_ms: ms(5_000),
            in_flight_bound: nz(20_000),
            shutdown_timeout_ms: ms(30_000),
            producer: ProducerSection::default(),
            processors: ProcessorSection::default(),
            batchers: BatcherSections::default(),
            replies: RepliesSection::default(),
            zones: ZonesSection::default(),
            sources: SourceSections::default(),
        }
    }
}

impl Default for BatcherSections {
    fn default() -> Self {
        let nz = |n: usize| NonZeroUsize::new(n).expect("nonzero");
        let ms = |n: u64| NonZeroU64::new(n).expect("nonzero");
        Self {
            broadcast: BatcherSection {
                batch_size: nz(256),
                batch_timeout_ms: ms(3),
                concurrency: nz(1),
                group_commit: false,
                retry: RetrySection::default(),
            },
            audit: BatcherSection {
                batch_size: nz(20),
                batch_timeout_ms: ms(2_000),
                concurrency: nz(4),
                group_commit: true,
                retry: RetrySection {
                    max_attempts: Attempts::Unlimited(Unlimited::Unlimited),
                    initial_delay_ms: 100,
                    multiplier: 2.0,
                    max_delay_ms: 10_000,
                    jitter: true,
                },
            },
        }
    }
}

impl Default for ProducerSection {
    fn default() -> Self {
        Self {
            queue: NonZeroUsize::new(10_000).expect("nonzero"),
            rate_limit: None,
        }
    }
}

impl Default for ProcessorSection {
    fn default() -> Self {
        Self {
            concurrency: None,
            max_demand: NonZeroUsize::new(64).expect("nonzero"),
            min_demand: None,
            partition_by_zone: true,
            timeout_ms: Some(NonZeroU64::new(5_000).expect("nonzero")),
            retry: RetrySection {
                max_attempts: Attempts::Count(NonZeroU32::new(5).expect("nonzero")),
                initial_delay_ms: 50,
                multiplier: 2.0,
                max_delay_ms: 2_000,
                jitter: true,
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl RetrySection {
    pub fn policy(&self) -> RetryPolicy {
        let attempts = match self.max_attempts {
            Attempts::Count(n) => n.get(),
            Attempts::Unlimited(_) => u32::MAX,
        };
        RetryPolicy::exponential(
            attempts,
            Duration::from_millis(self.initial_delay_ms),
            self.multiplier,
            Duration::from_millis(self.max_delay_ms),
        )
        .with_jitter(if self.jitter {
            Jitter::Full
        } else {
            Jitter::None
        })
    }
}

impl BatcherSection {
    pub fn config(&self, name: &str) -> BatcherConfig {
        BatcherConfig::new(name)
            .batch_size(self.batch_size.get())
            .batch_timeout(Duration::from_millis(self.batch_timeout_ms.get()))
            .concurrency(self.concurrency.get())
            .group_commit(self.group_commit)
            .retry(self.retry.policy())
    }
}

impl ProcessorSection {
    pub fn config(&self) -> ProcessorConfig {
        let mut config = ProcessorConfig::default()
            .max_demand(self.max_demand.get())
            .retry(self.retry.policy());
        if let Some(n) = self.concurrency {
            config = config.concurrency(n.get());
        }
        if let Some(min) = self.min_demand {
            config = config.demand(self.max_demand.get(), min);
        }
        if let Some(t) = self.timeout_ms {
            config = config.timeout(Duration::from_millis(t.get()));
        }
        config
    }
}

/// A NATS subject or a name of a stream, consumer, queue or exchange: printable, no spaces.
fn check_name(what: &str, name: &str, dots: bool) -> Result<(), String> {
    let bad = name.is_empty()
        || name.len() > 255
        || name.chars().any(|c| {
            c.is_whitespace() || c.is_control() || (!dots && matches!(c, '.' | '*' | '>'))
        });
    if bad {
        let rule = if dots {
            "a non-empty name without spaces"
        } else {
            "a non-empty name without spaces, dots, * or >"
        };
        return Err(format!("{what} {name:?} is not {rule}"));
    }
    Ok(())
}

impl NatsSection {
    fn check(&self) -> Result<(), String> {
        if !(self.url.starts_with("nats://") || self.url.starts_with("tls://")) {
            return Err(format!(
                "url {:?} must start with nats:// (e.g. nats://127.0.0.1:4222)",
                self.url
            ));
        }
        check_name("stream", &self.stream, false)?;
        check_name("dead_stream", &self.dead_stream, false)?;
        check_name("consumer", &self.consumer, false)?;
        check_name("dead_subject", &self.dead_subject, true)?;
        if self.dead_subject.contains(['*', '>']) {
            return Err("dead_subject is a subject prefix: no wildcards".into());
        }
        let [subject] = self.subjects.as_slice() else {
            return Err(format!(
                "subjects must name exactly one subject (the consumer's filter), not {}",
                self.subjects.len()
            ));
        };
        check_name("subject", subject, true)?;
        if self.ack_wait_ms.get() < 1_000 {
            return Err("ack_wait_ms must be at least 1000".into());
        }
        if self.retry.initial_delay_ms > self.retry.max_delay_ms {
            return Err("[retry] initial_delay_ms must not exceed max_delay_ms".into());
        }
        Ok(())
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.ack_wait_ms.get())
    }

    pub fn idle_heartbeat(&self) -> Duration {
        Duration::from_millis(self.idle_heartbeat_ms.get())
    }
}

impl RabbitMqSection {
    fn check(&self) -> Result<(), String> {
        if !(self.url.starts_with("amqp://") || self.url.starts_with("amqps://")) {
            return Err(format!(
                "url {:?} must start with amqp:// (e.g. amqp://guest:guest@127.0.0.1:5672/%2f)",
                self.url
            ));
        }
        check_name("queue", &self.queue, true)?;
        check_name("dead_exchange", &self.dead_exchange, true)?;
        check_name("dead_queue", &self.dead_queue, true)?;
        if self.queue == self.dead_queue {
            return Err("queue and dead_queue must differ".into());
        }
        Ok(())
    }
}

impl PipelineFile {
    /// The built-in pipeline as `pipelines/nats.toml` and `pipelines/rabbitmq.toml` have it,
    /// without their source: audit batches of up to 1000, since a broker delivers in bulk.
    pub fn for_broker() -> Self {
        let mut file = Self::default();
        file.batchers.audit.batch_size = NonZeroUsize::new(1000).expect("nonzero");
        file
    }

    /// Parses a pipeline file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, PipelineFileError> {
        let file: Self = toml::from_str(text).map_err(|e| PipelineFileError::Invalid {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        // What serde cannot see: relations between fields.
        let invalid = |message: String| PipelineFileError::Invalid {
            path: path.to_owned(),
            message,
        };
        if let Some(min) = file.processors.min_demand
            && min >= file.processors.max_demand.get()
        {
            return Err(invalid(format!(
                "[processors] min_demand ({min}) must be below max_demand ({})",
                file.processors.max_demand
            )));
        }
        for (name, b) in [
            ("broadcast", &file.batchers.broadcast),
            ("audit", &file.batchers.audit),
        ] {
            if b.batch_size.get() > file.in_flight_bound.get() {
                return Err(invalid(format!(
                    "[batchers.{name}] batch_size ({}) is above in_flight_bound ({}): its batches could never fill",
                    b.batch_size, file.in_flight_bound
                )));
            }
            if b.retry.initial_delay_ms > b.retry.max_delay_ms {
                return Err(invalid(format!(
                    "[batchers.{name}.retry] initial_delay_ms must not exceed max_delay_ms"
                )));
            }
        }
        if !file.processors.partition_by_zone {
            return Err(invalid(
                "[processors] partition_by_zone must be true: each zone has one writer, which \
                 applies its commands in order and numbers its events"
                    .into(),
            ));
        }
        if file.batchers.broadcast.concurrency.get() != 1 {
            return Err(invalid(
                "[batchers.broadcast] concurrency must be 1: each zone's subscribers see its \
                 events in seq order, which one sink worker keeps"
                    .into(),
            ));
        }
        if file.processors.retry.initial_delay_ms > file.processors.retry.max_delay_ms {
            return Err(invalid(
                "[processors.retry] initial_delay_ms must not exceed max_delay_ms".into(),
            ));
        }
        if let Some(nats) = &file.sources.nats {
            nats.check()
                .map_err(|m| invalid(format!("[sources.nats] {m}")))?;
        }
        if let Some(rabbit) = &file.sources.rabbitmq {
            rabbit
                .check()
                .map_err(|m| invalid(format!("[sources.rabbitmq] {m}")))?;
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, PipelineFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        PipelineFile::parse(text, Path::new("zones.toml"))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_shipped_file_is_the_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/zones.toml");
        assert_eq!(PipelineFile::load(&path).unwrap(), PipelineFile::default());
    }

    #[test]
    fn the_broker_files_are_the_default_with_a_source() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let nats = PipelineFile::load(&dir.join("nats.toml")).unwrap();
        assert_eq!(nats.sources.nats, Some(NatsSection::default()));
        let rabbit = PipelineFile::load(&dir.join("rabbitmq.toml")).unwrap();
        assert_eq!(rabbit.sources.rabbitmq, Some(RabbitMqSection::default()));
        for mut file in [nats, rabbit] {
            file.sources = SourceSections::default();
            assert_eq!(file, PipelineFile::for_broker());
        }
    }

    #[test]
    fn bad_source_sections_are_refused_with_what_to_change() {
        let e = err("[sources.nats]\nurl = \"http://x\"\n");
        assert!(
            e.contains("[sources.nats] url \"http://x\" must start with nats://"),
            "{e}"
        );
        let e = err("[sources.nats]\nsubjects = []\n");
        assert!(e.contains("subjects must name exactly one subject"), "{e}");
        let e = err("[sources.nats]\nstream = \"a.b\"\n");
        assert!(e.contains("stream \"a.b\" is not"), "{e}");
        let e = err("[sources.nats]\nack_wait_ms = 10\n");
        assert!(e.contains("ack_wait_ms must be at least 1000"), "{e}");
        let e = err("[sources.nats]\nconsumerr = \"x\"\n");
        assert!(
            e.contains("line 2") && e.contains("unknown field `consumerr`"),
            "{e}"
        );
        let e = err("[sources.rabbitmq]\nurl = \"nats://x\"\n");
        assert!(
            e.contains("[sources.rabbitmq] url \"nats://x\" must start with amqp://"),
            "{e}"
        );
        let e = err("[sources.rabbitmq]\nprefetch = 0\n");
        assert!(e.contains("line 2") && e.contains("nonzero"), "{e}");
        let e = err("[sources.rabbitmq]\ndead_queue = \"thunderline.commands\"\n");
        assert!(e.contains("queue and dead_queue must differ"), "{e}");
        let e = err("[sources.kafka]\n");
        assert!(e.contains("unknown field `kafka`"), "{e}");
    }

    #[test]
    fn bad_files_name_the_line_and_what_was_expected() {
        let e =
            err("tick_interval_ms = 100\n[batchers.audit]\nbatch_size = 0\nbatch_timeout_ms = 5\n");
        assert!(
            e.starts_with("zones.toml: TOML parse error at line 3"),
            "{e}"
        );
        assert!(e.contains("nonzero"), "{e}");
        let e = err("[processors]\nmax_demandd = 3\n");
        assert!(
            e.contains("line 2") && e.contains("unknown field `max_demandd`"),
            "{e}"
        );
        let e = err("in_flight_bound = \"lots\"\n");
        assert!(
            e.contains("line 1") && e.contains("invalid type: string"),
            "{e}"
        );
        let e = err("[processors.retry]\nmultiplier = 0.5\n");
        assert!(
            e.contains("line 2") && e.contains("multiplier must be a number of at least 1.0"),
            "{e}"
        );
        let e = err("[processors]\npartition_by_zone = false\n");
        assert!(e.contains("partition_by_zone must be true"), "{e}");
        let e =
            err("[batchers.broadcast]\nbatch_size = 10\nbatch_timeout_ms = 3\nconcurrency = 2\n");
        assert!(e.contains("concurrency must be 1"), "{e}");
        let e = err("[replies]\nafter = \"eventually\"\n");
        assert!(e.contains("line 2") && e.contains("unknown variant"), "{e}");
        let e = err("[processors]\nmax_demand = 4\nmin_demand = 4\n");
        assert_eq!(
            e,
            "zones.toml: [processors] min_demand (4) must be below max_demand (4)"
        );
    }
}

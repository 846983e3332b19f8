//! Pipeline files (`pipelines/zones.toml`): the zone pipeline `serve` runs, declared in TOML.
//!
//! The sections are the library's own configurations, read straight from the file:
//! `[processors]` is a `ProcessorConfig` (beside it the daemon's one key, `partition_by_zone`),
//! `[batchers.broadcast]` and `[batchers.audit]` are `BatcherConfig`s, every `retry` table is a
//! `RetryPolicy`, `[sources.nats]` a `JetStreamConfig` and `[sources.rabbitmq]` a
//! `RabbitMqConfig`. So nothing a file can say is out of a library user's reach, and there is
//! one set of defaults: a key a file leaves out takes the library's default. What the daemon
//! wants instead is written in the shipped `pipelines/zones.toml`, which is also what `serve`
//! runs without `--config` ([`PipelineFile::default`]).
//!
//! A bad file is refused before anything starts, with the file, the line and what was
//! expected: unknown keys, wrong types and impossible values (a batch size of 0, a retry policy
//! that cannot be followed) are caught while parsing, where the line is known; what relates
//! sections is checked after.

use std::cell::Cell;
use std::num::{NonZeroU64, NonZeroUsize};
use std::path::Path;
use std::time::Duration;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::error::DaemonError;
use crate::pipeline::{BatcherConfig, ProcessorConfig};
use crate::runtime::{HistoryConfig, Replies};
use crate::sources::jetstream::JetStreamConfig;
use crate::sources::rabbitmq::RabbitMqConfig;
use crate::zone::BroadcastLimit;

/// The shipped default pipeline, compiled in.
const ZONES_TOML: &str = include_str!("../../pipelines/zones.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Milliseconds between environment ticks of every zone with agents in it.
    #[serde(default = "defaults::tick_interval_ms")]
    pub tick_interval_ms: NonZeroU64,
    /// Most messages in the pipeline at once.
    #[serde(default = "defaults::in_flight_bound")]
    pub in_flight_bound: NonZeroUsize,
    /// How long a drain may take at shutdown.
    #[serde(default = "defaults::shutdown_timeout_ms")]
    pub shutdown_timeout_ms: NonZeroU64,
    #[serde(default)]
    pub producer: ProducerSection,
    #[serde(default)]
    pub processors: ProcessorsSection,
    #[serde(default)]
    pub batchers: BatcherSections,
    #[serde(default)]
    pub replies: RepliesSection,
    #[serde(default)]
    pub zones: ZonesSection,
    /// Broker ingest: zone commands from NATS JetStream and/or RabbitMQ, beside the sockets.
    #[serde(default)]
    pub sources: SourceSections,
    /// Run as a node of a cluster over NATS (`serve --cluster`); absent: a single daemon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

/// The daemon's own top-level keys, when a file leaves them out.
mod defaults {
    use std::num::{NonZeroU64, NonZeroUsize};

    pub fn tick_interval_ms() -> NonZeroU64 {
        NonZeroU64::new(5_000).expect("nonzero")
    }

    pub fn in_flight_bound() -> NonZeroUsize {
        NonZeroUsize::new(20_000).expect("nonzero")
    }

    pub fn shutdown_timeout_ms() -> NonZeroU64 {
        NonZeroU64::new(30_000).expect("nonzero")
    }
}

/// `[sources.nats]` (a JetStream durable pull consumer) and `[sources.rabbitmq]` (a durable
/// queue with a dead-letter exchange): the streams, queues and consumer are declared at start
/// when absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceSections {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<JetStreamConfig>,
    /// An omitted `prefetch` is what the processors can ask for (workers × max_demand), at
    /// most the source's share of the in-flight bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rabbitmq: Option<RabbitMqConfig>,
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
    /// How long the place a `migrate` reserves in the zone it moves to is held for the agent
    /// to join with its ticket (`expires_in_ms`).
    pub migration_ticket_ms: NonZeroU64,
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
            migration_ticket_ms: NonZeroU64::new(10_000).expect("nonzero"),
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

impl Default for ProducerSection {
    fn default() -> Self {
        Self {
            queue: NonZeroUsize::new(10_000).expect("nonzero"),
            rate_limit: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSection {
    pub allowed: NonZeroUsize,
    pub interval_ms: NonZeroU64,
}

/// `[processors]`: the engine's [`ProcessorConfig`], and beside it the daemon's one key.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProcessorsSection {
    /// Partition by zone id: each zone has one writer, which applies its commands one at a time
    /// in the order they came. The zone core needs it, so `false` is refused. Default: true.
    pub partition_by_zone: bool,
    #[serde(flatten)]
    pub config: ProcessorConfig,
}

impl Default for ProcessorsSection {
    fn default() -> Self {
        Self {
            partition_by_zone: true,
            config: ProcessorConfig::default(),
        }
    }
}

/// The daemon's key of `[processors]`.
const PARTITION_BY_ZONE: &str = "partition_by_zone";

impl<'de> Deserialize<'de> for ProcessorsSection {
    /// The table is handed to [`ProcessorConfig`]'s own deserializer as it is read, with
    /// `partition_by_zone` taken out on the way: nothing is buffered, so an error in any key
    /// still names its line (serde's `flatten` would buffer the table and lose them, and let
    /// unknown keys through).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let partition = Cell::new(None);
        let config = ProcessorConfig::deserialize(Plucking {
            inner: d,
            slot: &partition,
        })?;
        Ok(Self {
            partition_by_zone: partition.get().unwrap_or(true),
            config,
        })
    }
}

/// A deserializer of a table that takes out `partition_by_zone` (into `slot`) and passes every
/// other key, and its value, straight through.
struct Plucking<'s, D> {
    inner: D,
    slot: &'s Cell<Option<bool>>,
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Plucking<'_, D> {
    type Error = D::Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.inner.deserialize_any(PluckingVisitor {
            visitor,
            slot: self.slot,
        })
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let visitor = PluckingVisitor {
            visitor,
            slot: self.slot,
        };
        self.inner.deserialize_struct(name, fields, visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

struct PluckingVisitor<'s, V> {
    visitor: V,
    slot: &'s Cell<Option<bool>>,
}

impl<'de, V: Visitor<'de>> Visitor<'de> for PluckingVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.visitor.expecting(f)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.visitor.visit_map(PluckingMap {
            map,
            slot: self.slot,
        })
    }
}

struct PluckingMap<'s, A> {
    map: A,
    slot: &'s Cell<Option<bool>>,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for PluckingMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let mut seed = seed;
        loop {
            // The key is read, and handed on, inside the table's own key read: an error in it
            // (an unknown key) is placed at its line.
            match self.map.next_key_seed(KeySeed(seed))? {
                None => return Ok(None),
                Some(KeyRead::Other(key)) => return Ok(Some(key)),
                Some(KeyRead::Plucked(back)) => {
                    self.slot.set(Some(self.map.next_value()?));
                    seed = back;
                }
            }
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        self.map.next_value_seed(seed)
    }
}

/// A key read: the one taken out (its seed comes back for the next key), or any other.
enum KeyRead<K, T> {
    Plucked(K),
    Other(T),
}

struct KeySeed<K>(K);

impl<'de, K: DeserializeSeed<'de>> DeserializeSeed<'de> for KeySeed<K> {
    type Value = KeyRead<K, K::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let key = String::deserialize(d)?;
        if key == PARTITION_BY_ZONE {
            return Ok(KeyRead::Plucked(self.0));
        }
        let key: de::value::StringDeserializer<D::Error> = key.into_deserializer();
        self.0.deserialize(key).map(KeyRead::Other)
    }
}

/// `[batchers.broadcast]` and `[batchers.audit]`, each a [`BatcherConfig`] named by its table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(from = "Batchers")]
pub struct BatcherSections {
    pub broadcast: BatcherConfig,
    pub audit: BatcherConfig,
}

impl Default for BatcherSections {
    fn default() -> Self {
        Batchers::default().into()
    }
}

/// The tables as a file writes them, before they are named.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Batchers {
    broadcast: BatcherConfig,
    audit: BatcherConfig,
}

impl From<Batchers> for BatcherSections {
    fn from(b: Batchers) -> Self {
        Self {
            broadcast: b.broadcast.name("broadcast"),
            audit: b.audit.name("audit"),
        }
    }
}

impl Default for PipelineFile {
    /// The shipped `pipelines/zones.toml`, compiled in: the pipeline `serve` runs without
    /// `--config`.
    fn default() -> Self {
        Self::parse(ZONES_TOML, Path::new("pipelines/zones.toml"))
            .expect("the shipped pipelines/zones.toml parses (a test holds it so)")
    }
}

impl PipelineFile {
    /// The built-in pipeline as `pipelines/nats.toml` and `pipelines/rabbitmq.toml` have it,
    /// without their source: audit batches of up to 1000, since a broker delivers in bulk.
    pub fn for_broker() -> Self {
        let mut file = Self::default();
        file.batchers.audit = file.batchers.audit.batch_size(1000);
        file
    }

    /// Parses a pipeline file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, DaemonError> {
        let file: Self = toml::from_str(text).map_err(|e| DaemonError::InvalidPipelineFile {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        // What serde cannot see: relations between sections, and what the daemon needs.
        let invalid = |message: String| DaemonError::InvalidPipelineFile {
            path: path.to_owned(),
            message,
        };
        for b in [&file.batchers.broadcast, &file.batchers.audit] {
            if b.get_batch_size() > file.in_flight_bound.get() {
                return Err(invalid(format!(
                    "[batchers.{}] batch_size ({}) is above in_flight_bound ({}): its batches could never fill",
                    b.get_name(),
                    b.get_batch_size(),
                    file.in_flight_bound
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
        if file.batchers.broadcast.get_concurrency() != 1 {
            return Err(invalid(
                "[batchers.broadcast] concurrency must be 1: each zone's subscribers see its \
                 events in seq order, which one sink worker keeps"
                    .into(),
            ));
        }
        if let Some(nats) = &file.sources.nats {
            nats.validate()
                .map_err(|e| invalid(format!("[sources.nats] {e}")))?;
        }
        if let Some(rabbit) = &file.sources.rabbitmq {
            rabbit
                .validate()
                .map_err(|e| invalid(format!("[sources.rabbitmq] {e}")))?;
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self, DaemonError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| DaemonError::ReadPipelineFile {
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
        assert_eq!(nats.sources.nats, Some(JetStreamConfig::default()));
        let rabbit = PipelineFile::load(&dir.join("rabbitmq.toml")).unwrap();
        assert_eq!(rabbit.sources.rabbitmq, Some(RabbitMqConfig::default()));
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
        assert!(
            e.starts_with("zones.toml: TOML parse error at line 1")
                && e.contains("min_demand (4) must be below max_demand (4)"),
            "{e}"
        );
        let e = err("processors = 5\n");
        assert!(
            e.contains("line 1") && e.contains("invalid type: integer"),
            "{e}"
        );
        let e = err("processors = { partition_by_zone = false, max_demand = 8 }\n");
        assert!(e.contains("partition_by_zone must be true"), "{e}");
        let e = err("[processors]\npartition_by_zone = \"yes\"\n");
        assert!(e.contains("line 2") && e.contains("invalid type"), "{e}");
        let e = err("[batchers.audit.retry]\ninitial_delay_ms = 20000\nmax_delay_ms = 10\n");
        assert!(
            e.contains("line 1") && e.contains("initial_delay_ms must not exceed max_delay_ms"),
            "{e}"
        );
        let e = err("[processors.retry]\nmax_attempts = 0\n");
        assert!(
            e.contains("line 2") && e.contains("at least 1, or \"unlimited\""),
            "{e}"
        );
    }

    #[test]
    fn omitted_keys_take_the_library_defaults() {
        let file =
            PipelineFile::parse("[processors]\nmax_demand = 8\n", Path::new("x.toml")).unwrap();
        assert_eq!(
            file.processors.config,
            ProcessorConfig::default().max_demand(8)
        );
        assert_eq!(file.batchers.audit, BatcherConfig::new("audit"));
        assert_eq!(file.batchers.broadcast, BatcherConfig::new("broadcast"));
        let file =
            PipelineFile::parse("[sources.nats]\nstream = \"S\"\n", Path::new("x.toml")).unwrap();
        assert_eq!(
            file.sources.nats,
            Some(JetStreamConfig::default().stream("S"))
        );
    }

    #[test]
    fn a_retry_table_under_a_source_is_refused_with_where_retries_went() {
        let e = err("[sources.nats]\nstream = \"S\"\n\n[sources.nats.retry]\nmax_attempts = 5\n");
        assert!(
            e.starts_with("zones.toml: TOML parse error at line 4"),
            "{e}"
        );
        assert!(e.contains("[processors.retry]"), "{e}");
        let e = err("[sources.rabbitmq.retry]\nmax_attempts = 5\n");
        assert!(
            e.contains("line 1") && e.contains("[processors.retry]"),
            "{e}"
        );
    }

    #[test]
    fn a_file_written_back_parses_to_itself() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        for name in ["zones.toml", "nats.toml", "rabbitmq.toml"] {
            let file = PipelineFile::load(&dir.join(name)).unwrap();
            let written = toml::to_string(&file).unwrap();
            assert_eq!(
                PipelineFile::parse(&written, Path::new(name)).unwrap(),
                file,
                "{written}"
            );
        }
    }
}

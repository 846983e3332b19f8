//! `thunderline bench broker`: zone commands from a real broker through the daemon's pipeline
//! into the audit log, against the broker's raw consume-and-ack rate with the same client and
//! no pipeline, in the same run.
//!
//! Both paths read the same commands, published before either starts (to one stream read by
//! two consumers on NATS, to two queues on RabbitMQ), and both are timed from connecting to the
//! last acknowledgement. The pipeline's path is the daemon's own: `serve` in this process with
//! the pipeline file's settings and a `[sources.*]` section reading the benchmark's stream or
//! queue; a command is acknowledged once its events are committed to the audit log.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use super::BenchError;
use super::admin_client::AdminClient;
use crate::daemon::config::{PipelineFile, SourceSections};
use crate::daemon::server::{ServeArgs, Server};
use crate::sources::jetstream::JetStreamConfig;
use crate::sources::rabbitmq::RabbitMqConfig;
use crate::store::Store;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Nats,
    Rabbitmq,
}

#[derive(Clone, Debug, clap::Args)]
pub struct BrokerArgs {
    /// Which broker: nats (JetStream at --url, default nats://127.0.0.1:4222) or rabbitmq
    /// (default amqp://guest:guest@127.0.0.1:5672/%2f).
    #[arg(long, value_enum)]
    pub kind: BrokerKind,
    /// Commands to send through each path.
    #[arg(long, default_value_t = 50_000)]
    pub events: u64,
    /// Zones the commands are spread over.
    #[arg(long, default_value_t = 10)]
    pub zones: usize,
    /// Rounds, each with fresh streams or queues, zones and commands: raw, then pipeline. The
    /// report gives each round and the medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// The broker's URL; default: the local one of --kind.
    #[arg(long)]
    pub url: Option<String>,
    /// The audit log's database (postgres://… or sqlite://…); default: a fresh SQLite file.
    #[arg(long, env = "THUNDERLINE_DATABASE_URL")]
    pub database: Option<String>,
    /// A pipeline file for the daemon's settings (its [sources.*] names are replaced by the
    /// benchmark's own); default: the one pipelines/nats.toml and pipelines/rabbitmq.toml
    /// declare.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct BrokerReport {
    pub kind: BrokerKind,
    pub backend: String,
    pub events: u64,
    pub zones: usize,
    /// Commands per second from the broker into the audit log, acknowledged.
    pub pipeline_per_sec: f64,
    pub pipeline_seconds: f64,
    /// Commands in the audit log afterwards.
    pub audited: u64,
    /// Commands acknowledged to the broker.
    pub acked: u64,
    /// The same client consuming and acknowledging the same commands, without the pipeline.
    pub raw_per_sec: f64,
    pub raw_seconds: f64,
    /// pipeline_per_sec / raw_per_sec (medians of the rounds; the ratio is the median of each
    /// round's own ratio).
    pub ratio: f64,
    pub rounds: Vec<Round>,
}

/// One round's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Round {
    pub pipeline_per_sec: f64,
    pub raw_per_sec: f64,
    pub ratio: f64,
    pub audited: u64,
    pub acked: u64,
    /// Deliveries the broker made again (an ack wait ran out, a nak): each costs the round time.
    pub redelivered: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl BrokerReport {
    /// Every command is in the audit log and acknowledged, once, in every round.
    pub fn complete(&self) -> bool {
        self.rounds
            .iter()
            .all(|r| r.audited == self.events && r.acked == self.events)
    }

    pub fn table(&self) -> String {
        let mut table = format!(
            "broker benchmark ({:?}, audit log on {}): {} commands over {} zones, median of {} rounds\n\
             {:<34}{:>12.0} commands/s  ({:.3} s)\n\
             {:<34}{:>12.0} messages/s  ({:.3} s)\n\
             {:<34}{:>12.3}\n\
             {:<34}{:>12} of {} ({} acknowledged)\n",
            self.kind,
            self.backend,
            self.events,
            self.zones,
            self.rounds.len(),
            "broker → pipeline → audit log",
            self.pipeline_per_sec,
            self.pipeline_seconds,
            "baseline (raw consume + ack)",
            self.raw_per_sec,
            self.raw_seconds,
            "ratio",
            self.ratio,
            "commands in the audit log",
            self.audited,
            self.events,
            self.acked,
        );
        for (n, r) in self.rounds.iter().enumerate() {
            table.push_str(&format!(
                "  round {}: pipeline {:.0}/s, raw {:.0}/s, ratio {:.3}, {} redelivered\n",
                n + 1,
                r.pipeline_per_sec,
                r.raw_per_sec,
                r.ratio,
                r.redelivered
            ));
        }
        table
    }
}

/// The benchmark's own stream or queue names, so that it never reads anyone else's commands.
struct Names {
    tag: String,
}

impl Names {
    fn nats(&self, url: &str) -> JetStreamConfig {
        JetStreamConfig::new(url)
            .stream(format!("BENCH_{}", self.tag))
            .subjects(vec![format!("bench{}.commands.>", self.tag)])
            .dead_stream(format!("BENCH_{}_DEAD", self.tag))
            .dead_subject(format!("bench{}.dead", self.tag))
    }

    fn rabbit(&self, url: &str) -> RabbitMqConfig {
        RabbitMqConfig::new(url)
            .queue(format!("bench.{}.commands", self.tag))
            .dead_exchange(format!("bench.{}.dead", self.tag))
            .dead_queue(format!("bench.{}.commands.dead", self.tag))
    }

    fn raw_queue(&self) -> String {
        format!("bench.{}.raw", self.tag)
    }
}

/// One agent move for zone `zone`.
fn command(i: u64, zone: Uuid) -> (Uuid, Vec<u8>) {
    let id = Uuid::now_v7();
    let body = json!({
        "id": id, "zone_id": zone, "agent_id": format!("npc-{}", i % 16),
        "type": "agent_move", "payload": {"position": {"x": i, "y": 0, "z": 0}}
    });
    (id, body.to_string().into_bytes())
}

pub async fn run_async(args: &BrokerArgs) -> Result<BrokerReport, BenchError> {
    if args.events == 0 || args.zones == 0 || args.rounds == 0 {
        return Err(BenchError::Args(
            "--events, --zones and --rounds must be at least 1".into(),
        ));
    }
    let mut rounds = Vec::with_capacity(args.rounds);
    let mut backend = String::new();
    for _ in 0..args.rounds {
        let (round, used) = one_round(args).await?;
        backend = used;
        rounds.push(round);
    }
    let pick = |f: fn(&Round) -> f64| median(rounds.iter().map(f).collect());
    let pipeline_per_sec = pick(|r| r.pipeline_per_sec);
    let raw_per_sec = pick(|r| r.raw_per_sec);
    let last = rounds.last().cloned().expect("at least one round");
    Ok(BrokerReport {
        kind: args.kind,
        backend,
        events: args.events,
        zones: args.zones,
        pipeline_per_sec,
        pipeline_seconds: args.events as f64 / pipeline_per_sec,
        audited: last.audited,
        acked: last.acked,
        raw_per_sec,
        raw_seconds: args.events as f64 / raw_per_sec,
        ratio: pick(|r| r.ratio),
        rounds,
    })
}

async fn one_round(args: &BrokerArgs) -> Result<(Round, String), BenchError> {
    let names = Names {
        tag: Uuid::new_v4().simple().to_string()[..12].to_owned(),
    };
    let url = args.url.clone().unwrap_or_else(|| match args.kind {
        BrokerKind::Nats => JetStreamConfig::default().get_url().to_owned(),
        BrokerKind::Rabbitmq => RabbitMqConfig::default().get_url().to_owned(),
    });
    let dir = std::env::temp_dir().join(format!("thunderline-bench-broker-{}", names.tag));
    let database = args
        .database
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", dir.join("bench.db").display()));
    let mut file = match &args.config {
        Some(path) => PipelineFile::load(path)?,
        None => PipelineFile::for_broker(),
    };
    let serve = ServeArgs::local(Some(database.clone()), dir.clone());

    // The zones first, with the server alone: the commands are published once they exist.
    file.sources = SourceSections::default();
    let server = Server::start(&serve, &file).await?;
    let mut admin = AdminClient::connect(server.addr, &server.secrets.admin_token).await?;
    let mut zones = Vec::with_capacity(args.zones);
    for n in 0..args.zones {
        let zone = admin
            .call(
                hyper::Method::POST,
                "/api/zones",
                &json!({"name": format!("bench-{n}"), "capacity": 1000, "permissions": 0x03}),
            )
            .await?;
        let id = zone["id"].as_str().and_then(|s| Uuid::parse_str(s).ok());
        zones.push(
            id.ok_or_else(|| BenchError::nats("the admin API returned a zone without an id"))?,
        );
    }
    drop(admin);
    server.shutdown().await?;

    let commands: Vec<(Uuid, Uuid, Vec<u8>)> = (0..args.events)
        .map(|i| {
            let zone = zones[(i % zones.len() as u64) as usize];
            let (id, body) = command(i, zone);
            (zone, id, body)
        })
        .collect();
    let raw = match args.kind {
        BrokerKind::Nats => {
            let section = names.nats(&url);
            nats::publish(&section, &commands).await?;
            let raw = nats::raw(&section, args.events).await?;
            file.sources.nats = Some(section);
            raw
        }
        BrokerKind::Rabbitmq => {
            let section = names.rabbit(&url);
            rabbit::publish(&section, &names.raw_queue(), &commands).await?;
            let raw = rabbit::raw(&url, &names.raw_queue(), args.events).await?;
            file.sources.rabbitmq = Some(section);
            raw
        }
    };

    // The pipeline: the daemon with the source, timed until every command is acknowledged.
    let started = Instant::now();
    let server = Server::start(&serve, &file).await?;
    let limit = Duration::from_secs(60 + args.events / 1_000);
    // (acknowledged, when that count was first seen)
    let mut last = (0, Instant::now());
    let acked = loop {
        let acked = counted(&server.registry, "acked");
        if acked >= args.events {
            break acked;
        }
        // A round that stops moving is reported as it happens, with where it stopped: taken
        // from the broker (received) or in the pipeline (received, not acknowledged).
        if acked != last.0 {
            last = (acked, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(2) {
            tracing::warn!(
                after = ?started.elapsed(),
                acked,
                received = counted(&server.registry, "received"),
                "the pipeline acknowledged nothing for 2 s"
            );
            last.1 = Instant::now();
        }
        if started.elapsed() > limit {
            server.shutdown().await?;
            return Err(BenchError::Stalled {
                acked,
                events: args.events,
                secs: limit.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let elapsed = started.elapsed();
    let redelivered = counted(&server.registry, "redelivered");
    server.shutdown().await?;

    let store = Store::connect(&database).await?;
    let mut audited = 0;
    for zone in &zones {
        // Each zone's log starts with its creation; the rest are the commands' events.
        audited += store.count_events(Some(*zone)).await?.saturating_sub(1);
    }
    let backend = format!("{:?}", store.backend()).to_lowercase();
    store.close().await;
    match args.kind {
        BrokerKind::Nats => nats::cleanup(&names.nats(&url)).await,
        BrokerKind::Rabbitmq => rabbit::cleanup(&names.rabbit(&url), &names.raw_queue()).await,
    }
    if args.database.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let per_sec = |d: Duration| args.events as f64 / d.as_secs_f64();
    let round = Round {
        pipeline_per_sec: per_sec(elapsed),
        raw_per_sec: per_sec(raw),
        ratio: raw.as_secs_f64() / elapsed.as_secs_f64(),
        audited,
        acked,
        redelivered,
    };
    Ok((round, backend))
}

/// How many of the daemon's source messages ended with `outcome`, from its metrics.
fn counted(registry: &prometheus::Registry, outcome: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "thunderline_source_messages_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "outcome" && l.value() == outcome)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

pub fn run(args: &BrokerArgs) -> Result<BrokerReport, BenchError> {
    super::runtime()?.block_on(run_async(args))
}

mod nats {
    use super::*;
    use async_nats::jetstream::{self, consumer::pull, stream};

    async fn context(url: &str) -> Result<jetstream::Context, BenchError> {
        let client = async_nats::connect(url).await.map_err(BenchError::nats)?;
        Ok(jetstream::new(client))
    }

    /// The stream, with the commands in it (each with its id as `Nats-Msg-Id`).
    pub async fn publish(
        section: &JetStreamConfig,
        commands: &[(Uuid, Uuid, Vec<u8>)],
    ) -> Result<(), BenchError> {
        let js = context(section.get_url()).await?;
        js.create_stream(stream::Config {
            name: section.get_stream().to_owned(),
            subjects: section.get_subjects().to_vec(),
            ..stream::Config::default()
        })
        .await
        .map_err(BenchError::nats)?;
        let prefix = section.get_subjects()[0].trim_end_matches('>');
        for chunk in commands.chunks(1_000) {
            let mut acks = Vec::with_capacity(chunk.len());
            for (zone, id, body) in chunk {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", id.to_string().as_str());
                let ack = js
                    .publish_with_headers(format!("{prefix}{zone}"), headers, body.clone().into())
                    .await
                    .map_err(BenchError::nats)?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(BenchError::nats)?;
            }
        }
        Ok(())
    }

    /// A second durable pull consumer on the same stream, consumed and acknowledged message by
    /// message with the same client and pull size as the source, and nothing else.
    pub async fn raw(section: &JetStreamConfig, events: u64) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let js = context(section.get_url()).await?;
        let stream = js
            .get_stream(section.get_stream())
            .await
            .map_err(BenchError::nats)?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("raw".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                max_ack_pending: 20_000,
                ..pull::Config::default()
            })
            .await
            .map_err(BenchError::nats)?;
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(section.get_pull_batch())
            .heartbeat(section.get_idle_heartbeat())
            .expires(section.get_idle_heartbeat() * 4)
            .messages()
            .await
            .map_err(BenchError::nats)?;
        let mut seen = 0;
        while seen < events {
            match messages.next().await {
                Some(Ok(m)) => {
                    m.ack().await.map_err(BenchError::nats)?;
                    seen += 1;
                }
                Some(Err(e)) => return Err(BenchError::nats(e)),
                None => return Err(BenchError::nats("the raw consumer's stream ended")),
            }
        }
        js.client().flush().await.map_err(BenchError::nats)?;
        Ok(started.elapsed())
    }

    pub async fn cleanup(section: &JetStreamConfig) {
        if let Ok(js) = context(section.get_url()).await {
            let _ = js.delete_stream(section.get_stream()).await;
            let _ = js.delete_stream(section.get_dead_stream()).await;
        }
    }
}

mod rabbit {
    use super::*;
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    };
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    use crate::sources::rabbitmq::RabbitMqSource;

    async fn connect(url: &str) -> Result<Connection, BenchError> {
        Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(BenchError::rabbit)
    }

    /// The source's topology and a plain durable queue for the raw consumer, each with every
    /// command (persistent, its id as `message_id`), confirmed by the broker.
    pub async fn publish(
        section: &RabbitMqConfig,
        raw_queue: &str,
        commands: &[(Uuid, Uuid, Vec<u8>)],
    ) -> Result<(), BenchError> {
        RabbitMqSource::declare(section)
            .await
            .map_err(BenchError::rabbit)?;
        let connection = connect(section.get_url()).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(BenchError::rabbit)?;
        channel
            .queue_declare(
                raw_queue.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(BenchError::rabbit)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BenchError::rabbit)?;
        for queue in [section.get_queue(), raw_queue] {
            for chunk in commands.chunks(1_000) {
                let mut confirms = Vec::with_capacity(chunk.len());
                for (_, id, body) in chunk {
                    let properties = BasicProperties::default()
                        .with_message_id(id.to_string().into())
                        .with_content_type("application/json".into())
                        .with_delivery_mode(2);
                    let confirm = channel
                        .basic_publish(
                            "".into(),
                            queue.into(),
                            BasicPublishOptions::default(),
                            body,
                            properties,
                        )
                        .await
                        .map_err(BenchError::rabbit)?;
                    confirms.push(confirm);
                }
                for confirm in confirms {
                    confirm.await.map_err(BenchError::rabbit)?;
                }
            }
        }
        let _ = connection.close(200, "OK".into()).await;
        Ok(())
    }

    /// The same client consuming the raw queue with the prefetch the daemon would use and
    /// acknowledging message by message, and nothing else.
    pub async fn raw(url: &str, queue: &str, events: u64) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let connection = connect(url).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(BenchError::rabbit)?;
        let processors = PipelineFile::default().processors.config;
        let prefetch = processors.get_concurrency() * processors.get_max_demand();
        channel
            .basic_qos(
                u16::try_from(prefetch).unwrap_or(u16::MAX),
                BasicQosOptions::default(),
            )
            .await
            .map_err(BenchError::rabbit)?;
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "raw".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(BenchError::rabbit)?;
        // Message by message, as the source does, with what has arrived acknowledged together
        // (the acks of one round trip in flight at once) rather than one round trip each.
        let mut seen = 0;
        let mut ready = Vec::with_capacity(256);
        while seen < events {
            let mut next = Some(consumer.next().await);
            while let Some(item) = next.take() {
                match item {
                    Some(Ok(delivery)) => ready.push(delivery),
                    Some(Err(e)) => return Err(BenchError::rabbit(e)),
                    None => return Err(BenchError::rabbit("the raw consumer ended")),
                }
                if ready.len() < 256 {
                    next = futures_util::FutureExt::now_or_never(consumer.next());
                }
            }
            let acks = ready.iter().map(|d| d.ack(BasicAckOptions::default()));
            for acked in futures_util::future::join_all(acks).await {
                acked.map_err(BenchError::rabbit)?;
            }
            seen += ready.len() as u64;
            ready.clear();
        }
        let elapsed = started.elapsed();
        let _ = connection.close(200, "OK".into()).await;
        Ok(elapsed)
    }

    pub async fn cleanup(section: &RabbitMqConfig, raw_queue: &str) {
        let Ok(connection) = connect(section.get_url()).await else {
            return;
        };
        if let Ok(channel) = connection.create_channel().await {
            for queue in [section.get_queue(), section.get_dead_queue(), raw_queue] {
                let _ = channel
                    .queue_delete(queue.into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = channel
                .exchange_delete(
                    section.get_dead_exchange().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = connection.close(200, "OK".into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_acked_count_is_read_from_the_source_metrics() {
        let registry = prometheus::Registry::new();
        let metrics = crate::sources::SourceMetrics::new("jetstream", &registry).unwrap();
        metrics.message("acked", 7);
        metrics.for_source("rabbitmq").message("acked", 2);
        metrics.message("received", 100);
        assert_eq!(counted(&registry, "acked"), 9);
    }
}

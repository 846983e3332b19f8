//! A custom batch sink: zone events into a JSON-lines file, one write and one fsync per batch.
//!
//! It shows the sink contract: a sink gets its batch by reference (it cannot drop a message),
//! fails the whole batch with a retryable `Failure` when the write fails (the batcher retries it
//! with backoff), and a message is acknowledged only once every sink it was routed to has it.
//! Here each event goes to two batchers, the file and a console printer.
//!
//! Run it with `cargo run --example custom_sink`; it writes `target/custom_sink.jsonl`.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use thunderline::pipeline::{
    BatchInfo, BatchSink, BatcherConfig, BatcherName, Failure, Message, Pipeline, Processor,
    ProcessorConfig, RetryPolicy, in_memory,
};
use thunderline::runtime::{Limits, command, now};
use thunderline::zone::{Actor, CommandKind, NewZone, Permissions, Position, ZoneEvent, ZoneState};
use uuid::Uuid;

/// Appends each batch to a file and syncs it before saying the batch is done.
struct JsonLinesFile {
    path: PathBuf,
}

impl BatchSink<ZoneEvent> for JsonLinesFile {
    async fn handle_batch(
        &self,
        batch: &BatchInfo,
        messages: &mut [Message<ZoneEvent>],
    ) -> Result<(), Failure> {
        // One write per batch. A retried batch may repeat lines a failed write got partly
        // out; events carry unique ids, so a reader can drop the repeats.
        let mut lines = String::new();
        for m in messages.iter() {
            lines.push_str(&m.data.to_json());
            lines.push('\n');
        }
        let path = self.path.clone();
        let written = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)?;
            file.write_all(lines.as_bytes())?;
            file.sync_data()
        })
        .await;
        match written {
            Ok(Ok(())) => {
                println!("file: {} events ({} batch)", batch.size, batch.trigger);
                Ok(())
            }
            Ok(Err(e)) => Err(Failure::retryable(format!(
                "cannot append to the file: {e}"
            ))),
            Err(e) => Err(Failure::retryable(format!("the writer task failed: {e}"))),
        }
    }
}

/// Prints what it gets: the second branch of every event.
struct Console;

impl BatchSink<ZoneEvent> for Console {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<ZoneEvent>],
    ) -> Result<(), Failure> {
        for m in messages.iter() {
            println!(
                "console: #{} {} {}",
                m.data.seq,
                m.data.name(),
                m.data.kind.payload()
            );
        }
        Ok(())
    }
}

/// Routes every event to both sinks and keys batches by zone.
struct FanOut {
    both: Arc<[BatcherName]>,
}

impl Processor<ZoneEvent> for FanOut {
    async fn handle_message(&self, m: &mut Message<ZoneEvent>) -> Result<(), Failure> {
        let zone = m.data.zone_id.as_u128();
        m.put_batch_key(zone).put_batchers(self.both.clone());
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/custom_sink.jsonl");
    let _ = std::fs::remove_file(&path);

    let (producer, push) = in_memory::<ZoneEvent>(100);
    let pipeline = Pipeline::builder("custom-sink")
        .producer(producer)
        .processor(
            FanOut {
                both: Arc::from(vec![BatcherName::from("file"), "console".into()]),
            },
            ProcessorConfig::default(),
        )
        .batcher(
            BatcherConfig::new("file")
                .batch_size(5)
                .batch_timeout(Duration::from_millis(50))
                .retry(RetryPolicy::exponential(
                    5,
                    Duration::from_millis(10),
                    2.0,
                    Duration::from_secs(1),
                )),
            JsonLinesFile { path: path.clone() },
        )
        .batcher(BatcherConfig::new("console").batch_size(100), Console)
        .start()?;

    // A zone decides commands; each accepted one returns the events it caused, its creation
    // first. The runtime's `command` gives each a fresh id, and `Limits::context` the time and
    // the ids of its events.
    let mut zone = ZoneState::absent(Uuid::now_v7());
    let agent = |i: u32| Actor::Agent {
        agent_id: format!("agent-{i}"),
        connection: format!("conn-{i}"),
        permissions: Permissions::SPAWN_AGENTS,
    };
    let create = CommandKind::CreateZone(Box::new(NewZone {
        name: "Example".into(),
        assigned_server: Some("local".into()),
        ..NewZone::default()
    }));
    let mut commands = vec![command(zone.id(), Actor::Admin, create)];
    commands.extend((0..3).map(|i| command(zone.id(), agent(i), CommandKind::Join)));
    for step in 0..8 {
        let kind = CommandKind::AgentMove {
            position: Position {
                x: f64::from(step),
                y: 0.0,
                z: 0.0,
            },
            sent_at: None,
        };
        commands.push(command(zone.id(), agent(0), kind));
    }
    commands.push(command(zone.id(), Actor::System, CommandKind::Tick));
    for command in &commands {
        let accepted = zone
            .execute(command, &Limits::default().context(now()))
            .result?;
        for event in accepted.events {
            push.push(Message::new(event)).await?;
        }
    }
    drop(push);

    let stats = pipeline.join().await?;
    let lines = std::fs::read_to_string(&path)?.lines().count();
    println!(
        "{} events acknowledged; {lines} lines in {}",
        stats.successful,
        path.display()
    );
    Ok(())
}

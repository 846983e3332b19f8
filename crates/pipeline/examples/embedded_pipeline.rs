//! Embedding a thunderline pipeline in your own program.
//!
//! A fake sensor feed goes through a calibrating processor into a sink that prints batches, one
//! batch key per sensor. Some readings fail on purpose, to show the three ways a message can
//! end: acknowledged as successful, failed at once (permanent), or retried and then
//! dead-lettered (retryable). Run it with `cargo run --example embedded_pipeline`.
//!
//! The tests at the bottom push readings through the same pipeline and await how each one
//! ended, with `thunderline_pipeline::testing`: `cargo test --example embedded_pipeline`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use thunderline_pipeline::{
    Acknowledger, BatchInfo, BatchSink, BatcherConfig, ConfigError, DeadLetterSink, Demand,
    Failure, Jitter, Message, Pipeline, Processor, ProcessorConfig, Produced, Producer,
    RetryPolicy,
};

const SENSORS: [&str; 3] = ["boiler", "intake", "exhaust"];

/// The payload has to be `Clone` because a message may be fanned out to several batchers.
#[derive(Clone)]
struct Reading {
    seq: u64,
    sensor: &'static str,
    /// Raw ADC counts from the producer; degrees Celsius after the processor.
    value: f64,
}

impl Reading {
    fn new(seq: u64, value: f64) -> Self {
        let sensor = SENSORS[(seq % 3) as usize];
        Self { seq, sensor, value }
    }
}

type Msg = Message<Reading>;

/// A finite source. Real producers would wrap a socket or a broker client; all the pipeline
/// needs is that `produce` never pushes more than `demand` has room for.
struct SensorFeed {
    next: u64,
    total: u64,
    acker: Arc<dyn Acknowledger<Reading>>,
}

impl Producer<Reading> for SensorFeed {
    async fn produce(&mut self, demand: &mut Demand<Reading>) -> Produced {
        while self.next < self.total && !demand.is_filled() {
            let seq = self.next;
            // Every 11th reading comes back as a sentinel: the sensor is unplugged.
            let value = if seq % 11 == 10 {
                -1.0
            } else {
                400.0 + (seq * 37 % 200) as f64
            };
            let reading = Reading::new(seq, value);
            // Every message carries its acknowledger, so the source learns how each one ended.
            let _ = demand.push(Message::with_acker(reading, self.acker.clone()));
            self.next += 1;
        }
        // Returning Exhausted is what lets `join()` finish: the pipeline drains on its own.
        if self.next == self.total {
            Produced::Exhausted
        } else {
            Produced::More
        }
    }
}

struct Calibrate;

impl Processor<Reading> for Calibrate {
    async fn handle_message(&self, m: &mut Msg) -> Result<(), Failure> {
        // No retry could fix an unplugged sensor, so don't waste attempts on it.
        if m.data.value < 0.0 {
            return Err(Failure::permanent("sensor unplugged"));
        }
        // A flaky bus: reading 4 recovers on its second attempt, reading 7 never does and ends
        // up in the dead-letter sink once the retry policy gives up.
        if (m.data.seq == 4 && m.attempts() == 1) || m.data.seq == 7 {
            return Err(Failure::retryable("bus timeout"));
        }
        m.data.value = m.data.value * 0.125 - 20.0;
        // One batch per sensor, so the sink can write each batch to that sensor's table.
        m.put_batch_key(m.data.sensor);
        Ok(())
    }
}

struct PrintBatches;

impl BatchSink<Reading> for PrintBatches {
    async fn handle_batch(&self, b: &BatchInfo, ms: &mut [Msg]) -> Result<(), Failure> {
        let BatchInfo {
            batch_key, trigger, ..
        } = b;
        let seqs: Vec<u64> = ms.iter().map(|m| m.data.seq).collect();
        println!("batch  key={batch_key:?} trigger={trigger} {seqs:?}");
        Ok(())
    }
}

/// Only retryable failures that ran out of attempts land here; permanent ones skip it, since
/// replaying them later would fail the same way.
struct Quarantine;

impl DeadLetterSink<Reading> for Quarantine {
    async fn dead_letter(&self, stage: &str, ms: &mut [Msg]) {
        for m in ms.iter() {
            let why = m.failure().map_or("?", Failure::reason);
            let (seq, n) = (m.data.seq, m.attempts());
            println!("dead   seq={seq} at {stage} after {n} attempts: {why}");
        }
    }
}

/// `ack` runs on the pipeline's own tasks, so it only bumps counters; anything slow (a broker
/// round trip) belongs on a task of its own.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl Acknowledger<Reading> for Tally {
    fn ack(&self, successful: Vec<Msg>, failed: Vec<Msg>) {
        let (ok, bad) = (successful.len() as u64, failed.len() as u64);
        self.ok.fetch_add(ok, Ordering::Relaxed);
        self.failed.fetch_add(bad, Ordering::Relaxed);
    }
}

/// The pipeline, whatever feeds it: `main` runs it on the sensor feed, the tests on an
/// in-memory producer.
fn sensors(producer: impl Producer<Reading>) -> Result<Pipeline<Reading>, ConfigError> {
    // Millisecond delays keep the demo fast; no jitter keeps the retry timing predictable.
    let retry =
        RetryPolicy::exponential(3, Duration::from_millis(1), 2.0, Duration::from_millis(5))
            .with_jitter(Jitter::None);

    Pipeline::builder("sensors")
        .producer(producer)
        // Small demand so that the 40 readings are spread over both workers.
        .processor(
            Calibrate,
            ProcessorConfig::default()
                .concurrency(2)
                .demand(8, 4)
                .retry(retry),
        )
        // The size trigger fires during the run; whatever is left when the feed runs out leaves
        // with trigger `flush` during the drain, long before the timeout.
        .batcher(
            BatcherConfig::new("archive")
                .batch_size(5)
                .batch_timeout(Duration::from_secs(5)),
            PrintBatches,
        )
        .dead_letter(Quarantine)
        .start()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tally = Arc::new(Tally::default());
    let acker = tally.clone();
    let feed = SensorFeed {
        next: 0,
        total: 40,
        acker,
    };

    let pipeline = sensors(feed)?;

    // `join` consumes the handle, so take the topology while we still have it.
    let topology = pipeline.topology();
    let stats = pipeline.join().await?;

    println!("\nstages of {:?}:", topology.pipeline);
    for s in &topology.stages {
        println!("  {:<16} {:?} x{}", s.name, s.kind, s.concurrency);
    }
    println!("stats: {stats:#?}");
    let ok = tally.ok.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    println!("acknowledger saw {ok} ok, {failed} failed");
    // The engine's promise: every message handed out is acknowledged exactly once.
    assert_eq!(stats.successful + stats.failed, stats.produced);
    Ok(())
}

#[cfg(test)]
mod tests {
    use thunderline_pipeline::in_memory;
    use thunderline_pipeline::testing::{test_batch, test_message};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_reading_is_calibrated_refused_or_retried() -> Result<(), Box<dyn std::error::Error>>
    {
        let (producer, push) = in_memory(10);
        let pipeline = sensors(producer)?;

        let ok = test_message(&push, Reading::new(0, 400.0)).await;
        assert!(ok.is_successful());
        assert_eq!(ok.data.value, 30.0);

        let unplugged = test_message(&push, Reading::new(10, -1.0)).await;
        assert_eq!(
            unplugged.failure(),
            Some(&Failure::permanent("sensor unplugged"))
        );
        assert_eq!((unplugged.attempts, unplugged.dead_lettered), (1, false));

        // 4 recovers on its second attempt; 7 runs out of attempts and is dead-lettered.
        let flaky = test_batch(&push, [Reading::new(4, 480.0), Reading::new(7, 459.0)]).await;
        assert!(flaky[0].is_successful());
        assert_eq!(flaky[1].failure(), Some(&Failure::retryable("bus timeout")));
        assert_eq!((flaky[1].attempts, flaky[1].dead_lettered), (3, true));

        pipeline.shutdown().await?;
        Ok(())
    }
}

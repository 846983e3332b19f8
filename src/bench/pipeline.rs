//! `thunderline bench pipeline`: N small messages through producer → processors → one batcher →
//! a no-op sink, against a bare crossbeam channel between two threads as the baseline.

use std::hint::black_box;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::BenchError;
use crate::pipeline::{
    Acknowledger, BatchInfo, BatchSink, BatcherConfig, BatcherName, Demand, Failure, Message,
    Pipeline, Processor, ProcessorConfig, Produced, Producer,
};

/// The payload: 64 bytes, as in the workload.
pub type Payload = [u8; 64];

#[derive(Clone, Debug, clap::Args)]
pub struct PipelineArgs {
    /// Messages to send through each path.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: u64,
    /// Processor workers.
    #[arg(long, default_value_t = 2)]
    pub processors: usize,
    /// Messages a processor asks for at once (chunks are half of it).
    #[arg(long, default_value_t = 1024)]
    pub max_demand: usize,
    #[arg(long, default_value_t = 20)]
    pub batch_size: usize,
    /// Rounds of (baseline, pipeline), interleaved; the best of each counts, since noise on a
    /// shared machine only ever slows a run down.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Partition by message (its sequence number): every key's messages go to one processor,
    /// in order, and retries wait in line.
    #[arg(long)]
    pub partitioned: bool,
    /// Send each message to this many batchers (each with its own no-op sink); it is
    /// acknowledged once every copy is done.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub fanout: u16,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct PipelineReport {
    pub events: u64,
    pub acked: u64,
    pub failed: u64,
    pub seconds: f64,
    pub events_per_sec: f64,
    pub baseline_seconds: f64,
    pub baseline_events_per_sec: f64,
    /// The best pipeline round against the best baseline round.
    pub ratio: f64,
    /// The median of each round's pipeline rate over the same round's baseline rate.
    pub median_ratio: f64,
    pub partitioned: bool,
    pub fanout: u16,
    pub max_in_flight: usize,
    pub in_flight_bound: usize,
    pub processors: usize,
    pub max_demand: usize,
    pub batch_size: usize,
    pub rounds: u32,
    /// Every round's time, in seconds.
    pub pipeline_samples: Vec<f64>,
    pub baseline_samples: Vec<f64>,
    pub peak_rss_bytes: Option<u64>,
}

struct Generator {
    remaining: u64,
    next: u64,
    acker: Arc<dyn Acknowledger<Payload>>,
}

impl Producer<Payload> for Generator {
    async fn produce(&mut self, demand: &mut Demand<Payload>) -> Produced {
        while self.remaining > 0 && !demand.is_filled() {
            let mut payload = [0u8; 64];
            payload[..8].copy_from_slice(&self.next.to_le_bytes());
            let _ = demand.push(Message::with_acker(payload, self.acker.clone()));
            self.next += 1;
            self.remaining -= 1;
        }
        if self.remaining == 0 {
            Produced::Exhausted
        } else {
            Produced::More
        }
    }
}

/// Touches each message, and sends it to every batcher when there are several.
struct Touch {
    fanout: Option<Arc<[BatcherName]>>,
}

impl Processor<Payload> for Touch {
    async fn handle_message(&self, message: &mut Message<Payload>) -> Result<(), Failure> {
        message.data[63] = message.data[0];
        if let Some(names) = &self.fanout {
            message.put_batchers(names.clone());
        }
        Ok(())
    }
}

struct Discard;

impl BatchSink<Payload> for Discard {
    async fn handle_batch(
        &self,
        _batch: &BatchInfo,
        messages: &mut [Message<Payload>],
    ) -> Result<(), Failure> {
        black_box(messages);
        Ok(())
    }
}

/// The baseline: one message per send through a bounded crossbeam channel between two threads.
pub fn baseline(events: u64) -> Duration {
    let (tx, rx) = crossbeam_channel::bounded::<Payload>(1024);
    let started = Instant::now();
    let consumer = std::thread::spawn(move || {
        let mut n = 0u64;
        while let Ok(p) = rx.recv() {
            black_box(p);
            n += 1;
        }
        n
    });
    for i in 0..events {
        let mut payload = [0u8; 64];
        payload[..8].copy_from_slice(&i.to_le_bytes());
        if tx.send(payload).is_err() {
            break;
        }
    }
    drop(tx);
    let received = consumer.join().unwrap_or(0);
    let elapsed = started.elapsed();
    assert_eq!(received, events, "the baseline consumer lost messages");
    elapsed
}

/// Runs the pipeline path on the current runtime; returns (elapsed, acked, failed, stats).
pub async fn run_pipeline(
    args: &PipelineArgs,
) -> Result<(Duration, u64, u64, crate::pipeline::PipelineStats), BenchError> {
    let count = Arc::new(super::AckCounter::default());
    let producer = Generator {
        remaining: args.events,
        next: 0,
        acker: count.clone(),
    };
    let batchers: Vec<BatcherName> = (0..args.fanout)
        .map(|i| match i {
            0 => "default".into(),
            i => format!("copy{i}").into(),
        })
        .collect();
    let touch = Touch {
        fanout: (args.fanout > 1).then(|| batchers.clone().into()),
    };
    let started = Instant::now();
    let mut builder = Pipeline::builder("bench").producer(producer).processor(
        touch,
        ProcessorConfig::default()
            .concurrency(args.processors)
            .max_demand(args.max_demand),
    );
    if args.partitioned {
        builder = builder.partition_by(|m: &Message<Payload>| {
            u64::from_le_bytes(m.data[..8].try_into().unwrap_or_default())
        });
    }
    for name in &batchers {
        builder = builder.batcher(
            BatcherConfig::new(&**name)
                .batch_size(args.batch_size)
                .batch_timeout(Duration::from_secs(2)),
            Discard,
        );
    }
    let pipeline = builder.start()?;
    let stats = pipeline.join().await?;
    let elapsed = started.elapsed();
    Ok((
        elapsed,
        count.successful.load(Ordering::Relaxed),
        count.failed.load(Ordering::Relaxed),
        stats,
    ))
}

pub fn run(args: &PipelineArgs) -> Result<PipelineReport, BenchError> {
    let runtime = super::runtime()?;
    let mut pipeline_samples = Vec::new();
    let mut baseline_samples = Vec::new();
    let (mut acked, mut failed, mut max_in_flight, mut in_flight_bound) = (u64::MAX, 0, 0, 0);
    for _ in 0..args.rounds {
        baseline_samples.push(baseline(args.events));
        let (elapsed, ok, bad, stats) = runtime.block_on(run_pipeline(args))?;
        pipeline_samples.push(elapsed);
        // The worst round is the one reported: every round must acknowledge everything.
        acked = acked.min(ok);
        failed = failed.max(bad);
        max_in_flight = max_in_flight.max(stats.max_in_flight);
        in_flight_bound = stats.in_flight_bound;
    }
    let best = |v: &[Duration]| v.iter().copied().min().unwrap_or_default();
    let (elapsed, baseline) = (best(&pipeline_samples), best(&baseline_samples));
    let rate = |d: Duration| args.events as f64 / d.as_secs_f64();
    let secs = |v: &[Duration]| v.iter().map(Duration::as_secs_f64).collect();
    let mut ratios: Vec<f64> = baseline_samples
        .iter()
        .zip(&pipeline_samples)
        .map(|(b, p)| b.as_secs_f64() / p.as_secs_f64())
        .collect();
    ratios.sort_by(f64::total_cmp);
    let median_ratio = match ratios.len() {
        0 => 0.0,
        n if n % 2 == 1 => ratios[n / 2],
        n => (ratios[n / 2 - 1] + ratios[n / 2]) / 2.0,
    };
    Ok(PipelineReport {
        events: args.events,
        acked,
        failed,
        seconds: elapsed.as_secs_f64(),
        events_per_sec: rate(elapsed),
        baseline_seconds: baseline.as_secs_f64(),
        baseline_events_per_sec: rate(baseline),
        ratio: baseline.as_secs_f64() / elapsed.as_secs_f64(),
        median_ratio,
        partitioned: args.partitioned,
        fanout: args.fanout,
        max_in_flight,
        in_flight_bound,
        processors: args.processors,
        max_demand: args.max_demand,
        batch_size: args.batch_size,
        rounds: args.rounds,
        pipeline_samples: secs(&pipeline_samples),
        baseline_samples: secs(&baseline_samples),
        peak_rss_bytes: super::peak_rss_bytes(),
    })
}

impl PipelineReport {
    pub fn table(&self) -> String {
        let mib =
            |b: Option<u64>| b.map_or("n/a".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
        format!(
            "pipeline benchmark: {} events, {} processors, max_demand {}, batch_size {}{}{}, best of {} rounds\n\
             {:<28}{:>16.0} events/s  ({:.3} s)\n\
             {:<28}{:>16.0} events/s  ({:.3} s)\n\
             {:<28}{:>16.3}  (median per round {:.3})\n\
             {:<28}{:>16} ok, {} failed\n\
             {:<28}{:>16} (bound {})\n\
             {:<28}{:>16}\n",
            self.events,
            self.processors,
            self.max_demand,
            self.batch_size,
            if self.partitioned {
                ", partitioned"
            } else {
                ""
            },
            if self.fanout > 1 {
                format!(", fan-out {}", self.fanout)
            } else {
                String::new()
            },
            self.rounds,
            "pipeline",
            self.events_per_sec,
            self.seconds,
            "baseline (crossbeam)",
            self.baseline_events_per_sec,
            self.baseline_seconds,
            "ratio",
            self.ratio,
            self.median_ratio,
            "acked",
            self.acked,
            self.failed,
            "max in flight",
            self.max_in_flight,
            self.in_flight_bound,
            "peak RSS",
            mib(self.peak_rss_bytes),
        )
    }
}

//! Telemetry: Prometheus metrics per stage, and the topology a running pipeline reports.
//!
//! Labels are bounded: the pipeline's name, the stage (`producer`, `processor`, `batcher:<name>`,
//! `sink:<name>`), an outcome, a batch trigger. Stages update counters once per chunk or batch,
//! never once per message.

use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use serde::Serialize;

/// The engine's metric families, registered once per registry and shared by every pipeline
/// that reports to it.
#[derive(Clone)]
pub struct PipelineMetrics {
    messages: IntCounterVec,
    abandoned: IntCounterVec,
    batch_size: HistogramVec,
    duration: HistogramVec,
    in_flight: IntGaugeVec,
    concurrency: IntGaugeVec,
    rate_allowed: IntGaugeVec,
    rate_interval: GaugeVec,
}

impl PipelineMetrics {
    pub fn register(registry: &Registry) -> Result<Arc<Self>, prometheus::Error> {
        let messages = IntCounterVec::new(
            Opts::new(
                "thunderline_pipeline_messages_total",
                "Messages per stage and outcome: in, out, failed, retried, dead_lettered.",
            ),
            &["pipeline", "stage", "outcome"],
        )?;
        let abandoned = IntCounterVec::new(
            Opts::new(
                "thunderline_pipeline_abandoned_total",
                "Messages acknowledged as failed because they were dropped outside the ack path: \
                 a stage aborted at the drain deadline, or a fault in the engine.",
            ),
            &["pipeline"],
        )?;
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "thunderline_pipeline_batch_size",
                "Messages per batch, by what sent the batch out: size, timeout, flush or idle (a sink worker was free, with group commit).",
            )
            .buckets(vec![
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0,
            ]),
            &["pipeline", "batcher", "trigger"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "thunderline_pipeline_stage_duration_seconds",
                "Time a stage spent on one chunk (processors) or one batch (sinks).",
            )
            .buckets(prometheus::exponential_buckets(0.000_01, 4.0, 10)?),
            &["pipeline", "stage"],
        )?;
        let in_flight = IntGaugeVec::new(
            Opts::new(
                "thunderline_pipeline_in_flight",
                "Messages a stage holds right now.",
            ),
            &["pipeline", "stage"],
        )?;
        let concurrency = IntGaugeVec::new(
            Opts::new(
                "thunderline_pipeline_concurrency",
                "Workers a stage runs (processors and sinks can be resized while running).",
            ),
            &["pipeline", "stage"],
        )?;
        let rate_allowed = IntGaugeVec::new(
            Opts::new(
                "thunderline_pipeline_rate_limit_allowed",
                "Messages the producers may hand out per rate-limit interval; 0 means no limit.",
            ),
            &["pipeline"],
        )?;
        let rate_interval = GaugeVec::new(
            Opts::new(
                "thunderline_pipeline_rate_limit_interval_seconds",
                "The rate-limit interval; 0 means no limit.",
            ),
            &["pipeline"],
        )?;
        registry.register(Box::new(messages.clone()))?;
        registry.register(Box::new(abandoned.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(concurrency.clone()))?;
        registry.register(Box::new(rate_allowed.clone()))?;
        registry.register(Box::new(rate_interval.clone()))?;
        Ok(Arc::new(Self {
            messages,
            abandoned,
            batch_size,
            duration,
            in_flight,
            concurrency,
            rate_allowed,
            rate_interval,
        }))
    }

    pub(crate) fn stage(&self, pipeline: &str, stage: &str) -> StageMetrics {
        let count = |outcome| self.messages.with_label_values(&[pipeline, stage, outcome]);
        StageMetrics {
            name: stage.to_owned(),
            received: count("in"),
            sent: count("out"),
            failed: count("failed"),
            retried: count("retried"),
            dead_lettered: count("dead_lettered"),
            duration: self.duration.with_label_values(&[pipeline, stage]),
            in_flight: self.in_flight.with_label_values(&[pipeline, stage]),
            concurrency: self.concurrency.with_label_values(&[pipeline, stage]),
        }
    }

    pub(crate) fn rate_limit(&self, pipeline: &str) -> RateLimitMetrics {
        RateLimitMetrics {
            allowed: self.rate_allowed.with_label_values(&[pipeline]),
            interval: self.rate_interval.with_label_values(&[pipeline]),
        }
    }

    pub(crate) fn abandoned(&self, pipeline: &str) -> IntCounter {
        self.abandoned.with_label_values(&[pipeline])
    }

    pub(crate) fn batch_sizes(&self, pipeline: &str, batcher: &str) -> BatchSizeMetrics {
        let by = |t| self.batch_size.with_label_values(&[pipeline, batcher, t]);
        BatchSizeMetrics {
            size: by("size"),
            timeout: by("timeout"),
            flush: by("flush"),
            idle: by("idle"),
        }
    }
}

/// One stage's metric handles, resolved once so the hot path does no label look-ups.
#[derive(Clone)]
pub(crate) struct StageMetrics {
    pub name: String,
    pub received: IntCounter,
    pub sent: IntCounter,
    pub failed: IntCounter,
    pub retried: IntCounter,
    pub dead_lettered: IntCounter,
    pub duration: Histogram,
    pub in_flight: IntGauge,
    /// The stage's workers: what `topology()` reports, and what a resize moves.
    pub concurrency: IntGauge,
}

/// The rate limit in force, for dashboards.
#[derive(Clone)]
pub(crate) struct RateLimitMetrics {
    pub allowed: IntGauge,
    pub interval: Gauge,
}

impl RateLimitMetrics {
    pub fn show(&self, limit: Option<(usize, Duration)>) {
        let (allowed, interval) = limit.unwrap_or_default();
        self.allowed.set(i64::try_from(allowed).unwrap_or(i64::MAX));
        self.interval.set(interval.as_secs_f64());
    }
}

#[derive(Clone)]
pub(crate) struct BatchSizeMetrics {
    pub size: Histogram,
    pub timeout: Histogram,
    pub flush: Histogram,
    pub idle: Histogram,
}

/// What a stage is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Producer,
    Processor,
    Batcher,
    Sink,
}

/// One stage of a running pipeline.
#[derive(Clone, Debug, Serialize)]
pub struct StageTopology {
    pub name: String,
    pub kind: StageKind,
    pub concurrency: usize,
    /// Messages the stage holds right now.
    pub in_flight: i64,
}

/// A running pipeline's shape and load.
#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    pub pipeline: String,
    pub stages: Vec<StageTopology>,
    /// Messages handed out by producers and not yet acknowledged.
    pub in_flight: usize,
    pub in_flight_bound: usize,
    pub max_in_flight: usize,
}

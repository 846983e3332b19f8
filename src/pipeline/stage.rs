//! What every stage shares: the in-flight bound, the dead-letter sink, the totals, and the one
//! path by which a message leaves the pipeline (`settle`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::ack::acknowledge;
use super::flow::InFlight;
use super::message::Message;
use super::sink::DynDeadLetter;
use super::telemetry::StageMetrics;

pub(crate) struct Shared<T> {
    pub pipeline: String,
    pub in_flight: InFlight,
    pub dead_letter: Option<Arc<dyn DynDeadLetter<T>>>,
    pub produced: AtomicU64,
    pub successful: AtomicU64,
    pub failed: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Messages producers handed over while draining that still wait for a permit.
    pub held: AtomicUsize,
}

impl<T: Send + 'static> Shared<T> {
    pub fn new(
        pipeline: String,
        in_flight_bound: usize,
        dead_letter: Option<Arc<dyn DynDeadLetter<T>>>,
    ) -> Self {
        Self {
            pipeline,
            in_flight: InFlight::new(in_flight_bound),
            dead_letter,
            produced: AtomicU64::new(0),
            successful: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            held: AtomicUsize::new(0),
        }
    }

    /// Messages handed out by producers and not yet acknowledged.
    pub fn in_flight_now(&self) -> usize {
        let produced = self.produced.load(Ordering::Acquire);
        let settled = self.successful.load(Ordering::Acquire) + self.failed.load(Ordering::Acquire);
        produced.saturating_sub(settled) as usize
    }

    /// Ends the journey of `messages` at `stage`: retryable failures that ran out of attempts go
    /// to the dead-letter sink first, then everything is acknowledged and its permit freed.
    pub async fn settle(&self, stage: &StageMetrics, mut messages: Vec<Message<T>>) {
        let failed = messages.iter().filter(|m| m.is_failed()).count();
        if failed > 0 {
            stage.failed.inc_by(failed as u64);
            if let Some(dead_letter) = &self.dead_letter {
                let (mut exhausted, rest): (Vec<_>, Vec<_>) = messages
                    .into_iter()
                    .partition(|m| m.failure().is_some_and(|f| f.is_retryable()));
                if !exhausted.is_empty() {
                    dead_letter.dead_letter(&stage.name, &mut exhausted).await;
                    stage.dead_lettered.inc_by(exhausted.len() as u64);
                    self.dead_lettered
                        .fetch_add(exhausted.len() as u64, Ordering::Relaxed);
                }
                messages = exhausted;
                messages.extend(rest);
            }
        }
        let settled = acknowledge(messages);
        self.successful
            .fetch_add(settled.successful as u64, Ordering::Relaxed);
        self.failed
            .fetch_add(settled.failed as u64, Ordering::Relaxed);
        self.in_flight.release(settled.total());
    }
}

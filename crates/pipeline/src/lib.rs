//! The engine: producer → processor pool → batchers → sinks, with demand-driven backpressure,
//! per-message acknowledgement, retry, dead letters and a drain that loses nothing.
//!
//! It is modelled on Elixir's Broadway, and keeps Broadway's contract:
//!
//! - **Demand.** Processors ask producers for messages (`max_demand`, refilled at
//!   `min_demand`); a producer never hands out more than it was asked for, and the whole
//!   pipeline never holds more than its in-flight bound. A producer keeps hearing asks while it
//!   waits for in-flight permits or rate-limit tokens, and one with nothing to hand out pauses
//!   instead of spinning.
//! - **Acknowledgement.** Every message a producer hands out is acknowledged exactly once, after
//!   its last stage, and only after every sink it went to has it. Messages sharing an
//!   acknowledger are acknowledged together, once per chunk or batch.
//! - **Failure.** A failed message goes no further: it is retried if its failure is retryable
//!   and the stage's [`RetryPolicy`] allows, dead-lettered once attempts run out (permanent
//!   failures too, with [`PipelineBuilder::dead_letter_permanent`]), and acknowledged as
//!   failed. Without `partition_by`, a message waiting for its next attempt waits out of line and
//!   holds back nothing behind it; with it, it holds its worker, so order per key is kept.
//! - **Isolation.** Every user callback (`produce`, `drain`, the partition function, handlers,
//!   hooks, sinks, the dead-letter sink, acknowledgers) runs behind a panic guard, and every hook
//!   under its stage's timeout: a panic or a timeout fails only the messages it held, and the
//!   pipeline goes on. A panicking `produce` is called again after a pause.
//! - **Custody.** Wherever the engine holds messages, it holds them in a guard that, if they are
//!   ever dropped outside the ack path (an aborted task, a bug), acknowledges them as failed
//!   ("abandoned") and counts them in `thunderline_pipeline_abandoned_total` and
//!   [`PipelineStats::abandoned`]: no acknowledgement is ever lost silently.
//! - **Drain.** [`Pipeline::shutdown`] (or [`ShutdownHandle::shutdown`]) stops taking new
//!   messages, finishes everything already taken, flushes every open batch at once, cuts retry
//!   waits short (one last attempt, then dead letters), and acknowledges it all before its
//!   deadline; past the deadline it acknowledges what is left as failed and says how many.
//!
//! Time is added with checks: `Duration::MAX` (as a batch timeout, say) means "never".
//!
//! Beyond Broadway: retry with exponential backoff and full jitter (per processor pool and per
//! batcher), a dead-letter sink, fan-out to several batchers with one acknowledgement,
//! per-message timeouts, CPU-bound handlers on rayon, a hard bound on messages in flight, and
//! run-time control of a running pipeline: [`Pipeline::resize_processors`] and
//! [`Pipeline::resize_batcher`] under load (nothing lost, order per key kept),
//! [`Pipeline::set_rate_limit`] (effective at once), and a [`ShutdownHandle`] to drain it from
//! anywhere.
//!
//! Handlers fail a message with a [`Failure`], to which `?` converts the common errors
//! ([`FailureExt`] takes any other). [`testing`] pushes messages through a running pipeline and
//! awaits how each one ended, as Broadway's `test_message` and `test_batch` do.
//!
//! ```no_run
//! # use thunderline_pipeline::*;
//! struct Double;
//! impl Processor<u64> for Double {
//!     async fn handle_message(&self, m: &mut Message<u64>) -> Result<(), Failure> {
//!         m.data *= 2;
//!         Ok(())
//!     }
//! }
//! struct Print;
//! impl BatchSink<u64> for Print {
//!     async fn handle_batch(&self, b: &BatchInfo, ms: &mut [Message<u64>]) -> Result<(), Failure> {
//!         println!("{} messages ({})", ms.len(), b.trigger);
//!         Ok(())
//!     }
//! }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let (producer, push) = in_memory::<u64>(100);
//! let pipeline = Pipeline::builder("example")
//!     .producer(producer)
//!     .processor(Double, ProcessorConfig::default())
//!     .batcher(BatcherConfig::new("print"), Print)
//!     .start()?;
//! push.push(Message::new(21)).await?;
//! pipeline.shutdown().await?;
//! # Ok(()) }
//! ```

mod ack;
mod batcher;
mod builder;
mod error;
mod failure;
mod flow;
mod message;
mod pool;
mod processor;
mod producer;
mod retry;
mod running;
mod sink;
mod stage;
mod telemetry;
pub mod testing;

pub use ack::Acknowledger;
pub use batcher::{BatchInfo, Trigger};
pub use builder::{BatcherConfig, PipelineBuilder, ProcessorConfig};
pub use error::{ConfigError, PushError, ShutdownError};
pub use failure::{Failure, FailureExt};
pub use message::{BatchKey, BatchMode, BatcherName, Message, Metadata, Status};
pub use processor::{CpuProcessor, Processor};
pub use producer::{
    Demand, InMemoryProducer, Produced, Producer, PushHandle, PushPermit, in_memory,
};
pub use retry::{InvalidRetryPolicy, Jitter, RetryPolicy};
pub use running::{Pipeline, PipelineStats, ShutdownHandle};
pub use sink::{BatchSink, DeadLetterSink};
pub use telemetry::{PipelineMetrics, StageKind, StageTopology, Topology};

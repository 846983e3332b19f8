//! Thunderline: a staged event-processing engine (a Rust analogue of Elixir's Broadway) and the
//! real-time zone coordination it feeds.
//!
//! - [`pipeline`]: the engine — producers, processors, batchers, sinks, acknowledgement, retry,
//!   drain, telemetry. It knows nothing of zones.
//! - [`bench`]: the load-test harness behind `thunderline bench`.

pub mod bench;
pub mod pipeline;

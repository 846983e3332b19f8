//! Thunderline: a staged event-processing engine (a Rust analogue of Elixir's Broadway) and the
//! real-time zone coordination it feeds.
//!
//! - [`pipeline`]: the engine (the `thunderline-pipeline` crate) — producers, processors,
//!   batchers, sinks, acknowledgement, retry, drain, telemetry. It knows nothing of zones.
//! - [`zone`]: the zone rules (the `thunderline-zone` crate) — zones, permissions, resources,
//!   sessions, commands and events. Pure: no I/O, no clock, no randomness of its own.
//! - [`sources`]: broker producers (NATS JetStream, RabbitMQ) that settle each message with its
//!   broker once the pipeline is done with it. They know messages, not zones.
//! - [`store`]: zones and the audit log in PostgreSQL or embedded SQLite, and the audit-log sink.
//! - [`realtime`]: the Phoenix-Channels WebSocket server, zone topics, presence.
//! - [`runtime`]: live zones — their writers, registry, history, snapshots and timers, and the
//!   handle the front doors (sockets, the admin API, broker ingest) send commands through.
//! - [`daemon`]: configuration and the commands that wire the pieces together.
//! - [`bench`]: the load-test harness behind `thunderline bench`.
//! - [`redact`]: URLs without their credentials, for logs, errors and the API.

pub use thunderline_pipeline as pipeline;
pub use thunderline_zone as zone;

pub mod bench;
pub mod cluster;
pub mod daemon;
pub mod realtime;
pub mod redact;
pub mod runtime;
pub mod sources;
pub mod store;

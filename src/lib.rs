//! Thunderline: a staged event-processing engine (a Rust analogue of Elixir's Broadway) and the
//! real-time zone coordination it feeds.
//!
//! - [`pipeline`]: the engine — producers, processors, batchers, sinks, acknowledgement, retry,
//!   drain, telemetry. It knows nothing of zones.
//! - [`sources`]: broker producers (NATS JetStream, RabbitMQ) that settle each message with its
//!   broker once the pipeline is done with it. They know messages, not zones.
//! - [`zone`]: the domain — zones, permissions, resources, events. It knows nothing of storage
//!   or sockets.
//! - [`store`]: zones and the audit log in PostgreSQL or embedded SQLite, and the audit-log sink.
//! - [`realtime`]: the Phoenix-Channels WebSocket server, zone topics, presence.
//! - [`daemon`]: configuration and the commands that wire the pieces together.
//! - [`bench`]: the load-test harness behind `thunderline bench`.

pub mod bench;
pub mod daemon;
pub mod pipeline;
pub mod realtime;
pub mod sources;
pub mod store;
pub mod zone;

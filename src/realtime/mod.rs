//! Real time: a WebSocket server that speaks the Phoenix Channels protocol (V2 JSON), so the
//! official `phoenix` JavaScript client works against it unmodified; zone topics with presence;
//! and the topic sink that fans processed zone events out to subscribers.

pub mod channel;
pub mod hub;
pub mod protocol;
pub mod socket;
pub mod token;

pub use channel::{Command, Origin, TopicSink, ZoneWork};
pub use hub::{Hub, HubMetrics, Peer};
pub use socket::{SocketConfig, SocketContext, SocketMetrics};
pub use token::{Claims, TokenError, TokenSigner, random_secret};

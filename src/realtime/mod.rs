//! Real time: a WebSocket server that speaks the Phoenix Channels protocol (V2 JSON), so the
//! official `phoenix` JavaScript client works against it unmodified; zone topics with presence;
//! the topic sink that fans zone events out to subscribers; and the console's read-only admin
//! topic.
//!
//! It turns frames into zone commands and outcomes into frames; what the commands do is the
//! zone's business, and who applies them is the daemon's.

pub mod admission;
pub mod channel;
pub mod console;
pub mod hub;
mod migrate;
pub mod outlet;
pub mod protocol;
pub mod revocation;
pub mod socket;
pub mod token;
pub mod topic;

pub use channel::{Asked, SocketReply};
pub use console::{CONSOLE_TOPIC, ConsoleFeed};
pub use hub::{Hub, HubMetrics, Peer};
pub use socket::{Envelope, SocketConfig, SocketContext, SocketMetrics};
pub use token::{Claims, TicketClaims, TokenError, TokenSigner, random_secret};
pub use topic::{Broadcasts, TopicSink};

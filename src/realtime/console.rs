//! The console's topic, `admin:console`: read-only, joined with the admin token, it gets the
//! server's figures (a `stats` event) a few times a second until the channel is left or the
//! connection ends. What the figures are is the daemon's to say (it wires a [`ConsoleFeed`]);
//! the socket only checks the token and paces the pushes.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use super::hub::Peer;
use super::protocol;
use super::token::same;

pub const CONSOLE_TOPIC: &str = "admin:console";

/// What the console topic serves.
#[derive(Clone)]
pub struct ConsoleFeed {
    pub admin_token: String,
    /// The figures of the moment, as JSON.
    pub stats: Arc<dyn Fn() -> Value + Send + Sync>,
    /// How often they are pushed.
    pub every: Duration,
}

impl ConsoleFeed {
    /// Whether `token` is the admin token, compared in constant time.
    pub fn admits(&self, token: &str) -> bool {
        same(self.admin_token.as_bytes(), token.as_bytes())
    }

    /// Pushes `stats` to `peer` on the console topic every `every`, the first at once; ends
    /// when the connection does (or when the returned task is aborted: a leave).
    pub fn start(&self, peer: Peer, join_ref: Option<String>) -> JoinHandle<()> {
        let feed = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(feed.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let frame = protocol::encode(
                    join_ref.as_deref(),
                    None,
                    CONSOLE_TOPIC,
                    "stats",
                    &(feed.stats)(),
                );
                if !peer.send_text(frame) {
                    return;
                }
            }
        })
    }
}

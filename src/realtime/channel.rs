//! The zone channel: what a client's frames on `zone:<id>` ask for, as zone commands, and how
//! the outcome of each command comes back to the client as a reply.
//!
//! The socket turns a client event into a [`CommandKind`] with the one decoder brokers use too
//! ([`CommandKind::from_value`]); whoever applies commands (the zone's writer) tells the outcome
//! to a [`SocketReply`], which answers
//! the frame and keeps the connection's channel map right: a refused join leaves no trace.
//! Whether a channel is joined is the zone's to say: it holds the sessions, and sees a
//! channel's pushes after its join, in order, so a push behind a refused join is refused too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus::IntCounterVec;
use serde::Serialize;
use serde_json::json;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use uuid::Uuid;

use super::hub::{Peer, topic_name};
use super::protocol;
use super::topic::frames_for;
use crate::runtime::{Reply, ReplyTo};
use crate::zone::{Answer, Permissions, ZoneView};

/// A channel as its socket remembers it.
#[derive(Clone, Debug, PartialEq)]
pub struct Joined {
    pub join_ref: Option<String>,
    pub agent_id: String,
    /// The token's bits.
    pub perms: Permissions,
    /// When the token expires: the session ends then.
    pub expires_at: tokio::time::Instant,
    /// When the token was minted, for revocations ([`Claims::minted_us`]).
    ///
    /// [`Claims::minted_us`]: super::token::Claims::minted_us
    pub minted_us: i64,
    /// A `migrate` it asked for is under way: a second is refused, and the channel closes when
    /// it succeeds.
    pub migrating: bool,
}

/// A connection's channels by zone.
pub type Channels = HashMap<Uuid, Joined>;

/// What the client asked, as far as answering it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Asked {
    Join,
    /// `reply`: a `phx_leave` to answer (false when the connection dropped or a duplicate join
    /// replaced the channel).
    Leave {
        reply: bool,
    },
    Push,
}

/// Where a socket command's outcome goes: the frame that asked, on its connection.
pub struct SocketReply {
    pub peer: Peer,
    pub zone: Uuid,
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub asked: Asked,
    pub channels: Arc<Mutex<Channels>>,
    /// Join outcomes, by reason.
    pub joins: IntCounterVec,
    /// The connection's count of commands not answered yet: held until this one is.
    pub unanswered: Arc<()>,
}

impl SocketReply {
    /// Answers with an error that never reached the zone (overloaded, shutting down).
    pub fn refuse(&self, reason: &str, details: &str) {
        if self.asked == Asked::Join {
            self.forget_join();
            self.joins.with_label_values(&[reason]).inc();
        }
        if self.asked != (Asked::Leave { reply: false }) {
            self.send_error(reason, details);
        }
    }

    fn send_error(&self, reason: &str, details: &str) {
        self.peer.send_text(protocol::error_reply(
            self.join_ref.as_deref(),
            self.msg_ref.as_deref(),
            &topic_name(self.zone),
            reason,
            details,
        ));
    }

    /// A refused join leaves no channel behind, unless a newer join replaced it meanwhile.
    fn forget_join(&self) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if channels
            .get(&self.zone)
            .is_some_and(|j| j.join_ref == self.join_ref)
        {
            channels.remove(&self.zone);
        }
    }
}

/// An accepted command's answer as the client receives it, the `response` of its `phx_reply`:
/// `{}`, the zone (`{zone, agents, seq, epoch}`, with `recovered` after a join) or
/// `{"new_resources": …}`.
struct Response<'a> {
    answer: &'a Answer,
    recovered: bool,
}

impl Serialize for Response<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self.answer {
            Answer::Done => s.serialize_map(Some(0))?.end(),
            Answer::State(view) => view.serialize(s),
            Answer::Joined(view) => {
                #[derive(Serialize)]
                struct Joined<'a> {
                    #[serde(flatten)]
                    view: &'a ZoneView,
                    recovered: bool,
                }
                Joined {
                    view,
                    recovered: self.recovered,
                }
                .serialize(s)
            }
            // Only the admin API asks for it; shown as it would be.
            Answer::Sessions { seq, sessions } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("seq", seq)?;
                m.serialize_entry("sessions", sessions)?;
                m.end()
            }
            // The runtime's own questions during a migration; shown as they are.
            Answer::Located(located) => located.serialize(s),
            Answer::Reservation(held) => held.serialize(s),
            Answer::Applied(applied) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("applied", applied)?;
                m.end()
            }
            Answer::Resources(amounts) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("new_resources", amounts)?;
                m.end()
            }
        }
    }
}

/// A response as sent: `"duplicate": true` added when the command had been applied before (a
/// retry of the same idempotency key).
#[derive(Serialize)]
struct Answered<'a> {
    #[serde(flatten)]
    response: Response<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

impl ReplyTo for SocketReply {
    fn reply(&self, reply: &Reply) {
        let topic = topic_name(self.zone);
        match (self.asked, &reply.outcome.result) {
            (Asked::Leave { reply: false }, _) => {}
            (Asked::Leave { reply: true }, _) => {
                // A leave always succeeds for the client: the channel is closed either way.
                self.peer.send_text(protocol::reply(
                    self.join_ref.as_deref(),
                    self.msg_ref.as_deref(),
                    &topic,
                    true,
                    &json!({}),
                ));
                self.peer.send_text(protocol::encode(
                    self.join_ref.as_deref(),
                    self.join_ref.as_deref(),
                    &topic,
                    "phx_close",
                    &json!({}),
                ));
            }
            (asked, Ok(accepted)) => {
                if asked == Asked::Join {
                    self.joins.with_label_values(&["ok"]).inc();
                }
                let frame = protocol::reply(
                    self.join_ref.as_deref(),
                    self.msg_ref.as_deref(),
                    &topic,
                    true,
                    &Answered {
                        response: Response {
                            answer: &accepted.answer,
                            recovered: reply.recovered,
                        },
                        duplicate: accepted.duplicate,
                    },
                );
                self.peer.send_text(frame);
                // What a rejoin missed follows its reply, before anything newer: the connection
                // is subscribed only when the topic sink reaches the join's own event.
                // Only what its client would have received: an event filtered by interest
                // reaches the agent, or is not replayed.
                if !reply.missed.is_empty() {
                    let agent = {
                        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
                        channels.get(&self.zone).map(|j| j.agent_id.clone())
                    };
                    let frames: Vec<Utf8Bytes> = match agent {
                        Some(agent) => reply
                            .missed
                            .iter()
                            .flat_map(|e| frames_for(e, &agent))
                            .collect(),
                        None => Vec::new(),
                    };
                    if !frames.is_empty() {
                        self.peer.send_replay(Arc::from(frames));
                    }
                }
            }
            (asked, Err(refusal)) => {
                if asked == Asked::Join {
                    self.forget_join();
                    self.joins.with_label_values(&[refusal.reason()]).inc();
                }
                self.send_error(refusal.reason(), &refusal.to_string());
            }
        }
    }
}

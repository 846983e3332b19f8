//! The zone channel: what a client's frames on `zone:<id>` ask for, as zone commands, and how
//! the outcome of each command comes back to the client as a reply.
//!
//! The socket turns a client event into a [`CommandKind`] with the one decoder brokers use too
//! ([`CommandKind::from_value`]); whoever applies commands (the zone's writer) tells the outcome
//! to a [`SocketReply`], which answers
//! the frame and keeps the connection's channel map right: a refused join leaves no trace.
//! Whether a channel is joined is the zone's to say: it holds the sessions, and sees a
//! channel's pushes after its join, in order, so a push behind a refused join is refused too.

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

/// A connection's channels by zone: a few at most (Phoenix allows 100, a client holds one or
/// two), so a list, looked through; a hash map would take ~470 bytes for its first one.
#[derive(Debug, Default)]
pub struct Channels(Vec<(Uuid, Joined)>);

impl Channels {
    pub fn new() -> Self {
        Self::default()
    }

    fn position(&self, zone: &Uuid) -> Option<usize> {
        self.0.iter().position(|(z, _)| z == zone)
    }

    pub fn get(&self, zone: &Uuid) -> Option<&Joined> {
        self.0.iter().find(|(z, _)| z == zone).map(|(_, j)| j)
    }

    pub fn get_mut(&mut self, zone: &Uuid) -> Option<&mut Joined> {
        self.0.iter_mut().find(|(z, _)| z == zone).map(|(_, j)| j)
    }

    /// Sets `zone`'s channel; returns the one it replaced.
    pub fn insert(&mut self, zone: Uuid, joined: Joined) -> Option<Joined> {
        match self.get_mut(&zone) {
            Some(held) => Some(std::mem::replace(held, joined)),
            None => {
                self.push(zone, joined);
                None
            }
        }
    }

    /// `zone`'s channel, made with `joined` if there is none.
    pub fn get_or_insert_with(
        &mut self,
        zone: Uuid,
        joined: impl FnOnce() -> Joined,
    ) -> &mut Joined {
        let at = match self.position(&zone) {
            Some(at) => at,
            None => {
                self.push(zone, joined());
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    fn push(&mut self, zone: Uuid, joined: Joined) {
        // Room for one more, not the four a vector takes at first.
        self.0.reserve_exact(1);
        self.0.push((zone, joined));
    }

    pub fn remove(&mut self, zone: &Uuid) -> Option<Joined> {
        let at = self.position(zone)?;
        let (_, joined) = self.0.swap_remove(at);
        if self.0.is_empty() {
            // A connection that left its channels holds nothing for them.
            self.0 = Vec::new();
        }
        Some(joined)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &Joined)> {
        self.0.iter().map(|(z, j)| (z, j))
    }

    pub fn values(&self) -> impl Iterator<Item = &Joined> {
        self.0.iter().map(|(_, j)| j)
    }

    /// Every channel, leaving none.
    pub fn drain(&mut self) -> impl Iterator<Item = (Uuid, Joined)> {
        std::mem::take(&mut self.0).into_iter()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn joined(join_ref: &str) -> Joined {
        Joined {
            join_ref: Some(join_ref.to_owned()),
            agent_id: "a".to_owned(),
            perms: Permissions::default(),
            expires_at: tokio::time::Instant::now(),
            minted_us: 0,
            migrating: false,
        }
    }

    fn r(joined: Option<Joined>) -> Option<String> {
        joined.and_then(|j| j.join_ref)
    }

    #[test]
    fn a_zone_holds_one_channel_and_an_emptied_map_holds_nothing() {
        let (one, two) = (Uuid::now_v7(), Uuid::now_v7());
        let s = |x: &str| Some(x.to_owned());
        let mut channels = Channels::new();
        assert_eq!(r(channels.insert(one, joined("1"))), None);
        assert_eq!(r(channels.insert(two, joined("2"))), None);
        assert_eq!(r(channels.insert(one, joined("3"))), s("1"), "replaced");
        assert_eq!(channels.len(), 2);
        assert_eq!(r(channels.get(&one).cloned()), s("3"));
        let kept = channels.get_or_insert_with(two, || joined("4"));
        assert_eq!(kept.join_ref, s("2"));
        assert_eq!(r(channels.remove(&one)), s("3"));
        assert_eq!(r(channels.remove(&one)), None);
        assert_eq!(r(channels.remove(&two)), s("2"));
        assert!(channels.is_empty());
        assert_eq!(channels.0.capacity(), 0);
        channels.get_or_insert_with(one, || joined("5"));
        assert_eq!(
            channels.drain().map(|(z, _)| z).collect::<Vec<_>>(),
            vec![one]
        );
        assert!(channels.is_empty());
    }
}

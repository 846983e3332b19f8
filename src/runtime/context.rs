//! What the zone rules are given and cannot make themselves: the time, fresh ids for commands and
//! events, and new epochs. Read and minted here, in the runtime, so that the rules stay pure and
//! the same commands in the same contexts give the same events.

use chrono::{DateTime, SubsecRound, Utc};
use uuid::Uuid;

use crate::zone::{Actor, BroadcastLimit, CommandKind, Context, ZoneCommand};

/// The current time at the precision every store keeps (microseconds), so that what is stored
/// is exactly what comes back.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// A command for `zone_id` with a fresh id (a UUID v7: ids sort in the order they were made).
pub fn command(zone_id: Uuid, actor: Actor, kind: CommandKind) -> ZoneCommand {
    ZoneCommand::new(Uuid::now_v7(), zone_id, actor, kind)
}

/// A fresh epoch, for a zone whose history starts again (its log was found with a hole): 32 hex
/// digits.
pub fn new_epoch() -> String {
    Uuid::new_v4().simple().to_string()
}

/// The server's limits every decision is held to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Custom broadcasts allowed per zone.
    pub broadcast_limit: Option<BroadcastLimit>,
    /// The most sessions one agent may hold in one zone.
    pub max_sessions_per_agent: Option<u32>,
}

impl Limits {
    /// The context of one command applied now: the time, and fresh ids for its events.
    pub fn context(self, now: DateTime<Utc>) -> Context {
        Context {
            broadcast_limit: self.broadcast_limit,
            max_sessions_per_agent: self.max_sessions_per_agent,
            ..Context::new(now, Uuid::now_v7())
        }
    }
}

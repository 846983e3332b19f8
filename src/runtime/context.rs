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

/// The most characters an idempotency key may have.
pub const IDEMPOTENCY_KEY_CHARS: usize = 64;

/// The id of a command a client marked with `key`: the same for the same key of the same agent
/// in the same zone, whichever node or connection it comes through, so that the zone (which
/// applies an id once) applies a retried command at most once and answers it with its first
/// outcome. A UUID v8 of the SHA-256 of the three, each length-prefixed.
pub fn keyed_command_id(zone_id: Uuid, agent_id: &str, key: &str) -> Uuid {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    hash.update(zone_id.as_bytes());
    for part in [agent_id, key] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
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

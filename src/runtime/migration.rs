//! Moving agents between zones: drives a [`Migration`]'s steps through the zones' writers, one
//! command at a time, each answered (durably, with durable replies) before the next is sent.
//! The zones may be written on this node or on others (a cluster forwards each step to its
//! zone's owner like any command), and no writer ever waits on another: the steps are awaited
//! here. One migration of a session (or of a service's agent) runs at a time; a second is
//! refused `migration_pending` while it does, but a retry of the one under way (the same id and
//! destination: a client that timed out, a broker that redelivered) waits for it and is answered
//! as it is.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use uuid::Uuid;

use super::{AskError, ZoneHandle, now};
use crate::zone::{Migrated, Migration, Mover, ZoneError};

/// How long a step waits for room in the zone pipeline.
const ROOM: Duration = Duration::from_secs(5);
/// How long a step waits for its zone's answer.
const ANSWER: Duration = Duration::from_secs(10);

/// One migration asked for.
#[derive(Clone, Debug)]
pub struct MigrationRequest {
    /// Its id: a retry under the same id is the same migration.
    pub id: Uuid,
    pub from: Uuid,
    pub to: Uuid,
    pub agent_id: String,
    pub mover: Mover,
}

/// Runs migrations; see the module documentation.
pub struct Migrations {
    zones: ZoneHandle,
    /// How long a place is held for the agent in the zone it moves to.
    ticket_ttl: Duration,
    /// The sessions being moved now, and their migrations.
    pending: Mutex<HashMap<Session, UnderWay>>,
}

/// A session moved by a migration: its zone, its agent and its connection (a service's agent
/// has none).
type Session = (Uuid, String, Option<String>);

/// How a migration ended, once it has.
type Ending = Option<Result<Migrated, ZoneError>>;

/// A migration under way.
struct UnderWay {
    id: Uuid,
    to: Uuid,
    ended: watch::Receiver<Ending>,
}

/// Takes a session out of the pending set however its migration ends (its caller gone
/// included: a retry waiting for it then carries it on).
struct PendingGuard<'a> {
    pending: &'a Mutex<HashMap<Session, UnderWay>>,
    key: Session,
    ended: watch::Sender<Ending>,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if pending
            .get(&self.key)
            .is_some_and(|w| w.ended.same_channel(&self.ended.subscribe()))
        {
            pending.remove(&self.key);
        }
    }
}

impl Migrations {
    pub fn new(zones: ZoneHandle, ticket_ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            zones,
            ticket_ttl,
            pending: Mutex::default(),
        })
    }

    /// How long a place is held for a migrating agent.
    pub fn ticket_ttl(&self) -> Duration {
        self.ticket_ttl
    }

    /// Moves the agent: its place in `to` held, its sessions in `from` ended, and, for a
    /// service's agent, its sessions in `to` begun. Refused as the zones refuse it, or
    /// `migration_pending`, `same_zone`; `unavailable` when a step got no answer (a retry under
    /// the same id finishes it or is told how it ended).
    pub async fn migrate(&self, request: MigrationRequest) -> Result<Migrated, ZoneError> {
        if request.from == request.to {
            return Err(ZoneError::SameZone);
        }
        let connection = match &request.mover {
            Mover::Agent { connection, .. } => Some(connection.clone()),
            Mover::Service => None,
        };
        let key = (request.from, request.agent_id.clone(), connection);
        let guard = loop {
            let mut under_way = {
                let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
                match pending.get(&key) {
                    Some(w) if w.id == request.id && w.to == request.to => w.ended.clone(),
                    Some(_) => return Err(ZoneError::MigrationPending),
                    None => {
                        let (ended, watch) = watch::channel(None);
                        pending.insert(
                            key.clone(),
                            UnderWay {
                                id: request.id,
                                to: request.to,
                                ended: watch,
                            },
                        );
                        break PendingGuard {
                            pending: &self.pending,
                            key,
                            ended,
                        };
                    }
                }
            };
            // The same migration, under way: its ending is this one's. Dropped part way (its
            // caller went away), it is carried on from here.
            if let Ok(ending) = under_way.wait_for(Option::is_some).await
                && let Some(ending) = ending.clone()
            {
                return ending;
            }
        };
        let ending = self.run(request).await;
        guard.ended.send_replace(Some(ending.clone()));
        ending
    }

    /// Drives the migration's steps to their end.
    async fn run(&self, request: MigrationRequest) -> Result<Migrated, ZoneError> {
        let expires_at = expiry(now(), self.ticket_ttl);
        let mut migration = Migration::new(
            request.id,
            request.from,
            request.to,
            request.agent_id,
            request.mover,
            expires_at,
        );
        loop {
            let command = migration.next();
            let outcome = match self.zones.ask(command, ROOM, ANSWER).await {
                Ok(outcome) => outcome.result,
                Err(e @ (AskError::Overloaded | AskError::ShuttingDown | AskError::NoAnswer)) => {
                    Err(ZoneError::Unavailable(format!(
                        "the migration stopped part way ({e}): retry it under the same id"
                    )))
                }
            };
            if let Some(end) = migration.advance(outcome) {
                return end;
            }
        }
    }
}

fn expiry(now: DateTime<Utc>, ttl: Duration) -> DateTime<Utc> {
    now + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::seconds(10))
}

//! Agents moving between zones: the places a zone holds for agents on their way in, and what a
//! migration's steps ask of each zone. A migration from A to B is three commands, each decided by
//! one zone's writer: B *reserves* a place ([`Reservation`], counted against its capacity until
//! it is used, released or expires), A ends the agent's sessions (*depart*), and B turns the
//! reservation into sessions (*arrive*: a ticket's join, or at once for a service's agent).
//! Between the steps the agent is in A, or reserved in B, never in both and never in neither
//! while its reservation lasts; each step's command id is derived from the migration's, so a
//! migration retried is each step retried, which a zone applies at most once.
//!
//! Expiry needs no event: a reservation counts while `expires_at` is after the time of the
//! decision, and is forgotten by the first event after it (replay forgets it at the same event).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::command::{Actor, CommandKind, ZoneCommand};
use super::error::ZoneError;
use super::event::Position;
use super::permissions::Permissions;
use super::state::{Accepted, Answer};

/// Places a zone holds for an agent coming from zone `from`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reservation {
    /// Its id: what a ticket names.
    pub reservation: Uuid,
    pub agent_id: String,
    pub from: Uuid,
    /// The sessions it becomes, one place each (a service's agent, moved with its sessions);
    /// none for a ticket: one place, for whichever connection joins with it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<String>,
    /// The agent's last position in `from`, if it had one.
    #[serde(default)]
    pub position: Option<Position>,
    pub expires_at: DateTime<Utc>,
}

impl Reservation {
    /// How many places it holds.
    pub fn places(&self) -> usize {
        self.connections.len().max(1)
    }

    /// Whether it still holds its places at `now`.
    pub fn live_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at > now
    }
}

/// `migration_released`: a reservation's places given back before it was used (its migration
/// did not happen: the agent was no longer in the zone it came from).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Released {
    pub reservation: Uuid,
    pub agent_id: String,
}

/// Where an agent is in a zone, for a migration's first look (`locate`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Located {
    /// The connections holding its sessions here.
    pub connections: Vec<String>,
    /// Its last position here.
    pub position: Option<Position>,
}

/// The id of one step of migration `migration`: the same for the same migration, so a retried
/// migration retries each step under the id the zone remembers (a UUID v5 named by the step in
/// the migration's namespace).
pub fn step_id(migration: Uuid, step: &str) -> Uuid {
    Uuid::new_v5(&migration, step.as_bytes())
}

/// Who is moved.
#[derive(Clone, Debug, PartialEq)]
pub enum Mover {
    /// An agent's session on a connection, with its token's bits in the zone it leaves: it
    /// joins the other zone itself, with a ticket.
    Agent {
        connection: String,
        permissions: Permissions,
    },
    /// A service's agent (the admin API, a broker): every session it has in the zone it
    /// leaves becomes a session in the other at once.
    Service,
}

/// How a migration ended well: the place held for the agent, and whether it had been carried
/// out before (a retry, answered again).
#[derive(Clone, Debug, PartialEq)]
pub struct Migrated {
    pub reservation: Uuid,
    /// When the place held for the agent runs out (already past when it is gone: used by the
    /// ticket, or expired).
    pub expires_at: DateTime<Utc>,
    pub duplicate: bool,
}

/// Where a migration is.
#[derive(Clone, Debug, PartialEq)]
enum Step {
    Locate,
    /// The agent is not in the zone it leaves: did it leave under this migration (a retry)?
    Departed,
    /// It did: is its place still held?
    Held,
    Reserve(Box<Reservation>),
    Depart(Box<Reservation>),
    Arrive(Box<Reservation>, Vec<String>),
    Release(ZoneError),
}

/// One migration's steps, as a machine the runtime drives: [`next`](Self::next) is the command
/// to ask (of the zone it names), [`advance`](Self::advance) takes its outcome and says whether
/// the migration is over. Each step's command id comes from the migration's id
/// ([`step_id`]), so the same migration driven again (a retry) asks the same commands, which
/// each zone applies once.
///
/// The order keeps the agent somewhere at every point: the zone it goes to holds its place
/// before the zone it leaves ends its sessions, and the place is given back only when the
/// departure was refused (nothing left). A departure whose outcome is unknown (unavailable)
/// keeps the place until it expires, so an agent that did leave can still arrive.
#[derive(Clone, Debug)]
pub struct Migration {
    id: Uuid,
    from: Uuid,
    to: Uuid,
    agent_id: String,
    mover: Mover,
    expires_at: DateTime<Utc>,
    step: Step,
    /// The agent was found in the zone it leaves (so a departure that did not happen was not
    /// for want of it).
    located: bool,
}

impl Migration {
    /// Migration `id` of `agent_id` from zone `from` to zone `to`; a place held for it lasts
    /// until `expires_at`.
    pub fn new(
        id: Uuid,
        from: Uuid,
        to: Uuid,
        agent_id: String,
        mover: Mover,
        expires_at: DateTime<Utc>,
    ) -> Self {
        Self {
            id,
            from,
            to,
            agent_id,
            mover,
            expires_at,
            step: Step::Locate,
            located: false,
        }
    }

    /// Who is moved.
    pub fn mover(&self) -> &Mover {
        &self.mover
    }

    /// The reservation's id (what a ticket names): the same for the same migration.
    pub fn reservation_id(&self) -> Uuid {
        step_id(self.id, "reservation")
    }

    /// The command to ask now.
    pub fn next(&self) -> ZoneCommand {
        let system = |zone: Uuid, step: &str, kind: CommandKind| {
            ZoneCommand::new(step_id(self.id, step), zone, Actor::System, kind)
        };
        let reservation = self.reservation_id();
        match &self.step {
            Step::Locate => system(
                self.from,
                "locate",
                CommandKind::Locate {
                    agent_id: self.agent_id.clone(),
                },
            ),
            Step::Departed => system(
                self.from,
                "departed",
                CommandKind::Applied {
                    command: step_id(self.id, "depart"),
                },
            ),
            Step::Held => system(self.to, "held", CommandKind::GetReservation { reservation }),
            Step::Reserve(r) => system(self.to, "reserve", CommandKind::Reserve(r.clone())),
            Step::Depart(r) => {
                let kind = CommandKind::Depart {
                    agent_id: self.agent_id.clone(),
                    to: self.to,
                    reservation,
                    connections: r.connections.clone(),
                    until: r.expires_at,
                };
                let actor = match &self.mover {
                    Mover::Agent {
                        connection,
                        permissions,
                    } => Actor::Agent {
                        agent_id: self.agent_id.clone(),
                        connection: connection.clone(),
                        permissions: *permissions,
                    },
                    Mover::Service => Actor::System,
                };
                ZoneCommand::new(step_id(self.id, "depart"), self.from, actor, kind)
            }
            Step::Arrive(_, connections) => system(
                self.to,
                "arrive",
                CommandKind::Arrive {
                    reservation,
                    connections: connections.clone(),
                },
            ),
            Step::Release(_) => system(self.to, "release", CommandKind::Release { reservation }),
        }
    }

    /// Takes the outcome of [`next`](Self::next)'s command: `None` while the migration goes
    /// on, its end once it is over.
    pub fn advance(
        &mut self,
        outcome: Result<Accepted, ZoneError>,
    ) -> Option<Result<Migrated, ZoneError>> {
        let step = std::mem::replace(&mut self.step, Step::Locate);
        let done = |r: &Reservation, duplicate: bool| {
            Some(Ok(Migrated {
                reservation: r.reservation,
                expires_at: r.expires_at,
                duplicate,
            }))
        };
        let accepted = match (outcome, step) {
            // Told the departure's refusal whether or not the place was given back (one not
            // given back expires).
            (_, Step::Release(original)) => return Some(Err(original)),
            (Err(ZoneError::NotInZone { .. }), Step::Depart(_)) => {
                let refusal = ZoneError::NotInZone {
                    agent_id: self.agent_id.clone(),
                };
                self.step = Step::Release(refusal);
                return None;
            }
            (Err(refusal), _) => return Some(Err(refusal)),
            (Ok(accepted), step) => (accepted, step),
        };
        match accepted {
            (accepted, Step::Locate) => {
                let Answer::Located(located) = accepted.answer else {
                    return Some(Err(unexpected("locate")));
                };
                let connections = match &self.mover {
                    Mover::Agent { connection, .. } => {
                        if !located.connections.contains(connection) {
                            self.step = Step::Departed;
                            return None;
                        }
                        Vec::new()
                    }
                    Mover::Service if located.connections.is_empty() => {
                        self.step = Step::Departed;
                        return None;
                    }
                    Mover::Service => located.connections,
                };
                self.located = true;
                self.step = Step::Reserve(Box::new(Reservation {
                    reservation: self.reservation_id(),
                    agent_id: self.agent_id.clone(),
                    from: self.from,
                    connections,
                    position: located.position,
                    expires_at: self.expires_at,
                }));
                None
            }
            // Not in the zone it leaves: a retry of this migration, once it left, is told the
            // same again (a service's agent is brought the rest of the way).
            (accepted, Step::Departed) => {
                if accepted.answer == Answer::Applied(true) {
                    self.step = Step::Held;
                    None
                } else if self.located {
                    // Reserved under this id before, and the place ran out unused.
                    Some(Err(ZoneError::Unavailable(
                        "the place this migration held ran out before the agent left: ask again under another key".to_owned(),
                    )))
                } else {
                    Some(Err(ZoneError::NotInZone {
                        agent_id: self.agent_id.clone(),
                    }))
                }
            }
            (accepted, Step::Held) => match (accepted.answer, &self.mover) {
                (Answer::Reservation(Some(r)), Mover::Service) => {
                    self.step = Step::Arrive(r, Vec::new());
                    None
                }
                (Answer::Reservation(Some(r)), Mover::Agent { .. }) => done(&r, true),
                // Used or expired since: done before, and its ticket ended already.
                _ => Some(Ok(Migrated {
                    reservation: self.reservation_id(),
                    expires_at: DateTime::<Utc>::UNIX_EPOCH,
                    duplicate: true,
                })),
            },
            (accepted, Step::Reserve(_)) => {
                if let Answer::Reservation(Some(r)) = accepted.answer {
                    self.step = Step::Depart(r);
                } else {
                    // Made before, and gone since (used, released or expired): whether this
                    // migration was carried out is the departure's to say.
                    self.step = Step::Departed;
                }
                None
            }
            (accepted, Step::Depart(r)) => match (&self.mover, accepted.answer) {
                (Mover::Agent { .. }, _) => done(&r, accepted.duplicate),
                (Mover::Service, Answer::Located(left)) => {
                    self.step = Step::Arrive(r, left.connections);
                    None
                }
                (Mover::Service, _) => Some(Err(unexpected("depart"))),
            },
            (accepted, Step::Arrive(r, _)) => done(&r, accepted.duplicate),
            (_, Step::Release(original)) => Some(Err(original)),
        }
    }
}

fn unexpected(step: &str) -> ZoneError {
    ZoneError::Unavailable(format!(
        "the zone answered the migration's {step} unexpectedly"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ids_differ_by_step_and_migration_and_repeat() {
        let a = Uuid::now_v7();
        let b = Uuid::now_v7();
        assert_eq!(step_id(a, "reserve"), step_id(a, "reserve"));
        assert_ne!(step_id(a, "reserve"), step_id(a, "depart"));
        assert_ne!(step_id(a, "reserve"), step_id(b, "reserve"));
        assert_ne!(step_id(a, "reserve"), a);
    }
}

//! Agents moving between zones: random interleavings of joins, leaves, disconnects, migrations
//! (both ways, concurrent, retried under the same id, by agents and by services), ticket joins
//! (by their agent, by another, twice, late), the clock running out reservations and crashes
//! (every zone rebuilt from its log, its sessions expired, migrations under way abandoned), over
//! several zones. After every step: no agent holds sessions in two zones, no zone holds more
//! places than its capacity (reservations included), each zone's count is its sessions, a
//! reservation is used at most once, and an agent that left for a zone whose place is still
//! valid has that place held. Each zone's log rebuilds it exactly.

use std::collections::BTreeSet;

use chrono::{DateTime, Duration, TimeZone, Utc};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use thunderline_zone::*;
use uuid::Uuid;

const ZONES: usize = 3;
const AGENTS: usize = 4;
/// How long a place is held, in ms.
const TTL: i64 = 10_000;

#[derive(Clone, Debug)]
enum Op {
    Join {
        agent: usize,
        zone: usize,
    },
    Leave {
        agent: usize,
    },
    Disconnect {
        agent: usize,
    },
    /// Starts a migration of `agent` (by itself, or as a service's agent) to `to`; `retry`
    /// picks an earlier migration's id to use again.
    Migrate {
        agent: usize,
        to: usize,
        service: bool,
        retry: Option<usize>,
    },
    /// One step of the `n`th migration under way.
    Step {
        n: usize,
    },
    /// A ticket join with the `n`th ticket issued, by `agent` (perhaps not the ticket's).
    Ticket {
        n: usize,
        agent: usize,
    },
    Advance {
        ms: i64,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..AGENTS, 0..ZONES).prop_map(|(agent, zone)| Op::Join { agent, zone }),
        1 => (0..AGENTS).prop_map(|agent| Op::Leave { agent }),
        1 => (0..AGENTS).prop_map(|agent| Op::Disconnect { agent }),
        3 => (0..AGENTS, 0..ZONES, any::<bool>(), proptest::option::weighted(0.3, 0..8usize))
            .prop_map(|(agent, to, service, retry)| Op::Migrate { agent, to, service, retry }),
        8 => (0..6usize).prop_map(|n| Op::Step { n }),
        3 => (0..6usize, 0..AGENTS).prop_map(|(n, agent)| Op::Ticket { n, agent }),
        1 => prop_oneof![Just(1_000i64), Just(6_000), Just(11_000)].prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Crash),
    ]
}

struct Zone {
    state: ZoneState,
    log: Vec<ZoneEvent>,
}

/// A migration under way.
struct Running {
    migration: Migration,
    agent: usize,
    to: usize,
}

struct World {
    now: DateTime<Utc>,
    zones: Vec<Zone>,
    /// Each agent's current connection (a disconnect starts a new one).
    incarnation: [u32; AGENTS],
    running: Vec<Running>,
    /// Every migration id started, for retries.
    ids: Vec<(Uuid, usize, usize, usize)>,
    /// Tickets issued: reservation, zone, agent, expiry.
    tickets: Vec<(Uuid, usize, usize, DateTime<Utc>)>,
    next_id: u128,
}

fn agent_id(agent: usize) -> String {
    format!("agent-{agent}")
}

impl World {
    fn new(capacities: &[u32]) -> Self {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let mut world = Self {
            now,
            zones: Vec::new(),
            incarnation: [0; AGENTS],
            running: Vec::new(),
            ids: Vec::new(),
            tickets: Vec::new(),
            next_id: 1,
        };
        for (i, capacity) in capacities.iter().enumerate() {
            let id = Uuid::from_u128(0x7000 + i as u128);
            world.zones.push(Zone {
                state: ZoneState::absent(id),
                log: Vec::new(),
            });
            let spec = NewZone {
                name: format!("zone {i}"),
                capacity: Some(*capacity),
                assigned_server: Some("n".into()),
                ..NewZone::default()
            };
            world
                .run(i, Actor::Admin, CommandKind::CreateZone(Box::new(spec)))
                .expect("created");
        }
        world
    }

    fn fresh(&mut self) -> Uuid {
        self.next_id += 1;
        Uuid::from_u128(self.next_id << 64)
    }

    fn zone_of(&self, id: Uuid) -> usize {
        self.zones
            .iter()
            .position(|z| z.state.id() == id)
            .expect("a zone of the world")
    }

    fn connection(&self, agent: usize) -> String {
        format!("conn-{agent}.{}", self.incarnation[agent])
    }

    fn actor(&self, agent: usize) -> Actor {
        Actor::Agent {
            agent_id: agent_id(agent),
            connection: self.connection(agent),
            permissions: Permissions::all(),
        }
    }

    fn execute(&mut self, command: &ZoneCommand) -> Result<Accepted, ZoneError> {
        let ctx = Context::new(self.now, self.fresh());
        let zone = self.zone_of(command.zone_id);
        let z = &mut self.zones[zone];
        let outcome = z.state.execute(command, &ctx);
        if let Ok(accepted) = &outcome.result {
            z.log.extend(accepted.events.iter().cloned());
        }
        outcome.result
    }

    fn run(&mut self, zone: usize, actor: Actor, kind: CommandKind) -> Result<Accepted, ZoneError> {
        let command = ZoneCommand::new(self.fresh(), self.zones[zone].state.id(), actor, kind);
        self.execute(&command)
    }

    /// The zones where `agent` holds a session (any connection).
    fn sessions_of(&self, agent: usize) -> Vec<usize> {
        let id = agent_id(agent);
        (0..self.zones.len())
            .filter(|&z| {
                self.zones[z]
                    .state
                    .sessions()
                    .any(|(k, _)| k.agent_id == id)
            })
            .collect()
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            // A client that keeps to the protocol joins only while it is in no zone (and not
            // on its way into one as a service's agent: its channel was closed as `migrated`).
            Op::Join { agent, zone } => {
                let moving = self.zones.iter().any(|z| {
                    z.state.reservations().any(|r| {
                        r.agent_id == agent_id(agent)
                            && !r.connections.is_empty()
                            && r.live_at(self.now)
                    })
                });
                if self.sessions_of(agent).is_empty() && !moving {
                    let _ = self.run(zone, self.actor(agent), CommandKind::Join);
                }
            }
            Op::Leave { agent } => {
                for zone in self.sessions_of(agent) {
                    let _ = self.run(zone, self.actor(agent), CommandKind::Leave);
                }
            }
            Op::Disconnect { agent } => {
                for zone in self.sessions_of(agent) {
                    let _ = self.run(zone, self.actor(agent), CommandKind::Leave);
                }
                self.incarnation[agent] += 1;
            }
            Op::Migrate {
                agent,
                to,
                service,
                retry,
            } => {
                let (id, agent, to, service) = match retry.and_then(|n| self.ids.get(n)).copied() {
                    Some((id, agent, to, service)) => (id, agent, to, service == 1),
                    None => (self.fresh(), agent, to, service),
                };
                // From where it is (or the first zone, to be refused).
                let from = self.sessions_of(agent).first().copied().unwrap_or(0);
                let mover = if service {
                    Mover::Service
                } else {
                    Mover::Agent {
                        connection: self.connection(agent),
                        permissions: Permissions::all(),
                    }
                };
                let migration = Migration::new(
                    id,
                    self.zones[from].state.id(),
                    self.zones[to].state.id(),
                    agent_id(agent),
                    mover,
                    self.now + Duration::milliseconds(TTL),
                );
                if retry.is_none() {
                    self.ids.push((id, agent, to, usize::from(service)));
                }
                self.running.push(Running {
                    migration,
                    agent,
                    to,
                });
            }
            Op::Step { n } => {
                if n >= self.running.len() {
                    return;
                }
                let command = self.running[n].migration.next();
                let outcome = self.execute(&command);
                if let Some(end) = self.running[n].migration.advance(outcome) {
                    let done = self.running.remove(n);
                    if let (Ok(migrated), Mover::Agent { .. }) = (end, done.migration.mover()) {
                        self.tickets.push((
                            migrated.reservation,
                            done.to,
                            done.agent,
                            migrated.expires_at,
                        ));
                    }
                }
            }
            Op::Ticket { n, agent } => {
                let Some(&(reservation, zone, owner, _)) = self.tickets.get(n) else {
                    return;
                };
                // Its own agent uses it only while in no zone; anyone else may try.
                if agent == owner && !self.sessions_of(agent).is_empty() {
                    return;
                }
                let result = self.run(
                    zone,
                    self.actor(agent),
                    CommandKind::Arrive {
                        reservation,
                        connections: Vec::new(),
                    },
                );
                if agent != owner {
                    assert!(
                        matches!(result, Err(ZoneError::InvalidTicket(_))),
                        "another agent's ticket is refused: {result:?}"
                    );
                }
            }
            Op::Advance { ms } => self.now += Duration::milliseconds(ms),
            Op::Crash => {
                self.running.clear();
                for zone in 0..self.zones.len() {
                    let id = self.zones[zone].state.id();
                    let rebuilt = ZoneState::replay(id, &self.zones[zone].log).expect("replays");
                    assert_eq!(
                        rebuilt, self.zones[zone].state,
                        "the log rebuilds zone {zone}"
                    );
                    let mut state = ZoneState::from_snapshot(rebuilt.snapshot());
                    for e in &self.zones[zone].log {
                        if let Some(c) = e.command_id {
                            state.remember_applied(c, e.seq);
                        }
                    }
                    self.zones[zone].state = state;
                    let _ = self.run(zone, Actor::System, CommandKind::ExpireSessions);
                }
                for agent in 0..AGENTS {
                    self.incarnation[agent] += 1;
                }
            }
        }
    }

    fn check(&self) {
        for agent in 0..AGENTS {
            let zones = self.sessions_of(agent);
            assert!(
                zones.len() <= 1,
                "agent {agent} holds sessions in zones {zones:?}"
            );
        }
        let mut used = BTreeSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            let state = &z.state;
            let capacity = state.zone().capacity as usize;
            assert!(
                state.places_taken(self.now) <= capacity,
                "zone {i}: {} places taken of {capacity}",
                state.places_taken(self.now)
            );
            assert_eq!(
                state.zone().active_session_count as usize,
                state.session_count()
            );
            let mut sessions = 0i64;
            for e in &z.log {
                match &e.kind {
                    EventKind::AgentEntered(p) => {
                        sessions += 1;
                        if let Some(r) = p.reservation {
                            assert!(
                                used.insert((r, p.connection.clone())),
                                "reservation {r} used twice"
                            );
                        }
                    }
                    EventKind::AgentLeft(_) => sessions -= 1,
                    EventKind::ZoneDeleted(_) => sessions = 0,
                    _ => {}
                }
            }
            assert_eq!(
                sessions as usize,
                state.session_count(),
                "zone {i}: its log's count"
            );
        }
        // An agent that left for a zone whose place is valid and unused has the place.
        for (reservation, zone, _, expires_at) in &self.tickets {
            let arrived = used.iter().any(|(r, _)| r == reservation);
            if !arrived && *expires_at > self.now {
                assert!(
                    self.zones[*zone]
                        .state
                        .reservations()
                        .any(|r| r.reservation == *reservation),
                    "the place of a ticket still valid is held"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 400,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/migration.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn agents_are_never_in_two_zones_and_zones_never_over_capacity(
        capacities in proptest::collection::vec(1u32..4, ZONES),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let mut world = World::new(&capacities);
        for op in &ops {
            world.apply(op);
            world.check();
        }
        // Every migration under way, carried to its end: the same holds.
        while !world.running.is_empty() {
            world.apply(&Op::Step { n: 0 });
            world.check();
        }
        for zone in &world.zones {
            let rebuilt = ZoneState::replay(zone.state.id(), &zone.log).expect("replays");
            prop_assert_eq!(&rebuilt, &zone.state);
        }
    }
}

/// A migration's fixed story: observers' events in both zones, the position carried, the
/// place counted, a full zone refusing with the agent left where it was.
#[test]
fn a_migration_reserves_then_departs_then_arrives_with_the_position() {
    let mut world = World::new(&[5, 1, 1]);
    let a = world.zones[0].state.id();
    let b = world.zones[1].state.id();
    world.apply(&Op::Join { agent: 0, zone: 0 });
    world
        .run(
            0,
            world.actor(0),
            CommandKind::AgentMove {
                position: Position {
                    x: 1.0,
                    y: 2.0,
                    z: 3.0,
                },
                sent_at: None,
            },
        )
        .unwrap();
    let id = world.fresh();
    let mut m = Migration::new(
        id,
        a,
        b,
        agent_id(0),
        Mover::Agent {
            connection: world.connection(0),
            permissions: Permissions::all(),
        },
        world.now + Duration::milliseconds(TTL),
    );
    let migrated = loop {
        let command = m.next();
        let outcome = world.execute(&command);
        if let Some(end) = m.advance(outcome) {
            break end.unwrap();
        }
    };
    assert!(!migrated.duplicate);
    // B's log: the reservation; A's: the departure, with where to.
    let reserved = world.zones[1].log.last().unwrap();
    assert_eq!(reserved.name(), "migration_reserved");
    let left = world.zones[0].log.last().unwrap();
    let EventKind::AgentLeft(p) = &left.kind else {
        panic!("{left:?}")
    };
    assert_eq!((p.reason.as_deref(), p.to), (Some("migrated"), Some(b)));
    assert_eq!(world.zones[0].state.session_count(), 0);
    // The one place of B is held: a plain join is refused.
    world.incarnation[1] = 0;
    assert!(matches!(
        world.run(1, world.actor(1), CommandKind::Join),
        Err(ZoneError::ZoneFull { .. })
    ));
    // The ticket's join: from A, with the position, the reservation gone.
    let accepted = world
        .run(
            1,
            world.actor(0),
            CommandKind::Arrive {
                reservation: migrated.reservation,
                connections: Vec::new(),
            },
        )
        .unwrap();
    let EventKind::AgentEntered(p) = &accepted.events[0].kind else {
        panic!()
    };
    assert_eq!(p.from, Some(a));
    assert_eq!(
        p.position,
        Some(Position {
            x: 1.0,
            y: 2.0,
            z: 3.0
        })
    );
    let payload = serde_json::to_value(&accepted.events[0].kind).unwrap();
    assert_eq!(payload["from"], serde_json::json!(a.to_string()));
    assert_eq!(payload["position"]["y"], 2.0);
    assert_eq!(world.zones[1].state.reservations().count(), 0);
    // Used once: again is refused.
    assert!(matches!(
        world.run(
            1,
            world.actor(0),
            CommandKind::Arrive {
                reservation: migrated.reservation,
                connections: Vec::new()
            }
        ),
        Err(ZoneError::InvalidTicket(_))
    ));
    // The same migration again: told the same, nothing moves.
    let mut again = Migration::new(
        id,
        a,
        b,
        agent_id(0),
        Mover::Agent {
            connection: world.connection(0),
            permissions: Permissions::all(),
        },
        world.now + Duration::milliseconds(TTL),
    );
    let before: Vec<usize> = world.zones.iter().map(|z| z.log.len()).collect();
    let end = loop {
        let command = again.next();
        let outcome = world.execute(&command);
        if let Some(end) = again.advance(outcome) {
            break end;
        }
    };
    assert!(end.unwrap().duplicate);
    assert_eq!(
        before,
        world.zones.iter().map(|z| z.log.len()).collect::<Vec<_>>()
    );

    // To a full zone (C holds one place, taken): refused, and A is as it was.
    world.apply(&Op::Join { agent: 2, zone: 2 });
    world.apply(&Op::Join { agent: 3, zone: 0 });
    let a_before = world.zones[0].state.clone();
    let mut full = Migration::new(
        world.fresh(),
        a,
        world.zones[2].state.id(),
        agent_id(3),
        Mover::Service,
        world.now + Duration::milliseconds(TTL),
    );
    let end = loop {
        let command = full.next();
        let outcome = world.execute(&command);
        if let Some(end) = full.advance(outcome) {
            break end;
        }
    };
    assert!(matches!(end, Err(ZoneError::ZoneFull { .. })), "{end:?}");
    assert_eq!(world.zones[0].state, a_before);
}

/// A place not used in time is free again, with no event; its ticket is refused.
#[test]
fn a_reservation_expires_without_an_event_and_frees_its_place() {
    let mut world = World::new(&[2, 1, 1]);
    let (a, b) = (world.zones[0].state.id(), world.zones[1].state.id());
    world.apply(&Op::Join { agent: 0, zone: 0 });
    let mut m = Migration::new(
        world.fresh(),
        a,
        b,
        agent_id(0),
        Mover::Agent {
            connection: world.connection(0),
            permissions: Permissions::all(),
        },
        world.now + Duration::milliseconds(TTL),
    );
    let migrated = loop {
        let command = m.next();
        let outcome = world.execute(&command);
        if let Some(end) = m.advance(outcome) {
            break end.unwrap();
        }
    };
    assert_eq!(world.zones[1].state.places_taken(world.now), 1);
    let logged = world.zones[1].log.len();
    world.now += Duration::milliseconds(TTL);
    assert_eq!(world.zones[1].state.places_taken(world.now), 0);
    assert_eq!(world.zones[1].log.len(), logged, "no event");
    assert!(matches!(
        world.run(
            1,
            world.actor(0),
            CommandKind::Arrive {
                reservation: migrated.reservation,
                connections: Vec::new()
            }
        ),
        Err(ZoneError::InvalidTicket(_))
    ));
    world.apply(&Op::Join { agent: 1, zone: 1 });
    assert_eq!(world.sessions_of(1), vec![1], "the place is free");
}

/// A departure whose place ran out meanwhile (the first steps were slow) is refused: the agent
/// stays where it is rather than leave for a place that is gone; a retry is told so too.
#[test]
fn no_agent_leaves_for_a_place_that_ran_out() {
    let mut world = World::new(&[2, 2, 1]);
    let (a, b) = (world.zones[0].state.id(), world.zones[1].state.id());
    world.apply(&Op::Join { agent: 0, zone: 0 });
    let id = world.fresh();
    let migration = |world: &World| {
        Migration::new(
            id,
            a,
            b,
            agent_id(0),
            Mover::Agent {
                connection: world.connection(0),
                permissions: Permissions::all(),
            },
            world.now + Duration::milliseconds(TTL),
        )
    };
    let mut m = migration(&world);
    for _ in 0..2 {
        let command = m.next();
        let outcome = world.execute(&command);
        assert!(m.advance(outcome).is_none(), "located, then reserved");
    }
    world.now += Duration::milliseconds(TTL);
    let command = m.next();
    let outcome = world.execute(&command);
    assert!(matches!(
        m.advance(outcome),
        Some(Err(ZoneError::Unavailable(_)))
    ));
    assert_eq!(world.sessions_of(0), vec![0], "still in A");
    let mut again = migration(&world);
    let end = loop {
        let command = again.next();
        let outcome = world.execute(&command);
        if let Some(end) = again.advance(outcome) {
            break end;
        }
    };
    assert!(matches!(end, Err(ZoneError::Unavailable(_))), "{end:?}");
    assert_eq!(world.sessions_of(0), vec![0], "still in A");
}

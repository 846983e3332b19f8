//! Interest management against a brute-force oracle: random zones, radii and sequences of
//! joins, moves, interactions, leaves, radius changes and crashes (the zone rebuilt from its log
//! or its snapshot). The oracle knows only the definitions: who is in the zone, where each agent
//! is, the radius, and all pairs within it. After every step, each agent's sessions received
//! exactly the `agent_moved`, `agent_interaction`, `agent_entered_view` and `agent_left_view` the
//! definitions give, in order, and nothing else of movement; a join's `in_view` is the joining
//! agent's view.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{TimeZone, Utc};
use proptest::prelude::*;
use thunderline_zone::*;
use uuid::Uuid;

const AGENTS: usize = 6;

#[derive(Clone, Debug)]
enum Op {
    Join {
        agent: usize,
        conn: usize,
    },
    Leave {
        agent: usize,
        conn: usize,
    },
    Move {
        agent: usize,
        x: i32,
        y: i32,
        z: i32,
    },
    Interact {
        agent: usize,
        target: usize,
    },
    Radius(Option<u8>),
    Crash {
        snapshot: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..AGENTS, 0..2usize).prop_map(|(agent, conn)| Op::Join { agent, conn }),
        1 => (0..AGENTS, 0..2usize).prop_map(|(agent, conn)| Op::Leave { agent, conn }),
        // A small world and whole numbers: distances land exactly on the radius often.
        6 => (0..AGENTS, 0..12i32, 0..12i32, 0..2i32)
            .prop_map(|(agent, x, y, z)| Op::Move { agent, x, y, z }),
        1 => (0..AGENTS, 0..AGENTS).prop_map(|(agent, target)| Op::Interact { agent, target }),
        1 => proptest::option::weighted(0.8, 1..8u8).prop_map(Op::Radius),
        1 => any::<bool>().prop_map(|snapshot| Op::Crash { snapshot }),
    ]
}

/// What the definitions say a session hears of movement.
#[derive(Clone, Debug, PartialEq)]
enum Heard {
    Moved(String),
    Interaction(String),
    Entered(String, Position),
    Left(String),
}

/// The definitions, by brute force.
#[derive(Default)]
struct Oracle {
    sessions: BTreeSet<(String, String)>,
    positions: BTreeMap<String, Position>,
    radius: Option<f64>,
}

impl Oracle {
    fn present(&self, agent: &str) -> bool {
        self.sessions.iter().any(|(a, _)| a == agent)
    }

    fn agents(&self) -> BTreeSet<String> {
        self.sessions.iter().map(|(a, _)| a.clone()).collect()
    }

    /// Every placed agent's view: all pairs within the radius (every pair without one).
    fn views(&self) -> BTreeMap<String, BTreeMap<String, Position>> {
        let placed: Vec<(&String, &Position)> = self
            .positions
            .iter()
            .filter(|(a, _)| self.present(a))
            .collect();
        let mut views = BTreeMap::new();
        for (a, pa) in &placed {
            let mut view = BTreeMap::new();
            for (b, pb) in &placed {
                if a != b {
                    let d = ((pa.x - pb.x).powi(2) + (pa.y - pb.y).powi(2) + (pa.z - pb.z).powi(2))
                        .sqrt();
                    if self.radius.is_none_or(|r| d <= r) {
                        view.insert((*b).clone(), **pb);
                    }
                }
            }
            views.insert((*a).clone(), view);
        }
        views
    }
}

/// The view changes between two sets of views, per watcher: left ones, then entered ones.
fn changes(
    before: &BTreeMap<String, BTreeMap<String, Position>>,
    after: &BTreeMap<String, BTreeMap<String, Position>>,
    skip: Option<&str>,
) -> BTreeMap<String, Vec<Heard>> {
    let empty = BTreeMap::new();
    let mut out: BTreeMap<String, Vec<Heard>> = BTreeMap::new();
    let watchers: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for w in watchers {
        if Some(w.as_str()) == skip {
            continue;
        }
        let b = before.get(w).unwrap_or(&empty);
        let a = after.get(w).unwrap_or(&empty);
        let mut heard: Vec<Heard> = b
            .keys()
            .filter(|x| !a.contains_key(*x))
            .map(|x| Heard::Left(x.clone()))
            .collect();
        heard.extend(
            a.iter()
                .filter(|(x, _)| !b.contains_key(*x))
                .map(|(x, p)| Heard::Entered(x.clone(), *p)),
        );
        if !heard.is_empty() {
            out.insert(w.clone(), heard);
        }
    }
    out
}

struct Zone {
    state: ZoneState,
    log: Vec<ZoneEvent>,
    n: u128,
}

impl Zone {
    fn run(&mut self, actor: Actor, kind: CommandKind) -> Result<Accepted, ZoneError> {
        self.n += 1;
        let now =
            Utc.timestamp_opt(1_700_000_000, 0).unwrap() + chrono::Duration::seconds(self.n as i64);
        let id = Uuid::from_u128(self.n);
        let ctx = Context::new(now, Uuid::from_u128(self.n << 32));
        let command = ZoneCommand::new(id, self.state.id(), actor, kind);
        let outcome = self.state.execute(&command, &ctx);
        if let Ok(accepted) = &outcome.result {
            self.log.extend(accepted.events.iter().cloned());
        }
        outcome.result
    }
}

fn agent(n: usize) -> String {
    format!("agent-{n}")
}

fn actor(agent_n: usize, conn: usize) -> Actor {
    Actor::Agent {
        agent_id: agent(agent_n),
        connection: format!("conn-{agent_n}-{conn}"),
        permissions: Permissions::ADMIN_ZONE,
    }
}

/// What each agent's sessions heard of movement from these events, by [`received`].
fn heard(events: &[ZoneEvent], listeners: &BTreeSet<String>) -> BTreeMap<String, Vec<Heard>> {
    let mut out: BTreeMap<String, Vec<Heard>> = BTreeMap::new();
    for event in events {
        for listener in listeners {
            for r in received(event, listener) {
                let h = match r {
                    Received::Event => match &event.kind {
                        EventKind::AgentMoved(m) => Heard::Moved(m.agent_id.clone()),
                        EventKind::AgentInteraction(i) => Heard::Interaction(i.agent_id.clone()),
                        _ => continue,
                    },
                    Received::Sight(Sight::AgentEnteredView { agent_id, position }) => {
                        Heard::Entered(agent_id, position)
                    }
                    Received::Sight(Sight::AgentLeftView { agent_id }) => Heard::Left(agent_id),
                };
                out.entry(listener.clone()).or_default().push(h);
            }
        }
    }
    out
}

fn check(ops: Vec<Op>, radius: Option<u8>) -> Result<(), TestCaseError> {
    let zone_id = Uuid::from_u128(7);
    let mut zone = Zone {
        state: ZoneState::absent(zone_id),
        log: Vec::new(),
        n: 0,
    };
    let mut oracle = Oracle {
        radius: radius.map(f64::from),
        ..Oracle::default()
    };
    zone.run(
        Actor::Admin,
        CommandKind::CreateZone(Box::new(NewZone {
            name: "crowd".into(),
            capacity: Some(100),
            permissions: Some(Permissions::SPAWN_AGENTS),
            interest_radius: radius.map(f64::from),
            assigned_server: Some("node".into()),
            ..NewZone::default()
        })),
    )
    .expect("created");
    for op in ops {
        let before = oracle.views();
        let mut expected: BTreeMap<String, Vec<Heard>> = BTreeMap::new();
        let mut listeners = oracle.agents();
        let events = match op {
            Op::Join { agent: a, conn } => {
                let accepted = zone.run(actor(a, conn), CommandKind::Join).expect("joins");
                let joined_before = oracle.present(&agent(a));
                oracle
                    .sessions
                    .insert((agent(a), format!("conn-{a}-{conn}")));
                let after = oracle.views();
                listeners = oracle.agents();
                if oracle.radius.is_some() && !joined_before {
                    // The others see the joiner; it is shown its view in its answer.
                    expected = changes(&before, &after, Some(&agent(a)));
                }
                let Answer::Joined(view) = &accepted.answer else {
                    panic!("a join is answered with the zone");
                };
                let in_view = oracle.radius.map(|_| {
                    after
                        .get(&agent(a))
                        .map(|v| {
                            v.iter()
                                .map(|(agent_id, position)| InView {
                                    agent_id: agent_id.clone(),
                                    position: *position,
                                })
                                .collect()
                        })
                        .unwrap_or_default()
                });
                prop_assert_eq!(&view.in_view, &in_view, "in_view of {}", agent(a));
                accepted.events
            }
            Op::Leave { agent: a, conn } => {
                // No view changes: an agent that leaves is announced by agent_left.
                oracle
                    .sessions
                    .remove(&(agent(a), format!("conn-{a}-{conn}")));
                zone.run(actor(a, conn), CommandKind::Leave)
                    .expect("leaves")
                    .events
            }
            Op::Move { agent: a, x, y, z } => {
                let position = Position {
                    x: f64::from(x),
                    y: f64::from(y),
                    z: f64::from(z),
                };
                let Ok(accepted) = zone.run(
                    actor(a, 0),
                    CommandKind::AgentMove {
                        position,
                        sent_at: None,
                    },
                ) else {
                    let key = (agent(a), format!("conn-{a}-0"));
                    prop_assert!(!oracle.sessions.contains(&key));
                    continue;
                };
                oracle.positions.insert(agent(a), position);
                let after = oracle.views();
                let mover = agent(a);
                for listener in &listeners {
                    let mut heard = Vec::new();
                    if oracle.radius.is_some() {
                        heard = changes(&before, &after, None)
                            .remove(listener)
                            .unwrap_or_default();
                    }
                    let reached = oracle.radius.is_none()
                        || *listener == mover
                        || after.get(&mover).is_some_and(|v| v.contains_key(listener));
                    if reached {
                        heard.push(Heard::Moved(mover.clone()));
                    }
                    if !heard.is_empty() {
                        expected.insert(listener.clone(), heard);
                    }
                }
                accepted.events
            }
            Op::Interact { agent: a, target } => {
                let Ok(accepted) = zone.run(
                    actor(a, 0),
                    CommandKind::AgentInteract {
                        target_agent_id: agent(target),
                        kind: "wave".into(),
                        data: None,
                    },
                ) else {
                    continue;
                };
                let actor_id = agent(a);
                for listener in &listeners {
                    let reached = oracle.radius.is_none()
                        || *listener == actor_id
                        || *listener == agent(target)
                        || before
                            .get(&actor_id)
                            .is_some_and(|v| v.contains_key(listener));
                    if reached {
                        expected
                            .insert(listener.clone(), vec![Heard::Interaction(actor_id.clone())]);
                    }
                }
                accepted.events
            }
            Op::Radius(r) => {
                let r = r.map(f64::from);
                let accepted = zone
                    .run(
                        Actor::Admin,
                        CommandKind::UpdateZone(ZonePatch {
                            interest_radius: Some(r),
                            ..ZonePatch::default()
                        }),
                    )
                    .expect("a radius above 0 is taken");
                oracle.radius = r;
                expected = changes(&before, &oracle.views(), None);
                accepted.events
            }
            Op::Crash { snapshot } => {
                zone.state = if snapshot {
                    ZoneState::from_snapshot(zone.state.snapshot())
                } else {
                    ZoneState::replay(zone_id, &zone.log).expect("the log replays")
                };
                Vec::new()
            }
        };
        let got = heard(&events, &listeners);
        prop_assert_eq!(got, expected, "after {:?}", op_name(&events));
        // The log's own views are what was delivered: replay decides nothing.
        prop_assert_eq!(
            ZoneState::replay(zone_id, &zone.log).expect("replays"),
            zone.state.clone()
        );
    }
    Ok(())
}

fn op_name(events: &[ZoneEvent]) -> Vec<String> {
    events.iter().map(|e| e.name().to_owned()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        ..ProptestConfig::default()
    })]

    #[test]
    fn each_session_hears_exactly_the_movement_the_definitions_give(
        radius in proptest::option::weighted(0.8, 1..8u8),
        ops in proptest::collection::vec(op(), 1..60),
    ) {
        check(ops, radius)?;
    }
}

#[test]
fn a_zone_without_a_radius_is_unchanged_and_its_events_carry_no_view() {
    let mut zone = Zone {
        state: ZoneState::absent(Uuid::from_u128(9)),
        log: Vec::new(),
        n: 0,
    };
    zone.run(
        Actor::Admin,
        CommandKind::CreateZone(Box::new(NewZone {
            name: "open".into(),
            assigned_server: Some("node".into()),
            ..NewZone::default()
        })),
    )
    .unwrap();
    let joined = zone.run(actor(0, 0), CommandKind::Join).unwrap();
    let Answer::Joined(view) = joined.answer else {
        panic!()
    };
    assert_eq!(view.in_view, None);
    let moved = zone
        .run(
            actor(0, 0),
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
    assert!(moved.events.iter().all(|e| e.view.is_none()));
    let wire = serde_json::to_value(&moved.events[0]).unwrap();
    assert!(wire.get("view").is_none(), "{wire}");
}

#[test]
fn radii_that_are_not_above_zero_are_refused_and_change_nothing() {
    let mut zone = Zone {
        state: ZoneState::absent(Uuid::from_u128(9)),
        log: Vec::new(),
        n: 0,
    };
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let refused = zone.run(
            Actor::Admin,
            CommandKind::CreateZone(Box::new(NewZone {
                name: "z".into(),
                interest_radius: Some(bad),
                assigned_server: Some("node".into()),
                ..NewZone::default()
            })),
        );
        assert!(matches!(refused, Err(ZoneError::InvalidZone(_))), "{bad}");
    }
    zone.run(
        Actor::Admin,
        CommandKind::CreateZone(Box::new(NewZone {
            name: "z".into(),
            interest_radius: Some(5.0),
            assigned_server: Some("node".into()),
            ..NewZone::default()
        })),
    )
    .unwrap();
    let seq = zone.state.seq();
    for bad in [0.0, -3.0] {
        let refused = zone.run(
            Actor::Admin,
            CommandKind::UpdateZone(ZonePatch {
                interest_radius: Some(Some(bad)),
                ..ZonePatch::default()
            }),
        );
        assert!(matches!(refused, Err(ZoneError::InvalidZone(_))), "{bad}");
    }
    assert_eq!(zone.state.seq(), seq);
    assert_eq!(zone.state.zone().interest_radius, Some(5.0));
    // `null` removes it, and says so in the log.
    let removed = zone
        .run(
            Actor::Admin,
            CommandKind::UpdateZone(ZonePatch {
                interest_radius: Some(None),
                ..ZonePatch::default()
            }),
        )
        .unwrap();
    assert_eq!(zone.state.zone().interest_radius, None);
    assert_eq!(
        removed.events[0].kind.payload(),
        serde_json::json!({"interest_radius": null})
    );
    let patch: ZonePatch = serde_json::from_str(r#"{"interest_radius": null}"#).unwrap();
    assert_eq!(patch.interest_radius, Some(None));
    let patch: ZonePatch = serde_json::from_str(r#"{}"#).unwrap();
    assert_eq!(patch.interest_radius, None);
    assert!(serde_json::from_str::<ZonePatch>(r#"{"interest_radius": "5"}"#).is_err());
}

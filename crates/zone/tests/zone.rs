//! The zone domain: commands are decided against the state and their events applied; sessions
//! are an exact set under the capacity; every refusal changes nothing and says why; each
//! command id is applied once, whatever the retries; seq has no gaps; a zone's log alone, from
//! its `zone_created` at seq 1, rebuilds the live state; commands, events and refusals survive
//! JSON and MessagePack unchanged.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, SubsecRound, Utc};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::{Map, Value, json};
use thunderline_zone::*;
use uuid::Uuid;

/// `cases` cases, after the ones that failed before (kept beside this file: proptest cannot find
/// it by itself from a workspace member's directory).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/zone.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// What a zone with two resources is created from.
fn zone(capacity: u32, permissions: Permissions) -> NewZone {
    let mut resources = BTreeMap::new();
    resources.insert(
        "food".into(),
        Resource {
            amount: 50,
            max: 100,
            regen: 7,
        },
    );
    resources.insert(
        "ore".into(),
        Resource {
            amount: 5,
            max: 10,
            regen: 1,
        },
    );
    NewZone {
        name: "Test".into(),
        capacity: Some(capacity),
        permissions: Some(permissions),
        resources,
        assigned_server: Some("node-a".into()),
        ..NewZone::default()
    }
}

/// A zone created from `spec`, and its `zone_created`.
fn create(spec: NewZone) -> (ZoneState, ZoneEvent) {
    let mut state = ZoneState::absent(Uuid::now_v7());
    let command = cmd(
        state.id(),
        Actor::Admin,
        CommandKind::CreateZone(Box::new(spec)),
    );
    let mut events = run(&mut state, &command).result.unwrap().events;
    assert_eq!(events.len(), 1);
    (state, events.remove(0))
}

fn created(spec: NewZone) -> ZoneState {
    create(spec).0
}

fn all() -> Permissions {
    Permissions::from_bits_truncate(0x0f)
}

fn agent(conn: &str, agent_id: &str, permissions: Permissions) -> Actor {
    Actor::Agent {
        agent_id: agent_id.into(),
        connection: conn.into(),
        permissions,
    }
}

fn ctx() -> Context {
    Context::new(now(), Uuid::now_v7())
}

/// Runs a command; the outcome, checking on the way that a refusal changed nothing.
fn run(state: &mut ZoneState, command: &ZoneCommand) -> Outcome {
    let before = state.clone();
    let outcome = state.execute(command, &ctx());
    match &outcome.result {
        Err(_) => assert_eq!(*state, before, "a refusal changed the zone"),
        Ok(a) if a.events.is_empty() => assert_eq!(*state, before, "no event, yet a change"),
        Ok(_) => {}
    }
    outcome
}

fn cmd(zone: Uuid, actor: Actor, kind: CommandKind) -> ZoneCommand {
    ZoneCommand::new(Uuid::now_v7(), zone, actor, kind)
}

fn moved(x: f64) -> CommandKind {
    CommandKind::AgentMove {
        position: Position { x, y: 0.0, z: 0.0 },
        sent_at: None,
    }
}

/// What a socket would send to the zone: the client-side channel logic of one connection is
/// modelled, so that the zone sees the same command streams the server gives it.
#[derive(Clone, Debug)]
enum Op {
    Join {
        conn: u8,
        agent: u8,
    },
    Leave {
        conn: u8,
    },
    Disconnect {
        conn: u8,
    },
    Move {
        conn: u8,
    },
    Consume {
        conn: u8,
        amount: i64,
    },
    Interact {
        conn: u8,
    },
    Broadcast {
        conn: u8,
    },
    Tick,
    /// The command before this one is delivered again (a retry or a broker redelivery).
    Redeliver,
    Patch {
        capacity: u32,
    },
    Permissions {
        grant: u32,
        revoke: u32,
    },
    /// The admin API deletes the zone: every command after it is refused.
    Delete,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..5, 0u8..4).prop_map(|(conn, agent)| Op::Join { conn, agent }),
        2 => (0u8..5).prop_map(|conn| Op::Leave { conn }),
        1 => (0u8..5).prop_map(|conn| Op::Disconnect { conn }),
        4 => (0u8..5).prop_map(|conn| Op::Move { conn }),
        2 => (0u8..5, -2i64..40).prop_map(|(conn, amount)| Op::Consume { conn, amount }),
        1 => (0u8..5).prop_map(|conn| Op::Interact { conn }),
        1 => (0u8..5).prop_map(|conn| Op::Broadcast { conn }),
        1 => Just(Op::Tick),
        2 => Just(Op::Redeliver),
        1 => (1u32..5).prop_map(|capacity| Op::Patch { capacity }),
        1 => (0u32..16, 0u32..16).prop_map(|(grant, revoke)| Op::Permissions { grant, revoke }),
        1 => prop::bool::weighted(0.2).prop_map(|delete| if delete { Op::Delete } else { Op::Tick }),
    ]
}

/// One connection as the socket keeps it: its name (a new one after each disconnect) and the
/// agent whose channel it holds, if any.
#[derive(Clone, Default)]
struct Conn {
    generation: u32,
    channel: Option<String>,
}

impl Conn {
    fn name(&self, i: u8) -> String {
        format!("c{i}.{}", self.generation)
    }
}

/// Turns ops into the command stream a server would hand the zone.
fn commands(state: &ZoneState, ops: &[Op]) -> Vec<ZoneCommand> {
    let mut conns: Vec<Conn> = vec![Conn::default(); 5];
    let mut out: Vec<ZoneCommand> = Vec::new();
    let perms =
        Permissions::SPAWN_AGENTS | Permissions::MODIFY_ZONE | Permissions::BROADCAST_EVENTS;
    for op in ops {
        let push = |out: &mut Vec<ZoneCommand>, c: &Conn, i: u8, kind: CommandKind| {
            // A push goes out on whatever channel the socket holds, joined or not yet decided;
            // without one the socket refuses it itself.
            if let Some(agent_id) = &c.channel {
                out.push(cmd(state.id(), agent(&c.name(i), agent_id, perms), kind));
            }
        };
        match op {
            Op::Join { conn, agent: a } => {
                let c = &mut conns[*conn as usize];
                if let Some(old) = c.channel.take() {
                    out.push(cmd(
                        state.id(),
                        agent(&c.name(*conn), &old, perms),
                        CommandKind::Leave,
                    ));
                }
                let agent_id = format!("a{a}");
                out.push(cmd(
                    state.id(),
                    agent(&c.name(*conn), &agent_id, perms),
                    CommandKind::Join,
                ));
                c.channel = Some(agent_id);
            }
            Op::Leave { conn } | Op::Disconnect { conn } => {
                let c = &mut conns[*conn as usize];
                if let Some(old) = c.channel.take() {
                    out.push(cmd(
                        state.id(),
                        agent(&c.name(*conn), &old, perms),
                        CommandKind::Leave,
                    ));
                }
                if matches!(op, Op::Disconnect { .. }) {
                    c.generation += 1;
                }
            }
            Op::Move { conn } => push(&mut out, &conns[*conn as usize], *conn, moved(1.0)),
            Op::Consume { conn, amount } => push(
                &mut out,
                &conns[*conn as usize],
                *conn,
                CommandKind::ConsumeResource {
                    resource_type: "food".into(),
                    amount: *amount,
                },
            ),
            Op::Interact { conn } => push(
                &mut out,
                &conns[*conn as usize],
                *conn,
                CommandKind::AgentInteract {
                    target_agent_id: "a0".into(),
                    kind: "wave".into(),
                    data: Some(json!({"n": 1})),
                },
            ),
            Op::Broadcast { conn } => push(
                &mut out,
                &conns[*conn as usize],
                *conn,
                CommandKind::BroadcastEvent {
                    event_type: "storm".into(),
                    payload: Map::new(),
                },
            ),
            Op::Tick => out.push(cmd(state.id(), Actor::System, CommandKind::Tick)),
            Op::Redeliver => {
                if let Some(last) = out.last().cloned() {
                    out.push(last);
                }
            }
            Op::Patch { capacity } => out.push(cmd(
                state.id(),
                Actor::Admin,
                CommandKind::UpdateZone(ZonePatch {
                    capacity: Some(*capacity),
                    ..ZonePatch::default()
                }),
            )),
            Op::Delete => out.push(cmd(state.id(), Actor::Admin, CommandKind::DeleteZone)),
            Op::Permissions { grant, revoke } => out.push(cmd(
                state.id(),
                Actor::Admin,
                CommandKind::ChangePermissions {
                    grant: Permissions::from_bits_truncate(*grant),
                    revoke: Permissions::from_bits_truncate(*revoke),
                },
            )),
        }
    }
    out
}

proptest! {
    #![proptest_config(config(300))]

    /// Sessions are an exact set under the capacity, no event comes from an agent without a
    /// session, every command id is applied once, seq has no gaps, and replay rebuilds the zone.
    #[test]
    fn sessions_stay_exact_commands_apply_once_and_replay_rebuilds_the_zone(
        capacity in 1u32..4,
        ops in prop::collection::vec(op(), 0..120),
    ) {
        let (created, creation) = create(zone(capacity, all()));
        let mut live = created.clone();
        let mut log: Vec<ZoneEvent> = vec![creation];
        let mut applied: BTreeSet<Uuid> = BTreeSet::new();
        // The sessions as the events say, to check each event against.
        let mut sessions: BTreeSet<(String, String)> = BTreeSet::new();
        for command in commands(&created, &ops) {
            let outcome = run(&mut live, &command);
            let Ok(accepted) = outcome.result else { continue };
            if !accepted.events.is_empty() {
                prop_assert!(applied.insert(command.id), "command {} applied twice", command.id);
            }
            for e in &accepted.events {
                prop_assert_eq!(e.seq, log.len() as u64 + 1, "seq has no gaps");
                prop_assert_eq!(e.command_id, Some(command.id));
                match &e.kind {
                    EventKind::AgentEntered(p) => {
                        prop_assert!(sessions.insert((p.connection.clone(), p.agent_id.clone())));
                        prop_assert_eq!(p.session_count as usize, sessions.len());
                    }
                    EventKind::AgentLeft(p) => {
                        prop_assert!(sessions.remove(&(p.connection.clone(), p.agent_id.clone())));
                        prop_assert_eq!(p.session_count as usize, sessions.len());
                    }
                    // Its sessions end with it.
                    EventKind::ZoneDeleted(_) => sessions.clear(),
                    _ => {
                        if let (Some(agent_id), Actor::Agent { connection, .. }) = (e.kind.agent_id(), &command.actor) {
                            prop_assert!(
                                sessions.contains(&(connection.clone(), agent_id.to_owned())),
                                "{} from {} without a session", e.name(), agent_id
                            );
                        }
                    }
                }
                log.push(e.clone());
            }
            let count = live.zone().active_session_count as usize;
            prop_assert_eq!(count, sessions.len(), "active_session_count is the session set's size");
            prop_assert_eq!(count, live.session_count());
            prop_assert!(count <= live.zone().capacity as usize || !accepted.events.iter().any(|e| matches!(e.kind, EventKind::AgentEntered(_))),
                "a join took the zone over its capacity");
            prop_assert!(count <= capacity.max(live.zone().capacity) as usize);
        }
        prop_assert_eq!(live.seq(), log.len() as u64);
        prop_assert_eq!(log[0].seq, 1);
        let rebuilt = ZoneState::replay(live.id(), &log).unwrap();
        prop_assert_eq!(&rebuilt, &live, "the log alone, from seq 1, rebuilds the live zone");
        prop_assert_eq!(rebuilt.snapshot(), live.snapshot());
        // And through a snapshot taken anywhere: the snapshot, then the events after it.
        let cut = 1 + log.len() / 2;
        let partial = ZoneState::replay(live.id(), &log[..cut.min(log.len())]).unwrap();
        let mut loaded = ZoneState::from_snapshot(partial.snapshot());
        for e in &log[cut.min(log.len())..] {
            loaded.apply(e).unwrap();
        }
        prop_assert_eq!(&loaded, &live);
    }

    /// The rules read no clock and draw no random number: the same commands in the same
    /// contexts give the same events, ids and times included, and the same states.
    #[test]
    fn the_same_commands_in_the_same_contexts_give_the_same_events(
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let t0 = now();
        let contexts: Vec<Context> = (0..=ops.len() * 2 + 1)
            .map(|i| Context {
                broadcast_limit: Some(BroadcastLimit { allowed: 2, interval_ms: 1_000 }),
                max_sessions_per_agent: Some(2),
                ..Context::new(
                    t0 + chrono::Duration::milliseconds(i as i64 * 300),
                    Uuid::from_u128(0x0190_f5a0_0000_7000_8000_0000_0000_0000 | ((i as u128) << 40)),
                )
            })
            .collect();
        let id = Uuid::now_v7();
        let mut create = vec![cmd(id, Actor::Admin, CommandKind::CreateZone(Box::new(zone(3, all()))))];
        let template = ZoneState::absent(id);
        let mut first = template.clone();
        first.execute(&create[0], &contexts[0]);
        create.extend(commands(&first, &ops));
        let play = |mut state: ZoneState| {
            let outcomes: Vec<Outcome> = create
                .iter()
                .zip(&contexts)
                .map(|(c, ctx)| state.execute(c, ctx))
                .collect();
            (outcomes, state)
        };
        let (a, state_a) = play(template.clone());
        let (b, state_b) = play(template);
        prop_assert_eq!(a, b);
        prop_assert_eq!(state_a.snapshot(), state_b.snapshot());
    }

    #[test]
    fn events_and_commands_round_trip_through_json_and_messagepack_unchanged(
        ops in prop::collection::vec(op(), 1..40),
        props in prop::collection::btree_map("[a-z]{1,8}", prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            any::<bool>().prop_map(|b| json!(b)),
            "[ -~]{0,12}".prop_map(|s| json!(s)),
            (-1e9f64..1e9).prop_map(|f| json!(f)),
        ], 0..5),
    ) {
        let mut z = zone(1000, all());
        z.properties = Some(Value::Object(props.into_iter().collect()));
        let mut live = created(z);
        let mut events = Vec::new();
        let created = live.clone();
        for command in commands(&created, &ops) {
            let json = command.to_json();
            prop_assert_eq!(&ZoneCommand::from_json(&json).unwrap(), &command);
            prop_assert_eq!(&ZoneCommand::from_msgpack(&command.to_msgpack()).unwrap(), &command);
            let outcome = live.execute(&command, &ctx());
            if let Err(refusal) = &outcome.result {
                let text = serde_json::to_string(refusal).unwrap();
                prop_assert_eq!(&serde_json::from_str::<ZoneError>(&text).unwrap(), refusal);
                let packed = rmp_serde::to_vec_named(refusal).unwrap();
                prop_assert_eq!(&rmp_serde::from_slice::<ZoneError>(&packed).unwrap(), refusal);
            }
            events.extend(outcome.result.map(|a| a.events).unwrap_or_default());
        }
        for e in events {
            let json = e.to_json();
            prop_assert_eq!(&ZoneEvent::from_json(&json).unwrap(), &e);
            prop_assert_eq!(&ZoneEvent::from_msgpack(&e.to_msgpack()).unwrap(), &e);
            let wire: Value = serde_json::from_str(&json).unwrap();
            let keys: Vec<_> = wire.as_object().unwrap().keys().cloned().collect();
            prop_assert_eq!(keys, vec!["command_id", "id", "occurred_at", "payload", "seq", "type", "zone_id"]);
        }
    }
}

#[test]
fn payloads_are_shaped_as_in_the_seed_briefing_with_their_seq() {
    let mut z = created(zone(10, all()));
    let zid = z.id();
    let a = agent("c1", "agent-7", all());
    let events = |o: Outcome| o.result.unwrap().events;
    let entered = &events(run(&mut z, &cmd(zid, a.clone(), CommandKind::Join)))[0];
    assert_eq!(entered.name(), "agent_entered");
    let t = entered.occurred_at;
    assert_eq!(
        entered.kind.payload(),
        json!({"agent_id": "agent-7", "connection": "c1", "session_count": 1, "timestamp": t})
    );
    assert_eq!(
        serde_json::to_value(entered.broadcast_payload()).unwrap(),
        json!({"agent_id": "agent-7", "connection": "c1", "session_count": 1, "timestamp": t, "seq": 2})
    );
    let changed = &events(run(
        &mut z,
        &cmd(
            zid,
            a.clone(),
            CommandKind::ConsumeResource {
                resource_type: "food".into(),
                amount: 10,
            },
        ),
    ))[0];
    assert_eq!(
        changed.kind.payload(),
        json!({"agent_id": "agent-7", "changes": {"food": -10}, "new_resources": {"food": 40, "ore": 5}})
    );
    assert_eq!(changed.seq, 3);
    let tick = &events(run(&mut z, &cmd(zid, Actor::System, CommandKind::Tick)))[0];
    assert_eq!(
        tick.kind.payload(),
        json!({"tick": 1, "properties": {}, "new_resources": {"food": 47, "ore": 6}, "timestamp": tick.occurred_at})
    );
    let moved = &events(run(
        &mut z,
        &cmd(
            zid,
            a.clone(),
            CommandKind::AgentMove {
                position: Position {
                    x: 10.0,
                    y: 5.0,
                    z: 0.0,
                },
                sent_at: Some(7),
            },
        ),
    ))[0];
    assert_eq!(
        serde_json::to_value(moved.broadcast_payload()).unwrap(),
        json!({"agent_id": "agent-7", "position": {"x": 10.0, "y": 5.0, "z": 0.0}, "sent_at": 7, "seq": 5})
    );
    let custom = &events(run(
        &mut z,
        &cmd(
            zid,
            a,
            CommandKind::BroadcastEvent {
                event_type: "storm.warning".into(),
                payload: json!({"level": 3}).as_object().unwrap().clone(),
            },
        ),
    ))[0];
    assert_eq!(custom.name(), "storm.warning");
    assert_eq!(
        serde_json::to_value(custom.broadcast_payload()).unwrap(),
        json!({"agent_id": "agent-7", "payload": {"level": 3}, "seq": 6})
    );
    assert_eq!(ZoneEvent::from_json(&custom.to_json()).unwrap(), *custom);
}

#[test]
fn a_join_refused_or_undecided_lets_nothing_through() {
    let mut z = created(zone(1, all()));
    let zid = z.id();
    let alice = agent("c1", "alice", all());
    let bob = agent("c2", "bob", all());
    assert!(
        run(&mut z, &cmd(zid, alice, CommandKind::Join))
            .result
            .is_ok()
    );
    // Bob's join is refused; the pushes he sent behind it find no session.
    let refused = run(&mut z, &cmd(zid, bob.clone(), CommandKind::Join));
    assert_eq!(
        refused.result.unwrap_err(),
        ZoneError::ZoneFull { capacity: 1 }
    );
    for kind in [
        moved(1.0),
        CommandKind::ConsumeResource {
            resource_type: "food".into(),
            amount: 5,
        },
        CommandKind::AgentInteract {
            target_agent_id: "alice".into(),
            kind: "poke".into(),
            data: None,
        },
        CommandKind::GetZoneState,
    ] {
        let e = run(&mut z, &cmd(zid, bob.clone(), kind))
            .result
            .unwrap_err();
        assert_eq!(e.reason(), "unmatched topic", "{e}");
    }
    // His leave, twice, changes nothing and causes no event.
    for _ in 0..2 {
        let left = run(&mut z, &cmd(zid, bob.clone(), CommandKind::Leave));
        assert!(left.result.unwrap().events.is_empty());
    }
    assert_eq!(z.session_count(), 1);
    assert_eq!(z.seq(), 2);
    // The same agent on another connection is another session, under the same capacity.
    let again = run(
        &mut z,
        &cmd(zid, agent("c3", "alice", all()), CommandKind::Join),
    );
    assert_eq!(again.result.unwrap_err().reason(), "zone_full");
}

#[test]
fn a_command_redelivered_is_applied_once_and_gets_its_first_outcome() {
    let mut z = created(zone(5, all()));
    let zid = z.id();
    let created = z.clone();
    let a = agent("c1", "a", all());
    let mut log = run(&mut z, &cmd(zid, a.clone(), CommandKind::Join))
        .result
        .unwrap()
        .events;
    let consume = cmd(
        zid,
        a.clone(),
        CommandKind::ConsumeResource {
            resource_type: "food".into(),
            amount: 5,
        },
    );
    let first = run(&mut z, &consume).result.unwrap();
    assert_eq!(first.events.len(), 1);
    log.extend(first.events.clone());
    for _ in 0..3 {
        let again = run(&mut z, &consume).result.unwrap();
        assert!(again.duplicate && again.events.is_empty());
        assert_eq!(again.answer, first.answer);
    }
    assert_eq!(z.zone().resources["food"].amount, 45);
    let greedy = cmd(
        zid,
        a,
        CommandKind::ConsumeResource {
            resource_type: "food".into(),
            amount: 500,
        },
    );
    let refused = run(&mut z, &greedy).result.unwrap_err();
    assert_eq!(run(&mut z, &greedy).result.unwrap_err(), refused);
    // The memory of applied ids is rebuilt by replay too.
    let mut replayed = created;
    for e in &log {
        replayed.apply(e).unwrap();
    }
    let again = run(&mut replayed, &consume).result.unwrap();
    assert!(again.duplicate && again.events.is_empty());
    assert_eq!(replayed.zone().resources["food"].amount, 45);
}

#[test]
fn a_leave_delivered_again_after_a_new_join_does_not_end_the_new_session() {
    let mut z = created(zone(5, all()));
    let zid = z.id();
    let a = agent("c1", "a", all());
    run(&mut z, &cmd(zid, a.clone(), CommandKind::Join));
    let leave = cmd(zid, a.clone(), CommandKind::Leave);
    assert_eq!(run(&mut z, &leave).result.unwrap().events.len(), 1);
    run(&mut z, &cmd(zid, a.clone(), CommandKind::Join));
    // A leave that changed nothing is remembered as well as one that did.
    let idle_leave = cmd(zid, agent("c9", "nobody", all()), CommandKind::Leave);
    assert!(run(&mut z, &idle_leave).result.unwrap().events.is_empty());
    for again in [&leave, &idle_leave] {
        let outcome = run(&mut z, again).result.unwrap();
        assert!(outcome.duplicate && outcome.events.is_empty());
    }
    assert_eq!(z.session_count(), 1, "the new session is still there");
}

#[test]
fn broadcasts_need_the_bit_on_token_and_zone_and_a_valid_name_and_are_rate_limited() {
    let mut z = created(zone(
        5,
        Permissions::SPAWN_AGENTS | Permissions::BROADCAST_EVENTS,
    ));
    let zid = z.id();
    let with = agent(
        "c1",
        "with",
        Permissions::SPAWN_AGENTS | Permissions::BROADCAST_EVENTS,
    );
    let without = agent("c2", "without", Permissions::SPAWN_AGENTS);
    run(&mut z, &cmd(zid, with.clone(), CommandKind::Join));
    run(&mut z, &cmd(zid, without.clone(), CommandKind::Join));
    let storm = |t: &str| CommandKind::BroadcastEvent {
        event_type: t.into(),
        payload: json!({"level": 1}).as_object().unwrap().clone(),
    };
    let e = run(&mut z, &cmd(zid, without, storm("storm")))
        .result
        .unwrap_err();
    assert_eq!(
        e,
        ZoneError::Forbidden {
            needed: Permissions::BROADCAST_EVENTS,
            holder: Holder::Token
        }
    );
    for bad in [
        "",
        "agent_moved",
        "phx_reply",
        "presence_diff",
        "has space",
        &"x".repeat(65),
    ] {
        let e = run(&mut z, &cmd(zid, with.clone(), storm(bad)))
            .result
            .unwrap_err();
        assert_eq!(e.reason(), "invalid_payload", "{bad:?}: {e}");
    }
    let limit = BroadcastLimit {
        allowed: 3,
        interval_ms: 1_000,
    };
    let t0 = now();
    let at = |ms: i64| Context {
        broadcast_limit: Some(limit),
        ..Context::new(t0 + chrono::Duration::milliseconds(ms), Uuid::now_v7())
    };
    for i in 0..3 {
        assert!(
            z.execute(&cmd(zid, with.clone(), storm("storm")), &at(i))
                .result
                .is_ok()
        );
    }
    let limited = z.execute(&cmd(zid, with.clone(), storm("storm")), &at(500));
    assert_eq!(
        limited.result.unwrap_err(),
        ZoneError::RateLimited {
            allowed: 3,
            interval_ms: 1_000
        }
    );
    assert!(
        z.execute(&cmd(zid, with.clone(), storm("storm")), &at(1_000))
            .result
            .is_ok()
    );
    // The admin API needs the zone's bit only.
    assert!(
        run(&mut z, &cmd(zid, Actor::Admin, storm("maintenance")))
            .result
            .is_ok()
    );
    run(
        &mut z,
        &cmd(
            zid,
            Actor::Admin,
            CommandKind::ChangePermissions {
                grant: Permissions::empty(),
                revoke: Permissions::BROADCAST_EVENTS,
            },
        ),
    );
    let e = run(&mut z, &cmd(zid, Actor::Admin, storm("maintenance")))
        .result
        .unwrap_err();
    assert_eq!(e.reason(), "forbidden");
    let e = run(&mut z, &cmd(zid, with, storm("storm")))
        .result
        .unwrap_err();
    assert_eq!(
        e,
        ZoneError::Forbidden {
            needed: Permissions::BROADCAST_EVENTS,
            holder: Holder::Zone
        }
    );
}

#[test]
fn nul_and_oversize_strings_are_refused_and_change_nothing() {
    let mut z = created(zone(5, all()));
    let zid = z.id();
    let a = agent("c1", "a", all());
    run(&mut z, &cmd(zid, a.clone(), CommandKind::Join));
    let interact = |kind: &str, data: Value| CommandKind::AgentInteract {
        target_agent_id: "b".into(),
        kind: kind.into(),
        data: Some(data),
    };
    for kind in [
        interact("po\u{0}ke", json!({})),
        interact("poke", json!({"note": "a\u{0}b"})),
        interact("poke", json!({"k\u{0}": 1})),
        interact("poke", json!({"blob": "x".repeat(9 * 1024)})),
        interact(&"k".repeat(65), json!({})),
        CommandKind::BroadcastEvent {
            event_type: "storm".into(),
            payload: json!({"text": "\u{0}"}).as_object().unwrap().clone(),
        },
        CommandKind::ConsumeResource {
            resource_type: "food".into(),
            amount: 0,
        },
    ] {
        let e = run(&mut z, &cmd(zid, a.clone(), kind)).result.unwrap_err();
        assert_eq!(e.reason(), "invalid_payload", "{e}");
    }
    for bad in ["a\u{0}", "", &"x".repeat(201)] {
        let e = run(
            &mut z,
            &cmd(zid, agent("c9", bad, all()), CommandKind::Join),
        )
        .result
        .unwrap_err();
        assert_eq!(e.reason(), "invalid_payload", "{bad:?}");
    }
    let patch = |p: ZonePatch| cmd(zid, Actor::Admin, CommandKind::UpdateZone(p));
    for p in [
        ZonePatch {
            name: Some("n\u{0}".into()),
            ..ZonePatch::default()
        },
        ZonePatch {
            properties: Some(json!({"k": "v\u{0}"})),
            ..ZonePatch::default()
        },
        ZonePatch {
            properties: Some(json!({"k": "x".repeat(70 * 1024)})),
            ..ZonePatch::default()
        },
    ] {
        let e = run(&mut z, &patch(p)).result.unwrap_err();
        assert_eq!(e.reason(), "invalid_payload", "{e}");
    }
    let e = run(
        &mut z,
        &patch(ZonePatch {
            capacity: Some(0),
            ..ZonePatch::default()
        }),
    );
    assert!(e.result.is_err());
    assert_eq!(z.seq(), 2, "nothing but the join happened");
}

#[test]
fn zone_changes_are_events_and_a_deleted_zone_ends_its_sessions() {
    let mut z = created(zone(3, all()));
    let zid = z.id();
    let created = z.clone();
    run(
        &mut z,
        &cmd(zid, agent("c1", "a", all()), CommandKind::Join),
    );
    run(
        &mut z,
        &cmd(zid, agent("c2", "b", all()), CommandKind::Join),
    );
    let e = run(
        &mut z,
        &cmd(
            zid,
            Actor::Admin,
            CommandKind::UpdateZone(ZonePatch {
                capacity: Some(1),
                ..ZonePatch::default()
            }),
        ),
    )
    .result
    .unwrap_err();
    assert_eq!(e.reason(), "conflict");
    let updated = run(
        &mut z,
        &cmd(
            zid,
            Actor::Admin,
            CommandKind::UpdateZone(ZonePatch {
                name: Some("Renamed".into()),
                properties: Some(json!({"weather": "rain"})),
                ..ZonePatch::default()
            }),
        ),
    )
    .result
    .unwrap();
    assert_eq!(
        updated.events[0].kind.payload(),
        json!({"name": "Renamed", "properties": {"weather": "rain"}})
    );
    let deleted = run(&mut z, &cmd(zid, Actor::Admin, CommandKind::DeleteZone))
        .result
        .unwrap();
    let names: Vec<&str> = deleted.events.iter().map(|e| e.name()).collect();
    assert_eq!(names, ["zone_deleted"]);
    assert_eq!(z.session_count(), 0);
    assert!(z.is_deleted());
    let after = run(
        &mut z,
        &cmd(zid, agent("c1", "a", all()), CommandKind::Leave),
    );
    assert_eq!(after.result.unwrap_err().reason(), "zone_not_found");
    // Agents cannot do what only the admin API or the server may.
    let mut fresh = created.clone();
    let e = run(
        &mut fresh,
        &cmd(zid, agent("c1", "a", all()), CommandKind::Tick),
    );
    assert_eq!(e.result.unwrap_err().reason(), "forbidden");
}

#[test]
fn replay_refuses_events_out_of_order_or_for_another_zone() {
    let mut z = created(zone(3, all()));
    let zid = z.id();
    let events = run(
        &mut z,
        &cmd(zid, agent("c1", "a", all()), CommandKind::Join),
    )
    .result
    .unwrap()
    .events;
    let mut again = z.clone();
    assert!(matches!(
        again.apply(&events[0]).unwrap_err(),
        ZoneError::OutOfOrder { seq: 2, current: 2 }
    ));
    let mut other = created(zone(3, all()));
    assert!(matches!(
        other.apply(&events[0]).unwrap_err(),
        ZoneError::WrongZone { .. }
    ));
    assert!(ZoneEvent::from_json(r#"{"id":"x"}"#).is_err());
    assert!(ZoneEvent::from_msgpack(&[0xc1, 0x00]).is_err());
    assert_eq!(
        EventKind::from_parts(
            "agent_moved",
            json!({"agent_id": "a", "position": {"x": 1}})
        )
        .unwrap_err()
        .to_string(),
        "the agent_moved payload is refused: missing field `y`"
    );
}

#[test]
fn new_zones_are_checked() {
    let bad = |spec: NewZone| {
        Zone::create(Uuid::now_v7(), spec, now())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        bad(NewZone::default()),
        "invalid zone: the name must be 1 to 200 characters, without NUL"
    );
    assert_eq!(
        bad(NewZone {
            name: "x".into(),
            capacity: Some(0),
            ..NewZone::default()
        }),
        format!("invalid zone: capacity must be 1 to {}", i32::MAX)
    );
    let mut resources = BTreeMap::new();
    resources.insert(
        "food".to_owned(),
        Resource {
            amount: 11,
            max: 10,
            regen: 1,
        },
    );
    assert_eq!(
        bad(NewZone {
            name: "x".into(),
            resources,
            ..NewZone::default()
        }),
        "invalid zone: resource \"food\" needs 0 <= amount <= max and regen >= 0, got amount 11, max 10, regen 1"
    );
    assert_eq!(
        bad(NewZone {
            name: "x".into(),
            properties: Some(json!([1])),
            ..NewZone::default()
        }),
        "invalid zone: properties must be a JSON object"
    );
    assert!(
        bad(NewZone {
            name: "x".into(),
            properties: Some(json!({"a": "\u{0}"})),
            ..NewZone::default()
        })
        .contains("NUL")
    );
    assert_eq!(
        bad(NewZone {
            name: "x".into(),
            ..NewZone::default()
        }),
        "invalid zone: assigned_server must be 1 to 200 characters, without NUL"
    );
    let z = Zone::create(
        Uuid::now_v7(),
        NewZone {
            name: " Plaza ".into(),
            assigned_server: Some("node-9".into()),
            ..NewZone::default()
        },
        now(),
    )
    .unwrap();
    assert_eq!(
        (
            z.name.as_str(),
            z.capacity,
            z.permissions,
            z.assigned_server.as_str()
        ),
        ("Plaza", DEFAULT_CAPACITY, DEFAULT_PERMISSIONS, "node-9")
    );
    let spec = NewZone {
        name: " Plaza ".into(),
        assigned_server: Some("node-9".into()),
        ..NewZone::default()
    };
    let (state, creation) = create(spec.clone());
    assert_eq!(
        (state.zone().name.as_str(), state.seq(), creation.seq),
        ("Plaza", 1, 1)
    );
    assert_eq!(state.epoch().len(), 32);
    assert_ne!(state.epoch(), created(spec).epoch());
}

#[test]
fn client_commands_decode_one_way_from_a_value_or_from_text() {
    let both = |name: &str, payload: Value| {
        let from_value = CommandKind::from_value(name, payload.clone());
        assert_eq!(
            CommandKind::from_json(name, &payload.to_string()),
            from_value,
            "{name} {payload}"
        );
        from_value
    };
    assert_eq!(
        both(
            "agent_move",
            json!({"position": {"x": 1, "y": 2, "z": 3}, "sent_at": 7})
        ),
        Ok(CommandKind::AgentMove {
            position: Position {
                x: 1.0,
                y: 2.0,
                z: 3.0
            },
            sent_at: Some(7)
        })
    );
    assert_eq!(
        both("broadcast_event", json!({"event_type": "storm"})),
        Ok(CommandKind::BroadcastEvent {
            event_type: "storm".into(),
            payload: Map::new()
        })
    );
    assert_eq!(both("tick", json!({})), Ok(CommandKind::Tick));
    assert_eq!(
        both("get_zone_state", json!({})),
        Ok(CommandKind::GetZoneState)
    );
    // The amount's sign is the zone's to judge, for every front door alike.
    assert!(matches!(
        both(
            "consume_resource",
            json!({"resource_type": "f", "amount": 0})
        ),
        Ok(CommandKind::ConsumeResource { amount: 0, .. })
    ));
    let refusal = |name: &str, payload: Value| both(name, payload).unwrap_err();
    let unknown = refusal(
        "agent_move",
        json!({"position": {"x": 1, "y": 2, "z": 3}, "speed": 1}),
    );
    assert_eq!(unknown.reason(), "invalid_payload");
    assert_eq!(
        unknown.to_string(),
        "the agent_move payload is refused: unknown field `speed`, expected `position` or `sent_at`"
    );
    assert_eq!(
        refusal("tick", json!({"at": 1})).reason(),
        "invalid_payload"
    );
    assert_eq!(
        refusal(
            "consume_resource",
            json!({"resource_type": "f", "amount": 1.5})
        )
        .reason(),
        "invalid_payload"
    );
    let teleport = refusal("teleport", json!({}));
    assert_eq!(teleport.reason(), "unknown_event");
    assert!(
        teleport
            .to_string()
            .starts_with("\"teleport\" is not a command")
    );
    // What the zone alone may ask of itself is no client's command.
    for internal in [
        "join",
        "leave",
        "create_zone",
        "delete_zone",
        "expire_sessions",
        "end_connections",
    ] {
        assert_eq!(refusal(internal, json!({})).reason(), "unknown_event");
    }
    // A key given twice: the text says what the value (which keeps the last) says.
    assert_eq!(
        CommandKind::from_json("tick", r#"{"a": 1, "a": 2}"#).unwrap_err(),
        refusal("tick", json!({"a": 2}))
    );
}

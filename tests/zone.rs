//! The zone domain: operations keep counts and resources exact, every refusal changes nothing
//! and says why, replaying the events rebuilds the zone, and events survive JSON and MessagePack
//! unchanged.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{Value, json};
use thunderline::zone::*;

fn zone(capacity: u32) -> Zone {
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
    Zone::create(
        NewZone {
            name: "Test".into(),
            capacity: Some(capacity),
            resources,
            ..NewZone::default()
        },
        "node-a",
        now(),
    )
    .unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Enter(u8),
    Leave(u8),
    Consume(BTreeMap<String, Value>),
    Tick,
    Move(f64, f64, f64),
    Interact(u8, u8),
    Grant(u32),
    Revoke(u32),
}

fn op() -> impl Strategy<Value = Op> {
    let change = prop_oneof![
        4 => (-30i64..30).prop_map(|n| json!(n)),
        1 => Just(json!(2.5)),
        1 => Just(json!("ten")),
        1 => Just(json!(i64::MIN)),
    ];
    let name = prop_oneof![4 => Just("food".to_owned()), 3 => Just("ore".to_owned()), 1 => Just("gold".to_owned())];
    prop_oneof![
        3 => any::<u8>().prop_map(Op::Enter),
        2 => any::<u8>().prop_map(Op::Leave),
        4 => prop::collection::btree_map(name, change, 0..3).prop_map(Op::Consume),
        2 => Just(Op::Tick),
        1 => (any::<f64>(), -1e3f64..1e3, -1e3f64..1e3).prop_map(|(x, y, z)| Op::Move(x, y, z)),
        1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| Op::Interact(a, b)),
        1 => (0u32..16).prop_map(Op::Grant),
        1 => (0u32..16).prop_map(Op::Revoke),
    ]
}

proptest! {
    #[test]
    fn refusals_change_nothing_and_replay_rebuilds_the_zone(capacity in 1u32..5, ops in prop::collection::vec(op(), 0..80)) {
        let mut live = zone(capacity);
        let initial = live.clone();
        let mut events = Vec::new();
        let mut sessions = 0u32;
        for op in ops {
            let before = live.clone();
            let t = now();
            let result = match &op {
                Op::Enter(a) => live.agent_entered(&format!("a{a}"), t),
                Op::Leave(a) => live.agent_left(&format!("a{a}"), t),
                Op::Consume(changes) => {
                    let map = changes.clone().into_iter().collect();
                    live.consume_resources(Some("a"), &map, t)
                }
                Op::Tick => Ok(live.tick(t)),
                Op::Move(x, y, z) => live.agent_moved("a", Position { x: *x, y: *y, z: *z }, t),
                Op::Interact(a, b) => live.agent_interaction(&format!("a{a}"), &format!("a{b}"), "poke", None, t),
                Op::Grant(bits) | Op::Revoke(bits) => {
                    // Permission changes cause no event; they are replayed from the zone row.
                    let bits = Permissions::from_bits_truncate(*bits);
                    let expected = if matches!(op, Op::Grant(_)) {
                        live.grant_permission(bits, t);
                        before.permissions | bits
                    } else {
                        live.revoke_permission(bits, t);
                        before.permissions - bits
                    };
                    prop_assert_eq!(live.permissions, expected);
                    continue;
                }
            };
            match result {
                Ok(event) => {
                    prop_assert_eq!(event.zone_id, live.id);
                    match &op {
                        Op::Enter(_) => sessions += 1,
                        Op::Leave(_) => sessions -= 1,
                        _ => {}
                    }
                    events.push(event);
                }
                Err(e) => {
                    prop_assert_eq!(&live, &before, "refused {:?} ({}) changed the zone", op, e);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            prop_assert_eq!(live.active_session_count, sessions);
            prop_assert!(live.active_session_count <= live.capacity);
            for r in live.resources.values() {
                prop_assert!(0 <= r.amount && r.amount <= r.max);
            }
        }
        let mut rebuilt = initial;
        rebuilt.permissions = live.permissions;
        for e in &events {
            rebuilt.apply(e).unwrap();
        }
        if let Some(last) = events.last() {
            prop_assert_eq!(rebuilt.updated_at, last.occurred_at);
            rebuilt.updated_at = live.updated_at;
        }
        rebuilt.updated_at = live.updated_at;
        prop_assert_eq!(rebuilt, live);
        // Ids are UUID v7, made in order: sorting by id is sorting by when they were made.
        let mut sorted = events.clone();
        sorted.sort_by_key(|e| e.id);
        prop_assert_eq!(sorted, events);
    }

    #[test]
    fn events_round_trip_through_json_and_messagepack_unchanged(
        seed in prop::collection::vec(op(), 1..30),
        props in prop::collection::btree_map("[a-z]{1,8}", prop_oneof![
            any::<i64>().prop_map(|n| json!(n)),
            any::<bool>().prop_map(|b| json!(b)),
            "[ -~]{0,12}".prop_map(|s| json!(s)),
            (-1e9f64..1e9).prop_map(|f| json!(f)),
        ], 0..5),
    ) {
        let mut z = zone(1000);
        z.properties = Value::Object(props.into_iter().collect());
        let mut events = vec![z.tick(now())];
        for op in seed {
            let t = now();
            let e = match op {
                Op::Enter(a) => z.agent_entered(&format!("a{a}"), t),
                Op::Leave(a) => z.agent_left(&format!("a{a}"), t),
                Op::Consume(c) => z.consume_resources(None, &c.into_iter().collect(), t),
                Op::Move(x, y, zz) => z.agent_moved("mover", Position { x, y, z: zz }, t),
                Op::Interact(a, b) => z.agent_interaction(&format!("a{a}"), &format!("b{b}"), "trade", Some(json!({"qty": a, "note": "ok"})), t),
                _ => Ok(z.tick(t)),
            };
            events.extend(e.ok());
        }
        for e in events {
            let json = e.to_json();
            prop_assert_eq!(&ZoneEvent::from_json(&json).unwrap(), &e);
            let packed = e.to_msgpack();
            prop_assert_eq!(&ZoneEvent::from_msgpack(&packed).unwrap(), &e);
            let wire: Value = serde_json::from_str(&json).unwrap();
            let keys: Vec<_> = wire.as_object().unwrap().keys().cloned().collect();
            prop_assert_eq!(keys, vec!["id", "occurred_at", "payload", "type", "zone_id"]);
        }
    }
}

#[test]
fn payloads_are_shaped_as_in_the_seed_briefing() {
    let mut z = zone(10);
    let t = now();
    let entered = z.agent_entered("agent-7", t).unwrap();
    assert_eq!(entered.event_type().as_str(), "agent_entered");
    assert_eq!(
        entered.kind.payload(),
        json!({"agent_id": "agent-7", "session_count": 1, "timestamp": t})
    );
    let changed = z
        .consume_resources(
            Some("agent-7"),
            json!({"food": -10, "ore": -5}).as_object().unwrap(),
            t,
        )
        .unwrap();
    assert_eq!(
        changed.kind.payload(),
        json!({"agent_id": "agent-7", "changes": {"food": -10, "ore": -5}, "new_resources": {"food": 40, "ore": 0}})
    );
    let tick = z.tick(t);
    assert_eq!(
        tick.kind.payload(),
        json!({"tick": 1, "properties": {}, "new_resources": {"food": 47, "ore": 1}, "timestamp": t})
    );
    let moved = z
        .agent_moved(
            "agent-7",
            Position {
                x: 10.0,
                y: 5.0,
                z: 0.0,
            },
            t,
        )
        .unwrap();
    assert_eq!(
        moved.kind.payload(),
        json!({"agent_id": "agent-7", "position": {"x": 10.0, "y": 5.0, "z": 0.0}})
    );
}

#[test]
fn every_kind_of_bad_input_has_its_own_error_and_changes_nothing() {
    let mut z = zone(1);
    let before = z.clone();
    let t = now();
    let cases: Vec<(ZoneError, &str)> = vec![
        (
            parse_zone_id("not-a-uuid").unwrap_err(),
            "\"not-a-uuid\" is not a UUID (expected e.g. 123e4567-e89b-12d3-a456-426614174000)",
        ),
        (
            z.consume_resources(None, json!({"food": -51}).as_object().unwrap(), t)
                .unwrap_err(),
            "not enough food: 50 available, a change of -51 would leave -1",
        ),
        (
            z.consume_resources(None, json!({"food": 51}).as_object().unwrap(), t)
                .unwrap_err(),
            "food cannot exceed its maximum of 100: a change of 51 would make it 101",
        ),
        (
            z.consume_resources(None, json!({"food": -1.5}).as_object().unwrap(), t)
                .unwrap_err(),
            "the change to \"food\" must be a whole number, not -1.5",
        ),
        (
            // All or nothing: the valid food change is not applied either.
            z.consume_resources(
                None,
                json!({"food": -1, "gold": -1}).as_object().unwrap(),
                t,
            )
            .unwrap_err(),
            "the zone has no resource \"gold\"",
        ),
        (
            z.authorize(Permissions::SPAWN_AGENTS, Permissions::MODIFY_ZONE)
                .unwrap_err(),
            "this needs the 0x02 [modify_zone] permission, which the agent's token does not hold",
        ),
        (
            z.authorize(Permissions::ADMIN_ZONE, Permissions::MODIFY_ZONE)
                .unwrap_err(),
            "this needs the 0x02 [modify_zone] permission, which the zone does not hold",
        ),
        (
            z.agent_left("nobody", t).unwrap_err(),
            "agent nobody has no session in this zone to leave",
        ),
        (
            EventKind::from_parts("agent_danced", json!({})).unwrap_err(),
            "unknown event type \"agent_danced\" (expected one of agent_entered, agent_left, agent_moved, agent_interaction, resource_changed, environment_tick)",
        ),
        (
            EventKind::from_parts(
                "agent_moved",
                json!({"agent_id": "a", "position": {"x": 1}}),
            )
            .unwrap_err(),
            "the agent_moved payload has the wrong shape: missing field `y`",
        ),
    ];
    for (err, expected) in cases {
        assert_eq!(err.to_string(), expected);
    }
    assert_eq!(z, before);
    z.agent_entered("first", t).unwrap();
    let full = z.clone();
    assert_eq!(
        z.agent_entered("second", t).unwrap_err(),
        ZoneError::ZoneFull { capacity: 1 }
    );
    assert_eq!(z, full);
    assert!(ZoneEvent::from_json(r#"{"id":"x"}"#).is_err());
    assert!(ZoneEvent::from_msgpack(&[0xc1, 0x00]).is_err());
}

#[test]
fn new_zones_are_checked() {
    let bad = |spec: NewZone| Zone::create(spec, "n", now()).unwrap_err().to_string();
    assert_eq!(
        bad(NewZone::default()),
        "invalid zone: the name must be 1 to 200 characters"
    );
    assert_eq!(
        bad(NewZone {
            name: "x".into(),
            capacity: Some(0),
            ..NewZone::default()
        }),
        "invalid zone: capacity must be at least 1"
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
    let z = Zone::create(
        NewZone {
            name: " Plaza ".into(),
            ..NewZone::default()
        },
        "node-9",
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
    let shown = serde_json::to_value(&z).unwrap();
    let keys: Vec<_> = shown.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        vec![
            "active_session_count",
            "assigned_server",
            "capacity",
            "id",
            "inserted_at",
            "name",
            "permissions",
            "properties",
            "resources",
            "updated_at"
        ]
    );
}

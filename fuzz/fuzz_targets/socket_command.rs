//! The socket's command decoder: a client frame decoded by `protocol::decode`, then its event
//! and payload by `channel::parse_event`, as the socket does; or an event name (one of the
//! channel's, or any text) with any JSON object as payload. It never panics; an event of the
//! channel gives its own command or `invalid_payload`, any other `unknown_event`; an accepted
//! `consume_resource` takes more than 0; and an accepted command's payload, written back as
//! JSON, parses to the same command.
//!
//! Input: one byte choosing the mode (even: the rest is a frame; odd: an event of the channel
//! by index, or past the last index any event name up to the first newline), then the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use thunderline::realtime::parse_event;
use thunderline::realtime::protocol::decode;
use thunderline::zone::CommandKind;

const EVENTS: [&str; 5] = [
    "agent_move",
    "agent_interact",
    "consume_resource",
    "broadcast_event",
    "get_zone_state",
];

fn check(event: &str, payload: Map<String, Value>) {
    match parse_event(event, payload.clone()) {
        Ok(kind) => {
            assert_eq!(kind.name(), event, "{payload:?}");
            if let CommandKind::ConsumeResource { amount, .. } = kind {
                assert!(amount > 0, "{payload:?}");
            }
            let Value::Object(mut written) = serde_json::to_value(&kind).expect("kinds serialise")
            else {
                panic!("{kind:?} is not an object");
            };
            let written = match written.remove("payload") {
                Some(Value::Object(p)) => p,
                None => Map::new(),
                Some(other) => panic!("{kind:?} has payload {other}"),
            };
            assert_eq!(parse_event(event, written.clone()), Ok(kind), "{written:?}");
        }
        Err(refusal) => {
            let expected = if EVENTS.contains(&event) {
                "invalid_payload"
            } else {
                "unknown_event"
            };
            assert_eq!(refusal.reason, expected, "{event:?}: {}", refusal.details);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(frame) = decode(text) {
            check(&frame.event, frame.payload);
        }
        return;
    }
    let (event, json) = match EVENTS.get(usize::from(mode >> 1) % (EVENTS.len() + 1)) {
        Some(event) => (*event, text),
        None => text.split_once('\n').unwrap_or((text, "{}")),
    };
    if let Ok(payload) = serde_json::from_str::<Map<String, Value>>(json) {
        check(event, payload);
    }
});

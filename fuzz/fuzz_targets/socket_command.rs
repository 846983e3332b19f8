//! The one command decoder, as sockets and brokers use it: a client frame decoded by
//! `protocol::decode`, then its event and payload by `CommandKind::from_value`, as the socket
//! does; or an event name (one a client may send, or any text) with any JSON object as payload,
//! decoded from the value (the socket) and from the text (a broker). It never panics; the two
//! give the same command or the same refusal; a command a client may send gives its own command
//! or `invalid_payload`, any other `unknown_event`; and an accepted command's payload, written
//! back as JSON, decodes to the same command.
//!
//! Input: one byte choosing the mode (even: the rest is a frame; odd: a command by index, or past
//! the last index any name up to the first newline), then the text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use thunderline::realtime::protocol::decode;
use thunderline::zone::{CLIENT_COMMANDS, CommandKind};

fn check(event: &str, payload: Map<String, Value>) {
    let text = Value::Object(payload.clone()).to_string();
    let decoded = CommandKind::from_value(event, Value::Object(payload.clone()));
    assert_eq!(
        CommandKind::from_json(event, &text),
        decoded,
        "{event:?} {text}: the text and the value decode alike"
    );
    match decoded {
        Ok(kind) => {
            assert_eq!(kind.name(), event, "{payload:?}");
            let Value::Object(mut written) = serde_json::to_value(&kind).expect("kinds serialise")
            else {
                panic!("{kind:?} is not an object");
            };
            let written = match written.remove("payload") {
                Some(Value::Object(p)) => p,
                None => Map::new(),
                Some(other) => panic!("{kind:?} has payload {other}"),
            };
            assert_eq!(
                CommandKind::from_value(event, Value::Object(written.clone())),
                Ok(kind),
                "{written:?}"
            );
        }
        Err(refusal) => {
            let expected = if CLIENT_COMMANDS.contains(&event) {
                "invalid_payload"
            } else {
                "unknown_event"
            };
            assert_eq!(refusal.reason(), expected, "{event:?}: {refusal}");
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
    let commands = CLIENT_COMMANDS.len();
    let (event, json) = match CLIENT_COMMANDS.get(usize::from(mode >> 1) % (commands + 1)) {
        Some(event) => (*event, text),
        None => text.split_once('\n').unwrap_or((text, "{}")),
    };
    if let Ok(payload) = serde_json::from_str::<Map<String, Value>>(json) {
        check(event, payload);
    }
});

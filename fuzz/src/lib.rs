//! What the broker targets share: a delivery built from the fuzzer's bytes, and the checks on
//! what `decode_command` made of it.

use serde_json::{Map, Value, json};
use thunderline::daemon::ingest::decode_command;
use thunderline::pipeline::Failure;
use thunderline::sources::Delivery;
use thunderline::zone::{Actor, CLIENT_COMMANDS, ZoneCommand};

/// A valid command id, for the message id to match or not.
pub const ID: &str = "0190f5a0-0000-7000-8000-0000000000aa";

/// The message id a delivery carries, chosen by one byte: none (the usual case), the id of the
/// seeds, or one that is not a UUID.
pub fn message_id(selector: u8) -> Option<&'static str> {
    match selector % 4 {
        0 | 1 => None,
        2 => Some(ID),
        _ => Some("not-a-uuid"),
    }
}

pub fn delivery<'a>(
    payload: &'a [u8],
    content_type: Option<&'a str>,
    message_id: Option<&'a str>,
) -> Delivery<'a> {
    Delivery {
        payload,
        content_type,
        message_id,
        subject: "thunderline.commands.fuzz",
        attempt: 1,
    }
}

/// Decodes `delivery` and checks the outcome: a refusal is permanent and names its class
/// (`not_json`/`not_msgpack`, `invalid_payload` or `unknown_event`); a command is one a client
/// may send, from a
/// service, with the message id as its id when there is one, and the same command again when
/// written back as JSON and as MessagePack.
pub fn check(delivery: &Delivery<'_>, not_format: &str) {
    match decode_command(delivery) {
        Err(failure) => check_refusal(&failure, not_format),
        Ok(command) => {
            assert!(
                CLIENT_COMMANDS.contains(&command.kind.name()),
                "{command:?} is not a command a client may send"
            );
            assert!(
                matches!(command.actor, Actor::Service { .. }),
                "{command:?}"
            );
            if let Some(message_id) = delivery.message_id {
                assert_eq!(command.id.to_string(), message_id.to_ascii_lowercase());
            }
            let wire = wire(&command);
            let text = wire.to_string();
            let again = decode_command(&self::delivery(text.as_bytes(), None, None));
            assert_eq!(again.as_ref(), Ok(&command), "as JSON: {text}");
            let packed = rmp_serde::to_vec_named(&wire).expect("a JSON value packs");
            let again = decode_command(&self::delivery(&packed, Some("application/msgpack"), None));
            assert_eq!(again.as_ref(), Ok(&command), "as MessagePack: {text}");
        }
    }
}

fn check_refusal(failure: &Failure, not_format: &str) {
    let reason = failure.reason();
    assert!(!failure.is_retryable(), "{reason}");
    assert!(
        reason.starts_with("invalid_payload: ")
            || reason.starts_with("unknown_event: ")
            || reason.starts_with(not_format),
        "{reason}"
    );
}

/// A command as a broker would send it, in JSON.
fn wire(command: &ZoneCommand) -> Value {
    let Value::Object(mut kind) = serde_json::to_value(&command.kind).expect("kinds serialise")
    else {
        panic!("{:?} is not an object", command.kind);
    };
    let mut wire = Map::new();
    wire.insert("id".into(), json!(command.id));
    wire.insert("zone_id".into(), json!(command.zone_id));
    if let Actor::Service {
        agent_id: Some(agent),
    } = &command.actor
    {
        wire.insert("agent_id".into(), json!(agent));
    }
    wire.insert("type".into(), kind.remove("type").expect("a type"));
    if let Some(payload) = kind.remove("payload") {
        wire.insert("payload".into(), payload);
    }
    Value::Object(wire)
}

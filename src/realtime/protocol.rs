//! The Phoenix Channels V2 JSON codec: `[join_ref, ref, topic, event, payload]`.
//!
//! Decoding checks every field and says what was wrong; encoding writes the frame text once, so
//! a broadcast's bytes can be shared by every subscriber.

use serde::Serialize;
use serde_json::{Map, Value};

/// One frame from a client.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub join_ref: Option<String>,
    pub msg_ref: Option<String>,
    pub topic: String,
    pub event: String,
    pub payload: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("the frame is not JSON: {0}")]
    NotJson(String),
    #[error("a frame is an array of 5: [join_ref, ref, topic, event, payload]")]
    NotAnArray,
    #[error("a frame has 5 elements [join_ref, ref, topic, event, payload], this one has {0}")]
    WrongArity(usize),
    #[error("{0} must be a string or null")]
    BadRef(&'static str),
    #[error("{0} must be a string")]
    NotAString(&'static str),
    #[error("the payload must be a JSON object")]
    PayloadNotAnObject,
}

fn optional_string(v: Value, what: &'static str) -> Result<Option<String>, ProtocolError> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s)),
        _ => Err(ProtocolError::BadRef(what)),
    }
}

/// Parses a text frame. On error, the second value is the frame's `ref` when it could be read,
/// so the client can still be answered.
pub fn decode(text: &str) -> Result<Frame, (ProtocolError, Option<String>)> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| (ProtocolError::NotJson(e.to_string()), None))?;
    let Value::Array(items) = value else {
        return Err((ProtocolError::NotAnArray, None));
    };
    if items.len() != 5 {
        return Err((ProtocolError::WrongArity(items.len()), None));
    }
    let mut items = items.into_iter();
    let mut next = || items.next().unwrap_or(Value::Null);
    let join_ref = next();
    let msg_ref = optional_string(next(), "ref").map_err(|e| (e, None))?;
    let join_ref = optional_string(join_ref, "join_ref").map_err(|e| (e, msg_ref.clone()))?;
    let Value::String(topic) = next() else {
        return Err((ProtocolError::NotAString("topic"), msg_ref));
    };
    let Value::String(event) = next() else {
        return Err((ProtocolError::NotAString("event"), msg_ref));
    };
    let Value::Object(payload) = next() else {
        return Err((ProtocolError::PayloadNotAnObject, msg_ref));
    };
    Ok(Frame {
        join_ref,
        msg_ref,
        topic,
        event,
        payload,
    })
}

/// The text of a frame.
pub fn encode(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload: &impl Serialize,
) -> String {
    serde_json::to_string(&(join_ref, msg_ref, topic, event, payload)).expect("frames serialise")
}

/// `phx_reply` with `{status, response}`.
pub fn reply(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    ok: bool,
    response: &impl Serialize,
) -> String {
    #[derive(Serialize)]
    struct Reply<'a, R> {
        status: &'a str,
        response: &'a R,
    }
    let status = if ok { "ok" } else { "error" };
    encode(
        join_ref,
        msg_ref,
        topic,
        "phx_reply",
        &Reply { status, response },
    )
}

/// An error reply: `{status: "error", response: {reason, details}}`.
pub fn error_reply(
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    reason: &str,
    details: &str,
) -> String {
    reply(
        join_ref,
        msg_ref,
        topic,
        false,
        &serde_json::json!({"reason": reason, "details": details}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_refuses_precisely() {
        let f = decode(r#"["1","2","zone:x","phx_join",{"a":1}]"#).unwrap();
        assert_eq!(f.join_ref.as_deref(), Some("1"));
        assert_eq!(f.msg_ref.as_deref(), Some("2"));
        assert_eq!((f.topic.as_str(), f.event.as_str()), ("zone:x", "phx_join"));
        let hb = decode(r#"[null,"6","phoenix","heartbeat",{}]"#).unwrap();
        assert_eq!(hb.join_ref, None);
        let err = |t: &str| decode(t).unwrap_err();
        assert!(matches!(err("{").0, ProtocolError::NotJson(_)));
        assert_eq!(err("{}").0, ProtocolError::NotAnArray);
        assert_eq!(err("[1,2]").0, ProtocolError::WrongArity(2));
        assert_eq!(
            err(r#"[null,7,"t","e",{}]"#).0,
            ProtocolError::BadRef("ref")
        );
        assert_eq!(
            err(r#"[1,"7","t","e",{}]"#),
            (ProtocolError::BadRef("join_ref"), Some("7".into()))
        );
        assert_eq!(
            err(r#"[null,"7","t","e",null]"#),
            (ProtocolError::PayloadNotAnObject, Some("7".into()))
        );
        assert_eq!(
            err(r#"[null,"7",3,"e",{}]"#),
            (ProtocolError::NotAString("topic"), Some("7".into()))
        );
    }

    #[test]
    fn encodes_phoenix_frames() {
        assert_eq!(
            reply(Some("1"), Some("2"), "zone:x", true, &serde_json::json!({})),
            r#"["1","2","zone:x","phx_reply",{"status":"ok","response":{}}]"#
        );
        assert_eq!(
            error_reply(None, Some("3"), "t", "unmatched topic", "join first"),
            r#"[null,"3","t","phx_reply",{"status":"error","response":{"details":"join first","reason":"unmatched topic"}}]"#
        );
        assert_eq!(
            encode(
                None,
                None,
                "zone:x",
                "agent_moved",
                &serde_json::json!({"a": 1})
            ),
            r#"[null,null,"zone:x","agent_moved",{"a":1}]"#
        );
    }
}

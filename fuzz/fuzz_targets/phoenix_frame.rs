//! The Phoenix Channels V2 frame decoder, `realtime::protocol::decode`, on any text. It never
//! panics; a frame it accepts, encoded again with `protocol::encode`, decodes to the same frame;
//! a refusal names what was wrong, and gives back the frame's `ref` exactly when the text is a
//! 5-element array whose ref is a string and the error is in a later field.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use thunderline::realtime::protocol::{ProtocolError, decode, encode};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match decode(text) {
        Ok(frame) => {
            let again = encode(
                frame.join_ref.as_deref(),
                frame.msg_ref.as_deref(),
                &frame.topic,
                &frame.event,
                &frame.payload,
            );
            assert_eq!(decode(&again).as_ref(), Ok(&frame), "{again}");
        }
        Err((error, msg_ref)) => {
            let value: Result<Value, _> = serde_json::from_str(text);
            let items = match (&error, value) {
                (ProtocolError::NotJson(_), value) => {
                    assert!(value.is_err(), "{text:?} is JSON");
                    assert_eq!(msg_ref, None);
                    return;
                }
                (_, Err(e)) => panic!("{error:?}, but {text:?} is not JSON: {e}"),
                (ProtocolError::NotAnArray, Ok(value)) => {
                    assert!(!value.is_array(), "{text:?}");
                    assert_eq!(msg_ref, None);
                    return;
                }
                (_, Ok(Value::Array(items))) => items,
                (_, Ok(value)) => panic!("{error:?}, but {value} is not an array"),
            };
            if let ProtocolError::WrongArity(n) = error {
                assert_eq!(items.len(), n);
                assert_ne!(n, 5);
                assert_eq!(msg_ref, None);
                return;
            }
            assert_eq!(items.len(), 5, "{error:?}");
            match &items[1] {
                Value::String(r) => assert_eq!(msg_ref.as_ref(), Some(r), "{error:?}"),
                Value::Null => assert_eq!(msg_ref, None, "{error:?}"),
                other => {
                    assert_eq!(error, ProtocolError::BadRef("ref"), "ref {other}");
                    assert_eq!(msg_ref, None);
                    return;
                }
            }
            assert_ne!(error, ProtocolError::BadRef("ref"));
        }
    }
});

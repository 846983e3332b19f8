//! The broker command decoder, JSON side: `decode_command` on any bytes, with the content type
//! absent, `application/json` or another non-MessagePack type, with or without a message id.
//! It never panics; a refusal is permanent and starts `not_json:` or `invalid_payload:`; a
//! command it accepts is a broker command from a service, and written back as JSON and as
//! MessagePack it decodes to the same command.
//!
//! Input: one byte choosing the content type and message id, then the message body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thunderline_fuzz::{check, delivery, message_id};

const CONTENT_TYPES: [Option<&str>; 4] = [
    None,
    Some("application/json"),
    Some("application/json; charset=utf-8"),
    Some("text/plain"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector >> 2) % CONTENT_TYPES.len()];
    check(
        &delivery(body, content_type, message_id(selector)),
        "not_json: ",
    );
});

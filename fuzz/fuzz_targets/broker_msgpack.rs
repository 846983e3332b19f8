//! The broker command decoder, MessagePack side: `decode_command` on any bytes, with one of
//! the MessagePack content types (in any case, with parameters), with or without a message
//! id. It never panics; a refusal is permanent and starts `not_msgpack:` or
//! `invalid_payload:`; a command it accepts is a broker command from a service, and written
//! back as JSON and as MessagePack it decodes to the same command.
//!
//! Input: one byte choosing the content type and message id, then the message body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thunderline_fuzz::{check, delivery, message_id};

const CONTENT_TYPES: [&str; 4] = [
    "application/msgpack",
    "application/x-msgpack",
    "Application/MsgPack; charset=binary",
    "application/vnd.msgpack",
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[usize::from(selector >> 2) % CONTENT_TYPES.len()];
    check(
        &delivery(body, Some(content_type), message_id(selector)),
        "not_msgpack: ",
    );
});

//! The limits on what a command may carry. Every string a zone keeps or broadcasts is checked
//! here: no NUL anywhere (PostgreSQL's `jsonb` and `text` refuse it, so one such string would
//! otherwise block the audit log), and a bounded size, so that one client cannot make every
//! subscriber's queue carry megabytes.
//!
//! | what | limit |
//! |---|---|
//! | agent id, connection id | 1 to 200 bytes |
//! | interaction `kind`, custom event type, resource name | 1 to 64 bytes |
//! | `target_agent_id` | 1 to 200 bytes |
//! | zone name, assigned server | 1 to 200 characters |
//! | interaction `data` | 8 KiB of JSON |
//! | custom event `payload` | 8 KiB of JSON |
//! | zone `properties` | 64 KiB of JSON |
//!
//! No string anywhere, keys of JSON objects included, may hold U+0000.

use serde_json::Value;

use super::error::ZoneError;

pub const MAX_AGENT_ID_BYTES: usize = 200;
pub const MAX_CONNECTION_BYTES: usize = 200;
pub const MAX_NAME_BYTES: usize = 64;
pub const MAX_ZONE_NAME_CHARS: usize = 200;
pub const MAX_DATA_BYTES: usize = 8 * 1024;
pub const MAX_PROPERTIES_BYTES: usize = 64 * 1024;

/// A string field: non-empty, at most `max` bytes, no NUL.
pub(crate) fn text(
    event_type: &str,
    field: &str,
    value: &str,
    max: usize,
) -> Result<(), ZoneError> {
    if value.is_empty() {
        return Err(ZoneError::invalid(
            event_type,
            format!("{field} must not be empty"),
        ));
    }
    if value.len() > max {
        return Err(ZoneError::invalid(
            event_type,
            format!(
                "{field} is {} bytes; at most {max} are allowed",
                value.len()
            ),
        ));
    }
    if value.contains('\0') {
        return Err(ZoneError::invalid(
            event_type,
            format!("{field} must not contain NUL (U+0000)"),
        ));
    }
    Ok(())
}

/// Free JSON: at most `max` bytes once serialised, and no NUL in any string or key.
pub(crate) fn json(
    event_type: &str,
    field: &str,
    value: &Value,
    max: usize,
) -> Result<(), ZoneError> {
    if has_nul(value) {
        return Err(ZoneError::invalid(
            event_type,
            format!("{field} must not contain NUL (U+0000) in any string or key"),
        ));
    }
    let size = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
    if size > max {
        return Err(ZoneError::invalid(
            event_type,
            format!("{field} is {size} bytes of JSON; at most {max} are allowed"),
        ));
    }
    Ok(())
}

fn has_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nul_is_found_anywhere_and_sizes_are_bounded() {
        assert!(text("e", "kind", "poke", 64).is_ok());
        assert!(text("e", "kind", "", 64).is_err());
        assert!(text("e", "kind", "po\0ke", 64).is_err());
        assert!(text("e", "kind", &"x".repeat(65), 64).is_err());
        assert!(json("e", "data", &json!({"a": [1, {"b": "ok"}]}), 100).is_ok());
        assert!(json("e", "data", &json!({"a": [1, {"b": "n\u{0}o"}]}), 100).is_err());
        assert!(json("e", "data", &json!({"k\u{0}": 1}), 100).is_err());
        assert!(json("e", "data", &json!({"a": "x".repeat(200)}), 100).is_err());
    }
}

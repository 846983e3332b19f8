//! Inputs the fuzz targets (`fuzz/`, cargo-fuzz) found to break a decoder, each fed to the same
//! function, with the outcome it should have. Each input is also kept under
//! `fuzz/regressions/<target>/`, which CI's fuzzing step runs first. BENCHMARKS.md ("Fuzzing
//! (issue 15)") has the runs that found them.

mod common;

use serde_json::{Value, json};
use thunderline::daemon::ingest::decode_command;
use thunderline::sources::Delivery;
use thunderline::store::Store;
use thunderline::zone::ZoneCommand;

const ZONE: &str = "0190f5a0-0000-7000-8000-000000000001";
const ID: &str = "0190f5a0-0000-7000-8000-0000000000aa";

fn delivery<'a>(payload: &'a [u8], content_type: Option<&'a str>) -> Delivery<'a> {
    Delivery {
        payload,
        content_type,
        message_id: None,
        subject: "thunderline.commands.z",
        attempt: 1,
    }
}

/// An `agent_interact` command whose `data` is `depth` arrays, one inside the other.
fn interact_nested(depth: usize) -> Value {
    let mut data = json!(1);
    for _ in 0..depth {
        data = Value::Array(vec![data]);
    }
    json!({
        "id": ID, "zone_id": ZONE, "agent_id": "npc-7", "type": "agent_interact",
        "payload": {"target_agent_id": "bob", "kind": "wave", "data": data}
    })
}

fn assert_refused(payload: &[u8], content_type: Option<&str>, what: &str) {
    match decode_command(&delivery(payload, content_type)) {
        Ok(command) => panic!("{what}: accepted as {:?}", command.kind.name()),
        Err(failure) => {
            assert!(!failure.is_retryable(), "{what}: {}", failure.reason());
            let reason = failure.reason();
            assert!(
                ["invalid_payload: ", "not_json: ", "not_msgpack: "]
                    .iter()
                    .any(|class| reason.starts_with(class)),
                "{what}: {reason}"
            );
        }
    }
}

/// `broker_msgpack`, crash 1. MessagePack was decoded with rmp-serde's nesting limit (1024
/// levels), JSON with serde_json's: a command whose payload nests deeper than JSON allows was
/// accepted from MessagePack, though the same command as JSON is refused, and its event, logged
/// as JSON, cannot be read back from the audit log (serde_json refuses it there too).
/// MessagePack must be held to JSON's depth. (JSON's payload is now parsed on its own, so its
/// limit counts from the payload: the fuzzer's input, one level inside it, is taken from both,
/// and its event reads back.)
#[tokio::test]
async fn a_msgpack_command_is_held_to_the_nesting_json_allows() {
    // The fuzzer's minimised input; its first byte chose the content type: application/msgpack.
    let found = include_bytes!("../fuzz/regressions/broker_msgpack/nesting-depth");
    let from_msgpack = decode_command(&delivery(&found[1..], Some("application/msgpack")));
    let as_json = {
        use serde::Deserialize;
        let mut unlimited = rmp_serde::Deserializer::from_read_ref(&found[1..]);
        unlimited.set_max_depth(10_000);
        Value::deserialize(&mut unlimited).unwrap().to_string()
    };
    let from_json = decode_command(&delivery(as_json.as_bytes(), None));
    assert_eq!(from_msgpack.is_ok(), from_json.is_ok(), "{from_json:?}");
    if let Ok(command) = from_msgpack {
        reads_back(command).await;
    }
    for depth in [200, 400] {
        let command = interact_nested(depth);
        let json = command.to_string();
        assert_refused(json.as_bytes(), None, &format!("JSON, {depth} deep"));
        let packed = rmp_serde::to_vec_named(&command).unwrap();
        assert_refused(
            &packed,
            Some("application/msgpack"),
            &format!("MessagePack, {depth} deep"),
        );
    }
}

/// The boundary: at every depth around JSON's limit, MessagePack accepts a command exactly when
/// JSON does (so the fix refuses nothing JSON takes), and what is accepted is the same command.
#[test]
fn msgpack_and_json_accept_the_same_nesting() {
    let mut accepted = 0;
    for depth in 100..=140 {
        let command = interact_nested(depth);
        let json = command.to_string();
        let packed = rmp_serde::to_vec_named(&command).unwrap();
        let from_json = decode_command(&delivery(json.as_bytes(), None)).ok();
        let from_msgpack = decode_command(&delivery(&packed, Some("application/msgpack"))).ok();
        // (Not the commands themselves in the message: 100 nested arrays print long.)
        assert_eq!(
            from_msgpack.is_some(),
            from_json.is_some(),
            "{depth} deep: accepted from MessagePack, from JSON"
        );
        assert!(
            from_msgpack == from_json,
            "{depth} deep: different commands"
        );
        accepted += usize::from(from_json.is_some());
    }
    assert!((1..41).contains(&accepted), "the limit is inside 100..=140");
}

/// The deepest command either accepts is applied, logged and read back from the audit log: an
/// accepted command never leaves an event its zone cannot load.
#[tokio::test]
async fn the_deepest_command_accepted_reads_back_from_the_audit_log() {
    let deepest = (100..=140)
        .rev()
        .find_map(|depth| {
            let json = interact_nested(depth).to_string();
            decode_command(&delivery(json.as_bytes(), None)).ok()
        })
        .expect("some depth is accepted");
    reads_back(deepest).await;
}

/// Applies `command` to a zone of its own, logs its events and reads them back.
async fn reads_back(mut command: ZoneCommand) {
    let db = common::sqlite();
    let store = Store::connect(&db.url).await.unwrap();
    let (mut zone, _) = common::zones::stored(&store, common::zones::spec("deep")).await;
    command.zone_id = zone.id();
    let events = common::zones::execute(&mut zone, &command)
        .result
        .unwrap()
        .events;
    assert_eq!(events.len(), 1);
    store
        .append_events(&events.iter().collect::<Vec<_>>())
        .await
        .unwrap();
    let back = store
        .zone_events(zone.id(), None, Some(1), None)
        .await
        .unwrap();
    assert_eq!(back, events, "the event reads back as it was logged");
    store.close().await;
    db.cleanup().await;
}

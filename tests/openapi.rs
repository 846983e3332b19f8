//! The admin API's OpenAPI description against the server that serves it: every described
//! operation is served, nothing is served undescribed, every error is `{"error", "details"}`,
//! and what the server answers has the fields the description promises. (Fuzzing the
//! description's inputs is `contrib/schemathesis.sh`, in CI.)

mod common;

use common::server::{TestServer, http, start};
use serde_json::{Value, json};

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

async fn described(srv: &TestServer) -> Value {
    let (status, doc) = http(srv.server.addr, "GET", "/api/openapi.json", None, None).await;
    assert_eq!(status, 200, "the description needs no token: {doc}");
    doc
}

/// `path` with each `{param}` filled: a zone id that names no zone, a batcher, an agent.
fn filled(path: &str) -> String {
    path.replace("{id}", "00000000-0000-7000-8000-000000000000")
        .replace("{name}", "broadcast")
        .replace("{agent_id}", "nobody")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_description_is_openapi_3_1_and_names_what_a_user_needs() {
    let srv = start(None).await;
    let doc = described(&srv).await;
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["info"]["title"].as_str().is_some_and(|t| !t.is_empty()));
    let paths = doc["paths"].as_object().unwrap();
    for path in [
        "/api/zones",
        "/api/zones/{id}",
        "/api/zones/{id}/permissions",
        "/api/zones/{id}/events",
        "/api/zones/{id}/broadcast",
        "/api/zones/{id}/agents",
        "/api/dead_letters",
        "/api/tokens",
        "/api/tokens/revoke",
        "/api/pipeline",
        "/api/cluster",
        "/api/cluster/drain",
        "/api/openapi.json",
        "/healthz",
        "/readyz",
    ] {
        assert!(paths.contains_key(path), "{path} is not described");
    }
    // The bodies a user sends and the answers they read are described, not left as "object".
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for schema in [
        "NewZone",
        "ZonePatch",
        "Zone",
        "Permissions",
        "Resource",
        "WireEvent",
        "EventPage",
        "DeadLetterPage",
        "AgentPage",
        "ApiErrorBody",
    ] {
        assert!(schemas.contains_key(schema), "no schema {schema}");
    }
    let create = &paths["/api/zones"]["post"];
    assert_eq!(
        create["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/NewZone"
    );
    // Permissions are bits, one name, or a list of names, everywhere they are taken.
    let permissions = serde_json::to_string(&schemas["Permissions"]).unwrap();
    for form in ["integer", "string", "array"] {
        assert!(permissions.contains(form), "{permissions}");
    }

    // Every admin operation asks for the admin token and describes its errors; the description
    // and the health checks ask for nothing.
    assert_eq!(
        doc["components"]["securitySchemes"]["admin_token"]["scheme"],
        "bearer"
    );
    let public = ["/api/openapi.json", "/healthz", "/readyz"];
    for (path, item) in paths {
        for method in METHODS {
            let Some(op) = item.get(method) else { continue };
            if public.contains(&path.as_str()) {
                assert!(op.get("security").is_none(), "{method} {path}");
                continue;
            }
            assert_eq!(
                op["security"],
                json!([{"admin_token": []}]),
                "{method} {path}"
            );
            for status in ["400", "401", "404", "503"] {
                assert_eq!(
                    op["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                    "#/components/schemas/ApiErrorBody",
                    "{method} {path} {status}"
                );
            }
            assert!(
                op["responses"]
                    .as_object()
                    .unwrap()
                    .keys()
                    .any(|s| s.starts_with('2')),
                "{method} {path} has no success"
            );
        }
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_described_operation_is_served_and_nothing_else_is() {
    let srv = start(None).await;
    let doc = described(&srv).await;
    let paths = doc["paths"].as_object().unwrap();
    // Described methods last-but-one: a described DELETE removes nothing (no zone has the id).
    for (path, item) in paths {
        let target = filled(path);
        for method in METHODS {
            let upper = method.to_ascii_uppercase();
            let body = (method != "get").then(|| json!({}));
            let (status, answer) = srv.api(&upper, &target, body).await;
            if item.get(method).is_some() {
                assert_ne!(
                    status, 405,
                    "{upper} {path} is described, not served: {answer}"
                );
                assert!(
                    !(status == 404 && answer["error"] == "not_found"),
                    "{upper} {path} is described, not routed: {answer}"
                );
                // What it answers is described: a status among its responses (or `default`).
                let responses = item[method]["responses"].as_object().unwrap();
                assert!(
                    responses.contains_key(&status.to_string())
                        || responses.contains_key("default"),
                    "{upper} {target} answered {status}, which is not described: {answer}"
                );
            } else {
                assert_eq!(
                    (status, answer["error"].clone()),
                    (405, json!("method_not_allowed")),
                    "{upper} {path} is served but not described"
                );
                assert!(answer["details"].is_string());
            }
        }
    }

    // What no route serves is a JSON 404, with a token or without.
    for path in ["/api/nothing", "/api/zones/x/y/z", "/api/zones/a/events/b"] {
        for token in [Some(srv.server.secrets.admin_token.as_str()), None] {
            let (status, answer) = http(srv.server.addr, "GET", path, None, token).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(answer["error"], "not_found", "{path}: {answer}");
            assert!(
                answer["details"]
                    .as_str()
                    .unwrap()
                    .contains(path.split('?').next().unwrap())
            );
        }
    }
    srv.stop().await;
}

/// The required fields of `schema` (following `$ref`s and `allOf`, as a flattened struct is
/// described).
fn required<'a>(doc: &'a Value, schema: &'a Value) -> Vec<&'a str> {
    let schema = match schema["$ref"].as_str() {
        Some(r) => &doc["components"]["schemas"][r.rsplit('/').next().unwrap()],
        None => schema,
    };
    let mut fields: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        fields.extend(required(doc, part));
    }
    fields
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_have_the_fields_the_description_promises() {
    let srv = start(None).await;
    let doc = described(&srv).await;
    let (status, zone) = srv
        .api(
            "POST",
            "/api/zones",
            Some(json!({"name": "described", "capacity": 4,
                        "permissions": ["spawn_agents", "broadcast_events"]})),
        )
        .await;
    assert_eq!(status, 201, "{zone}");
    let id = zone["id"].as_str().unwrap();
    let (status, _) = srv
        .api(
            "POST",
            &format!("/api/zones/{id}/broadcast"),
            Some(json!({"event_type": "storm", "payload": {"wind": 3}})),
        )
        .await;
    assert_eq!(status, 200);

    for (path, served) in [
        ("/api/zones", "/api/zones".to_owned()),
        ("/api/zones/{id}", format!("/api/zones/{id}")),
        ("/api/zones/{id}/events", format!("/api/zones/{id}/events")),
        ("/api/zones/{id}/agents", format!("/api/zones/{id}/agents")),
        ("/api/dead_letters", "/api/dead_letters".to_owned()),
        ("/api/pipeline", "/api/pipeline".to_owned()),
    ] {
        let (status, body) = srv.api("GET", &served, None).await;
        assert_eq!(status, 200, "{served}: {body}");
        let schema =
            &doc["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
        let fields = required(&doc, schema);
        assert!(
            !fields.is_empty(),
            "{path}: the answer's fields are not described"
        );
        for field in fields {
            assert!(body.get(field).is_some(), "{served} lacks {field}: {body}");
        }
    }

    // Every list is a page: its items, limit, offset and total.
    for (served, items) in [
        ("/api/zones?limit=1".to_owned(), "zones"),
        (format!("/api/zones/{id}/events?limit=1"), "events"),
        (format!("/api/zones/{id}/agents?limit=1"), "agents"),
        ("/api/dead_letters?limit=1".to_owned(), "dead_letters"),
    ] {
        let (status, body) = srv.api("GET", &served, None).await;
        assert_eq!(status, 200, "{served}: {body}");
        assert!(body[items].is_array(), "{served}: {body}");
        assert_eq!(body["limit"], 1, "{served}");
        assert_eq!(body["offset"], 0, "{served}");
        assert!(body["total"].is_u64(), "{served}: {body}");
        let (status, body) = srv.api("GET", &format!("{served}0000"), None).await;
        assert_eq!(
            (status, body["error"].clone()),
            (400, json!("bad_request")),
            "{served}0000"
        );
    }
    let (_, events) = srv
        .api(
            "GET",
            &format!("/api/zones/{id}/events?limit=1&offset=1"),
            None,
        )
        .await;
    assert_eq!(events["total"], 2, "created, then the storm: {events}");
    assert_eq!(events["events"][0]["type"], "storm");

    // A body is an object: an array of the fields is not read as one (serde would).
    for body in [json!([]), json!(["renamed"]), json!("x"), json!(null)] {
        let (status, answer) = srv
            .api("PATCH", &format!("/api/zones/{id}"), Some(body.clone()))
            .await;
        assert_eq!(
            (status, answer["error"].clone()),
            (400, json!("bad_request")),
            "{body}"
        );
    }
    let (_, unchanged) = srv.api("GET", &format!("/api/zones/{id}"), None).await;
    assert_eq!(unchanged["name"], "described");

    // The WebSocket endpoint's refusals before an upgrade are JSON errors too.
    let (status, answer) = http(srv.server.addr, "GET", "/socket/websocket", None, None).await;
    assert!((400..500).contains(&status), "{status}");
    assert!(
        answer["error"].is_string() && answer["details"].is_string(),
        "{answer}"
    );
    srv.stop().await;
}

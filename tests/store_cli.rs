//! `thunderline replay` and `thunderline bench audit` as a user runs them, on SQLite and (where
//! it answers, always under CI) PostgreSQL.

mod common;

use std::process::Command;

use serde_json::{Value, json};
use thunderline::store::Store;
use thunderline::zone::*;

fn thunderline(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(args)
        .env_remove("THUNDERLINE_DATABASE_URL")
        .output()
        .expect("the binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_prints_a_zones_events_in_order_as_json_lines() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let (mut zone, creation) =
            common::zones::stored(&store, common::zones::spec("Replay")).await;
        let actor = Actor::Agent {
            agent_id: "a".into(),
            connection: "c".into(),
            permissions: Permissions::SPAWN_AGENTS,
        };
        let run = |zone: &mut ZoneState, kind| common::zones::run(zone, &actor, kind);
        let mut events = run(&mut zone, CommandKind::Join);
        for i in 2..2500 {
            events.extend(run(
                &mut zone,
                CommandKind::AgentMove {
                    position: Position {
                        x: f64::from(i),
                        y: 0.0,
                        z: 0.0,
                    },
                    sent_at: None,
                },
            ));
        }
        let refs: Vec<&ZoneEvent> = events.iter().collect();
        store.append_events(&refs).await.unwrap();
        // The log starts with the zone's creation.
        events.insert(0, creation);
        store.close().await;

        let (ok, stdout, stderr) = thunderline(&[
            "replay",
            "--zone",
            &zone.id().to_string(),
            "--database",
            &db.url,
        ]);
        assert!(ok, "{}: {stderr}", db.name);
        let lines: Vec<ZoneEvent> = stdout
            .lines()
            .map(|l| ZoneEvent::from_json(l).unwrap())
            .collect();
        assert_eq!(
            lines, events,
            "{}: every event, in order, across pages",
            db.name
        );

        let since = events[2000].occurred_at.to_rfc3339();
        let (ok, stdout, _) = thunderline(&[
            "replay",
            "--zone",
            &zone.id().to_string(),
            "--since",
            &since,
            "--database",
            &db.url,
        ]);
        assert!(ok);
        let first: Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
        assert_eq!(first["type"], json!("agent_moved"));
        assert_eq!(first["seq"], json!(2001));
        let expected = events
            .iter()
            .filter(|e| e.occurred_at >= events[2000].occurred_at)
            .count();
        assert_eq!(stdout.lines().count(), expected);

        let (ok, _, stderr) = thunderline(&["replay", "--zone", "zone-1", "--database", &db.url]);
        assert!(!ok);
        assert_eq!(
            stderr.trim(),
            "error: \"zone-1\" is not a UUID (expected e.g. 123e4567-e89b-12d3-a456-426614174000)"
        );
        let (ok, _, stderr) = thunderline(&[
            "replay",
            "--zone",
            &zone.id().to_string(),
            "--since",
            "yesterday",
            "--database",
            &db.url,
        ]);
        assert!(!ok);
        assert_eq!(
            stderr.trim(),
            "error: --since \"yesterday\" is not an RFC 3339 time (expected e.g. 2026-11-27T10:00:00Z)"
        );
        let unknown = uuid::Uuid::now_v7();
        let (ok, _, stderr) = thunderline(&[
            "replay",
            "--zone",
            &unknown.to_string(),
            "--database",
            &db.url,
        ]);
        assert!(!ok);
        assert_eq!(stderr.trim(), format!("error: no zone has id {unknown}"));
        db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_audit_writes_exactly_the_events_it_sends() {
    for db in common::backends().await {
        let (ok, stdout, stderr) = thunderline(&[
            "bench",
            "audit",
            "--events",
            "3000",
            "--database",
            &db.url,
            "--json",
        ]);
        assert!(ok, "{}: {stderr}", db.name);
        let report: Value = serde_json::from_str(&stdout).expect("one JSON object");
        for key in [
            "events",
            "rows_in_db",
            "events_per_sec",
            "baseline_rows_per_sec",
            "ratio",
        ] {
            assert!(report.get(key).is_some(), "missing {key}");
        }
        assert_eq!(report["events"], 3000);
        assert_eq!(report["rows_in_db"], 3000);
        assert_eq!(report["baseline_rows"], 3000);
        db.cleanup().await;
    }
    let (ok, _, stderr) = thunderline(&[
        "bench",
        "audit",
        "--events",
        "10",
        "--database",
        "redis://127.0.0.1",
    ]);
    assert!(!ok);
    assert_eq!(
        stderr.trim(),
        "error: unsupported database URL \"redis://127.0.0.1\": expected postgres://… or sqlite://…"
    );
}

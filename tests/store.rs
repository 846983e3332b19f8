//! The store, the same tests against SQLite and PostgreSQL: zones survive a restart, the audit
//! log is idempotent and ordered, replaying it rebuilds the live zone, and the audit sink loses
//! and duplicates nothing while its connections are being killed.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use thunderline::pipeline::*;
use thunderline::store::{AuditSink, Backend, Store, StoreError};
use thunderline::zone::*;

fn spec(name: &str) -> NewZone {
    let mut resources = BTreeMap::new();
    resources.insert(
        "food".to_owned(),
        Resource {
            amount: 100,
            max: 100,
            regen: 3,
        },
    );
    resources.insert(
        "energy".to_owned(),
        Resource {
            amount: 40,
            max: 50,
            regen: 5,
        },
    );
    NewZone {
        name: name.to_owned(),
        capacity: Some(3),
        permissions: Some(Permissions::SPAWN_AGENTS | Permissions::MODIFY_ZONE),
        resources,
        properties: Some(json!({"biome": "forest", "weather": {"rain": true}})),
        assigned_server: None,
    }
}

#[tokio::test]
async fn zones_survive_a_restart_exactly_as_committed() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        assert_eq!(
            store.backend(),
            if db.name == "sqlite" {
                Backend::Sqlite
            } else {
                Backend::Postgres
            }
        );
        let mut zone = Zone::create(spec("Glade"), "node-a", now()).unwrap();
        store.insert_zone(&zone).await.unwrap();
        zone.agent_entered("agent-1", now()).unwrap();
        zone.consume_resources(
            Some("agent-1"),
            json!({"food": -10}).as_object().unwrap(),
            now(),
        )
        .unwrap();
        zone.tick(now());
        zone.grant_permission(Permissions::BROADCAST_EVENTS, now());
        store.save_zone(&zone).await.unwrap();
        store.close().await;

        let reopened = Store::connect(&db.url).await.unwrap();
        let back = reopened.get_zone(zone.id).await.unwrap();
        assert_eq!(back, zone, "{}: what was committed comes back", db.name);
        assert_eq!(back.tick, 1);
        reopened.close().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn listing_paging_deleting_and_missing_zones() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let zone = Zone::create(spec(&format!("z{i}")), "node-a", now()).unwrap();
            store.insert_zone(&zone).await.unwrap();
            ids.push(zone.id);
        }
        let page: Vec<_> = store
            .list_zones(2, 1)
            .await
            .unwrap()
            .iter()
            .map(|z| z.id)
            .collect();
        assert_eq!(page, ids[1..3].to_vec(), "{}", db.name);
        assert_eq!(store.count_zones().await.unwrap(), 5);
        store.delete_zone(ids[0]).await.unwrap();
        let missing = store.get_zone(ids[0]).await.unwrap_err();
        assert!(
            matches!(missing, StoreError::Zone(ZoneError::ZoneNotFound(id)) if id == ids[0]),
            "{}: {missing}",
            db.name
        );
        assert!(matches!(
            store.delete_zone(ids[0]).await.unwrap_err(),
            StoreError::Zone(ZoneError::ZoneNotFound(_))
        ));
        let mut ghost = Zone::create(spec("ghost"), "node-a", now()).unwrap();
        ghost.name = "never stored".into();
        assert!(matches!(
            store.save_zone(&ghost).await.unwrap_err(),
            StoreError::Zone(ZoneError::ZoneNotFound(_))
        ));
        assert_eq!(store.count_zones().await.unwrap(), 4);
        store.close().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn the_audit_log_is_idempotent_ordered_and_filterable() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let mut zone = Zone::create(spec("Log"), "node-a", now()).unwrap();
        let other = Zone::create(spec("Other"), "node-a", now()).unwrap();
        let mut events = Vec::new();
        for i in 0..30 {
            events.push(
                zone.agent_moved(
                    "a",
                    Position {
                        x: i as f64,
                        y: 0.5,
                        z: -1.0,
                    },
                    now(),
                )
                .unwrap(),
            );
        }
        let noise = ZoneEvent::new(
            other.id,
            EventKind::AgentMoved(Moved {
                agent_id: "b".into(),
                position: Position {
                    x: 0.0,
                    y: 0.0,
                    z: 0.0,
                },
                sent_at: None,
            }),
            now(),
        );
        let refs: Vec<&ZoneEvent> = events.iter().chain([&noise]).collect();
        assert_eq!(store.append_events(&refs).await.unwrap(), 31);
        // The same batch again, as after a commit whose acknowledgement was lost: nothing new.
        assert_eq!(store.append_events(&refs).await.unwrap(), 0);
        assert_eq!(store.count_events(None).await.unwrap(), 31, "{}", db.name);
        assert_eq!(store.count_events(Some(zone.id)).await.unwrap(), 30);

        let back = store.zone_events(zone.id, None, None, None).await.unwrap();
        assert_eq!(
            back, events,
            "{}: events come back unchanged and in order",
            db.name
        );
        let since = events[20].occurred_at;
        let later = store
            .zone_events(zone.id, Some(since), None, Some(5))
            .await
            .unwrap();
        assert_eq!(later.len(), 5);
        assert!(later.iter().all(|e| e.occurred_at >= since));
        assert_eq!(
            later[0],
            events
                .iter()
                .find(|e| e.occurred_at >= since)
                .unwrap()
                .clone()
        );
        store.close().await;
        db.cleanup().await;
    }
}

/// Acknowledges by counting.
#[derive(Default)]
struct Acks {
    ok: std::sync::atomic::AtomicUsize,
    failed: std::sync::atomic::AtomicUsize,
}

impl Acknowledger<ZoneEvent> for Acks {
    fn ack(&self, ok: Vec<Message<ZoneEvent>>, failed: Vec<Message<ZoneEvent>>) {
        self.ok.fetch_add(ok.len(), Ordering::SeqCst);
        self.failed.fetch_add(failed.len(), Ordering::SeqCst);
    }
}

struct Pass;

impl Processor<ZoneEvent> for Pass {
    async fn handle_message(&self, _m: &mut Message<ZoneEvent>) -> Result<(), Failure> {
        Ok(())
    }
}

fn audit_pipeline(
    store: &Store,
    batch_size: usize,
) -> Result<(Pipeline<ZoneEvent>, PushHandle<ZoneEvent>), ConfigError> {
    let (producer, push) = in_memory(1000);
    let pipeline = Pipeline::builder("audit-test")
        .producer(producer)
        .processor(Pass, ProcessorConfig::default().concurrency(2))
        .batcher(
            BatcherConfig::new("audit")
                .batch_size(batch_size)
                .batch_timeout(Duration::from_millis(50))
                .concurrency(2)
                .retry(RetryPolicy::exponential(
                    u32::MAX,
                    Duration::from_millis(5),
                    2.0,
                    Duration::from_millis(200),
                )),
            AuditSink::new(store.clone()),
        )
        .start()?;
    Ok((pipeline, push))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_the_log_rebuilds_the_zone_that_was_live() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let mut live = Zone::create(spec("Replay"), "node-a", now()).unwrap();
        store.insert_zone(&live).await.unwrap();
        let created = live.clone();
        let acks = Arc::new(Acks::default());
        let (pipeline, push) = audit_pipeline(&store, 7).unwrap();
        let mut events = Vec::new();
        for step in 0..60u32 {
            let t = now();
            let result = match step % 6 {
                0 => live.agent_entered(&format!("agent-{step}"), t),
                1 => live.consume_resources(
                    Some("agent"),
                    json!({"food": -(i64::from(step) % 13), "energy": -2})
                        .as_object()
                        .unwrap(),
                    t,
                ),
                2 => Ok(live.tick(t)),
                3 => live.agent_left(&format!("agent-{step}"), t),
                4 => live.agent_interaction("a", "b", "wave", Some(json!({"n": step})), t),
                _ => live.agent_moved(
                    "a",
                    Position {
                        x: 1.0,
                        y: 2.0,
                        z: f64::from(step),
                    },
                    t,
                ),
            };
            // Refusals (an empty zone, not enough food) are part of the test: they change
            // nothing and cause no event.
            if let Ok(event) = result {
                events.push(event.clone());
                push.push(Message::with_acker(event, acks.clone()))
                    .await
                    .unwrap();
            }
        }
        drop(push);
        pipeline.join().await.unwrap();
        assert_eq!(acks.ok.load(Ordering::SeqCst), events.len());
        store.save_zone(&live).await.unwrap();

        let log = store.zone_events(live.id, None, None, None).await.unwrap();
        assert_eq!(
            log, events,
            "{}: the log holds every event, in order",
            db.name
        );
        let mut rebuilt = created.clone();
        for event in &log {
            rebuilt.apply(event).unwrap();
        }
        assert_eq!(rebuilt, live, "{}: replay rebuilds the live state", db.name);
        assert_eq!(rebuilt, store.get_zone(live.id).await.unwrap());
        store.close().await;
        db.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_sink_loses_and_duplicates_nothing_while_connections_are_killed() {
    let Some(db) = common::postgres().await else {
        return;
    };
    let store = Store::connect_with(&db.url, 4).await.unwrap();
    let base = std::env::var("THUNDERLINE_TEST_DATABASE_URL").unwrap_or(common::DEFAULT_PG.into());
    let mut killer = <sqlx::PgConnection as sqlx::Connection>::connect(&base)
        .await
        .unwrap();
    let zone = Zone::create(spec("Faults"), "node-a", now()).unwrap();
    let acks = Arc::new(Acks::default());
    let (pipeline, push) = audit_pipeline(&store, 20).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let tag = db.tag.clone();
    let stopper = stop.clone();
    let kills = tokio::spawn(async move {
        let mut killed = 0u64;
        while !stopper.load(Ordering::SeqCst) {
            let n: Vec<bool> = sqlx::query_scalar(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = $1 AND pid <> pg_backend_pid()",
            )
            .bind(&tag)
            .fetch_all(&mut killer)
            .await
            .unwrap();
            killed += n.len() as u64;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        killed
    });

    const EVENTS: usize = 3000;
    let mut ids = Vec::with_capacity(EVENTS);
    let mut z = zone.clone();
    for i in 0..EVENTS {
        let event = z
            .agent_moved(
                "a",
                Position {
                    x: i as f64,
                    y: 0.0,
                    z: 0.0,
                },
                now(),
            )
            .unwrap();
        ids.push(event.id);
        push.push(Message::with_acker(event, acks.clone()))
            .await
            .unwrap();
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    drop(push);
    let stats = tokio::time::timeout(Duration::from_secs(120), pipeline.join())
        .await
        .expect("the pipeline finishes once the database is left alone")
        .unwrap();
    stop.store(true, Ordering::SeqCst);
    let killed = kills.await.unwrap();
    assert!(killed > 0, "the test must actually have cut connections");

    assert_eq!(acks.ok.load(Ordering::SeqCst), EVENTS);
    assert_eq!(acks.failed.load(Ordering::SeqCst), 0);
    assert_eq!(stats.successful, EVENTS as u64);
    // Every event exactly once: the count matches and every id is there.
    let fresh = Store::connect(&db.url).await.unwrap();
    assert_eq!(
        fresh.count_events(Some(zone.id)).await.unwrap(),
        EVENTS as u64
    );
    let logged: Vec<_> = fresh
        .zone_events(zone.id, None, None, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(logged, ids);
    eprintln!("killed {killed} connections while writing {EVENTS} events");
    fresh.close().await;
    store.close().await;
    db.cleanup().await;
}

#[tokio::test]
async fn bad_urls_get_clear_errors() {
    let err = Store::connect("mysql://localhost/x").await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported database URL \"mysql://localhost/x\": expected postgres://… or sqlite://…"
    );
    let err = Store::connect("postgres://u:hunter2@127.0.0.1:1/none")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.starts_with("cannot open the database at postgres://u:***@127.0.0.1:1/none"),
        "{text}"
    );
    assert!(!text.contains("hunter2"));
}

//! The store, the same tests against SQLite and PostgreSQL: snapshots survive a restart and
//! never go back, the audit log is idempotent and ordered by seq, an event the database refuses
//! as data is dead-lettered while its batch-mates land, replaying the log rebuilds the live
//! zone, and the audit sink loses and duplicates nothing while its connections are being killed.

mod common;

use std::collections::BTreeMap;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use thunderline::pipeline::*;
use thunderline::store::{AuditSink, Backend, Store, StoreError};
use thunderline::zone::*;
use uuid::Uuid;

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
        assigned_server: Some("node-a".into()),
        interest_radius: Some(25.0),
    }
}

fn agent(name: &str) -> Actor {
    Actor::Agent {
        agent_id: name.into(),
        connection: format!("conn-{name}"),
        permissions: Permissions::from_bits_truncate(0x0f),
    }
}

/// Applies a command as a zone's writer does; the events it caused (none if refused).
fn step(state: &mut ZoneState, actor: Actor, kind: CommandKind) -> Vec<ZoneEvent> {
    let command = thunderline::runtime::command(state.id(), actor, kind);
    common::zones::execute(state, &command)
        .result
        .map(|a| a.events)
        .unwrap_or_default()
}

fn moved(x: f64) -> CommandKind {
    CommandKind::AgentMove {
        position: Position { x, y: 0.5, z: -1.0 },
        sent_at: None,
    }
}

#[tokio::test]
async fn snapshots_survive_a_restart_exactly_as_committed_and_never_go_back() {
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
        let mut zone = common::zones::create(spec("Glade")).0;
        store.insert_zone(&zone.snapshot()).await.unwrap();
        step(&mut zone, agent("agent-1"), CommandKind::Join);
        step(
            &mut zone,
            agent("agent-1"),
            CommandKind::ConsumeResource {
                resource_type: "food".into(),
                amount: 10,
            },
        );
        let older = zone.snapshot();
        step(&mut zone, Actor::System, CommandKind::Tick);
        step(
            &mut zone,
            Actor::Admin,
            CommandKind::ChangePermissions {
                grant: Permissions::BROADCAST_EVENTS,
                revoke: Permissions::empty(),
            },
        );
        let newest = zone.snapshot();
        store.save_snapshots(&[&newest]).await.unwrap();
        // A snapshot delivered late does not roll the zone back; one retried changes nothing.
        store.save_snapshots(&[&older, &newest]).await.unwrap();
        store.close().await;

        let reopened = Store::connect(&db.url).await.unwrap();
        let back = reopened.get_zone(zone.id()).await.unwrap();
        assert_eq!(back, newest, "{}: what was committed comes back", db.name);
        assert_eq!(back.zone.tick, 1);
        assert_eq!(back.seq, 5, "its creation, then four commands");
        assert_eq!(back.sessions.len(), 1);
        assert_eq!(ZoneState::from_snapshot(back), zone);
        assert_eq!(
            reopened.zones_with_sessions().await.unwrap(),
            vec![zone.id()]
        );
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
            let zone = common::zones::create(spec(&format!("z{i}"))).0;
            store.insert_zone(&zone.snapshot()).await.unwrap();
            ids.push(zone.id());
        }
        let page: Vec<_> = store
            .list_zones(2, 1, None)
            .await
            .unwrap()
            .iter()
            .map(|z| z.zone.id)
            .collect();
        assert_eq!(page, ids[1..3].to_vec(), "{}", db.name);
        assert_eq!(store.count_zones(None).await.unwrap(), 5);
        // A name search: any case, and a `%` or `_` in it matches only itself.
        let found: Vec<_> = store
            .list_zones(10, 0, Some("Z3"))
            .await
            .unwrap()
            .iter()
            .map(|z| z.zone.id)
            .collect();
        assert_eq!(found, vec![ids[3]], "{}", db.name);
        assert_eq!(store.count_zones(Some("z")).await.unwrap(), 5);
        assert_eq!(store.count_zones(Some("%")).await.unwrap(), 0);
        assert_eq!(store.count_zones(Some("_")).await.unwrap(), 0);
        // Deleting is writing a deleted zone's snapshot.
        let mut deleted = store.get_zone(ids[0]).await.unwrap();
        deleted.deleted = true;
        store.save_snapshots(&[&deleted]).await.unwrap();
        let missing = store.get_zone(ids[0]).await.unwrap_err();
        assert!(
            matches!(missing, StoreError::Zone(ZoneError::ZoneNotFound(id)) if id == ids[0]),
            "{}: {missing}",
            db.name
        );
        // Again (a retried write): nothing more happens.
        store.save_snapshots(&[&deleted]).await.unwrap();
        assert_eq!(store.count_zones(None).await.unwrap(), 4);
        // A snapshot of a deleted zone is dropped, not an error.
        let ghost = common::zones::create(spec("ghost")).0;
        store.save_snapshots(&[&ghost.snapshot()]).await.unwrap();
        assert_eq!(store.count_zones(None).await.unwrap(), 4);
        store.close().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn the_audit_log_is_idempotent_ordered_by_seq_and_filterable() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let (mut zone, creation) = common::zones::create(spec("Log"));
        let mut other = common::zones::create(spec("Other")).0;
        let mut events = vec![creation];
        events.extend(step(&mut zone, agent("a"), CommandKind::Join));
        for i in 2..30 {
            events.extend(step(&mut zone, agent("a"), moved(i as f64)));
        }
        let mut noise = step(&mut other, agent("b"), CommandKind::Join);
        noise.extend(step(&mut other, agent("b"), moved(0.0)));
        let refs: Vec<&ZoneEvent> = events.iter().chain(&noise).collect();
        assert_eq!(store.append_events(&refs).await.unwrap(), 32);
        // The same batch again, as after a commit whose acknowledgement was lost: nothing new.
        assert_eq!(store.append_events(&refs).await.unwrap(), 0, "{}", db.name);
        assert_eq!(store.count_events(None).await.unwrap(), 32, "{}", db.name);
        assert_eq!(store.count_events(Some(zone.id())).await.unwrap(), 30);

        let back = store
            .zone_events(zone.id(), None, None, None)
            .await
            .unwrap();
        assert_eq!(
            back, events,
            "{}: events come back unchanged and in order",
            db.name
        );
        let seqs: Vec<u64> = back.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=30).collect::<Vec<_>>());
        let page = store
            .zone_events(zone.id(), None, Some(10), Some(5))
            .await
            .unwrap();
        assert_eq!(page, events[10..15].to_vec(), "after_seq pages by seq");
        let since = events[20].occurred_at;
        let later = store
            .zone_events(zone.id(), Some(since), None, Some(5))
            .await
            .unwrap();
        assert_eq!(later.len(), 5);
        assert!(later.iter().all(|e| e.occurred_at >= since));
        assert_eq!(
            store.events_after(zone.id(), 25).await.unwrap(),
            events[25..].to_vec()
        );
        store.close().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn an_event_refused_as_data_is_dead_lettered_and_its_batch_mates_land() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let mut zone = common::zones::create(spec("Poison")).0;
        let mut events = step(&mut zone, agent("a"), CommandKind::Join);
        for i in 1..20 {
            events.extend(step(&mut zone, agent("a"), moved(i as f64)));
        }
        // What the zone itself would refuse, made by hand: an event the database cannot take.
        // PostgreSQL refuses NUL in jsonb; both refuse a seq already taken by another event.
        let mut poison = events[7].clone();
        poison.id = uuid::Uuid::now_v7();
        if db.name == "postgres" {
            poison.seq = 100;
            if let EventKind::AgentMoved(m) = &mut poison.kind {
                m.agent_id = "nul\u{0}agent".into();
            }
        }
        let mut batch: Vec<&ZoneEvent> = events.iter().collect();
        batch.insert(11, &poison);
        let report = store.append_or_dead_letter(&batch).await.unwrap();
        assert_eq!(
            (report.inserted, report.dead_lettered),
            (20, 1),
            "{}: the innocent land, the poison is set aside",
            db.name
        );
        assert_eq!(
            store
                .zone_events(zone.id(), None, None, None)
                .await
                .unwrap(),
            events
        );
        let dead = store.dead_letters(Some(zone.id()), 10, 0).await.unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].id, poison.id);
        assert_eq!(dead[0].event_type, "agent_moved");
        assert!(!dead[0].reason.is_empty());
        assert_eq!(ZoneEvent::from_json(&dead[0].event).unwrap(), poison);
        assert_eq!(store.dead_letters(None, 10, 0).await.unwrap().len(), 1);
        // Idempotent like the log: the same batch again adds nothing anywhere.
        let again = store.append_or_dead_letter(&batch).await.unwrap();
        assert_eq!(again.inserted, 0);
        assert_eq!(store.dead_letters(None, 10, 0).await.unwrap().len(), 1);
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
        let mut live = common::zones::create(spec("Replay")).0;
        store.insert_zone(&live.snapshot()).await.unwrap();
        let created = live.clone();
        let acks = Arc::new(Acks::default());
        let (pipeline, push) = audit_pipeline(&store, 7).unwrap();
        let mut events = Vec::new();
        for step_no in 0..60u32 {
            let who = agent(&format!("agent-{}", step_no % 4));
            let kind = match step_no % 6 {
                0 => CommandKind::Join,
                1 => CommandKind::ConsumeResource {
                    resource_type: "food".into(),
                    amount: i64::from(step_no % 13) + 1,
                },
                2 => CommandKind::Tick,
                3 => CommandKind::Leave,
                4 => CommandKind::AgentInteract {
                    target_agent_id: "b".into(),
                    kind: "wave".into(),
                    data: Some(json!({"n": step_no})),
                },
                _ => moved(f64::from(step_no)),
            };
            let who = if kind == CommandKind::Tick {
                Actor::System
            } else {
                who
            };
            // Refusals (a full zone, not enough food, no session) are part of the test: they
            // change nothing and cause no event.
            for event in step(&mut live, who, kind) {
                events.push(event.clone());
                push.push(Message::with_acker(event, acks.clone()))
                    .await
                    .unwrap();
            }
        }
        drop(push);
        pipeline.join().await.unwrap();
        assert_eq!(acks.ok.load(Ordering::SeqCst), events.len());

        let log = store
            .zone_events(live.id(), None, None, None)
            .await
            .unwrap();
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
        // Loading is the stored snapshot (here, the zone as created) and the log after it.
        let mut loaded = ZoneState::from_snapshot(store.get_zone(live.id()).await.unwrap());
        for event in store.events_after(live.id(), loaded.seq()).await.unwrap() {
            loaded.apply(&event).unwrap();
        }
        assert_eq!(loaded, live);
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
    let zone = common::zones::create(spec("Faults")).0;
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
    step(&mut z, agent("a"), CommandKind::Join);
    for i in 0..EVENTS {
        let event = step(&mut z, agent("a"), moved(i as f64)).remove(0);
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
        fresh.count_events(Some(zone.id())).await.unwrap(),
        EVENTS as u64
    );
    let logged: Vec<_> = fresh
        .zone_events(zone.id(), None, None, None)
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

/// A command whose events are logged and covered by the zone's snapshot, delivered again after
/// a restart (a broker redelivers what was not acknowledged before a crash), is answered as a
/// duplicate, not applied a second time: the zone loaded from the store remembers the ids of the
/// commands its log holds, not only those logged after the snapshot.
#[tokio::test]
async fn a_command_behind_the_snapshot_is_not_applied_again_after_a_restart() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let mut zone = common::zones::create(spec("Glade")).0;
        store.insert_zone(&zone.snapshot()).await.unwrap();
        let service = Actor::Service {
            agent_id: Some("npc-1".into()),
        };
        let first = thunderline::runtime::command(zone.id(), service.clone(), moved(1.0));
        let later = thunderline::runtime::command(zone.id(), service.clone(), moved(2.0));
        let mut logged = Vec::new();
        for command in [&first, &later] {
            let outcome = common::zones::execute(&mut zone, command);
            logged.extend(outcome.result.unwrap().events);
        }
        store
            .append_events(&logged.iter().collect::<Vec<_>>())
            .await
            .unwrap();
        store.save_snapshots(&[&zone.snapshot()]).await.unwrap();

        let registry = thunderline::runtime::ZoneRegistry::new(store.clone());
        let mut loaded = registry.read(zone.id()).await.unwrap().state;
        assert_eq!(loaded.seq(), 3);
        for command in [&first, &later] {
            let again = common::zones::execute(&mut loaded, command);
            let accepted = again.result.unwrap();
            assert!(
                accepted.duplicate && accepted.events.is_empty(),
                "{}: {} applied again after a restart",
                db.name,
                command.id
            );
        }
        assert_eq!(loaded.seq(), 3);
        // A new command still applies.
        let fresh = thunderline::runtime::command(zone.id(), service, moved(3.0));
        assert_eq!(
            common::zones::execute(&mut loaded, &fresh)
                .result
                .unwrap()
                .events
                .len(),
            1
        );
        store.close().await;
        db.cleanup().await;
    }
}

#[tokio::test]
async fn token_revocations_keep_the_latest_cutoff_and_go_with_their_zone() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let zone = common::zones::create(spec("revoked")).0;
        store.insert_zone(&zone.snapshot()).await.unwrap();
        let id = zone.id();
        store.revoke_tokens("a", id, 20).await.unwrap();
        store.revoke_tokens("a", id, 10).await.unwrap();
        store.revoke_tokens("b", id, 5).await.unwrap();
        let mut all = store.token_revocations().await.unwrap();
        all.sort();
        assert_eq!(
            all,
            vec![("a".to_owned(), id, 20), ("b".to_owned(), id, 5)],
            "{}",
            db.name
        );
        store.revoke_tokens("a", id, 30).await.unwrap();
        assert!(
            store
                .token_revocations()
                .await
                .unwrap()
                .contains(&("a".to_owned(), id, 30))
        );
        // Unknown zones cannot be revoked for; a deleted zone takes its revocations with it.
        assert!(store.revoke_tokens("a", Uuid::now_v7(), 1).await.is_err());
        let mut deleted = zone.snapshot();
        deleted.deleted = true;
        store.save_snapshots(&[&deleted]).await.unwrap();
        assert!(store.token_revocations().await.unwrap().is_empty());
        store.close().await;
        db.cleanup().await;
    }
}

/// In a cluster a zone's writer holds a lease whose fencing token grows with every grant; the
/// store keeps the newest token a writer claimed the zone with, and refuses every write of a
/// writer with an older one: its events, its snapshots, its closing of the zone, its claim.
#[tokio::test]
async fn a_writer_whose_lease_moved_on_writes_nothing() {
    for db in common::backends().await {
        let store = Store::connect(&db.url).await.unwrap();
        let (mut zone, _) = common::zones::stored(&store, spec("Fenced")).await;
        let id = zone.id();
        let agent = Actor::Service {
            agent_id: Some("npc".into()),
        };
        // The first writer (which created it) claims the zone with token 1 and logs a move.
        store.open_zone(id, Some(1)).await.unwrap();
        let first = common::zones::run(&mut zone, &agent, moved(1.0));
        let refs: Vec<&ZoneEvent> = first.iter().collect();
        store.append_fenced(&refs, &[(id, 1)]).await.unwrap();
        let stale = zone.clone();

        // Its lease moves on: the next writer claims token 2 (the zone was left open).
        assert!(
            store.open_zone(id, Some(2)).await.unwrap(),
            "left open by the first"
        );
        let mut next = zone.clone();
        let theirs = common::zones::run(&mut next, &agent, moved(2.0));
        store
            .append_fenced(&theirs.iter().collect::<Vec<_>>(), &[(id, 2)])
            .await
            .unwrap();

        // The first writer, resumed, tries to log its own next move (the same seq): refused,
        // nothing written, not even a dead letter.
        let mut mine = stale.clone();
        let late = common::zones::run(&mut mine, &agent, moved(9.0));
        let refused = store
            .append_fenced_or_dead_letter(&late.iter().collect::<Vec<_>>(), &[(id, 1)])
            .await;
        assert!(
            matches!(refused, Err(StoreError::Fenced { zone, fence: 1, current: 2 }) if zone == id),
            "{}: {refused:?}",
            db.name
        );
        let logged = store.events_after(id, 0).await.unwrap();
        assert_eq!(logged.last().unwrap().id, theirs[0].id, "{}", db.name);
        assert_eq!(store.dead_letters(Some(id), 10, 0).await.unwrap().len(), 0);

        // Its snapshot is not written, its close changes nothing, its claim is refused.
        store
            .save_fenced(&[(&mine.snapshot(), Some(1))])
            .await
            .unwrap();
        assert_ne!(
            store.get_zone(id).await.unwrap().seq,
            mine.seq(),
            "{}",
            db.name
        );
        store.close_zones(&[(id, Some(1))]).await.unwrap();
        assert!(
            matches!(
                store.open_zone(id, Some(1)).await,
                Err(StoreError::Fenced { .. })
            ),
            "{}",
            db.name
        );
        // The current writer's snapshot and close land; without a token (a single daemon)
        // nothing is checked.
        store
            .save_fenced(&[(&next.snapshot(), Some(2))])
            .await
            .unwrap();
        assert_eq!(store.get_zone(id).await.unwrap().seq, next.seq());
        store.close_zones(&[(id, Some(2))]).await.unwrap();
        assert!(
            !store.open_zone(id, Some(2)).await.unwrap(),
            "closed by its writer"
        );
        assert!(store.open_zone(id, None).await.unwrap());
        db.cleanup().await;
    }
}

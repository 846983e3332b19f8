//! The official `phoenix` JavaScript client (tests/js, versions pinned in its lockfile) against
//! the real `thunderline serve` binary. Without Node this says so loudly and passes; under
//! `CI=true` a missing Node fails it.

mod common;

use std::path::Path;
use std::process::Command;

fn node_available() -> bool {
    Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Node and the pinned packages, or None after saying why not (an error under CI).
fn prepared() -> Option<std::path::PathBuf> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !node_available() {
        assert!(
            !ci,
            "Node.js is required under CI=true to run the phoenix client tests"
        );
        eprintln!("\n*** SKIPPED the phoenix JavaScript client tests: `node` is not installed.\n");
        return None;
    }
    let js = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/js");
    if !js.join("node_modules/phoenix").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&js)
            .status()
            .expect("npm runs");
        assert!(status.success(), "npm ci failed in tests/js");
    }
    Some(js)
}

/// Runs `node <args>` in `js` against `daemon`; whether it succeeded, and what it printed.
fn node(
    js: &Path,
    daemon: &common::binary::Daemon,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String) {
    let out = Command::new("node")
        .args(args)
        .current_dir(js)
        .env("THUNDERLINE_URL", &daemon.url)
        .env("THUNDERLINE_ADMIN_TOKEN", common::binary::ADMIN)
        .envs(env.iter().copied())
        .output()
        .expect("node runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// Runs the suite against the binary started with `extra` flags.
fn run_suite(js: &Path, name: &str, extra: &[&str]) {
    run_file(js, name, extra, "zone.test.mjs");
}

/// Runs one test file against the binary started with `extra` flags.
fn run_file(js: &Path, name: &str, extra: &[&str], file: &str) {
    let dir = std::env::temp_dir().join(format!("thunderline-js-{name}-{}", std::process::id()));
    let daemon = common::binary::start(&dir, extra);
    let (ok, report) = node(js, &daemon, &["--test", "--test-concurrency=1", file], &[]);
    let (exit, printed) = daemon.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{name}:\n{report}");
    assert!(ok, "the phoenix client tests failed ({name}):\n{report}");
    assert!(
        exit.success(),
        "the daemon exited with {exit:?} after SIGTERM; it printed {printed:?}"
    );
}

/// As a new user starts it: no flags, the embedded SQLite store, durable replies.
#[test]
fn the_phoenix_client_works_against_the_daemon_unmodified() {
    if let Some(js) = prepared() {
        run_suite(&js, "defaults", &[]);
    }
}

/// With replies sent as soon as the zone applied a command (the default waits for the log).
#[test]
fn the_phoenix_client_works_with_replies_applied() {
    if let Some(js) = prepared() {
        run_suite(&js, "applied", &["--replies", "applied"]);
    }
}

/// Runs tests/js/migration.test.mjs against the binary whose tickets last `ticket_ms`
/// (`[zones] migration_ticket_ms`; None: the default, 10 s).
fn run_migrations(js: &Path, name: &str, ticket_ms: Option<u64>) {
    let dir = std::env::temp_dir().join(format!("thunderline-js-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    #[cfg(unix)]
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let config = dir.join("pipeline.toml");
    let mut args = Vec::new();
    if let Some(ms) = ticket_ms {
        // The shipped pipeline, its ticket shortened.
        let shipped = include_str!("../pipelines/zones.toml");
        let file = shipped.replace(
            "migration_ticket_ms = 10000",
            &format!("migration_ticket_ms = {ms}"),
        );
        assert_ne!(
            file, shipped,
            "the shipped pipeline sets migration_ticket_ms"
        );
        std::fs::write(&config, file).unwrap();
        args = vec!["--config", config.to_str().unwrap()];
    }
    let daemon = common::binary::start(&dir, &args);
    let ticket = ticket_ms.unwrap_or(10_000).to_string();
    let (ok, report) = node(
        js,
        &daemon,
        &["--test", "--test-concurrency=1", "migration.test.mjs"],
        &[("TICKET_MS", &ticket)],
    );
    let (exit, printed) = daemon.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{name}:\n{report}");
    assert!(ok, "the migration tests failed ({name}):\n{report}");
    assert!(exit.success(), "{printed:?}");
}

/// Interest management: moves reach only the agents within a zone's radius, views open and
/// close, the radius changes, and a zone without one is unchanged.
#[test]
fn the_phoenix_client_hears_only_the_moves_within_the_radius() {
    if let Some(js) = prepared() {
        run_file(&js, "interest", &[], "interest.test.mjs");
        run_file(
            &js,
            "interest-applied",
            &["--replies", "applied"],
            "interest.test.mjs",
        );
    }
}

/// Agents moving between zones, with the default ticket (10 s) and with one short enough to
/// wait out.
#[test]
fn the_phoenix_client_moves_agents_between_zones() {
    if let Some(js) = prepared() {
        run_migrations(&js, "migration", None);
        run_migrations(&js, "migration-short", Some(1_500));
    }
}

/// Runs one phase of tests/js/recovery_restart.mjs against `daemon`.
fn recovery_phase(js: &Path, daemon: &common::binary::Daemon, phase: &str, state: &Path) {
    let state = state.to_str().expect("a UTF-8 path");
    let (ok, report) = node(
        js,
        daemon,
        &["recovery_restart.mjs", phase],
        &[("RECOVERY_STATE", state)],
    );
    println!("{phase}: {report}");
    assert!(ok, "recovery {phase} failed:\n{report}");
}

/// A client that dropped before the daemon restarted rejoins the restarted daemon (nothing in
/// memory) and gets what it missed from the audit log.
#[test]
fn a_rejoin_after_a_daemon_restart_recovers_from_the_audit_log() {
    let Some(js) = prepared() else { return };
    let dir = std::env::temp_dir().join(format!("thunderline-js-restart-{}", std::process::id()));
    let state = dir.join("recovery.json");
    let daemon = common::binary::start(&dir, &[]);
    recovery_phase(&js, &daemon, "before", &state);
    let (exit, printed) = daemon.terminate();
    assert!(exit.success(), "{printed:?}");
    let daemon = common::binary::start(&dir, &[]);
    recovery_phase(&js, &daemon, "after", &state);
    let (exit, printed) = daemon.terminate();
    assert!(exit.success(), "{printed:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The console at `/` in Debian's Chromium, driven by Playwright: nothing without the token;
/// with it, stage counters and a zone's agents change as traffic flows, and the NATS source
/// shows. The screenshot is kept
/// as `target/console.png`.
#[test]
fn the_console_shows_the_pipeline_and_the_zones_in_a_real_browser() {
    let Some(js) = prepared() else { return };
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !Path::new("/usr/bin/chromium").exists() {
        assert!(
            !ci,
            "Debian's chromium is required under CI=true for the console test"
        );
        eprintln!("\n*** SKIPPED the console browser test: /usr/bin/chromium is not installed.\n");
        return;
    }
    let dir = std::env::temp_dir().join(format!("thunderline-console-{}", std::process::id()));
    let shot = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/console.png");
    // With the NATS source, so that the console has a broker source to show.
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/nats.toml");
    let daemon = common::binary::start(&dir, &["--config", config.to_str().unwrap()]);
    // Dead letters for the console to count: one command the decoder refuses, one for a zone
    // that does not exist (refused by the zone).
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let js = async_nats::jetstream::new(async_nats::connect("127.0.0.1:4222").await.unwrap());
        let missing = uuid::Uuid::now_v7();
        for body in [
            "not a command {".to_owned(),
            serde_json::json!({"id": uuid::Uuid::now_v7(), "zone_id": missing, "agent_id": "npc",
                "type": "agent_move", "payload": {"position": {"x": 1, "y": 0, "z": 0}}})
            .to_string(),
        ] {
            js.publish(format!("thunderline.commands.{missing}"), body.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
    });
    let (ok, report) = node(
        &js,
        &daemon,
        &["--test", "--test-concurrency=1", "console.test.mjs"],
        &[
            ("CONSOLE_SCREENSHOT", shot.to_str().expect("a UTF-8 path")),
            ("CONSOLE_DEAD_LETTERS", "2"),
        ],
    );
    let (exit, printed) = daemon.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    println!("console:\n{report}");
    assert!(ok, "the console test failed:\n{report}");
    assert!(exit.success(), "{printed:?}");
    assert!(shot.exists(), "the screenshot was saved");
}

/// With the pipeline file and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phoenix_client_works_against_the_daemon_on_postgres() {
    let Some(js) = prepared() else { return };
    let Some(db) = common::postgres().await else {
        return;
    };
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/zones.toml");
    let url = db.url.clone();
    let config = config.to_str().unwrap().to_owned();
    tokio::task::spawn_blocking(move || {
        run_suite(&js, "postgres", &["--config", &config, "--database", &url]);
    })
    .await
    .unwrap();
    db.cleanup().await;
}

/// Two nodes of one cluster (NATS and one PostgreSQL schema): the official client on each,
/// one zone, broadcasts and presence across them (tests/js/cluster.test.mjs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phoenix_client_sees_broadcasts_and_presence_across_cluster_nodes() {
    let Some(js) = prepared() else { return };
    let db = common::postgres()
        .await
        .expect("PostgreSQL is needed for a cluster");
    let name = format!("js{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut nodes = Vec::new();
    for node in ["a", "b"] {
        let dir = std::env::temp_dir().join(format!("thunderline-{name}-{node}"));
        let daemon = common::binary::start(
            &dir,
            &[
                "--database",
                &db.url,
                "--cluster",
                "nats://127.0.0.1:4222",
                "--node-id",
                node,
                "--cluster-name",
                &name,
                "--cluster-heartbeat-ms",
                "100",
            ],
        );
        let ready = common::eventually(10, async || {
            common::server::http(daemon.addr, "GET", "/readyz", None, None)
                .await
                .0
                == 200
        })
        .await;
        assert!(ready, "node {node} joined");
        nodes.push((daemon, dir));
    }
    let url_b = nodes[1].0.url.clone();
    // The console's view of the nodes, in Chromium, where it is (it must be under CI).
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let browser = Path::new("/usr/bin/chromium").exists();
    assert!(
        browser || !ci,
        "Debian's chromium is required under CI=true for the console test"
    );
    let suites: &[&str] = if browser {
        &["cluster.test.mjs", "console_cluster.test.mjs"]
    } else {
        &["cluster.test.mjs"]
    };
    let report = {
        let a = &nodes[0].0;
        let mut args = vec!["--test", "--test-concurrency=1"];
        args.extend(suites);
        node(&js, a, &args, &[("THUNDERLINE_URL_B", &url_b)])
    };
    for (daemon, dir) in nodes {
        let (exit, printed) = daemon.terminate();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(exit.success(), "{printed:?}");
    }
    db.cleanup().await;
    let (ok, report) = report;
    println!("cluster:\n{report}");
    assert!(
        ok,
        "the phoenix client failed across the cluster:\n{report}"
    );
}

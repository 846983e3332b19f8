//! `thunderline bench ws` as a user runs it: a small load against a daemon it starts itself,
//! the baseline in the same run, the documented JSON keys, every broadcast delivered, every push
//! answered and its reply timed, `--replies`, and a self-contained HTML report.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_ws_delivers_every_broadcast_and_reports_it() {
    let report = std::env::temp_dir().join(format!("bench-ws-{}.html", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args([
            "bench",
            "ws",
            "--clients",
            "30",
            "--zones",
            "3",
            "--rate",
            "300",
            "--duration",
            "2",
            "--json",
            "--replies",
            "durable",
            "--report",
        ])
        .arg(&report)
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let r: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    for key in [
        "clients",
        "zones",
        "connected",
        "ingress_events_per_sec",
        "expected_deliveries",
        "delivered",
        "delivered_per_sec",
        "latency_ms",
        "reply_latency_ms",
        "replies_timed",
        "replies_mode",
        "errors",
        "slow_consumer_disconnects",
        "server_peak_rss_bytes",
        "rss_per_connection_bytes",
        "baseline_delivered_per_sec",
        "baseline_latency_ms",
        "baseline_reply_latency_ms",
        "ratio",
    ] {
        assert!(r.get(key).is_some(), "missing {key} in {r}");
    }
    for latency in [
        "latency_ms",
        "reply_latency_ms",
        "baseline_latency_ms",
        "baseline_reply_latency_ms",
    ] {
        for q in ["p50", "p90", "p99", "p999", "max"] {
            assert!(
                r[latency][q].as_f64().is_some_and(|v| v > 0.0),
                "{latency} {q} in {r}"
            );
        }
        let l = &r[latency];
        let q = |k: &str| l[k].as_f64().unwrap();
        assert!(
            q("p50") <= q("p90") && q("p90") <= q("p99") && q("p99") <= q("p999"),
            "{latency} percentiles in order: {l}"
        );
        assert!(q("p999") <= q("max"), "{latency}: {l}");
    }
    assert_eq!(r["replies_mode"], "durable");
    assert_eq!(r["connected"], 30);
    assert_eq!(r["errors"], 0);
    assert!(r["expected_deliveries"].as_u64().unwrap() > 0);
    assert_eq!(
        r["delivered"], r["expected_deliveries"],
        "every broadcast delivered"
    );
    assert_eq!(r["replies"], r["sent"], "every push answered ok");
    assert_eq!(r["replies_timed"], r["replies"], "every ok reply timed");
    assert!(
        stderr.contains("reply latency (push → ok)"),
        "the table shows reply latency: {stderr}"
    );
    assert!(r["ratio"].as_f64().unwrap() > 0.0);
    // The run's broadcast batches by trigger: every move went through one, and at this light
    // load they leave because the sink is free, not by timeout.
    let batches = &r["broadcast_batches"];
    let count = |t: &str, k: &str| {
        batches[t][k]
            .as_u64()
            .unwrap_or_else(|| panic!("{t}.{k}: {r}"))
    };
    let events: u64 = ["idle", "size", "timeout", "flush"]
        .iter()
        .map(|t| count(t, "events"))
        .sum();
    assert!(
        events >= r["sent"].as_u64().unwrap(),
        "every move was batched: {batches}"
    );
    assert!(count("idle", "batches") > 0, "{batches}");
    assert!(batches["idle"]["mean_size"].as_f64().unwrap() >= 1.0);
    assert!(
        stderr.contains("broadcast batches (trigger)   idle "),
        "the table shows them: {stderr}"
    );
    assert!(
        stderr.contains("websocket benchmark"),
        "the table goes to standard error"
    );
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(
        html.starts_with("<!doctype html>") && html.contains("<svg") && !html.contains("<script")
    );
    let _ = std::fs::remove_file(&report);
}

#[test]
fn bench_ws_refuses_impossible_loads() {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "ws", "--clients", "2", "--zones", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--zones between 1 and --clients"));
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "ws", "--url", "ws://127.0.0.1:9"])
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"));
    // The harness cannot set the reply mode of a server it did not start.
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args([
            "bench",
            "ws",
            "--url",
            "ws://127.0.0.1:9",
            "--admin-token",
            "x",
            "--replies",
            "applied",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--replies"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "ws", "--replies", "eventually"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unknown mode is refused");
}

/// Runs `thunderline bench ws --json` with `args`; checks it succeeded and printed its table
/// (headed `table`) to stderr; returns its JSON.
fn bench_ws_json(args: &[&str], table: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "ws", "--json"])
        .args(args)
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    assert!(stderr.contains(table), "the table goes to stderr");
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

fn sweep(extra: &[&str]) -> Value {
    let args = [
        &["--clients", "20", "--zones", "2", "--duration", "1"],
        extra,
    ]
    .concat();
    bench_ws_json(&args, "websocket sweep")
}

#[test]
fn a_sweep_runs_every_rate_and_reports_the_highest_within_target() {
    let r = sweep(&["--sweep", "100,200", "--p99-target-ms", "10000"]);
    let steps = r["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    for (step, rate) in steps.iter().zip([100.0, 200.0]) {
        assert_eq!(step["rate"], rate);
        assert_eq!(step["connected"], 20);
        assert!(step["expected_deliveries"].as_u64().unwrap() > 0);
        assert_eq!(step["delivered"], step["expected_deliveries"]);
        assert_eq!(step["replies"], step["sent"]);
        assert_eq!(step["replies_timed"], step["replies"]);
        assert!(
            step["reply_latency_ms"]["p50"].as_f64().unwrap()
                <= step["reply_latency_ms"]["p99"].as_f64().unwrap()
        );
        assert_eq!(step["within_target"], true);
    }
    assert_eq!(r["highest_rate_within_target"], 200.0);
    assert!(
        r["replies_mode"].is_null(),
        "no --replies: the server's default"
    );

    // A target no run can hold: every step is reported, and none is within it.
    let r = sweep(&["--sweep", "100", "--p99-target-ms", "0.001"]);
    assert_eq!(r["steps"][0]["within_target"], false);
    assert!(r["highest_rate_within_target"].is_null());
}

/// `--nodes 3 --rolling-restart`: the cluster steady, then again while each node restarts; the
/// clients its node closes rejoin another and recover, and every push answered ok was applied.
#[test]
fn bench_ws_reports_a_rolling_restart_against_a_steady_run() {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args([
            "bench",
            "ws",
            "--nodes",
            "3",
            "--rolling-restart",
            "--clients",
            "30",
            "--zones",
            "3",
            "--rate",
            "150",
            "--duration",
            "12",
            "--no-baseline",
            "--json",
        ])
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let r: Value = serde_json::from_slice(&out.stdout).expect("stdout is one JSON object");
    assert_eq!(r["nodes"], 3);
    // The steady run: nobody closed, everything delivered.
    assert_eq!(r["reconnects"], 0, "{r}");
    assert_eq!(r["delivered"], r["expected_deliveries"], "{r}");
    let rolling = &r["rolling_restart"];
    assert_eq!(rolling["connected"], 30, "{rolling}");
    assert_eq!(rolling["restarted_nodes"], 3, "{rolling}");
    // Each node closed its clients once; each of them rejoined another node, recovered.
    let closes = rolling["disconnects"].as_u64().unwrap();
    assert!(
        closes >= 30,
        "every client was on a restarted node once: {rolling}"
    );
    assert_eq!(rolling["reconnects"], closes, "{rolling}");
    assert_eq!(
        rolling["recovered_rejoins"], rolling["reconnects"],
        "{rolling}"
    );
    assert_eq!(rolling["errors"], 0, "{rolling}");
    // A push is unanswered only if its node closed before reading it: then it was not applied,
    // and its broadcast is the only one missing (one per member of its zone).
    let unanswered = rolling["sent"].as_u64().unwrap() - rolling["replies"].as_u64().unwrap();
    let missing =
        rolling["expected_deliveries"].as_u64().unwrap() - rolling["delivered"].as_u64().unwrap();
    assert_eq!(missing, unanswered * 10, "{rolling}");
    assert!(stderr.contains("rolling restart"), "{stderr}");
}

#[test]
fn bench_ws_refuses_a_rolling_restart_without_a_cluster() {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "ws", "--rolling-restart"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--nodes 2 or more"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Crowds: one zone of agents on random walks with an interest radius, then the same load
/// without one, in the same run; the report says what each delivered and the model.
#[test]
fn bench_ws_crowds_with_and_without_an_interest_radius() {
    let r = bench_ws_json(
        &[
            "--agents-per-zone",
            "40",
            "--move-hz",
            "4",
            "--world",
            "100",
            "--aoi-radius",
            "20",
            "--duration",
            "1",
        ],
        "crowd benchmark",
    );
    let asked = &r["asked"];
    assert_eq!(asked["agents_per_zone"], 40, "{r}");
    assert_eq!(asked["interest_radius"], 20.0);
    assert_eq!(r["zones"], 1, "one zone unless --zones is given");
    assert_eq!(asked["connected"], 40);
    assert_eq!(asked["replies"], asked["sent"], "every move answered");
    assert!(asked["moves_per_sec"].as_f64().unwrap() > 0.0);
    // Spread over a 100 × 100 square with a radius of 20, each agent sees some of the others:
    // moves reach fewer than all, and views open and close.
    let sent = asked["sent"].as_u64().unwrap();
    let delivered = asked["delivered"].as_u64().unwrap();
    assert!(
        delivered >= sent,
        "each mover hears itself: {delivered} of {sent}"
    );
    assert!(
        delivered < sent * 40,
        "not every agent hears every move: {delivered}"
    );
    assert!(asked["view_frames"].as_u64().unwrap() > 0, "{asked}");
    // Without a radius: every move to everyone, at one or more agent counts.
    let without = r["without_radius"].as_array().unwrap();
    assert!(!without.is_empty());
    for run in without {
        assert_eq!(run["interest_radius"], Value::Null);
        assert_eq!(run["view_frames"], 0);
        assert_eq!(run["delivered"], run["expected_deliveries"], "{run}");
    }
    assert_eq!(r["model"]["agents"], 10_000);
    assert!(
        r["model"]["frames_per_sec_without_radius"]
            .as_f64()
            .unwrap()
            > r["model"]["frames_per_sec_with_radius"].as_f64().unwrap()
    );
    // Crowds replace --clients and --rate.
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "ws", "--agents-per-zone", "10", "--clients", "5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args([
            "bench",
            "ws",
            "--agents-per-zone",
            "10",
            "--aoi-radius",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--aoi-radius"));
}

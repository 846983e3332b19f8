//! The `thunderline bench pipeline` command as a user runs it: it finishes by itself, acknowledges
//! every event, stays within its in-flight bound, and prints the documented JSON keys.

use std::process::Command;

/// Runs `thunderline <args>` and returns its stdout as the one JSON object it must print,
/// failing with its stderr when it exits unsuccessfully.
fn json_report(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(args)
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "{args:?}: exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is one JSON object")
}

#[test]
fn bench_pipeline_prints_one_json_object_with_the_documented_keys() {
    let report = json_report(&["bench", "pipeline", "--events", "20000", "--json"]);
    for key in [
        "events",
        "acked",
        "failed",
        "events_per_sec",
        "baseline_events_per_sec",
        "ratio",
        "max_in_flight",
        "in_flight_bound",
    ] {
        assert!(report.get(key).is_some(), "missing key {key} in {report}");
    }
    assert_eq!(report["events"], 20000);
    assert_eq!(report["acked"], 20000);
    assert_eq!(report["failed"], 0);
    assert!(report["max_in_flight"].as_u64() <= report["in_flight_bound"].as_u64());
    assert!(report["ratio"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_without_a_name_lists_the_benchmarks() {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .arg("bench")
        .output()
        .expect("the binary runs");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("pipeline"), "{text}");
}

#[test]
fn bad_flags_get_a_clear_error_and_a_failing_exit() {
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "pipeline", "--events", "lots"])
        .output()
        .expect("the binary runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("invalid value 'lots' for '--events"), "{err}");
}

/// `bench broker` on each broker, small: every command reaches the audit log and its
/// acknowledgement once, and the report carries both rates and their ratio.
#[test]
fn bench_broker_runs_on_both_brokers_and_audits_every_command() {
    for kind in ["nats", "rabbitmq"] {
        let report = json_report(&[
            "bench", "broker", "--kind", kind, "--events", "500", "--rounds", "1", "--json",
        ]);
        assert_eq!(report["kind"], kind);
        assert_eq!(report["events"], 500);
        assert_eq!(report["audited"], 500, "{report}");
        assert_eq!(report["acked"], 500, "{report}");
        for key in ["pipeline_per_sec", "raw_per_sec", "ratio"] {
            assert!(report[key].as_f64().unwrap() > 0.0, "{key} in {report}");
        }
        assert_eq!(report["rounds"].as_array().unwrap().len(), 1);
    }
    let out = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["bench", "broker", "--kind", "kafka"])
        .output()
        .expect("the binary runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid value 'kafka'"));
}

/// `bench recovery`, small: every rejoin recovers every missed event, from memory and from the
/// audit log, and the report has both and the plain join's baseline.
#[test]
fn bench_recovery_recovers_every_rejoin_from_memory_and_from_the_log() {
    let report = json_report(&[
        "bench",
        "recovery",
        "--missed",
        "50,200",
        "--rejoins",
        "3",
        "--json",
    ]);
    let cases = report["cases"].as_array().unwrap();
    let seen: Vec<(u64, &str)> = cases
        .iter()
        .map(|c| (c["missed"].as_u64().unwrap(), c["from"].as_str().unwrap()))
        .collect();
    assert_eq!(
        seen,
        [
            (50, "memory"),
            (50, "audit_log"),
            (200, "memory"),
            (200, "audit_log")
        ]
    );
    for c in cases {
        assert_eq!(c["recovered"], 3, "{c}");
        assert!(c["recovery"]["p99_ms"].as_f64().unwrap() > 0.0, "{c}");
        assert!(c["plain_join"]["p99_ms"].as_f64().unwrap() > 0.0, "{c}");
    }
}

/// `bench migrate`, small, on one node and across two: every move ends with the agent in the
/// other zone, and the report has the plain leave-and-join beside it.
#[test]
fn bench_migrate_moves_every_agent_on_one_node_and_across_two() {
    for nodes in ["1", "2"] {
        let report = json_report(&[
            "bench", "migrate", "--agents", "5", "--rounds", "4", "--nodes", nodes, "--json",
        ]);
        assert_eq!(report["nodes"].as_u64().unwrap().to_string(), nodes);
        for way in ["migrate", "leave_and_join"] {
            let m = &report[way];
            assert_eq!(m["completed"], 20, "{way}: {report}");
            assert_eq!(m["failed"], 0, "{way}: {report}");
            assert!(m["p99_ms"].as_f64().unwrap() > 0.0, "{way}: {report}");
            assert!(m["per_sec"].as_f64().unwrap() > 0.0, "{way}: {report}");
        }
    }
}

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

#[test]
fn the_phoenix_client_works_against_the_daemon_unmodified() {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    if !node_available() {
        assert!(
            !ci,
            "Node.js is required under CI=true to run the phoenix client tests"
        );
        eprintln!("\n*** SKIPPED the phoenix JavaScript client tests: `node` is not installed.\n");
        return;
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

    let dir = std::env::temp_dir().join(format!("thunderline-js-{}", std::process::id()));
    let daemon = common::binary::start(&dir, &[]);
    let url = daemon.url.clone();
    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "zone.test.mjs"])
        .current_dir(&js)
        .env("THUNDERLINE_URL", &url)
        .env("THUNDERLINE_ADMIN_TOKEN", common::binary::ADMIN)
        .output()
        .expect("node runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (exit, printed) = daemon.terminate();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{report}");
    assert!(
        out.status.success(),
        "the phoenix client tests failed:\n{report}"
    );
    assert!(
        exit.success(),
        "the daemon exited with {exit:?} after SIGTERM; it printed {printed:?}"
    );
}

//! The official `phoenix` JavaScript client (tests/js, versions pinned in its lockfile) against
//! the real `thunderline serve` binary. Without Node this says so loudly and passes; under
//! `CI=true` a missing Node fails it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let admin = "js-test-admin-token";
    let mut server = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .env_remove("THUNDERLINE_DATABASE_URL")
        .env("THUNDERLINE_ADMIN_TOKEN", admin)
        .env(
            "THUNDERLINE_SECRET",
            "js-test-signing-secret-of-at-least-32-bytes",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the daemon starts");
    let mut lines = BufReader::new(server.stdout.take().unwrap()).lines();
    let started = Instant::now();
    let url = loop {
        let line = lines
            .next()
            .expect("the daemon prints where it listens")
            .unwrap();
        if let Some(url) = line.strip_prefix("thunderline listening on ") {
            break url.trim().to_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the daemon did not start"
        );
    };
    // Keep reading its output so it never blocks on a full pipe.
    let drain = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let out = Command::new("node")
        .args(["--test", "--test-concurrency=1", "zone.test.mjs"])
        .current_dir(&js)
        .env("THUNDERLINE_URL", &url)
        .env("THUNDERLINE_ADMIN_TOKEN", admin)
        .output()
        .expect("node runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let _ = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status();
    let exit = server.wait().expect("the daemon exits");
    let printed = drain.join().unwrap_or_default();
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

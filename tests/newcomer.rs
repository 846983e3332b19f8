//! What a new user meets first, run as they run it: commands started from the wrong directory,
//! a port already taken, a data directory others can read. Each refuses with a message that says
//! what to do, and creates nothing.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};

const ZONE: &str = "01939e3a-7c4e-7b8e-9c2d-1a2b3c4d5e6f";

/// `thunderline args…` run in `dir`, with no setting from the environment; one that is still
/// running after 20 s (a server that started when it should have refused) is killed, and its
/// output is what it printed until then, with a failed status.
fn run_in(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(args)
        .current_dir(dir)
        .env_remove("THUNDERLINE_DATABASE_URL")
        .env_remove("THUNDERLINE_DATA_DIR")
        .env_remove("THUNDERLINE_SECRET")
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    common::eventually_blocking(20, || child.try_wait().expect("waits").is_some());
    if child.try_wait().expect("waits").is_none() {
        let _ = child.kill();
    }
    child.wait_with_output().expect("the binary is reaped")
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn empty_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "thunderline-newcomer-{name}-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn token_and_replay_from_a_directory_without_a_server_create_nothing_and_say_where_they_looked() {
    let dir = empty_dir("commands");
    for args in [
        vec!["token", "--agent", "a1", "--zone", ZONE],
        vec!["replay", "--zone", ZONE],
    ] {
        let out = run_in(&dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} refused: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed nothing");
        assert!(
            stderr.contains(&dir.join("data").display().to_string()),
            "{args:?} names the directory it looked for: {stderr}"
        );
        assert!(
            stderr.contains("--data-dir"),
            "{args:?} names the flag: {stderr}"
        );
        assert!(
            entries(&dir).is_empty(),
            "{args:?} created {:?}",
            entries(&dir)
        );
    }
    // An explicit SQLite database that does not exist is not created either.
    let missing = dir.join("elsewhere.db");
    let url = format!("sqlite://{}", missing.display());
    let out = run_in(&dir, &["replay", "--zone", ZONE, "--database", &url]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("elsewhere.db"), "{stderr}");
    assert!(entries(&dir).is_empty(), "created {:?}", entries(&dir));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn serve_on_a_port_in_use_creates_nothing() {
    let dir = empty_dir("port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run_in(&dir, &["serve", "--listen", &addr]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
    assert!(
        entries(&dir).is_empty(),
        "nothing created: {:?}",
        entries(&dir)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn serve_refuses_a_data_directory_others_can_read_and_says_who_can() {
    use std::os::unix::fs::PermissionsExt;
    let dir = empty_dir("modes");
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    for (mode, who) in [
        (0o755, "group and others"),
        (0o750, "group"),
        (0o705, "others"),
    ] {
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(mode)).unwrap();
        let out = run_in(&dir, &["serve", "--listen", "127.0.0.1:0"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "mode {mode:o} refused: {stderr}");
        assert!(stderr.contains(&format!("{mode:o}")), "{stderr}");
        assert!(stderr.contains(who), "mode {mode:o}: {who}: {stderr}");
        assert!(stderr.contains("chmod 700"), "{stderr}");
        assert!(entries(&data).is_empty(), "{:?}", entries(&data));
    }
    // A secret file only the group can read is said to be readable by the group.
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).unwrap();
    let secret = data.join("secret");
    std::fs::write(&secret, "x".repeat(40)).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = run_in(&dir, &["serve", "--listen", "127.0.0.1:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("readable by its group"), "{stderr}");
    assert!(!stderr.contains("others"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `serve` started in `dir` with no setting from the environment and `extra` flags; its
/// standard output and error go to files, as a service manager or `> log 2>&1` would take them
/// (not a terminal). Returns the files' contents once `ready` holds for them (bounded), after
/// SIGTERM and its exit.
fn serve_until(dir: &Path, extra: &[&str], ready: impl Fn(&str, &str) -> bool) -> (String, String) {
    let out_path = dir.join("stdout.log");
    let err_path = dir.join("stderr.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", "data"])
        .args(extra)
        .current_dir(dir)
        .env_remove("THUNDERLINE_DATABASE_URL")
        .env_remove("THUNDERLINE_DATA_DIR")
        .env_remove("THUNDERLINE_SECRET")
        .env_remove("THUNDERLINE_ADMIN_TOKEN")
        .env_remove("THUNDERLINE_LOG_LEVEL")
        .env_remove("THUNDERLINE_LOG_FORMAT")
        .env_remove("RUST_LOG")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("the binary runs");
    let read = || {
        (
            std::fs::read_to_string(&out_path).unwrap_or_default(),
            std::fs::read_to_string(&err_path).unwrap_or_default(),
        )
    };
    common::eventually_blocking(30, || {
        let (out, err) = read();
        child.try_wait().unwrap().is_some() || ready(&out, &err)
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let (out, err) = read();
    std::fs::remove_file(&out_path).unwrap();
    std::fs::remove_file(&err_path).unwrap();
    (out, err)
}

#[test]
fn the_banner_says_where_the_console_and_the_admin_token_are_on_every_start() {
    let dir = empty_dir("banner");
    let kept = dir.join("data").join("admin_token").display().to_string();
    let banner_done = |out: &str, _: &str| out.contains("admin token:");
    let (first, logs) = serve_until(&dir, &[], banner_done);
    let url = first
        .lines()
        .find_map(|l| l.strip_prefix("thunderline listening on "))
        .unwrap_or_else(|| panic!("{first}"))
        .to_owned();
    assert!(first.contains(&format!("console: {url}/")), "{first}");
    assert!(
        first.contains(&format!("{url}/api/openapi.json")),
        "{first}"
    );
    assert!(
        first.contains(&format!("admin token: generated now, kept in {kept}")),
        "{first}"
    );
    let token = std::fs::read_to_string(dir.join("data/admin_token")).unwrap();
    assert!(
        !first.contains(token.trim()) && !logs.contains(token.trim()),
        "a token is never printed where it is not a terminal"
    );
    assert!(logs.contains("thunderline listening"), "{logs}");
    assert!(
        !logs.contains('\u{1b}'),
        "no colour codes in a log file: {logs:?}"
    );

    let (again, _) = serve_until(&dir, &[], banner_done);
    assert!(
        again.contains(&format!("admin token: kept in {kept}")),
        "a second start says where the token is: {again}"
    );

    // JSON logs: the banner is a JSON line with the same facts, and nothing else is printed.
    let (out, logs) = serve_until(&dir, &["--log-format", "json"], |_, err| {
        err.contains("thunderline listening")
    });
    assert!(out.is_empty(), "{out}");
    let line = logs
        .lines()
        .find(|l| l.contains("thunderline listening"))
        .unwrap();
    let line: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    let fields = &line["fields"];
    assert!(
        fields["console"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1:"),
        "{line}"
    );
    assert_eq!(fields["admin_token"], format!("kept in {kept}"), "{line}");
    assert!(logs.lines().all(|l| l.starts_with('{')), "{logs}");

    // --log-level warn: no info lines (the banner on standard output stays).
    let (out, logs) = serve_until(&dir, &["--log-level", "warn"], banner_done);
    assert!(out.contains("admin token:"), "{out}");
    assert!(!logs.contains("INFO"), "{logs}");
    std::fs::remove_dir_all(&dir).unwrap();
}

//! Credentials in URLs never reach the output: the real `thunderline serve`, given a database or
//! a broker URL with a password (or a NATS token) that cannot be reached, fails to start, and
//! neither what it prints nor its logs (as text or JSON) hold the secret.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const SECRET: &str = "s3cretpass";
const TOKEN: &str = "s3crettoken";

/// Runs `serve` with `args` (at most 60 s) and returns (exited with success, stdout + stderr).
fn serve(dir: &Path, args: &[&str]) -> (bool, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_thunderline"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .args(args)
        .env_remove("THUNDERLINE_DATABASE_URL")
        .env(
            "THUNDERLINE_ADMIN_TOKEN",
            "test-admin-token-long-enough-0123456789",
        )
        .env(
            "THUNDERLINE_SECRET",
            "test-signing-secret-of-at-least-32-bytes",
        )
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    // Read both pipes on threads of their own, so that a full pipe never blocks the daemon.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    // Its exit, awaited on a thread of its own, for at most 60 s: past that it is killed (a
    // serve that started is a failure of this test too, and must not outlive it).
    let pid = child.id();
    let (exited, exit) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exited.send(child.wait());
    });
    let status = match exit.recv_timeout(Duration::from_secs(60)) {
        Ok(status) => status.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("serve {args:?} neither failed nor started within 60 s");
        }
    };
    let printed = format!(
        "{}{}",
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default()
    );
    (status.success(), printed)
}

#[test]
fn no_secret_in_a_url_is_printed_when_serve_cannot_connect() {
    let dir = std::env::temp_dir().join(format!(
        "thunderline-redaction-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let nats = file(
        "nats.toml",
        format!("[sources.nats]\nurl = \"nats://admin:{SECRET}@127.0.0.1:1\"\n"),
    );
    let token = file(
        "token.toml",
        format!("[sources.nats]\nurl = \"nats://{TOKEN}@127.0.0.1:1\"\n"),
    );
    let rabbit = file(
        "rabbitmq.toml",
        format!("[sources.rabbitmq]\nurl = \"amqp://admin:{SECRET}@127.0.0.1:1/%2f\"\n"),
    );
    let database = format!("postgres://admin:{SECRET}@127.0.0.1:1/db");
    let cases: [(&str, Vec<&str>, &str); 4] = [
        ("a database password", vec!["--database", &database], SECRET),
        ("a NATS password", vec!["--config", &nats], SECRET),
        ("a NATS token", vec!["--config", &token], TOKEN),
        ("a RabbitMQ password", vec!["--config", &rabbit], SECRET),
    ];
    for (what, args, secret) in cases {
        for format in ["text", "json"] {
            let mut args = args.clone();
            args.extend(["--log-format", format]);
            let (started, printed) = serve(&dir, &args);
            assert!(!started, "{what}: serve started against 127.0.0.1:1");
            assert!(
                printed.contains("127.0.0.1:1"),
                "{what} ({format}): the error names where it could not connect: {printed}"
            );
            assert!(
                !printed.contains(secret),
                "{what} ({format}) leaked into the output: {printed}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

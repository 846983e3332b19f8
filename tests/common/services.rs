//! The machine's services as the tests stop and start them, with the commands of the machine
//! notes (the same `.ci/run` uses). A test that stops one holds a guard that starts it again
//! when the test ends, even by a panic.

use std::process::Command;
use std::time::Duration;

pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

pub fn wait_until(what: &str, secs: u64, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn start_nats() {
    let _ = Command::new("start-stop-daemon")
        .args([
            "--start",
            "--oknodo",
            "--background",
            "--exec",
            "/usr/sbin/nats-server",
            "--",
            "-a",
            "127.0.0.1",
            "-p",
            "4222",
            "-js",
            "-sd",
            "/var/lib/nats-server",
            "-l",
            "/var/log/nats-server.log",
        ])
        .status();
    wait_until("NATS listens again", 60, || listening(4222));
}

pub fn stop_nats() {
    let stopped = Command::new("start-stop-daemon")
        .args([
            "--stop",
            "--oknodo",
            "--retry",
            "10",
            "--exec",
            "/usr/sbin/nats-server",
        ])
        .status()
        .expect("start-stop-daemon runs");
    assert!(stopped.success());
    wait_until("NATS stops listening", 20, || !listening(4222));
}

/// Starts NATS again when dropped, whatever happened.
pub struct NatsBack;

impl Drop for NatsBack {
    fn drop(&mut self) {
        start_nats();
    }
}

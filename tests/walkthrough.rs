//! The README's five-minute walkthrough, run as a newcomer runs it: its shell blocks, as written,
//! against the real binary (on `PATH` as `thunderline`), in a fresh directory holding only
//! `examples/js`. The first block (`thunderline serve`) runs in the background; the others run
//! in order in one shell, as in the second terminal. The one change: the server's address
//! `127.0.0.1:4000` is a free port, so that the test never takes a port someone uses.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

const README: &str = include_str!("../README.md");
const SECTION: &str = "## Five minutes: from `serve` to a connected client";

/// The `sh` blocks of the walkthrough's section, in order.
fn blocks() -> Vec<String> {
    let start = README
        .find(SECTION)
        .expect("the README has the walkthrough");
    let section = &README[start + SECTION.len()..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("```").expect("a closed block");
        blocks.push(body[..close].to_owned());
        rest = &body[close + 3..];
    }
    blocks
}

fn copy_example(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/js");
    let to = to.join("examples/js");
    std::fs::create_dir_all(&to).unwrap();
    for file in ["package.json", "package-lock.json", "zone_client.mjs"] {
        std::fs::copy(from.join(file), to.join(file)).unwrap();
    }
}

fn node_available() -> bool {
    Command::new("node").arg("--version").output().is_ok()
        && Command::new("npm").arg("--version").output().is_ok()
}

#[cfg(unix)]
#[test]
fn the_readme_walkthrough_runs_as_written() {
    use std::os::unix::process::CommandExt;
    if !node_available() {
        assert!(
            std::env::var("CI").is_err(),
            "Node.js and npm are needed for the walkthrough under CI"
        );
        eprintln!("\n*** SKIPPED the README walkthrough: node or npm is missing.\n");
        return;
    }
    let blocks = blocks();
    assert!(blocks.len() >= 4, "the walkthrough's blocks: {blocks:#?}");
    assert_eq!(
        blocks[0].trim(),
        "thunderline serve",
        "the first block starts the server"
    );
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let here = |block: &str| block.replace("127.0.0.1:4000", &addr);

    let dir: PathBuf = std::env::temp_dir().join(format!(
        "thunderline-walkthrough-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    copy_example(&dir);
    let bin = Path::new(env!("CARGO_BIN_EXE_thunderline"))
        .parent()
        .unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let shell = |script: String| {
        let mut c = Command::new("bash");
        c.args(["-euo", "pipefail", "-c", &script])
            .current_dir(&dir)
            .env("PATH", &path)
            .env("THUNDERLINE_LISTEN", &addr)
            .env_remove("THUNDERLINE_DATA_DIR")
            .env_remove("THUNDERLINE_DATABASE_URL")
            .env_remove("THUNDERLINE_SECRET")
            .env_remove("THUNDERLINE_ADMIN_TOKEN")
            .process_group(0);
        c
    };

    // The first terminal. THUNDERLINE_LISTEN moves it to the free port (the README's blocks name
    // only the default address, which `here` rewrites).
    let server_out = dir.join("serve.out");
    let mut server = shell(here(&blocks[0]))
        .stdout(std::fs::File::create(&server_out).unwrap())
        .stderr(std::fs::File::create(dir.join("serve.err")).unwrap())
        .spawn()
        .unwrap();
    let stop = |server: &mut std::process::Child| {
        let _ = Command::new("kill")
            // `--` before the group: procps-ng 4.0's kill takes `-TERM -PGID` without an
            // error and signals nothing.
            .args(["-TERM", "--", &format!("-{}", server.id())])
            .status();
        let _ = server.wait();
    };
    common::eventually_blocking(30, || {
        std::fs::read_to_string(&server_out).is_ok_and(|out| out.contains("admin token:"))
    });
    let banner = std::fs::read_to_string(&server_out).unwrap_or_default();
    if !banner.contains("admin token:") {
        stop(&mut server);
        panic!("the server did not start: {banner}");
    }
    assert!(
        banner.contains(&format!("console: http://{addr}/")),
        "{banner}"
    );

    // The second terminal: every other block, in order, in one shell.
    let script: Vec<String> = blocks[1..].iter().map(|b| here(b)).collect();
    let out = shell(script.join("\n")).output().unwrap();
    stop(&mut server);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let logs = std::fs::read_to_string(dir.join("serve.err")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "the walkthrough failed:\n{stdout}\n{stderr}\nthe server's log:\n{logs}"
    );
    // The client joined, dropped, and came back with what it missed.
    assert!(stdout.contains("recovered: true"), "{stdout}");
    assert!(
        stdout.matches("notice ").count() >= 3,
        "the three notices it missed: {stdout}"
    );
    // Both tokens were minted (the CLI's on its own line, the API's as JSON).
    assert!(stdout.contains("\"token\""), "{stdout}");
    assert!(stderr.contains("expires at"), "{stderr}");
    // The replay printed the zone's log, from its creation, as JSON lines.
    let replayed: Vec<serde_json::Value> = stdout
        .lines()
        .filter(|l| l.starts_with('{') && l.contains("\"occurred_at\""))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        replayed.first().map(|e| e["type"].clone()),
        Some("zone_created".into()),
        "{stdout}"
    );
    assert!(
        replayed.iter().any(|e| e["type"] == "agent_moved"),
        "{stdout}"
    );
}

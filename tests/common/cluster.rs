//! A cluster of daemons for the tests: child processes on loopback ports sharing NATS (under a
//! cluster name of their own) and one fresh PostgreSQL schema.

use std::path::PathBuf;
use std::process::Stdio;

use serde_json::Value;

use super::binary::{self, ADMIN, Daemon};
use super::server::http;

pub const NATS: &str = "nats://127.0.0.1:4222";

/// A cluster of its own (its own name on the shared NATS server) on a fresh schema.
pub struct Cluster {
    pub name: String,
    pub db: super::TestDb,
    pub dirs: Vec<PathBuf>,
}

impl Cluster {
    pub async fn new() -> Self {
        let db = super::postgres()
            .await
            .expect("PostgreSQL is needed for a cluster (one database shared by its nodes)");
        Self {
            name: format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            db,
            dirs: Vec::new(),
        }
    }

    /// Starts node `node`, waiting until it has joined (ready).
    pub async fn node(&mut self, node: &str) -> Daemon {
        self.node_with(node, &[]).await
    }

    /// As [`node`](Self::node), with more environment variables.
    pub async fn node_with(&mut self, node: &str, envs: &[(&str, &str)]) -> Daemon {
        self.node_full(node, &[], envs).await
    }

    /// As [`node`](Self::node), with more arguments (`--config FILE`, say).
    pub async fn node_args(&mut self, node: &str, args: &[&str]) -> Daemon {
        self.node_full(node, args, &[]).await
    }

    async fn node_full(&mut self, node: &str, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = std::env::temp_dir().join(format!(
            "thunderline-{}-{node}-{}",
            self.name,
            self.dirs.len()
        ));
        self.dirs.push(dir.clone());
        let daemon = binary::start_env(
            &dir,
            &[
                "--database",
                &self.db.url,
                "--cluster",
                NATS,
                "--node-id",
                node,
                "--cluster-name",
                &self.name,
                "--cluster-heartbeat-ms",
                "100",
            ]
            .into_iter()
            .chain(args.iter().copied())
            .collect::<Vec<_>>(),
            Stdio::inherit(),
            envs,
        );
        let ready = super::eventually(10, async || {
            http(daemon.addr, "GET", "/readyz", None, None).await.0 == 200
        })
        .await;
        assert!(ready, "node {node} joined its cluster");
        daemon
    }

    pub async fn cleanup(self) {
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
        self.db.cleanup().await;
    }
}

/// A PostgreSQL connection to the cluster's schema.
pub async fn db(cluster: &Cluster) -> sqlx::PgConnection {
    use sqlx::Connection;
    sqlx::PgConnection::connect(&cluster.db.url).await.unwrap()
}

/// The seqs in zone `zone`'s audit log, in order.
pub async fn logged_seqs(cluster: &Cluster, zone: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM audit_events WHERE zone_id = $1::uuid ORDER BY seq")
        .bind(zone)
        .fetch_all(&mut db(cluster).await)
        .await
        .unwrap()
}

/// The x of every `agent_moved` of `agent` in zone `zone`'s audit log, in seq order.
pub async fn logged_moves(cluster: &Cluster, zone: &str, agent: &str) -> Vec<i64> {
    let rows: Vec<(f64,)> = sqlx::query_as(
        "SELECT (payload->'position'->>'x')::float8 FROM audit_events \
         WHERE zone_id = $1::uuid AND event_type = 'agent_moved' AND payload->>'agent_id' = $2 ORDER BY seq",
    )
    .bind(zone)
    .bind(agent)
    .fetch_all(&mut db(cluster).await)
    .await
    .unwrap();
    rows.into_iter().map(|(x,)| x as i64).collect()
}

/// Resumes a daemon stopped with SIGSTOP, whatever happens in the test.
pub struct Stopped<'a>(pub &'a Daemon);

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        self.0.signal("-CONT");
    }
}

pub async fn zone_json(node: &Daemon, zone: &str) -> Value {
    let (status, body) = http(
        node.addr,
        "GET",
        &format!("/api/zones/{zone}"),
        None,
        Some(ADMIN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

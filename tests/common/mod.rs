//! Databases for the store's tests: a fresh SQLite file, and a fresh schema in the PostgreSQL
//! at `THUNDERLINE_TEST_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`).
//! Without a reachable PostgreSQL the Postgres half is skipped, loudly; under `CI=true`, or when
//! the variable is set, an unreachable PostgreSQL fails the test instead.

#![allow(dead_code)]

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgConnection;

pub const DEFAULT_PG: &str = "postgres://postgres@127.0.0.1:5432/test";

/// One database a test runs against.
pub struct TestDb {
    pub name: &'static str,
    pub url: String,
    /// The tag in `application_name`, to find this test's connections.
    pub tag: String,
    schema: Option<(String, String)>,
    file: Option<std::path::PathBuf>,
}

impl TestDb {
    pub async fn cleanup(self) {
        if let Some((base, schema)) = &self.schema
            && let Ok(mut c) = PgConnection::connect(base).await
        {
            let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                .execute(&mut c)
                .await;
        }
        if let Some(file) = &self.file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
    }
}

pub fn sqlite() -> TestDb {
    let tag = format!("t{}", uuid::Uuid::now_v7().simple());
    let file = std::env::temp_dir().join(format!("thunderline-{tag}.db"));
    TestDb {
        name: "sqlite",
        url: format!("sqlite://{}", file.display()),
        tag,
        schema: None,
        file: Some(file),
    }
}

/// A fresh schema in the test PostgreSQL, or None (after saying so) when there is none.
pub async fn postgres() -> Option<TestDb> {
    let explicit = std::env::var("THUNDERLINE_TEST_DATABASE_URL").ok();
    let base = explicit.clone().unwrap_or_else(|| DEFAULT_PG.to_owned());
    let must = explicit.is_some() || std::env::var("CI").is_ok_and(|v| v == "true");
    let conn = tokio::time::timeout(Duration::from_secs(5), PgConnection::connect(&base)).await;
    let mut conn = match conn {
        Ok(Ok(c)) => c,
        Ok(Err(e)) if must => panic!("PostgreSQL at {base} is required here and failed: {e}"),
        Err(_) if must => panic!("PostgreSQL at {base} is required here and did not answer"),
        _ => {
            eprintln!(
                "\n*** SKIPPED the PostgreSQL half of this test: no server answers at {base}.\n\
                 *** Start one or set THUNDERLINE_TEST_DATABASE_URL; CI=true makes this a failure.\n"
            );
            return None;
        }
    };
    let tag = format!("t{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE SCHEMA {tag}"))
        .execute(&mut conn)
        .await
        .expect("create a test schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options[search_path]={tag}&application_name={tag}");
    Some(TestDb {
        name: "postgres",
        url,
        tag: tag.clone(),
        schema: Some((base, tag)),
        file: None,
    })
}

/// Every backend this machine can test.
pub async fn backends() -> Vec<TestDb> {
    let mut all = vec![sqlite()];
    all.extend(postgres().await);
    all
}

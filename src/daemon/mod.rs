//! The daemon: configuration from flags and the environment, the zone server (`serve`), and
//! the commands around it (`token`, `replay`). This is where the engine, the zones, the store
//! and the WebSocket channels are wired together, and where errors get their context.

pub mod api;
pub mod config;
pub mod console;
pub mod control;
pub mod ingest;
pub mod replay;
pub mod server;
pub mod token;
pub mod zones;

use std::path::PathBuf;

use crate::store::default_database_url;

/// Where the store lives.
#[derive(Clone, Debug, clap::Args)]
pub struct DatabaseArgs {
    /// Database URL: postgres://user@host/db, or sqlite://path/to/file.db.
    /// Default: the embedded SQLite file in the data directory.
    #[arg(long, env = "THUNDERLINE_DATABASE_URL")]
    pub database: Option<String>,
    /// Directory for the embedded database and generated secrets.
    #[arg(long, env = "THUNDERLINE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

impl DatabaseArgs {
    pub fn url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| default_database_url(&self.data_dir))
    }
}

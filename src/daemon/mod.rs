//! The daemon's edge: configuration from flags and the environment, and the commands that work
//! on its store (`replay`). This is where the engine, the zones and the store are wired together
//! and where errors are reported with their context.

pub mod replay;

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

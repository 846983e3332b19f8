//! The daemon: configuration from flags and the environment, the zone server (`serve`), and
//! the commands around it (`token`, `replay`). This is where the engine, the zones, the store
//! and the WebSocket channels are wired together, and where errors get their context.

pub mod api;
pub mod config;
pub mod console;
pub mod control;
pub mod error;
pub mod ingest;
pub mod openapi;
pub mod replay;
pub mod server;
pub mod token;

use std::path::PathBuf;

use crate::redact::redact_url;
use crate::store::default_database_url;

/// Where the store lives. Its `Debug` shows the URL without credentials.
#[derive(Clone, clap::Args)]
pub struct DatabaseArgs {
    /// Database URL: postgres://user@host/db, or sqlite://path/to/file.db.
    /// Default: the embedded SQLite file in the data directory.
    #[arg(long, env = "THUNDERLINE_DATABASE_URL")]
    pub database: Option<String>,
    /// Directory for the embedded database and generated secrets.
    #[arg(long, env = "THUNDERLINE_DATA_DIR", default_value = "data")]
    pub data_dir: PathBuf,
}

impl std::fmt::Debug for DatabaseArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseArgs")
            .field("database", &self.database.as_deref().map(redact_url))
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl DatabaseArgs {
    pub fn url(&self) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| default_database_url(&self.data_dir))
    }
}

/// A span of time given on the command line, in whole seconds: `3600`, or with a unit, `90s`,
/// `15m`, `24h`, `7d`.
pub fn seconds(text: &str) -> Result<u64, String> {
    let (digits, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "{text:?} is not a duration: use seconds (3600) or a number with s, m, h or d (24h)"
            ));
        }
    };
    let count: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: it must start with a whole number"))?;
    count
        .checked_mul(scale)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::seconds;

    #[test]
    fn durations_are_seconds_or_a_number_with_a_unit() {
        assert_eq!(seconds("3600"), Ok(3600));
        assert_eq!(seconds("90s"), Ok(90));
        assert_eq!(seconds("15m"), Ok(900));
        assert_eq!(seconds("24h"), Ok(86_400));
        assert_eq!(seconds("7d"), Ok(604_800));
        for bad in [
            "",
            "h",
            "-5",
            "1.5h",
            "1 h",
            "2w",
            "24hh",
            "99999999999999999999d",
        ] {
            assert!(seconds(bad).is_err(), "{bad:?}");
        }
    }
}

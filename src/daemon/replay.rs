//! `thunderline replay`: a zone's audited events, in order, as JSON lines.

use std::io::Write;

use chrono::{DateTime, Utc};

use super::DatabaseArgs;
use super::error::DaemonError;
use crate::store::Store;
use crate::zone::parse_zone_id;

#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// The zone whose events to print.
    #[arg(long)]
    pub zone: String,
    /// Only events at or after this time (RFC 3339, e.g. 2026-11-27T10:00:00Z).
    #[arg(long)]
    pub since: Option<String>,
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// Events are read a page at a time, so a long log streams instead of filling memory.
const PAGE: u32 = 1_000;

/// Writes the zone's events to `out`, one JSON object per line; returns how many.
pub async fn replay(args: &ReplayArgs, out: &mut impl Write) -> Result<u64, DaemonError> {
    let zone = parse_zone_id(&args.zone)?;
    let since = args
        .since
        .as_deref()
        .map(|s| {
            DateTime::parse_from_rfc3339(s.trim())
                .map(|t| t.with_timezone(&Utc))
                .map_err(|_| DaemonError::BadSince(s.to_owned()))
        })
        .transpose()?;
    // The server's store as it is: nothing is created where none exists.
    if args.db.database.is_none() {
        super::server::existing_data_dir(&args.db.data_dir)?;
    }
    let store = Store::open_existing(&args.db.url()).await?;
    let mut written = 0u64;
    let mut after = None;
    loop {
        let page = store.zone_events(zone, since, after, Some(PAGE)).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.seq);
        for event in &page {
            writeln!(out, "{}", event.to_json()).map_err(DaemonError::Output)?;
            written += 1;
        }
    }
    out.flush().map_err(DaemonError::Output)?;
    if written == 0 {
        // No events: say so if the zone does not exist at all.
        store.get_zone(zone).await?;
    }
    store.close().await;
    Ok(written)
}

//! `thunderline token`: mints a join token with the server's secret.

use chrono::{DateTime, Utc};

use super::DatabaseArgs;
use super::error::DaemonError;
use super::server::{DEFAULT_MAX_TOKEN_TTL, signing_secret};
use crate::realtime::{TokenError, TokenSigner};
use crate::zone::{Permissions, parse_zone_id};

#[derive(Clone, Debug, clap::Args)]
pub struct TokenArgs {
    /// The agent the token is for.
    #[arg(long)]
    pub agent: String,
    /// The zone it lets the agent join.
    #[arg(long)]
    pub zone: String,
    /// Permission names (spawn_agents, modify_zone, broadcast_events, admin_zone), several
    /// separated by commas (spawn_agents,modify_zone), or bits (5, 0x05).
    #[arg(long, default_value = "spawn_agents")]
    pub perms: String,
    /// How long until it expires, in seconds (or 90m, 24h, 7d).
    #[arg(long, default_value_t = 3600, value_parser = super::seconds)]
    pub ttl: u64,
    /// The longest it may live (as `serve --max-token-ttl`).
    #[arg(long, env = "THUNDERLINE_MAX_TOKEN_TTL", default_value_t = DEFAULT_MAX_TOKEN_TTL,
          value_parser = super::seconds)]
    pub max_token_ttl: u64,
    #[command(flatten)]
    pub db: DatabaseArgs,
}

/// The token and when it expires. Uses `THUNDERLINE_SECRET`, or the secret `serve` keeps in the
/// data directory (which must exist: a token signed with a secret made up here would be no
/// server's).
pub fn mint(args: &TokenArgs) -> Result<(String, DateTime<Utc>), DaemonError> {
    if args.ttl > args.max_token_ttl {
        return Err(DaemonError::TtlTooLong {
            ttl: args.ttl,
            max: args.max_token_ttl,
        });
    }
    let zone = parse_zone_id(&args.zone)?;
    let perms: Permissions = args.perms.parse()?;
    let signing = signing_secret(&args.db.data_dir)?;
    let signer = TokenSigner::new(signing.as_bytes())?;
    let (token, claims) = signer.mint(
        &args.agent,
        zone,
        perms,
        i64::try_from(args.ttl).map_err(|_| TokenError::BadTtl)?,
        Utc::now(),
    )?;
    Ok((token, claims.expires_at()))
}

//! The `migrate` push: an agent on `zone:A` asks to move to zone B with a join token for B.
//! Checked here as a join of B would be (the token's agent, zone, expiry and revocation), then
//! carried out by the runtime's [`Migrations`]; the client is answered `ok` with a ticket for
//! B (`{zone, ticket, expires_in_ms}`), its channel on A closed (`phx_close`, reason
//! `migrated`), or refused with A unchanged: `zone_not_found`, `unauthorized`, `zone_full`,
//! `same_zone`, `not_joined`, `migration_pending`, `invalid_payload`, `unavailable`.

use std::sync::{Arc, Mutex};

use serde::Deserialize;
use serde_json::{Map, Value, json};
use uuid::Uuid;

use super::channel::Channels;
use super::hub::{Hub, Peer, topic_name};
use super::protocol::{self, Frame};
use super::revocation::Revocations;
use super::token::{TicketClaims, TokenSigner};
use crate::runtime::{MigrationRequest, Migrations, keyed_command_id};
use crate::zone::{Mover, ZoneError, parse_zone_id};

/// What a `migrate` push carries.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Migrate {
    to: String,
    token: String,
}

/// What a connection lends a migration it asks for.
pub struct Asker<'a> {
    pub peer: &'a Peer,
    pub channels: &'a Arc<Mutex<Channels>>,
    pub hub: &'a Arc<Hub>,
    pub signer: &'a TokenSigner,
    pub revocations: &'a Revocations,
    pub migrations: Option<&'a Arc<Migrations>>,
    /// Held until the client is answered.
    pub unanswered: Arc<()>,
}

/// A refusal before anything was asked of a zone: (reason, details).
type Refusal = (&'static str, String);

/// Starts the migration `frame` asks for on `zone` (its `idempotency_key`, if any, taken
/// out as `key`), or refuses it at once; the answer goes to the client when it ends.
pub fn start(asker: Asker<'_>, zone: Uuid, frame: Frame, key: Option<String>) {
    let reply_error = |(reason, details): Refusal| {
        asker.peer.send_text(protocol::error_reply(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            reason,
            &details,
        ));
    };
    let Some(migrations) = asker.migrations.cloned() else {
        return reply_error((
            "unavailable",
            "this server does not move agents between zones".into(),
        ));
    };
    let checked = check(&asker, zone, &frame, key);
    let (request, claims, join_ref) = match checked {
        Ok(checked) => checked,
        Err(refusal) => return reply_error(refusal),
    };
    let peer = asker.peer.clone();
    let channels = asker.channels.clone();
    let hub = asker.hub.clone();
    let signer = asker.signer.clone();
    let unanswered = asker.unanswered;
    let (from, to) = (request.from, request.to);
    let msg_ref = frame.msg_ref;
    let topic = frame.topic;
    tokio::spawn(async move {
        let result = migrations.migrate(request).await;
        let _unanswered = unanswered;
        let finish = |migrating: bool| {
            let mut channels = channels.lock().unwrap_or_else(|e| e.into_inner());
            match channels.get_mut(&from) {
                Some(joined) if joined.join_ref == join_ref && migrating => {
                    channels.remove(&from);
                    true
                }
                Some(joined) if joined.join_ref == join_ref => {
                    joined.migrating = false;
                    false
                }
                _ => false,
            }
        };
        match result {
            Ok(migrated) => {
                // A retry told how it ended before ends no session now: a channel this
                // connection joined since stays.
                let closed = finish(!migrated.duplicate);
                if closed {
                    hub.unsubscribe_now(from, &peer.id);
                }
                let ticket = signer.mint_ticket(&TicketClaims {
                    ticket: migrated.reservation,
                    agent_id: claims.agent_id.clone(),
                    zone_id: to,
                    perms: claims.perms,
                    exp_ms: migrated.expires_at.timestamp_millis(),
                    token_exp: claims.exp,
                    minted_us: claims.minted_us,
                });
                // What is left of the place's time: the whole of it when the steps took less
                // than a second (it was reserved a moment ago).
                let ttl = i64::try_from(migrations.ticket_ttl().as_millis()).unwrap_or(i64::MAX);
                let left = (migrated.expires_at - crate::runtime::now())
                    .num_milliseconds()
                    .clamp(0, ttl);
                let expires_in_ms = if !migrated.duplicate && ttl - left < 1_000 {
                    ttl
                } else {
                    left
                };
                let mut response = Map::new();
                response.insert("zone".into(), json!(to.to_string()));
                response.insert("ticket".into(), json!(ticket));
                response.insert("expires_in_ms".into(), json!(expires_in_ms));
                if migrated.duplicate {
                    response.insert("duplicate".into(), json!(true));
                }
                peer.send_text(protocol::reply(
                    join_ref.as_deref(),
                    msg_ref.as_deref(),
                    &topic,
                    true,
                    &Value::Object(response),
                ));
                if closed {
                    peer.send_text(protocol::encode(
                        join_ref.as_deref(),
                        join_ref.as_deref(),
                        &topic_name(from),
                        "phx_close",
                        &json!({"reason": "migrated", "to": to.to_string()}),
                    ));
                }
            }
            Err(refusal) => {
                finish(false);
                peer.send_text(protocol::error_reply(
                    join_ref.as_deref(),
                    msg_ref.as_deref(),
                    &topic,
                    refusal.reason(),
                    &refusal.to_string(),
                ));
            }
        }
    });
}

/// Checks a `migrate` push as a join of its destination would be checked, and marks its
/// channel as migrating: the request, the destination token's claims and the channel's
/// `join_ref`.
fn check(
    asker: &Asker<'_>,
    zone: Uuid,
    frame: &Frame,
    key: Option<String>,
) -> Result<(MigrationRequest, super::token::Claims, Option<String>), Refusal> {
    let Migrate { to, token } = Migrate::deserialize(Value::Object(frame.payload.clone()))
        .map_err(|e| {
            (
                "invalid_payload",
                format!("migrate takes {{\"to\": \"<zone id>\", \"token\": \"<join token for it>\"}}: {e}"),
            )
        })?;
    let to = parse_zone_id(&to).map_err(|e| ("zone_not_found", e.to_string()))?;
    if to == zone {
        return Err(("same_zone", ZoneError::SameZone.to_string()));
    }
    let claims = asker
        .signer
        .verify(&token, chrono::Utc::now())
        .map_err(|e| ("unauthorized", e.to_string()))?;
    if claims.zone_id != to {
        return Err((
            "unauthorized",
            "the token was minted for another zone than the one to move to".into(),
        ));
    }
    if asker.revocations.revoked(&claims) {
        return Err((
            "unauthorized",
            "the token was revoked: move with a token minted since".into(),
        ));
    }
    let mut channels = asker.channels.lock().unwrap_or_else(|e| e.into_inner());
    let joined = channels
        .get_mut(&zone)
        .filter(|j| frame.join_ref.is_none() || j.join_ref == frame.join_ref);
    let (join_ref, permissions) = match joined {
        Some(joined) => {
            if joined.agent_id != claims.agent_id {
                return Err((
                    "unauthorized",
                    "the token was minted for another agent".into(),
                ));
            }
            if joined.migrating {
                return Err(("migration_pending", ZoneError::MigrationPending.to_string()));
            }
            joined.migrating = true;
            (joined.join_ref.clone(), joined.perms)
        }
        // A retry (its idempotency key given) of a migration that took the agent out already is
        // told how it ended; anything else needs a session here.
        None if key.is_some() => (frame.join_ref.clone(), claims.perms),
        None => {
            return Err((
                "not_joined",
                format!(
                    "agent {} has no session in this zone on this connection: join it first",
                    claims.agent_id
                ),
            ));
        }
    };
    let id = match &key {
        Some(key) => keyed_command_id(zone, &claims.agent_id, key),
        None => Uuid::now_v7(),
    };
    let request = MigrationRequest {
        id,
        from: zone,
        to,
        agent_id: claims.agent_id.clone(),
        mover: Mover::Agent {
            connection: asker.peer.id.to_string(),
            permissions,
        },
    };
    Ok((request, claims, join_ref))
}

//! Join tokens: the server's signature over an agent, a zone, permission bits and an expiry.
//!
//! A token is `<claims>.<mac>`: the claims as base64url JSON, and an HMAC-SHA256 of that text
//! under the server's secret, also base64url. Only the server can mint one; anyone holding one
//! can read its claims, which are not secret.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use uuid::Uuid;

use crate::zone::Permissions;

/// What a token lets its holder do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    pub agent_id: String,
    pub zone_id: Uuid,
    pub perms: Permissions,
    /// Expiry, in seconds since the Unix epoch.
    pub exp: i64,
    /// When it was minted, in microseconds since the Unix epoch: a revocation refuses the
    /// tokens minted before it, and a token minted a moment after it must still work. Tokens
    /// of versions before revocation lack it and count as minted at the epoch.
    #[serde(default)]
    pub minted_us: i64,
}

impl Claims {
    pub fn expires_at(&self) -> DateTime<Utc> {
        Utc.timestamp_opt(self.exp, 0)
            .single()
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is not the server's")]
    BadSignature,
    #[error("the token expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("the signing secret must be at least 32 bytes")]
    WeakSecret,
    #[error("a token's lifetime must be between 1 second and 10 years")]
    BadTtl,
}

/// Mints and checks tokens with one secret.
#[derive(Clone)]
pub struct TokenSigner {
    key: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSigner(..)")
    }
}

const MAX_TTL_SECS: i64 = 10 * 365 * 24 * 3600;

impl TokenSigner {
    pub fn new(secret: &[u8]) -> Result<Self, TokenError> {
        if secret.len() < 32 {
            return Err(TokenError::WeakSecret);
        }
        Ok(Self {
            key: Hmac::new_from_slice(secret).map_err(|_| TokenError::WeakSecret)?,
        })
    }

    /// A token for `agent_id` in `zone_id` with `perms`, valid for `ttl_secs` from `now`.
    pub fn mint(
        &self,
        agent_id: &str,
        zone_id: Uuid,
        perms: Permissions,
        ttl_secs: i64,
        now: DateTime<Utc>,
    ) -> Result<(String, Claims), TokenError> {
        if !(1..=MAX_TTL_SECS).contains(&ttl_secs) {
            return Err(TokenError::BadTtl);
        }
        let claims = Claims {
            agent_id: agent_id.to_owned(),
            zone_id,
            perms,
            // Rounded up to the next whole second, so the token lives at least `ttl_secs`
            // wherever in the second it is minted (a 1 s token minted at x.999 must not die at
            // x+1).
            exp: now.timestamp() + ttl_secs + i64::from(now.timestamp_subsec_nanos() > 0),
            minted_us: now.timestamp_micros(),
        };
        Ok((self.sealed(&claims, b""), claims))
    }

    /// The claims of a token this signer minted that has not expired at `now`.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Result<Claims, TokenError> {
        let claims: Claims = self.opened(token, b"")?;
        if claims.exp <= now.timestamp() {
            return Err(TokenError::Expired(claims.expires_at()));
        }
        Ok(claims)
    }
}

/// What a migration's ticket lets its holder do: join zone `zone_id` as `agent_id` into the
/// place reservation `reservation` holds, with the bits and the lifetime of the join token the
/// migration was asked with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketClaims {
    pub ticket: Uuid,
    pub agent_id: String,
    pub zone_id: Uuid,
    pub perms: Permissions,
    /// When the place stops being held, in milliseconds since the Unix epoch.
    pub exp_ms: i64,
    /// The join token's expiry (seconds) and minting (microseconds): the session's.
    pub token_exp: i64,
    pub minted_us: i64,
}

impl TicketClaims {
    /// The join token's claims, which the session it opens keeps to.
    pub fn token(&self) -> Claims {
        Claims {
            agent_id: self.agent_id.clone(),
            zone_id: self.zone_id,
            perms: self.perms,
            exp: self.token_exp,
            minted_us: self.minted_us,
        }
    }
}

impl TokenSigner {
    /// `<claims>.<mac>`: the claims as base64url JSON and the HMAC, under `domain`, of that
    /// text.
    fn sealed<T: Serialize>(&self, claims: &T, domain: &[u8]) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let mut mac = self.key.clone();
        mac.update(domain);
        mac.update(body.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{sig}")
    }

    /// The claims of what [`sealed`](Self::sealed) made under `domain`, its MAC checked in
    /// constant time.
    fn opened<T: serde::de::DeserializeOwned>(
        &self,
        text: &str,
        domain: &[u8],
    ) -> Result<T, TokenError> {
        let (body, sig) = text.split_once('.').ok_or(TokenError::Malformed)?;
        let sig = URL_SAFE_NO_PAD
            .decode(sig)
            .map_err(|_| TokenError::Malformed)?;
        let mut mac = self.key.clone();
        mac.update(domain);
        mac.update(body.as_bytes());
        mac.verify_slice(&sig)
            .map_err(|_| TokenError::BadSignature)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)
    }
}

/// Signed apart from join tokens, so that neither passes for the other.
const TICKET_DOMAIN: &[u8] = b"thunderline ticket\0";

impl TokenSigner {
    /// A ticket with `claims`: the same claims give the same ticket (a retried migration is
    /// told the same ticket again).
    pub fn mint_ticket(&self, claims: &TicketClaims) -> String {
        self.sealed(claims, TICKET_DOMAIN)
    }

    /// The claims of a ticket this signer minted whose place has not expired at `now`.
    pub fn verify_ticket(
        &self,
        ticket: &str,
        now: DateTime<Utc>,
    ) -> Result<TicketClaims, TokenError> {
        let claims: TicketClaims = self.opened(ticket, TICKET_DOMAIN)?;
        if claims.exp_ms <= now.timestamp_millis() {
            let at = Utc
                .timestamp_millis_opt(claims.exp_ms)
                .single()
                .unwrap_or(DateTime::<Utc>::MIN_UTC);
            return Err(TokenError::Expired(at));
        }
        Ok(claims)
    }
}

/// Constant-time comparison, so a token cannot be guessed a byte at a time.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// 32 random bytes from the operating system, hex-encoded: a fresh secret or admin token.
pub fn random_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS has a random source");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_and_tokens_do_not_pass_for_each_other() {
        let signer = TokenSigner::new(&[7u8; 32]).unwrap();
        let now = Utc::now();
        let claims = TicketClaims {
            ticket: Uuid::nil(),
            agent_id: "a".into(),
            zone_id: Uuid::nil(),
            perms: Permissions::all(),
            exp_ms: now.timestamp_millis() + 10_000,
            token_exp: now.timestamp() + 60,
            minted_us: 0,
        };
        let ticket = signer.mint_ticket(&claims);
        assert_eq!(
            ticket,
            signer.mint_ticket(&claims),
            "the same claims, the same ticket"
        );
        assert_eq!(signer.verify_ticket(&ticket, now), Ok(claims.clone()));
        assert!(signer.verify(&ticket, now).is_err(), "a ticket is no token");
        let (token, _) = signer
            .mint("a", Uuid::nil(), Permissions::all(), 60, now)
            .unwrap();
        assert!(
            signer.verify_ticket(&token, now).is_err(),
            "a token is no ticket"
        );
        let later = now + chrono::Duration::milliseconds(10_000);
        assert!(matches!(
            signer.verify_ticket(&ticket, later),
            Err(TokenError::Expired(_))
        ));
        let other = TokenSigner::new(&[8u8; 32]).unwrap();
        assert_eq!(
            other.verify_ticket(&ticket, now),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn tokens_verify_only_untampered_unexpired_and_ours() {
        let signer = TokenSigner::new(&[7u8; 32]).unwrap();
        let zone = Uuid::now_v7();
        let now = Utc::now();
        let (token, claims) = signer
            .mint("agent-1", zone, Permissions::SPAWN_AGENTS, 60, now)
            .unwrap();
        assert_eq!(signer.verify(&token, now).unwrap(), claims);
        assert_eq!(
            signer.verify(&token, now + chrono::Duration::seconds(61)),
            Err(TokenError::Expired(claims.expires_at()))
        );
        let other = TokenSigner::new(&[8u8; 32]).unwrap();
        assert_eq!(other.verify(&token, now), Err(TokenError::BadSignature));
        // Raising one's own permissions breaks the signature.
        let (body, sig) = token.split_once('.').unwrap();
        let mut forged: Claims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).unwrap()).unwrap();
        forged.perms = Permissions::all();
        let forged = format!(
            "{}.{sig}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap())
        );
        assert_eq!(signer.verify(&forged, now), Err(TokenError::BadSignature));
        assert_eq!(signer.verify("garbage", now), Err(TokenError::Malformed));
        assert_eq!(signer.verify("a.b.c", now), Err(TokenError::Malformed));
        assert!(TokenSigner::new(b"short").is_err());
        assert_eq!(random_secret().len(), 64);
    }

    #[test]
    fn a_token_lives_at_least_its_ttl_wherever_in_the_second_it_is_minted() {
        let signer = TokenSigner::new(&[7u8; 32]).unwrap();
        let zone = Uuid::now_v7();
        let second = Utc.timestamp_opt(1_800_000_000, 0).single().unwrap();
        for ms in [0, 1, 500, 999] {
            let minted = second + chrono::Duration::milliseconds(ms);
            let (token, claims) = signer
                .mint("agent-1", zone, Permissions::SPAWN_AGENTS, 1, minted)
                .unwrap();
            let almost = minted + chrono::Duration::milliseconds(999);
            assert!(signer.verify(&token, almost).is_ok(), "minted at +{ms} ms");
            assert!(claims.expires_at() >= minted + chrono::Duration::seconds(1));
            // And no more than a second beyond it.
            let late = minted + chrono::Duration::seconds(2);
            assert!(signer.verify(&token, late).is_err(), "minted at +{ms} ms");
        }
    }
}

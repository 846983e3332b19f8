//! Join-token verification, `realtime::token::TokenSigner::verify`. It never panics, and never
//! accepts a token whose signature is not the signer's. Three modes, by the first byte:
//!
//! - any text as a token, verified at a time near the seeds' (an accepted one must carry the
//!   HMAC of its body under the secret, checked here independently, and not have expired);
//! - a token minted with fuzzed claims, then mutated (characters replaced, inserted, removed,
//!   swapped, the text cut or extended): an accepted token has exactly the minted claims, an
//!   unmutated one is accepted until it expires, and another secret accepts none of them;
//! - any text as a token body, signed here with the secret: the claims decoding behind the
//!   signature check, which no outsider reaches, never panics either.
#![no_main]

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use thunderline::realtime::token::{Claims, TokenError, TokenSigner};
use thunderline::zone::Permissions;
use uuid::Uuid;

/// The seeds' secret and minting time.
const SECRET: [u8; 32] = [7; 32];
const MINTED_AT: i64 = 1_800_000_000;
const TTL_MAX: i64 = 10 * 365 * 24 * 3600;

fn at(secs: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(secs, 0).expect("in chrono's range")
}

fn mac(secret: &[u8], body: &str) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("any key length");
    mac.update(body.as_bytes());
    mac.finalize().into_bytes().to_vec()
}

/// Accepted means signed by `secret` and unexpired at `now`.
fn check_accepted(secret: &[u8], token: &str, now: DateTime<Utc>, claims: &Claims) {
    let (body, sig) = token.split_once('.').expect("an accepted token has a dot");
    assert_eq!(
        URL_SAFE_NO_PAD.decode(sig).ok(),
        Some(mac(secret, body)),
        "{token:?} accepted without the signer's signature"
    );
    assert!(claims.exp > now.timestamp(), "{claims:?} expired at {now}");
}

fn any_text(mut u: Unstructured) -> Result<()> {
    let now = at(MINTED_AT + i64::from(u.arbitrary::<i16>()?));
    let Ok(token) = std::str::from_utf8(u.take_rest()) else {
        return Ok(());
    };
    let signer = TokenSigner::new(&SECRET).expect("32 bytes");
    if let Ok(claims) = signer.verify(token, now) {
        check_accepted(&SECRET, token, now, &claims);
    }
    Ok(())
}

const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ ";

fn mutated(u: &mut Unstructured) -> Result<()> {
    // A secret of any length: too short ones are refused.
    let secret: Vec<u8> = if u.arbitrary()? {
        SECRET.to_vec()
    } else {
        let len = u.int_in_range(0..=64)?;
        u.bytes(len)?.to_vec()
    };
    let signer = match TokenSigner::new(&secret) {
        Ok(signer) => signer,
        Err(e) => {
            assert!(secret.len() < 32);
            assert_eq!(e, TokenError::WeakSecret);
            return Ok(());
        }
    };
    let agent: String = u.arbitrary()?;
    let zone = Uuid::from_bytes(u.arbitrary()?);
    let perms = Permissions::from_bits_truncate(u.arbitrary()?);
    let ttl = if u.arbitrary()? {
        u.arbitrary::<i64>()?
    } else {
        u.int_in_range(1..=3600)?
    };
    let minted_at = at(MINTED_AT);
    let (token, claims) = match signer.mint(&agent, zone, perms, ttl, minted_at) {
        Ok(minted) => minted,
        Err(e) => {
            assert!(!(1..=TTL_MAX).contains(&ttl), "{ttl}: {e}");
            assert_eq!(e, TokenError::BadTtl);
            return Ok(());
        }
    };
    assert_eq!(
        (claims.agent_id.as_str(), claims.zone_id),
        (agent.as_str(), zone)
    );
    assert_eq!((claims.perms, claims.exp), (perms, MINTED_AT + ttl));

    let mut text = token.clone().into_bytes();
    for _ in 0..u.int_in_range(0..=8)? {
        let pick = |u: &mut Unstructured| -> Result<u8> {
            Ok(if u.ratio(3, 4)? {
                *u.choose(ALPHABET)?
            } else {
                u.arbitrary()?
            })
        };
        let len = text.len();
        match u.int_in_range(0..=6)? {
            0 if len > 0 => {
                let i = u.choose_index(len)?;
                text[i] = pick(u)?;
            }
            1 => {
                let i = u.int_in_range(0..=len)?;
                let b = pick(u)?;
                text.insert(i, b);
            }
            2 if len > 0 => {
                text.remove(u.choose_index(len)?);
            }
            3 if len > 0 => {
                let (i, j) = (u.choose_index(len)?, u.choose_index(len)?);
                text.swap(i, j);
            }
            4 => text.truncate(u.int_in_range(0..=len)?),
            5 => {
                let n = u.int_in_range(0..=8)?;
                text.extend(u.bytes(n)?);
            }
            6 if len > 0 => {
                // Flip one bit: a near-identical signature or body.
                let i = u.choose_index(len)?;
                text[i] ^= 1 << u.int_in_range(0..=6)?;
            }
            _ => {}
        }
    }
    let Ok(text) = String::from_utf8(text) else {
        return Ok(());
    };
    let now = if u.arbitrary()? {
        at(MINTED_AT + u.int_in_range(-10..=7200)?)
    } else {
        at(u.int_in_range(-8_000_000_000_000..=8_000_000_000_000)?)
    };
    let result = signer.verify(&text, now);
    match &result {
        Ok(accepted) => {
            assert_eq!(accepted, &claims, "{text:?} (minted {token:?})");
            check_accepted(&secret, &text, now, accepted);
        }
        Err(_) if text == token && claims.exp > now.timestamp() => {
            panic!("the minted token {token:?} refused at {now}: {result:?}")
        }
        Err(e) if text == token => assert_eq!(e, &TokenError::Expired(claims.expires_at())),
        Err(_) => {}
    }
    let mut other = secret.clone();
    other[0] ^= 1;
    let other = TokenSigner::new(&other).expect("as long");
    assert!(
        other.verify(&text, now).is_err(),
        "another secret took {text:?}"
    );
    Ok(())
}

fn signed_body(mut u: Unstructured) -> Result<()> {
    let now = at(MINTED_AT + i64::from(u.arbitrary::<i16>()?));
    let Ok(body) = std::str::from_utf8(u.take_rest()) else {
        return Ok(());
    };
    // The body as it is (base64url or not), and the body's bytes encoded as the signer would.
    for body in [body.to_owned(), URL_SAFE_NO_PAD.encode(body)] {
        let token = format!("{body}.{}", URL_SAFE_NO_PAD.encode(mac(&SECRET, &body)));
        let signer = TokenSigner::new(&SECRET).expect("32 bytes");
        match signer.verify(&token, now) {
            Ok(claims) => check_accepted(&SECRET, &token, now, &claims),
            Err(TokenError::BadSignature) => {
                assert!(body.contains('.'), "{token:?}: a good signature refused")
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let u = Unstructured::new(rest);
    let _ = match mode % 3 {
        0 => any_text(u),
        1 => mutated(&mut { u }),
        _ => signed_body(u),
    };
});

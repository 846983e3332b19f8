//! Token revocation: which agents' tokens for which zones no longer open sessions, and a signal
//! that tells every connection to end the sessions such tokens opened.
//!
//! The signal is a generation count that connections watch (sharded, as the shutdown signal
//! is), not a queue of revocations: it costs a connection next to nothing per frame, and a
//! connection that wakes checks each of its channels against the revocations in force.
//!
//! A revocation covers the tokens minted before it ([`Claims::minted_us`]); a token minted
//! after it works as usual. Persisting revocations is the daemon's business: it loads them at
//! start and records each before it is announced here.

use std::collections::HashMap;
use std::sync::RwLock;

use tokio::sync::watch;
use uuid::Uuid;

use super::token::Claims;

/// One revocation: the tokens `agent_id` holds for `zone_id`, minted before `before_us`
/// (microseconds since the Unix epoch).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revocation {
    pub agent_id: String,
    pub zone_id: Uuid,
    pub before_us: i64,
}

/// The revocations in force, shared by the admin API and every connection.
pub struct Revocations {
    cutoffs: RwLock<HashMap<(String, Uuid), i64>>,
    generation: watch::Sender<u64>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Revocations {
    /// The revocations recorded earlier.
    pub fn new(recorded: impl IntoIterator<Item = Revocation>) -> Self {
        let cutoffs = recorded
            .into_iter()
            .map(|r| ((r.agent_id, r.zone_id), r.before_us))
            .collect();
        Self {
            cutoffs: RwLock::new(cutoffs),
            generation: watch::channel(0).0,
        }
    }

    /// Puts `revocation` in force and tells the connections. A later cutoff replaces an earlier
    /// one; an earlier one changes nothing.
    pub fn revoke(&self, revocation: Revocation) {
        {
            let mut cutoffs = self.cutoffs.write().unwrap_or_else(|e| e.into_inner());
            let cutoff = cutoffs
                .entry((revocation.agent_id.clone(), revocation.zone_id))
                .or_insert(i64::MIN);
            *cutoff = (*cutoff).max(revocation.before_us);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    /// Whether a token with `claims` was revoked.
    pub fn revoked(&self, claims: &Claims) -> bool {
        self.revoked_for(&claims.agent_id, claims.zone_id, claims.minted_us)
    }

    /// Whether a token of `agent_id` for `zone_id` minted at `minted_us` was revoked.
    pub fn revoked_for(&self, agent_id: &str, zone_id: Uuid, minted_us: i64) -> bool {
        let cutoffs = self.cutoffs.read().unwrap_or_else(|e| e.into_inner());
        // Most servers have none: then no key is built for the lookup.
        !cutoffs.is_empty()
            && cutoffs
                .get(&(agent_id.to_owned(), zone_id))
                .is_some_and(|&before| minted_us < before)
    }

    /// Changes whenever a revocation is put in force: a connection then ends the sessions of
    /// its channels that [`revoked_for`](Self::revoked_for) covers.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_covers_the_tokens_minted_before_it_only() {
        let zone = Uuid::now_v7();
        let revocations = Revocations::default();
        let told = revocations.subscribe();
        assert!(!revocations.revoked_for("a", zone, 5));
        revocations.revoke(Revocation {
            agent_id: "a".into(),
            zone_id: zone,
            before_us: 10,
        });
        assert!(revocations.revoked_for("a", zone, 9));
        assert!(!revocations.revoked_for("a", zone, 10), "minted after it");
        assert!(!revocations.revoked_for("b", zone, 9), "another agent");
        assert!(
            !revocations.revoked_for("a", Uuid::now_v7(), 9),
            "another zone"
        );
        assert!(told.has_changed().unwrap(), "connections are told");
        // An older revocation arriving late does not shorten the newer one.
        revocations.revoke(Revocation {
            agent_id: "a".into(),
            zone_id: zone,
            before_us: 3,
        });
        assert!(revocations.revoked_for("a", zone, 9));
        let loaded = Revocations::new([Revocation {
            agent_id: "a".into(),
            zone_id: zone,
            before_us: 10,
        }]);
        assert!(loaded.revoked_for("a", zone, 9));
    }
}

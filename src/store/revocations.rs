//! Revoked join tokens, kept so that a revocation outlives a restart.

use uuid::Uuid;

use super::{Store, StoreError, on_pool};

impl Store {
    /// Records that `agent_id`'s tokens for `zone_id` minted before `before_us` (microseconds
    /// since the Unix epoch) are revoked; a later cutoff replaces an earlier one, never the
    /// reverse.
    pub async fn revoke_tokens(
        &self,
        agent_id: &str,
        zone_id: Uuid,
        before_us: i64,
    ) -> Result<(), StoreError> {
        let _turn = self.write_turn().await;
        let sql = "INSERT INTO token_revocations (agent_id, zone_id, revoked_before_us) \
                   VALUES ($1, $2, $3) \
                   ON CONFLICT (agent_id, zone_id) DO UPDATE SET revoked_before_us = \
                   CASE WHEN excluded.revoked_before_us > token_revocations.revoked_before_us \
                   THEN excluded.revoked_before_us ELSE token_revocations.revoked_before_us END";
        on_pool!(self.db(), pool => sqlx::query(sql)
            .bind(agent_id)
            .bind(zone_id)
            .bind(before_us)
            .execute(pool)
            .await
            .map(|_| ()))?;
        Ok(())
    }

    /// Every revocation recorded: agent, zone, and the cutoff in microseconds.
    pub async fn token_revocations(&self) -> Result<Vec<(String, Uuid, i64)>, StoreError> {
        let rows = on_pool!(self.db(), pool => sqlx::query_as(
            "SELECT agent_id, zone_id, revoked_before_us FROM token_revocations")
            .fetch_all(pool)
            .await)?;
        Ok(rows)
    }
}

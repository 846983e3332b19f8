-- Revoked join tokens: an agent's tokens for a zone minted before revoked_before_us
-- (microseconds since the Unix epoch) open no sessions.
CREATE TABLE token_revocations (
    agent_id          TEXT NOT NULL,
    zone_id           BLOB NOT NULL REFERENCES zones (id) ON DELETE CASCADE,
    revoked_before_us INTEGER NOT NULL,
    PRIMARY KEY (agent_id, zone_id)
);

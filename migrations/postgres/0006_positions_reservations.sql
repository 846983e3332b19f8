-- What a zone's snapshot holds for agents moving between zones: each agent's last position
-- (carried to the zone it moves to) and the places held for agents on their way in.
ALTER TABLE zones ADD COLUMN positions JSONB NOT NULL DEFAULT '{}';
ALTER TABLE zones ADD COLUMN reservations JSONB NOT NULL DEFAULT '[]';

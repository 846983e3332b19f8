-- Each zone's history is numbered: seq 1, 2, 3… per zone, unique. The zone row is a snapshot
-- of the state at its seq (sessions included), in an epoch that changes only if its history is
-- reset. Events the database refused as data wait in audit_dead_letters.
ALTER TABLE zones ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE zones ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
ALTER TABLE zones ADD COLUMN sessions JSONB NOT NULL DEFAULT '[]';
ALTER TABLE audit_events ADD COLUMN seq BIGINT NOT NULL DEFAULT 0;
ALTER TABLE audit_events ADD COLUMN command_id UUID;

-- Number what earlier versions logged, in the order it was made.
UPDATE audit_events a SET seq = r.rn
FROM (SELECT id, row_number() OVER (PARTITION BY zone_id ORDER BY id) AS rn FROM audit_events) r
WHERE a.id = r.id;
UPDATE zones z SET
    seq = COALESCE((SELECT max(a.seq) FROM audit_events a WHERE a.zone_id = z.id), 0),
    epoch = replace(gen_random_uuid()::text, '-', ''),
    active_session_count = 0;

CREATE UNIQUE INDEX audit_events_zone_seq_idx ON audit_events (zone_id, seq);
DROP INDEX audit_events_zone_idx;

CREATE TABLE audit_dead_letters (
    id          UUID PRIMARY KEY,
    zone_id     UUID NOT NULL,
    seq         BIGINT NOT NULL,
    event_type  TEXT NOT NULL,
    -- The whole event as JSON text: what the log refused as jsonb still fits here.
    event       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    failed_at   TIMESTAMPTZ NOT NULL
);
CREATE INDEX audit_dead_letters_zone_idx ON audit_dead_letters (zone_id, seq);

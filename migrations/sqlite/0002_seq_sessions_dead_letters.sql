-- Each zone's history is numbered: seq 1, 2, 3… per zone, unique. The zone row is a snapshot
-- of the state at its seq (sessions included), in an epoch that changes only if its history is
-- reset. Events the database refused as data wait in audit_dead_letters.
ALTER TABLE zones ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE zones ADD COLUMN epoch TEXT NOT NULL DEFAULT '';
ALTER TABLE zones ADD COLUMN sessions TEXT NOT NULL DEFAULT '[]';
ALTER TABLE audit_events ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
ALTER TABLE audit_events ADD COLUMN command_id BLOB;

-- Number what earlier versions logged, in the order it was made.
UPDATE audit_events SET seq = (
    SELECT r.rn FROM (
        SELECT id, row_number() OVER (PARTITION BY zone_id ORDER BY id) AS rn FROM audit_events
    ) r WHERE r.id = audit_events.id
);
UPDATE zones SET
    seq = COALESCE((SELECT max(a.seq) FROM audit_events a WHERE a.zone_id = zones.id), 0),
    epoch = lower(hex(randomblob(16))),
    active_session_count = 0;

CREATE UNIQUE INDEX audit_events_zone_seq_idx ON audit_events (zone_id, seq);
DROP INDEX audit_events_zone_idx;

CREATE TABLE audit_dead_letters (
    id          BLOB PRIMARY KEY,
    zone_id     BLOB NOT NULL,
    seq         INTEGER NOT NULL,
    event_type  TEXT NOT NULL,
    event       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    failed_at   TEXT NOT NULL
);
CREATE INDEX audit_dead_letters_zone_idx ON audit_dead_letters (zone_id, seq);

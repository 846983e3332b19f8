-- Zones, with the seed briefing's fields, and the audit log of every zone event.
-- UUIDs are 16-byte blobs, timestamps RFC 3339 text, JSON text (as sqlx encodes them).
CREATE TABLE zones (
    id                   BLOB PRIMARY KEY,
    name                 TEXT NOT NULL,
    permissions          INTEGER NOT NULL CHECK (permissions >= 0),
    assigned_server      TEXT NOT NULL,
    active_session_count INTEGER NOT NULL CHECK (active_session_count >= 0),
    capacity             INTEGER NOT NULL CHECK (capacity > 0),
    resources            TEXT NOT NULL,
    properties           TEXT NOT NULL,
    tick                 INTEGER NOT NULL DEFAULT 0,
    inserted_at          TEXT NOT NULL,
    updated_at           TEXT NOT NULL
);
CREATE INDEX zones_permissions_idx ON zones (permissions);
CREATE INDEX zones_assigned_server_idx ON zones (assigned_server);

CREATE TABLE audit_events (
    id          BLOB PRIMARY KEY,
    zone_id     BLOB NOT NULL,
    event_type  TEXT NOT NULL,
    payload     TEXT NOT NULL,
    occurred_at TEXT NOT NULL,
    recorded_at TEXT NOT NULL
);
CREATE INDEX audit_events_zone_idx ON audit_events (zone_id, id);

-- Zones, with the seed briefing's fields, and the audit log of every zone event.
CREATE TABLE zones (
    id                   UUID PRIMARY KEY,
    name                 TEXT NOT NULL,
    permissions          INTEGER NOT NULL CHECK (permissions >= 0),
    assigned_server      TEXT NOT NULL,
    active_session_count INTEGER NOT NULL CHECK (active_session_count >= 0),
    capacity             INTEGER NOT NULL CHECK (capacity > 0),
    resources            JSONB NOT NULL,
    properties           JSONB NOT NULL,
    tick                 BIGINT NOT NULL DEFAULT 0,
    inserted_at          TIMESTAMPTZ NOT NULL,
    updated_at           TIMESTAMPTZ NOT NULL
);
CREATE INDEX zones_permissions_idx ON zones (permissions);
CREATE INDEX zones_assigned_server_idx ON zones (assigned_server);
CREATE INDEX zones_properties_idx ON zones USING GIN (properties);

CREATE TABLE audit_events (
    id          UUID PRIMARY KEY,
    zone_id     UUID NOT NULL,
    event_type  TEXT NOT NULL,
    payload     JSONB NOT NULL,
    occurred_at TIMESTAMPTZ NOT NULL,
    recorded_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Replay reads one zone's events in id order (UUID v7: the order they were made).
CREATE INDEX audit_events_zone_idx ON audit_events (zone_id, id);

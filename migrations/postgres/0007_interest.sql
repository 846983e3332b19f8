-- Interest management: a zone's radius (NULL: every move reaches everyone), and beside each
-- logged event whom it reached and whose views it changed (NULL: everyone, no view changed), so
-- that a rejoin recovers only what its client would have received.
ALTER TABLE zones ADD COLUMN interest_radius DOUBLE PRECISION;
ALTER TABLE audit_events ADD COLUMN view JSONB;

-- Whether a writer holds the zone and has not closed it cleanly (evicted with its latest state
-- written, or stopped with the pipeline drained). A zone loaded while this is still true was
-- left by a writer that stopped uncleanly: what it broadcast may not all be in the log, so the
-- zone continues in a new epoch.
ALTER TABLE zones ADD COLUMN open INTEGER NOT NULL DEFAULT 0;

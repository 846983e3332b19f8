-- The fencing token of the zone's current writer in a cluster: the revision of its lease. A
-- writer's writes carry its token, and are refused once a higher one is here (the lease moved
-- on while the writer was paused or cut off). 0: never fenced (a single daemon).
ALTER TABLE zones ADD COLUMN fence INTEGER NOT NULL DEFAULT 0;

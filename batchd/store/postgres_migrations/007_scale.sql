-- Issue 13 (helper "scale"; the lead renumbers at merge): the batcher's per-pass reads of the queue
-- (queued_groups, next_not_before) and `batchd status` cost O(groups), not O(queue).
--
-- Queued items per route are counted, not summed: queued_counts holds the folded counts and
-- queue_deltas what statements changed since. Each statement that inserts, updates or deletes items
-- appends one delta row per route it moved (statement triggers with transition tables: no trigger
-- per row, and ingest's one INSERT per chunk adds one row per route). Appending never waits on another
-- transaction, so nodes ingesting or claiming the same route concurrently never queue on a hot
-- counter row; the store folds the committed deltas into queued_counts (fold_queue_deltas) as the
-- batcher reads the queue, and every read sums both.
--
-- What a pass must leave out is subtracted through small indexes: items held back by a backoff
-- (items_held: only requeued items ever have not_before > 0) and items whose fallback is due
-- (items_fallback, 005). A group's oldest due item is one step of items_oldest.
CREATE TABLE queued_counts (
    profile text NOT NULL,
    endpoint text NOT NULL,
    model text NOT NULL,
    n bigint NOT NULL,
    bytes bigint NOT NULL,
    PRIMARY KEY (profile, endpoint, model)
);

CREATE TABLE queue_deltas (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    profile text NOT NULL,
    endpoint text NOT NULL,
    model text NOT NULL,
    n bigint NOT NULL,
    bytes bigint NOT NULL
);

-- Taken under the migration's lock, before the triggers exist: no statement is counted twice.
LOCK TABLE items IN SHARE MODE;
INSERT INTO queued_counts (profile, endpoint, model, n, bytes)
SELECT profile, endpoint, model, COUNT(*), SUM(size) FROM items WHERE state = 'queued' GROUP BY profile, endpoint, model;

-- SET search_path FROM CURRENT: the functions find the tables of this schema whatever the caller's path.
CREATE FUNCTION queue_deltas_inserted() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO queue_deltas (profile, endpoint, model, n, bytes)
    SELECT profile, endpoint, model, COUNT(*), SUM(size) FROM new_rows WHERE state = 'queued'
    GROUP BY profile, endpoint, model;
    RETURN NULL;
END
$$;

CREATE FUNCTION queue_deltas_updated() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO queue_deltas (profile, endpoint, model, n, bytes)
    SELECT profile, endpoint, model, SUM(n), SUM(bytes) FROM (
        SELECT profile, endpoint, model, 1 AS n, size::bigint AS bytes FROM new_rows WHERE state = 'queued'
        UNION ALL
        SELECT profile, endpoint, model, -1, -size::bigint FROM old_rows WHERE state = 'queued'
    ) AS moved
    GROUP BY profile, endpoint, model HAVING SUM(n) <> 0 OR SUM(bytes) <> 0;
    RETURN NULL;
END
$$;

CREATE FUNCTION queue_deltas_deleted() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO queue_deltas (profile, endpoint, model, n, bytes)
    SELECT profile, endpoint, model, -COUNT(*), -SUM(size) FROM old_rows WHERE state = 'queued'
    GROUP BY profile, endpoint, model;
    RETURN NULL;
END
$$;

CREATE TRIGGER items_queue_inserted AFTER INSERT ON items REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_deltas_inserted();
CREATE TRIGGER items_queue_updated AFTER UPDATE ON items REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_deltas_updated();
CREATE TRIGGER items_queue_deleted AFTER DELETE ON items REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION queue_deltas_deleted();

CREATE INDEX items_held ON items (not_before) WHERE state = 'queued' AND not_before > 0;
CREATE INDEX items_oldest ON items (profile, endpoint, model, queued_at) WHERE state = 'queued';

-- `batchd status` counts the requests of live batches per state, per live batch through this index.
CREATE INDEX items_batch_state ON items (batch_id, state) WHERE batch_id IS NOT NULL;

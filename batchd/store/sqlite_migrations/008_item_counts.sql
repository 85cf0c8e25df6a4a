-- Queued items per route, so that `batchd status` reads a few rows instead of counting the queue
-- (a COUNT over the queue index grows with the queue: about 2 s at 10M items). Batched and
-- submitted items are counted through the live batches (bounded by what is in flight).
--
-- Kept cheaply: no trigger per inserted row (ingest is the hot path). New items are folded into
-- the counts once per committed chunk, by a trigger on the file's progress (lines_committed),
-- from the id mark up: ids only grow. A state change in or out of 'queued' of an item already
-- folded moves its count. Items above the mark (not folded yet) are counted by the status query.
-- A migration that rebuilds `items` or `files` must create these triggers again.
-- (The migration runner splits scripts at a semicolon that ends a line: inside a trigger body, a
-- statement's semicolon is followed by the next statement or END on the same line.)
CREATE TABLE queued_counts (
    profile TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (profile, endpoint, model)
) WITHOUT ROWID;

CREATE TABLE queued_counts_mark (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    last_item INTEGER NOT NULL
);

INSERT INTO queued_counts (profile, endpoint, model, n)
SELECT profile, endpoint, model, COUNT(*) FROM items WHERE state = 'queued' GROUP BY profile, endpoint, model;

INSERT INTO queued_counts_mark (one, last_item) SELECT 1, COALESCE(MAX(id), 0) FROM items;

CREATE TRIGGER queued_counts_fold AFTER UPDATE OF lines_committed ON files
BEGIN
    INSERT INTO queued_counts (profile, endpoint, model, n)
    SELECT profile, endpoint, model, COUNT(*) FROM items
    WHERE id > (SELECT last_item FROM queued_counts_mark) AND +state = 'queued'  -- `+`: by rowid range, not a scan of the queue index
    GROUP BY profile, endpoint, model
    ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = n + excluded.n; UPDATE queued_counts_mark
    SET last_item = (SELECT COALESCE(MAX(id), 0) FROM items); END;

CREATE TRIGGER queued_counts_move AFTER UPDATE OF state ON items
WHEN (old.state = 'queued') IS NOT (new.state = 'queued') AND old.id <= (SELECT last_item FROM queued_counts_mark)
BEGIN
    INSERT INTO queued_counts (profile, endpoint, model, n)
    VALUES (old.profile, old.endpoint, old.model, CASE WHEN new.state = 'queued' THEN 1 ELSE -1 END)
    ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = n + excluded.n; END;

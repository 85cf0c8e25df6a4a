-- Issue 13 (helper "scale"; the lead renumbers at merge): the batcher's per-pass reads of the queue
-- (queued_groups, next_not_before) and `batchd status` cost O(groups), not O(queue).
--
-- queued_counts (008) keeps bytes beside n, so a group's count and size are read, not summed. What a
-- pass must leave out is subtracted through small indexes: items held back by a backoff
-- (items_held: only requeued items ever have not_before > 0; fresh items never enter it, so ingest
-- pays nothing for it) and items whose fallback is due (items_fallback, 012). A group's oldest due
-- item is one seek of items_oldest.
--
-- New items are folded into the counts by the store itself, once per transaction that inserts
-- items (fold_queued_counts), instead of by 008's trigger on files.lines_committed: a file committed
-- whole (add_files) never updated lines_committed, so its items stayed unfolded and every read of the
-- counts scanned them.
-- (The migration runner splits scripts at a semicolon that ends a line: inside a trigger body, a
-- statement's semicolon is followed by the next statement or END on the same line.)
DROP TRIGGER queued_counts_fold;
DROP TRIGGER queued_counts_move;

ALTER TABLE queued_counts ADD COLUMN bytes INTEGER NOT NULL DEFAULT 0;
DELETE FROM queued_counts;
INSERT INTO queued_counts (profile, endpoint, model, n, bytes)
SELECT profile, endpoint, model, COUNT(*), SUM(size) FROM items WHERE state = 'queued' GROUP BY profile, endpoint, model;
UPDATE queued_counts_mark SET last_item = (SELECT COALESCE(MAX(id), 0) FROM items);

-- A claim (queued -> batched, claim_items: the only statement that makes that move) is moved by
-- claim_batch itself, once per claim (claimed_from_queue): a trigger per claimed row was about a
-- third of a 20,000-request claim. Every other move in or out of 'queued' is this trigger's.
CREATE TRIGGER queued_counts_move AFTER UPDATE OF state ON items
WHEN (old.state = 'queued') IS NOT (new.state = 'queued') AND NOT (old.state = 'queued' AND new.state = 'batched')
    AND old.id <= (SELECT last_item FROM queued_counts_mark)
BEGIN
    INSERT INTO queued_counts (profile, endpoint, model, n, bytes)
    VALUES (old.profile, old.endpoint, old.model, CASE WHEN new.state = 'queued' THEN 1 ELSE -1 END, CASE WHEN new.state = 'queued' THEN old.size ELSE -old.size END)
    ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes; END;

-- Retention deletes only final items; a queued item deleted by any other way must not stay counted.
CREATE TRIGGER queued_counts_gone AFTER DELETE ON items
WHEN old.state = 'queued' AND old.id <= (SELECT last_item FROM queued_counts_mark)
BEGIN
    INSERT INTO queued_counts (profile, endpoint, model, n, bytes) VALUES (old.profile, old.endpoint, old.model, -1, -old.size)
    ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes; END;

CREATE INDEX items_held ON items (not_before) WHERE state = 'queued' AND not_before > 0;
CREATE INDEX items_oldest ON items (profile, endpoint, model, queued_at) WHERE state = 'queued';

-- `batchd status` counts the requests of live batches per state: an index-only count per live batch
-- (a join of every in-flight item into one GROUP BY was 4x slower: 50 ms per 60,000 in flight).
-- Partial: ingest never writes it.
CREATE INDEX items_batch_state ON items (batch_id, state) WHERE batch_id IS NOT NULL;

-- items_batch holds only items that are or were in a batch: ingest no longer writes an entry per
-- request (10M NULL keys at 10M queued), and a claim inserts its entries instead of moving them out
-- of the NULL range, which pays for items_oldest and items_batch_state. `batch_id = ?` implies
-- `batch_id IS NOT NULL`, so every lookup by batch still uses it.
DROP INDEX items_batch;
CREATE INDEX items_batch ON items (batch_id) WHERE batch_id IS NOT NULL;

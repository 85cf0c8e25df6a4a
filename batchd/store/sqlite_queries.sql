-- The SQLite engine's statements (batchd/store/sqlite.py reads them as Q.name).
-- Lists are passed as one JSON array parameter and read with json_each, so no statement is built
-- at run time. Parameters are named (:name) where a statement uses one twice.

-- == connection =================================================================================

-- name: pragma_wal
PRAGMA journal_mode=WAL;

-- name: pragma_synchronous_full
PRAGMA synchronous=FULL;

-- name: pragma_wal_autocheckpoint
-- The writer checkpoints only as a backstop (65,536 pages, 256 MB of WAL): the checkpointer's own
-- connection copies the WAL into the database beside it (wal_checkpoint_passive), so no commit
-- pays for a checkpoint. Each checkpoint inside a commit held the writer for up to a third of a
-- second during a large ingest, and every write queued behind it.
PRAGMA wal_autocheckpoint=65536;

-- name: wal_checkpoint_passive
-- Copies what it can without waiting for the writer or any reader, and blocks neither.
PRAGMA wal_checkpoint(PASSIVE);

-- name: wal_checkpoint_truncate
-- Once writing has stopped: copies the rest and cuts the WAL file to nothing. It holds writers off
-- while it runs, so the checkpointer's connection gives up after a short busy wait (a reader still
-- on the log) and tries again after the next quiet spell. Cutting the file during a burst instead
-- (journal_size_limit) made every restart of the log grow the file again: ingest about 8% slower.
PRAGMA wal_checkpoint(TRUNCATE);

-- name: pragma_checkpointer_busy_timeout
PRAGMA busy_timeout=100;

-- name: begin_deferred_sync
-- A write transaction whose commit a later FULL commit makes durable (see SQLiteStore._tx).
PRAGMA synchronous=NORMAL;
BEGIN IMMEDIATE;

-- name: begin_full_sync
-- Back to FULL after deferred-sync transactions, in the same call as the BEGIN.
PRAGMA synchronous=FULL;
BEGIN IMMEDIATE;

-- name: pragma_foreign_keys_on
PRAGMA foreign_keys=ON;

-- name: pragma_foreign_keys_off
PRAGMA foreign_keys=OFF;

-- name: pragma_foreign_key_check
PRAGMA foreign_key_check;

-- name: pragma_user_version
PRAGMA user_version;

-- name: pragma_integrity_check
PRAGMA integrity_check;

-- name: begin_immediate
BEGIN IMMEDIATE;

-- name: commit
COMMIT;

-- name: rollback
ROLLBACK;

-- == meta and nodes =============================================================================

-- name: meta_get
SELECT value FROM meta WHERE key = ?;

-- name: meta_set_once
INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING;

-- name: node_register
INSERT INTO nodes (node, heartbeat_at, started_at, pid, host) VALUES (:node, :now, :now, :pid, :host)
ON CONFLICT (node) DO UPDATE SET heartbeat_at = excluded.heartbeat_at, started_at = excluded.started_at,
    pid = excluded.pid, host = excluded.host;

-- name: node_heartbeat
UPDATE nodes SET heartbeat_at = :now WHERE node = :node;

-- name: adopt_files
-- Rows from before nodes existed (migration 007) belong to the first node that opens the database.
UPDATE files SET node = ? WHERE node = '';

-- name: adopt_outbox_cursor
-- The outbox cursor of a database from before nodes ("outbox") becomes that node's ("outbox:NODE").
UPDATE sink_cursors SET sink = 'outbox:' || :node
WHERE sink = 'outbox' AND NOT EXISTS (SELECT 1 FROM sink_cursors WHERE sink = 'outbox:' || :node);

-- == intake =====================================================================================

-- name: find_file
SELECT * FROM files
WHERE node = :node AND name = :name AND sha256 = :sha256 AND ino = :ino AND moved_at IS NULL
ORDER BY id DESC LIMIT 1;

-- name: out_name_holder
SELECT id, state FROM files WHERE node = ? AND out_name = ?;

-- name: out_name_give_up
UPDATE files SET out_name = out_name || '~' || id WHERE id = ?;

-- name: insert_file
INSERT INTO files (node, name, sha256, size, out_name, ingested_at, dev, ino, state, lines, lines_committed,
    offset_committed, options, deadline)
VALUES (:node, :name, :sha256, :size, :out_name, :now, :dev, :ino, :state, 0, 0, 0, :options, :deadline)
RETURNING *;

-- name: find_files
-- find_file for several keys at once: a JSON array of [name, sha256, ino].
SELECT * FROM files
WHERE node = :node AND moved_at IS NULL
    AND (name, sha256, ino) IN (SELECT value ->> 0, value ->> 1, value ->> 2 FROM json_each(:keys))
ORDER BY id;

-- name: out_names_held
SELECT out_name FROM files WHERE node = :node AND out_name IN (SELECT value FROM json_each(:names));

-- name: next_file_id
-- Inside the write transaction (one writer): the ids the next files get, as SQLite would give them.
SELECT COALESCE(MAX(id), 0) + 1 AS next FROM files;

-- name: insert_whole_files
-- Files committed whole (add_files), a JSON array of [id, name, sha256, size, out_name, dev, ino, lines, options,
-- deadline].
INSERT INTO files (id, node, name, sha256, size, out_name, ingested_at, dev, ino, state, lines, lines_committed,
    offset_committed, options, deadline)
SELECT value ->> 0, :node, value ->> 1, value ->> 2, value ->> 3, value ->> 4, :now, value ->> 5, value ->> 6, 'open',
    value ->> 7, value ->> 7, value ->> 3, value ->> 8, value ->> 9
FROM json_each(:files)
RETURNING *;

-- name: seen_custom_ids
SELECT custom_id FROM items WHERE file_id = ? AND custom_id IN (SELECT value FROM json_each(?));

-- name: next_item_id
-- Inside the write transaction (one writer): the ids the next items get, as SQLite would give them.
SELECT COALESCE(MAX(id), 0) + 1 AS next FROM items;

-- name: insert_items
-- Items as one JSON array of [file_id, line, custom_id, profile, endpoint, model, size, tokens,
-- deadline, fallback_at, inputs]: one statement (no per-row binding in Python, which would hold the
-- GIL on the writer's thread), ids :first, :first + 1, ... in array order.
INSERT INTO items (id, file_id, line, custom_id, profile, endpoint, model, size, tokens, deadline, fallback_at,
    inputs, queued_at)
SELECT :first + key, value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6,
    value ->> 7, value ->> 8, value ->> 9, value ->> 10, :now
FROM json_each(:rows);

-- name: insert_item_bodies
-- Their bodies, a JSON array of strings in the same order (each stored as the BLOB of its UTF-8
-- bytes), under the same ids.
INSERT INTO item_bodies (item_id, body) SELECT :first + key, CAST(value AS BLOB) FROM json_each(:bodies);

-- name: fold_queued_counts
-- The items inserted by this transaction (above the mark: ids only grow) into the queue counts
-- (migration 014): once per transaction that inserts items, by rowid range.
INSERT INTO queued_counts (profile, endpoint, model, n, bytes)
SELECT profile, endpoint, model, COUNT(*), SUM(size) FROM items
WHERE id > (SELECT last_item FROM queued_counts_mark) AND +state = 'queued'  -- `+`: by rowid range, not a scan of the queue index
GROUP BY profile, endpoint, model
ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes;

-- name: advance_queued_counts_mark
UPDATE queued_counts_mark SET last_item = (SELECT COALESCE(MAX(id), 0) FROM items);

-- name: insert_line_result
INSERT INTO results (file_id, line, status, payload, created_at) VALUES (?, ?, ?, ?, ?);

-- name: advance_file
-- The compare-and-set that makes add_chunk idempotent: only the chunk right after the committed lines.
UPDATE files SET lines_committed = :last_line, offset_committed = :end_offset
WHERE id = :id AND lines_committed = :expected AND state = 'ingesting';

-- name: finish_file
UPDATE files SET state = 'open', lines = ?, lines_committed = MAX(lines_committed, ?)
WHERE id = ? AND state = 'ingesting';

-- name: file_moved
UPDATE files SET moved_at = COALESCE(moved_at, ?) WHERE id = ?;

-- name: files_moved
UPDATE files SET moved_at = COALESCE(moved_at, :now) WHERE id IN (SELECT value FROM json_each(:ids));

-- == queue ======================================================================================

-- name: queued_groups
-- O(groups), not O(queue) (migration 014): each group's count and bytes from queued_counts (plus any
-- items not folded yet), less the items held back (items_held) and those whose fallback is due
-- (items_fallback: they belong to the real-time fallback, never counted into a batch), both few;
-- its oldest due item is one seek of items_oldest (the items it steps over are the same few).
-- Partial indexes' conditions are repeated so that SQLite may use them. One statement: one snapshot.
WITH counted AS (
    SELECT profile, endpoint, model, n, bytes FROM queued_counts
    UNION ALL
    SELECT profile, endpoint, model, COUNT(*), SUM(size) FROM items
    WHERE id > (SELECT last_item FROM queued_counts_mark) AND +state = 'queued'  -- `+`: by rowid range
    GROUP BY profile, endpoint, model
    UNION ALL
    SELECT profile, endpoint, model, -COUNT(*), -SUM(size) FROM items INDEXED BY items_held
    WHERE state = 'queued' AND not_before > 0 AND not_before > :now
    GROUP BY profile, endpoint, model
    UNION ALL
    SELECT profile, endpoint, model, -COUNT(*), -SUM(size) FROM items INDEXED BY items_fallback
    WHERE fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime')
        AND fallback_at <= :now AND state = 'queued' AND not_before <= :now
    GROUP BY profile, endpoint, model
), groups AS (
    SELECT profile, endpoint, model, SUM(n) AS n, SUM(bytes) AS bytes FROM counted
    GROUP BY profile, endpoint, model HAVING SUM(n) > 0
)
SELECT g.profile, g.endpoint, g.model, g.n, g.bytes, (
    SELECT i.queued_at FROM items i INDEXED BY items_oldest
    WHERE i.state = 'queued' AND i.profile = g.profile AND i.endpoint = g.endpoint AND i.model = g.model
        AND i.not_before <= :now AND (i.fallback_at IS NULL OR i.fallback_at > :now)
    ORDER BY i.queued_at LIMIT 1
) AS oldest
FROM groups g ORDER BY g.profile, g.endpoint, g.model;

-- name: earliest_deadline
-- Through the partial index, in fallback_at order, to the group's first item: never a scan of the
-- group's queue (INDEXED BY: the queue index would also serve the equalities, then sort). The
-- index's own condition is repeated so that SQLite may use it.
SELECT deadline, fallback_at FROM items INDEXED BY items_fallback
WHERE fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime')
    AND fallback_at > :now AND state = 'queued'
    AND profile = :profile AND endpoint = :endpoint AND model = :model
ORDER BY fallback_at LIMIT 1;

-- name: next_not_before
-- One seek of items_held (its condition repeated so that SQLite may use it; now > 0).
SELECT MIN(not_before) AS t FROM items INDEXED BY items_held WHERE state = 'queued' AND not_before > 0 AND not_before > ?;

-- name: creations
-- Created at the provider since :since, and live intents about to be (pending: not created yet).
SELECT COALESCE(submitted_at, created_at) AS t FROM batches
WHERE profile = :profile AND (submitted_at >= :since OR (state = 'pending' AND submitted_at IS NULL))
ORDER BY t;

-- name: learned_limits
SELECT profile, model, tokens FROM learned_limits;

-- name: lower_learned_limit
INSERT INTO learned_limits (profile, model, tokens, learned_at) VALUES (:profile, :model, :tokens, :now)
ON CONFLICT (profile, model) DO UPDATE SET tokens = excluded.tokens, learned_at = excluded.learned_at
WHERE excluded.tokens < learned_limits.tokens;

-- name: learned_limit
SELECT tokens FROM learned_limits WHERE profile = ? AND model = ?;

-- name: request_flush
INSERT INTO flush_requests (route, requested_at) VALUES (?, ?)
ON CONFLICT (route) DO UPDATE SET requested_at = excluded.requested_at;

-- name: flush_requests
SELECT route, requested_at FROM flush_requests;

-- name: clear_flush_request
DELETE FROM flush_requests WHERE route = ? AND requested_at = ?;

-- name: insert_batch
INSERT INTO batches (profile, kind, endpoint, model, created_at, owner, lease_until)
VALUES (?, ?, ?, ?, ?, ?, ?);

-- name: claim_items
-- A group's oldest due items, up to the request limit and while the running size, tokens and
-- embedding inputs fit (a prefix: the running sums only grow); with :lone, a first item that alone
-- exceeds a bound is taken alone. Items whose fallback is due are the real-time fallback's.
-- The limit is taken before the running sums: a window over the whole group grows with the queue.
-- The only statement that moves items from queued to batched: claim_batch moves their counts (claimed_from_queue).
UPDATE items SET state = 'batched', batch_id = :batch WHERE id IN (
    SELECT id FROM (
        SELECT id, SUM(size) OVER w AS bytes, SUM(tokens) OVER w AS tokens, SUM(inputs) OVER w AS inputs,
            ROW_NUMBER() OVER w AS n
        FROM (
            SELECT id, size, tokens, inputs FROM items
            WHERE state = 'queued' AND profile = :profile AND endpoint = :endpoint AND model = :model
                AND not_before <= :now AND (fallback_at IS NULL OR fallback_at > :now)
            ORDER BY id LIMIT :max_requests
        )
        WINDOW w AS (ORDER BY id)
    ) WHERE bytes <= :max_bytes AND (
        (tokens <= :max_tokens AND inputs <= :max_inputs) OR (n = 1 AND :lone)
    )
);

-- name: claim_prefix
-- The totals of what claim_items would take if every bound held for the whole prefix (the usual
-- case: a group's oldest items up to the request limit fit the byte limit). Its last id bounds
-- claim_prefix_items.
SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes, COALESCE(SUM(tokens), 0) AS tokens,
    COALESCE(SUM(inputs), 0) AS inputs, MAX(id) AS last
FROM (
    SELECT id, size, tokens, inputs FROM items
    WHERE state = 'queued' AND profile = :profile AND endpoint = :endpoint AND model = :model
        AND not_before <= :now AND (fallback_at IS NULL OR fallback_at > :now)
    ORDER BY id LIMIT :max_requests
);

-- name: claim_prefix_items
-- claim_items when claim_prefix's totals fit every bound: the same items (the same conditions, up
-- to the prefix's last id, in the same transaction) by one walk of the queue index, with no window
-- over them and no list of ids.
UPDATE items SET state = 'batched', batch_id = :batch
WHERE state = 'queued' AND profile = :profile AND endpoint = :endpoint AND model = :model
    AND not_before <= :now AND (fallback_at IS NULL OR fallback_at > :now) AND id <= :last;

-- name: claimed_from_queue
-- What claim_items moved out of the queue, out of the group's counts (migration 014: its trigger leaves
-- queued -> batched to the claim). Claimed items are folded already: the fold is in the inserting transaction.
INSERT INTO queued_counts (profile, endpoint, model, n, bytes) VALUES (:profile, :endpoint, :model, -:n, -:bytes)
ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes;

-- name: batch_totals
SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS bytes, COALESCE(SUM(tokens), 0) AS tokens,
    COALESCE(SUM(inputs), 0) AS inputs
FROM items WHERE batch_id = ?;

-- name: unclaim_last_item
UPDATE items SET state = 'queued', batch_id = NULL WHERE id = (SELECT MAX(id) FROM items WHERE batch_id = ?);

-- name: delete_batch
DELETE FROM batches WHERE id = ?;

-- name: set_batch_totals
UPDATE batches SET requests = ?, bytes = ?, tokens = ?, inputs = ? WHERE id = ?;

-- name: batch_bodies
SELECT i.id, i.endpoint, b.body FROM items i JOIN item_bodies b ON b.item_id = i.id
WHERE i.batch_id = ? AND i.id > ? ORDER BY i.id LIMIT ?;

-- name: batch_input_size
-- length() of a BLOB reads its size from the record header, not its pages.
SELECT COUNT(*) AS n, COALESCE(SUM(length(b.body)), 0) AS body_bytes,
    COALESCE(SUM(length(printf('%x', i.id))), 0) AS id_hex_digits
FROM items i JOIN item_bodies b ON b.item_id = i.id WHERE i.batch_id = ?;

-- name: batch_item_ids
SELECT id FROM items WHERE batch_id = ? ORDER BY id;

-- name: usage
-- Live batches (intents included: they are about to be created) of a profile, and optionally a model.
SELECT COUNT(*) AS batches, COALESCE(SUM(tokens), 0) AS tokens, COALESCE(SUM(requests), 0) AS requests
FROM batches
WHERE profile = :profile AND (:model IS NULL OR model = :model) AND state IN ('pending', 'unverified', 'submitted');

-- name: created_since
SELECT COUNT(*) AS n FROM batches
WHERE profile = :profile AND (:model IS NULL OR model = :model) AND submitted_at >= :since;

-- name: active_holds
SELECT profile, model, until FROM holds WHERE until > ?;

-- name: hold
INSERT INTO holds (profile, model, until, failures, reason) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (profile, model) DO UPDATE SET until = excluded.until, failures = excluded.failures,
    reason = excluded.reason;

-- name: hold_failures
SELECT failures FROM holds WHERE profile = ? AND model = ?;

-- name: release_hold
DELETE FROM holds WHERE profile = ? AND model = ?;

-- == batches ====================================================================================

-- name: batch
SELECT * FROM batches WHERE id = ?;

-- name: batches_in_state
SELECT * FROM batches WHERE state IN (SELECT value FROM json_each(?)) ORDER BY id;

-- name: owned_batches
SELECT * FROM batches WHERE owner = ? AND state IN (SELECT value FROM json_each(?)) ORDER BY id;

-- name: take_over
-- Every live batch whose lease expired (its node died or let it go) becomes this node's.
UPDATE batches SET owner = :node, lease_until = :until
WHERE state IN ('pending', 'unverified', 'submitted') AND (owner IS NULL OR lease_until < :now)
RETURNING *;

-- name: renew_leases
UPDATE batches SET lease_until = :until
WHERE owner = :node AND state IN ('pending', 'unverified', 'submitted');

-- name: release_leases
UPDATE batches SET owner = NULL, lease_until = 0
WHERE owner = ? AND state IN ('pending', 'unverified', 'submitted');

-- name: release_sink_leases
DELETE FROM sink_leases WHERE node = ?;

-- name: remote_ids
SELECT remote_id FROM batches WHERE profile = ? AND remote_id IS NOT NULL;

-- name: remote_owner
SELECT id FROM batches WHERE remote_id = ?;

-- name: set_input_file
UPDATE batches SET input_file_id = ? WHERE id = ?;

-- name: note_submit_failure
UPDATE batches SET submit_attempts = submit_attempts + 1, last_error = ?, not_before = ? WHERE id = ?;

-- name: mark_submitted
UPDATE batches SET state = 'submitted', remote_id = ?, remote_status = ?, submitted_at = ?,
    remote_created_at = ?, last_error = NULL
WHERE id = ?;

-- name: items_submitted
UPDATE items SET state = 'submitted', attempts = attempts + 1 WHERE batch_id = ? AND state = 'batched';

-- name: mark_unverified
UPDATE batches SET state = 'unverified', remote_id = ?, remote_status = ?, submitted_at = ?,
    remote_created_at = ?, last_error = ?
WHERE id = ? AND state = 'pending';

-- name: confirm_ownership
UPDATE batches SET state = 'submitted', last_error = NULL WHERE id = ? AND state = 'unverified';

-- name: reject_remote
INSERT INTO batch_rejects (batch_id, remote_id, rejected_at, reason) VALUES (?, ?, ?, ?)
ON CONFLICT (batch_id, remote_id) DO NOTHING;

-- name: unadopt
-- submit_attempts > 0 makes the batcher reconcile again before it ever creates.
UPDATE batches SET state = 'pending', remote_id = NULL, remote_status = NULL, counts = NULL,
    submitted_at = NULL, remote_created_at = NULL, ended_at = NULL, output_file_id = NULL,
    error_file_id = NULL, submit_attempts = submit_attempts + 1, not_before = 0, last_error = ?
WHERE id = ? AND state = 'unverified' AND remote_id = ?;

-- name: rejected_remotes
SELECT remote_id FROM batch_rejects WHERE batch_id = ?;

-- name: note_cancel_requested
UPDATE batches SET cancel_requested_at = COALESCE(cancel_requested_at, ?), last_error = ? WHERE id = ?;

-- name: record_poll
UPDATE batches SET remote_status = :remote_status, counts = :counts, output_file_id = :output_file_id,
    error_file_id = :error_file_id, last_polled_at = :now,
    ended_at = CASE WHEN :ended THEN COALESCE(ended_at, :now) ELSE ended_at END
WHERE id = :id;

-- name: note_batch_error
UPDATE batches SET last_error = ? WHERE id = ?;

-- name: finish_batch
UPDATE batches SET state = 'done', collected_at = :now, ended_at = COALESCE(ended_at, :now),
    fate = COALESCE(:fate, fate), last_error = COALESCE(:error, last_error)
WHERE id = :id;

-- == outcomes ===================================================================================

-- name: submitted_items
-- Waiting: SUBMITTED, or REALTIME (handed to the fallback; the first final answer wins).
SELECT id, file_id, line, custom_id, attempts, state, deadline FROM items
WHERE batch_id = ? AND state IN ('submitted', 'realtime') ORDER BY id;

-- name: submitted_items_among
SELECT id, file_id, line, custom_id, attempts, state, deadline FROM items
WHERE batch_id = ? AND state IN ('submitted', 'realtime') AND id IN (SELECT value FROM json_each(?)) ORDER BY id;

-- name: waiting_among
-- The CAS of record_outcomes: which of these items are still waiting in this batch, and how.
SELECT id, state FROM items
WHERE batch_id = ? AND state IN ('submitted', 'realtime') AND id IN (SELECT value FROM json_each(?));

-- name: fallback_answered
SELECT i.id, i.file_id, i.line, i.custom_id, i.attempts, i.state, i.deadline
FROM items i JOIN results r ON r.file_id = i.file_id AND r.line = i.line
WHERE i.batch_id = ? AND i.state IN ('succeeded', 'errored', 'expired', 'canceled') AND r.via = 'realtime'
ORDER BY i.id;

-- name: batch_route
SELECT profile, model FROM batches WHERE id = ?;

-- name: max_result_id
-- Inside a write transaction: the next rows inserted get the ids after it, in order (see _RecentResults).
SELECT COALESCE(MAX(id), 0) FROM results;

-- name: insert_final_result
INSERT INTO results (file_id, line, item_id, status, profile, model, batch_id, input_tokens, output_tokens,
    cached_input_tokens, cache_creation_input_tokens, cost_batch, cost_realtime, payload, created_at, via,
    cost_paid, deadline)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, (SELECT deadline FROM items WHERE id = ?))
ON CONFLICT (file_id, line) DO NOTHING;

-- name: insert_duplicate
-- A second answer for an item whose result was served the other way: a cost, not a result.
INSERT INTO duplicate_costs (item_id, file_id, line, profile, model, batch_id, via, input_tokens, output_tokens,
    cost, created_at)
SELECT i.id, i.file_id, i.line, i.profile, i.model, :batch_id, :via, :input_tokens, :output_tokens, :cost, :now
FROM items i JOIN results r ON r.file_id = i.file_id AND r.line = i.line
WHERE i.id = :item_id AND r.via <> :via
ON CONFLICT DO NOTHING;

-- name: item_handover
-- To the real-time fallback: the body stays, and so does the batch (its late answer may still win).
UPDATE items SET state = 'realtime'
WHERE batch_id = ? AND state = 'submitted' AND id IN (SELECT value FROM json_each(?));

-- name: items_final
UPDATE items SET state = ? WHERE id IN (SELECT value FROM json_each(?));

-- name: delete_item_bodies
DELETE FROM item_bodies WHERE item_id IN (SELECT value FROM json_each(?));

-- name: item_retry
-- Its age for max_wait starts when it may go again, not at its first ingest: retries becoming due
-- within one max_wait leave together, not one by one.
UPDATE items SET state = 'queued', batch_id = NULL, not_before = ?, queued_at = ?, last_error = ? WHERE id = ?;

-- name: item_retry_refund
-- A bystander of a deadline cancel: back to the queue with its attempt given back.
UPDATE items SET state = 'queued', batch_id = NULL, attempts = MAX(attempts - 1, 0), not_before = ?, queued_at = ?,
    last_error = ?
WHERE id = ?;

-- name: refund_batch
-- One statement, so that a repeat cannot give an attempt back twice.
UPDATE items SET state = 'queued', batch_id = NULL, attempts = MAX(attempts - 1, 0), not_before = ?,
    queued_at = ?, last_error = ?
WHERE batch_id = ? AND state = 'submitted';

-- == delivery ===================================================================================

-- name: sink_cursor
SELECT last_result_id FROM sink_cursors WHERE sink = ?;

-- name: results_after
SELECT r.id, r.file_id, f.out_name, r.payload, r.created_at FROM results r JOIN files f ON f.id = r.file_id
WHERE r.id > :last AND (:node IS NULL OR f.node = :node) ORDER BY r.id LIMIT :limit;

-- name: to_redeliver
SELECT r.id, r.file_id, f.out_name, r.payload, r.created_at FROM results r JOIN files f ON f.id = r.file_id
WHERE r.id IN (SELECT result_id FROM parked WHERE sink = ? AND redeliver = 1) ORDER BY r.id LIMIT ?;

-- name: advance_cursor
INSERT INTO sink_cursors (sink, last_result_id) VALUES (?, ?)
ON CONFLICT (sink) DO UPDATE SET last_result_id = MAX(last_result_id, excluded.last_result_id);

-- name: set_cursor
INSERT INTO sink_cursors (sink, last_result_id) VALUES (?, ?)
ON CONFLICT (sink) DO UPDATE SET last_result_id = excluded.last_result_id;

-- name: park
INSERT INTO parked (sink, result_id, parked_at, error) VALUES (?, ?, ?, ?)
ON CONFLICT (sink, result_id) DO UPDATE SET redeliver = 0, error = excluded.error;

-- name: unpark
DELETE FROM parked WHERE sink = ? AND result_id = ?;

-- name: request_redelivery
UPDATE parked SET redeliver = 1 WHERE redeliver = 0 AND (:sink IS NULL OR sink = :sink);

-- name: take_sink_lease
INSERT INTO sink_leases (sink, node, until) VALUES (:sink, :node, :until)
ON CONFLICT (sink) DO UPDATE SET node = excluded.node, until = excluded.until
WHERE sink_leases.node = excluded.node OR sink_leases.until < :now;

-- name: sink_lease_holder
SELECT node FROM sink_leases WHERE sink = ?;

-- name: file_delivered
UPDATE files SET delivered = delivered + ?, out_bytes = ? WHERE id = ?;

-- name: open_files
-- Ingesting files too: their invalid lines have results to deliver before the ingest ends.
SELECT * FROM files WHERE node = ? AND state IN ('ingesting', 'open') ORDER BY id;

-- name: file
SELECT * FROM files WHERE id = ?;

-- name: files_node_out_name
SELECT id, node, out_name FROM files WHERE id IN (SELECT value FROM json_each(?));

-- name: files_by_id
SELECT * FROM files WHERE id IN (SELECT value FROM json_each(?));

-- name: delivered_payloads
-- What the file's node's outbox has delivered ("outbox" is the cursor's name from before nodes).
SELECT r.id, r.payload FROM results r JOIN files f ON f.id = r.file_id
WHERE r.file_id = :file AND r.id > :after AND r.id <= COALESCE(
    (SELECT last_result_id FROM sink_cursors WHERE sink = 'outbox:' || f.node),
    (SELECT last_result_id FROM sink_cursors WHERE sink = 'outbox'), 0)
ORDER BY r.id LIMIT :limit;

-- name: complete_file
-- Only an OPEN file: one whose ingest is unfinished is never completed.
UPDATE files SET state = 'complete', completed_at = ? WHERE id = ? AND state = 'open';

-- == reporting ==================================================================================

-- name: add_error
INSERT INTO errors (at, event, message) VALUES (?, ?, ?);

-- name: trim_errors
DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - ?;

-- name: report
-- Stored results since :since and the totals of those retention pruned (by the hour they were made),
-- plus the duplicate costs (second answers, paid for, not results), stored and pruned, per :by.
SELECT key, SUM(requests) AS requests, SUM(succeeded) AS succeeded, SUM(input_tokens) AS input_tokens,
    SUM(cached_input_tokens) AS cached_input_tokens, SUM(output_tokens) AS output_tokens,
    SUM(cost_batch) AS cost_batch, SUM(cost_realtime) AS cost_realtime, SUM(unpriced) AS unpriced,
    SUM(cost_paid) AS cost_paid, SUM(fallback_requests) AS fallback_requests, SUM(fallback_cost) AS fallback_cost,
    SUM(deadlines_met) AS deadlines_met, SUM(deadlines_missed) AS deadlines_missed,
    SUM(duplicate_requests) AS duplicate_requests, SUM(duplicate_cost) AS duplicate_cost
FROM (
    SELECT CASE :by WHEN 'model' THEN COALESCE(r.model, '(invalid)') WHEN 'provider' THEN COALESCE(r.profile, '(invalid)')
               WHEN 'day' THEN date(r.created_at, 'unixepoch') ELSE f.name END AS key,
        COUNT(*) AS requests, SUM(r.status = 'succeeded') AS succeeded,
        COALESCE(SUM(r.input_tokens), 0) AS input_tokens, COALESCE(SUM(r.cached_input_tokens), 0) AS cached_input_tokens,
        COALESCE(SUM(r.output_tokens), 0) AS output_tokens, SUM(r.cost_batch) AS cost_batch,
        SUM(r.cost_realtime) AS cost_realtime, SUM(r.cost_batch IS NULL AND r.input_tokens IS NOT NULL) AS unpriced,
        SUM(r.cost_paid) AS cost_paid, SUM(r.via = 'realtime') AS fallback_requests,
        SUM(CASE WHEN r.via = 'realtime' THEN r.cost_paid END) AS fallback_cost,
        COALESCE(SUM(r.created_at <= r.deadline), 0) AS deadlines_met,
        COALESCE(SUM(r.created_at > r.deadline), 0) AS deadlines_missed,
        0 AS duplicate_requests, NULL AS duplicate_cost
    FROM results r JOIN files f ON f.id = r.file_id WHERE r.created_at >= :since
    GROUP BY key
    UNION ALL
    SELECT CASE :by WHEN 'model' THEN COALESCE(t.model, '(invalid)') WHEN 'provider' THEN COALESCE(t.profile, '(invalid)')
               WHEN 'day' THEN date(t.hour, 'unixepoch') ELSE t.file_name END AS key,
        SUM(t.requests), SUM(CASE WHEN t.status = 'succeeded' THEN t.requests ELSE 0 END),
        SUM(t.input_tokens), SUM(t.cached_input_tokens), SUM(t.output_tokens), SUM(t.cost_batch),
        SUM(t.cost_realtime), SUM(t.unpriced), SUM(t.cost_paid), SUM(t.fallback_requests), SUM(t.fallback_cost),
        SUM(t.deadlines_met), SUM(t.deadlines_missed), 0, NULL
    FROM result_totals t WHERE t.hour >= :since
    GROUP BY key
    UNION ALL
    SELECT CASE :by WHEN 'model' THEN COALESCE(d.model, '(invalid)') WHEN 'provider' THEN COALESCE(d.profile, '(invalid)')
               WHEN 'day' THEN date(d.created_at, 'unixepoch') ELSE f.name END AS key,
        0, 0, 0, 0, 0, NULL, NULL, 0, NULL, 0, NULL, 0, 0, COUNT(*), SUM(d.cost)
    FROM duplicate_costs d JOIN files f ON f.id = d.file_id WHERE d.created_at >= :since
    GROUP BY key
    UNION ALL
    SELECT CASE :by WHEN 'model' THEN COALESCE(u.model, '(invalid)') WHEN 'provider' THEN COALESCE(u.profile, '(invalid)')
               WHEN 'day' THEN date(u.hour, 'unixepoch') ELSE u.file_name END AS key,
        0, 0, 0, 0, 0, NULL, NULL, 0, NULL, 0, NULL, 0, 0, SUM(u.requests), SUM(u.cost)
    FROM duplicate_totals u WHERE u.hour >= :since
    GROUP BY key
)
GROUP BY key ORDER BY key;

-- name: query_results
SELECT f.name AS file, r.line, r.status, r.payload FROM results r JOIN files f ON f.id = r.file_id
WHERE (:file IS NULL OR f.name = :file)
    AND (:custom_id IS NULL OR json_extract(CAST(r.payload AS TEXT), '$.custom_id') = :custom_id)
    AND (:status IS NULL OR r.status = :status)
ORDER BY r.id LIMIT :limit;

-- name: status_queue
-- Queued: the counts kept by migrations 008 and 014 plus any items not folded into them yet (none
-- once a transaction that inserted items commits); batched and submitted: the items of live batches. Flat however long the queue.
SELECT profile, endpoint, model, 'queued' AS state, SUM(n) AS n FROM (
    SELECT profile, endpoint, model, n FROM queued_counts
    UNION ALL
    SELECT profile, endpoint, model, COUNT(*) AS n FROM items
    WHERE id > (SELECT last_item FROM queued_counts_mark) AND +state = 'queued'  -- `+`: by rowid range, not a scan of the queue index
    GROUP BY profile, endpoint, model
) GROUP BY profile, endpoint, model HAVING SUM(n) > 0
UNION ALL
-- A batch's items are its route's: counted per live batch and state in items_batch_state alone (014).
SELECT b.profile, b.endpoint, b.model, s.state, SUM((
    SELECT COUNT(*) FROM items i INDEXED BY items_batch_state WHERE i.batch_id = b.id AND i.state = s.state
)) AS n
FROM batches b, (SELECT 'batched' AS state UNION ALL SELECT 'submitted') AS s
WHERE b.state IN ('pending', 'unverified', 'submitted')
GROUP BY b.profile, b.endpoint, b.model, s.state HAVING n > 0;

-- name: status_ended_batches
SELECT id, profile, model, remote_id, remote_status, fate, last_error, collected_at FROM batches
WHERE state = 'done' AND fate IS NOT NULL ORDER BY id DESC LIMIT 10;

-- name: status_results
-- Every result ever made, pruned ones too (as the savings beside it count them).
SELECT status, SUM(n) AS n FROM (
    SELECT status, COUNT(*) AS n FROM results GROUP BY status
    UNION ALL
    SELECT status, SUM(requests) FROM result_totals GROUP BY status
) AS counted GROUP BY status;

-- name: status_files
SELECT name, out_name, lines, delivered, state FROM files ORDER BY id DESC LIMIT 20;

-- name: status_errors
SELECT at, event, message FROM errors ORDER BY id DESC LIMIT ?;

-- name: status_holds
SELECT profile, model, until, reason FROM holds WHERE until > ?;

-- name: status_sinks
SELECT c.sink, (SELECT COUNT(*) FROM results WHERE id > c.last_result_id) AS pending,
    (SELECT COUNT(*) FROM parked p WHERE p.sink = c.sink) AS parked
FROM sink_cursors c ORDER BY c.sink;

-- name: status_nodes
SELECT node, heartbeat_at, started_at, pid, host FROM nodes ORDER BY node;

-- Read models for /metrics (batchd/metrics.py): database-wide, cheap aggregates.

-- name: metrics_queue
-- Every queued item, held back or not: the counts (migration 014), and each group's oldest in one seek.
WITH counted AS (
    SELECT profile, endpoint, model, n FROM queued_counts
    UNION ALL
    SELECT profile, endpoint, model, COUNT(*) FROM items
    WHERE id > (SELECT last_item FROM queued_counts_mark) AND +state = 'queued'  -- `+`: by rowid range
    GROUP BY profile, endpoint, model
), groups AS (
    SELECT profile, endpoint, model, SUM(n) AS n FROM counted GROUP BY profile, endpoint, model HAVING SUM(n) > 0
)
SELECT g.profile, g.endpoint, g.model, g.n AS queued, (
    SELECT MIN(i.queued_at) FROM items i INDEXED BY items_oldest
    WHERE i.state = 'queued' AND i.profile = g.profile AND i.endpoint = g.endpoint AND i.model = g.model
) AS oldest
FROM groups g;

-- name: metrics_batches
-- Pruned batches (migration 015) still count: batchd_batches_finished_total is a counter.
SELECT profile, state, status, SUM(n) AS n FROM (
    SELECT profile, state, COALESCE(remote_status, state) AS status, COUNT(*) AS n FROM batches
    GROUP BY profile, state, COALESCE(remote_status, state)
    UNION ALL
    SELECT profile, 'done', label, CAST(value AS INTEGER) FROM metric_totals WHERE family = 'batches_finished'
) GROUP BY profile, state, status;

-- name: metrics_results
SELECT COALESCE(profile, '') AS profile, COALESCE(model, '') AS model, status, SUM(requests) AS n,
    SUM(collected) AS collected,
    COALESCE(SUM(input_tokens), 0) AS input_tokens, COALESCE(SUM(output_tokens), 0) AS output_tokens,
    COALESCE(SUM(cost_batch), 0.0) AS cost_batch, COALESCE(SUM(cost_realtime), 0.0) AS cost_realtime
FROM (
    SELECT profile, model, status, 1 AS requests, CASE WHEN batch_id IS NOT NULL THEN 1 ELSE 0 END AS collected,
        input_tokens, output_tokens, cost_batch, cost_realtime
    FROM results
    UNION ALL
    -- What retention pruned still counts: these are counters, and a counter never goes down.
    SELECT profile, model, status, requests, CASE WHEN status = 'invalid' THEN 0 ELSE requests END,
        input_tokens, output_tokens, cost_batch, cost_realtime
    FROM result_totals
) AS r GROUP BY COALESCE(profile, ''), COALESCE(model, ''), status;

-- name: metrics_retries
-- Only retried items, through their partial index (migration 015), and what pruning folded.
SELECT profile, model, SUM(retries) AS retries FROM (
    SELECT profile, model, SUM(attempts - 1) AS retries FROM items INDEXED BY items_retried
    WHERE attempts > 1 GROUP BY profile, model
    UNION ALL
    SELECT profile, model, value FROM metric_totals WHERE family = 'retries'
) GROUP BY profile, model;

-- name: metrics_capacity
SELECT profile, model, COUNT(*) AS batches, COALESCE(SUM(tokens), 0) AS tokens,
    COALESCE(SUM(requests), 0) AS requests
FROM batches WHERE state IN ('pending', 'unverified', 'submitted') GROUP BY profile, model;

-- name: metrics_turnaround
SELECT profile, model, collected_at - submitted_at AS seconds FROM batches
WHERE state = 'done' AND collected_at IS NOT NULL AND submitted_at IS NOT NULL;

-- name: metrics_turnaround_pruned
-- Pruned batches' turnarounds: a count per (profile, bucket index, -1 for +Inf) and a sum per profile.
SELECT profile, family, CAST(NULLIF(label, '') AS INTEGER) AS bucket, value FROM metric_totals
WHERE family IN ('turnaround', 'turnaround_sum');

-- name: metrics_ingested
SELECT (SELECT COUNT(*) FROM files)
        + COALESCE((SELECT value FROM metric_totals WHERE family = 'ingested_files'), 0) AS files,
    (SELECT COALESCE(SUM(lines_committed), 0) FROM files)
        + COALESCE((SELECT value FROM metric_totals WHERE family = 'ingested_lines'), 0) AS lines;

-- name: request_poll
UPDATE batches SET poll_requested_at = :now WHERE id = :id AND state IN ('unverified', 'submitted');

-- Issue 12: operator pauses, the batch listing, retention.

-- name: pause
INSERT INTO pauses (profile, model, paused_at, reason) VALUES (?, ?, ?, ?)
ON CONFLICT (profile, model) DO UPDATE SET reason = COALESCE(excluded.reason, pauses.reason);

-- name: resume_route
DELETE FROM pauses WHERE profile = ? AND model = ?;

-- name: resume_all
DELETE FROM pauses;

-- name: pauses
SELECT profile, model, paused_at, reason FROM pauses ORDER BY profile, model;

-- name: recent_batches
SELECT * FROM batches ORDER BY id DESC LIMIT ?;

-- name: prunable_files
SELECT f.id FROM files f
WHERE f.state = 'complete' AND f.completed_at < :before
    AND NOT EXISTS (SELECT 1 FROM items i WHERE i.file_id = f.id
                    AND i.state IN ('queued', 'batched', 'submitted', 'realtime'))
    AND NOT EXISTS (SELECT 1 FROM results r JOIN parked p ON p.result_id = r.id WHERE r.file_id = f.id)
    -- :delivered: the lowest cursor of the webhook sinks (NULL: none configured).
    AND (:delivered IS NULL OR NOT EXISTS (SELECT 1 FROM results r WHERE r.file_id = f.id AND r.id > :delivered))
    -- SQLite hands the largest rowid out again once its row is gone: an id at or below the queue
    -- counts' mark or a sink's cursor would be new work never counted or delivered. The rows holding
    -- the largest ids stay until newer ones exist (PostgreSQL's sequences never go back).
    AND f.id <> (SELECT MAX(id) FROM files)
    AND NOT EXISTS (SELECT 1 FROM items i WHERE i.id = (SELECT MAX(id) FROM items) AND i.file_id = f.id)
    AND NOT EXISTS (SELECT 1 FROM results r WHERE r.id = (SELECT MAX(id) FROM results) AND r.file_id = f.id)
ORDER BY f.id LIMIT :limit;

-- name: fold_totals
INSERT INTO result_totals (hour, profile, model, file_name, status, requests, input_tokens, cached_input_tokens,
    output_tokens, cost_batch, cost_realtime, unpriced, cost_paid, fallback_requests, fallback_cost, deadlines_met,
    deadlines_missed)
SELECT CAST(r.created_at / 3600 AS INTEGER) * 3600.0, r.profile, r.model, f.name, r.status, COUNT(*),
    COALESCE(SUM(r.input_tokens), 0), COALESCE(SUM(r.cached_input_tokens), 0), COALESCE(SUM(r.output_tokens), 0),
    SUM(r.cost_batch), SUM(r.cost_realtime), SUM(r.cost_batch IS NULL AND r.input_tokens IS NOT NULL),
    SUM(r.cost_paid), SUM(r.via = 'realtime'), SUM(CASE WHEN r.via = 'realtime' THEN r.cost_paid END),
    COALESCE(SUM(r.created_at <= r.deadline), 0), COALESCE(SUM(r.created_at > r.deadline), 0)
FROM results r JOIN files f ON f.id = r.file_id
WHERE r.file_id IN (SELECT value FROM json_each(?))
GROUP BY 1, r.profile, r.model, f.name, r.status;

-- name: fold_duplicates
INSERT INTO duplicate_totals (hour, profile, model, file_name, requests, input_tokens, output_tokens, cost)
SELECT CAST(d.created_at / 3600 AS INTEGER) * 3600.0, d.profile, d.model, f.name, COUNT(*),
    COALESCE(SUM(d.input_tokens), 0), COALESCE(SUM(d.output_tokens), 0), SUM(d.cost)
FROM duplicate_costs d JOIN files f ON f.id = d.file_id
WHERE d.file_id IN (SELECT value FROM json_each(?))
GROUP BY 1, d.profile, d.model, f.name;

-- name: prune_duplicates
DELETE FROM duplicate_costs WHERE file_id IN (SELECT value FROM json_each(?));

-- name: prune_results
DELETE FROM results WHERE file_id IN (SELECT value FROM json_each(?));

-- name: prune_item_bodies
DELETE FROM item_bodies WHERE item_id IN (SELECT id FROM items WHERE file_id IN (SELECT value FROM json_each(?)));

-- name: fold_metric_files
-- What pruning these files takes from /metrics' counters (ingested files and lines, retries), kept.
INSERT INTO metric_totals (family, profile, model, label, value)
SELECT * FROM (
    SELECT 'ingested_files', '', '', '', COUNT(*) FROM files WHERE id IN (SELECT value FROM json_each(:ids))
    UNION ALL
    SELECT 'ingested_lines', '', '', '', COALESCE(SUM(lines_committed), 0) FROM files
    WHERE id IN (SELECT value FROM json_each(:ids))
    UNION ALL
    SELECT 'retries', profile, model, '', SUM(attempts - 1) FROM items
    WHERE file_id IN (SELECT value FROM json_each(:ids)) AND attempts > 1 GROUP BY profile, model
) WHERE true
ON CONFLICT (family, profile, model, label) DO UPDATE SET value = value + excluded.value;

-- name: fold_metric_batches
-- What pruning these batches takes from /metrics: finished counts by status, turnaround buckets
-- (:buckets, a JSON array of upper bounds; the index of the first bound >= seconds, -1 past the last).
INSERT INTO metric_totals (family, profile, model, label, value)
SELECT * FROM (
    SELECT 'batches_finished', profile, '', COALESCE(remote_status, state), COUNT(*) FROM batches
    WHERE id IN (SELECT value FROM json_each(:ids)) GROUP BY profile, COALESCE(remote_status, state)
    UNION ALL
    SELECT 'turnaround', profile, '', CAST(bucket AS TEXT), COUNT(*) FROM (
        SELECT profile, COALESCE(
            (SELECT MIN(key) FROM json_each(:buckets) WHERE value >= MAX(collected_at - submitted_at, 0)), -1
        ) AS bucket
        FROM batches WHERE id IN (SELECT value FROM json_each(:ids))
            AND collected_at IS NOT NULL AND submitted_at IS NOT NULL
    ) GROUP BY profile, bucket
    UNION ALL
    SELECT 'turnaround_sum', profile, '', '', SUM(MAX(collected_at - submitted_at, 0)) FROM batches
    WHERE id IN (SELECT value FROM json_each(:ids)) AND collected_at IS NOT NULL AND submitted_at IS NOT NULL
    GROUP BY profile
) WHERE true
ON CONFLICT (family, profile, model, label) DO UPDATE SET value = value + excluded.value;

-- name: prune_items
DELETE FROM items WHERE file_id IN (SELECT value FROM json_each(?));

-- name: prune_files
DELETE FROM files WHERE id IN (SELECT value FROM json_each(?));

-- name: prunable_batches
SELECT b.id FROM batches b
WHERE b.state = 'done' AND COALESCE(b.collected_at, b.ended_at, b.created_at) < :before
    AND NOT EXISTS (SELECT 1 FROM items i WHERE i.batch_id = b.id)
    AND b.id <> (SELECT MAX(id) FROM batches)  -- as prunable_files: a batch id is never handed out twice
ORDER BY b.id LIMIT :limit;

-- name: prune_batch_rejects
DELETE FROM batch_rejects WHERE batch_id IN (SELECT value FROM json_each(?));

-- name: prune_batches
DELETE FROM batches WHERE id IN (SELECT value FROM json_each(?));

-- Issue 12: `batchd cancel`: intents written by the command, carried out by the batch's lease holder.

-- name: note_cancel_reason
UPDATE batches SET cancel_reason = COALESCE(cancel_reason, ?) WHERE id = ?;

-- name: request_cancel
-- OPERATOR (every request ends canceled) outranks FILE (only a cancelled file's requests do).
-- poll_requested_at wakes the lease holder's poller at its next lease renewal.
UPDATE batches SET cancel_wanted_at = COALESCE(cancel_wanted_at, :now),
    cancel_reason = CASE WHEN cancel_reason = 'operator' THEN 'operator' ELSE :reason END,
    poll_requested_at = :now
WHERE id = :id AND state IN ('pending', 'unverified', 'submitted');

-- name: canceled_files
SELECT DISTINCT i.file_id FROM items i JOIN files f ON f.id = i.file_id
WHERE i.batch_id = ? AND f.canceled_at IS NOT NULL;

-- name: batched_items
SELECT id, file_id, line, custom_id, attempts, state, deadline FROM items
WHERE batch_id = ? AND state = 'batched' ORDER BY id;

-- name: pending_batch_routes
-- The CAS of drop_pending: the batch's claimed requests and their route, while it is still pending.
SELECT i.id, i.profile, i.model FROM items i JOIN batches b ON b.id = i.batch_id
WHERE i.batch_id = ? AND i.state = 'batched' AND b.state = 'pending';

-- name: batch_still_pending
SELECT 1 FROM batches WHERE id = ? AND state = 'pending';

-- name: unclaim_batched
UPDATE items SET state = 'queued', batch_id = NULL WHERE batch_id = ? AND state = 'batched';

-- name: canceled_with_queued
-- Few files are ever cancelled: their rows first, then one probe of each one's items.
SELECT f.id FROM files f
WHERE f.canceled_at IS NOT NULL AND f.state <> 'complete'
    AND EXISTS (SELECT 1 FROM items i WHERE i.file_id = f.id AND i.state IN ('queued', 'realtime'))
ORDER BY f.id;

-- name: files_named
SELECT * FROM files WHERE name = ? ORDER BY id;

-- name: queued_items
-- Not in a batch: queued, or waiting for the real-time fallback.
SELECT id, file_id, line, custom_id, attempts FROM items WHERE file_id = ? AND state IN ('queued', 'realtime')
ORDER BY id;

-- name: mark_file_canceled
UPDATE files SET canceled_at = COALESCE(canceled_at, ?) WHERE id = ?;

-- name: queued_among
-- The CAS of cancel_file: which of these items of the file are still queued (or waiting for the
-- real-time fallback), and their route.
SELECT id, profile, model FROM items
WHERE file_id = ? AND state IN ('queued', 'realtime') AND id IN (SELECT value FROM json_each(?));

-- name: insert_canceled_result
INSERT INTO results (file_id, line, item_id, status, profile, model, batch_id, payload, created_at)
VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?)
ON CONFLICT (file_id, line) DO NOTHING;

-- name: file_live_batches
SELECT DISTINCT batch_id FROM items
WHERE file_id = ? AND state IN ('batched', 'submitted') AND batch_id IS NOT NULL ORDER BY batch_id;

-- name: file_items
SELECT id, line, custom_id, state, profile, endpoint, model, deadline, fallback_at, tokens, inputs FROM items
WHERE file_id = ? ORDER BY line;

-- Issue 11: the real-time fallback. Due items are found through the partial index items_fallback
-- (its WHERE repeated word for word, so the planner may use it), never by a scan of the queue.

-- name: fallback_take_queued
-- This node's queued requests whose deadline (less its lead) has come go to the fallback.
UPDATE items INDEXED BY items_fallback SET state = 'realtime'
WHERE fallback_at <= :now AND fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime')
    AND state = 'queued' AND file_id IN (SELECT id FROM files WHERE node = :node);

-- name: fallback_cancel_batches
-- Live batches holding a due request, not cancelled for any reason yet: cancel them for the fallback.
UPDATE batches SET cancel_wanted_at = COALESCE(cancel_wanted_at, :now), cancel_reason = 'deadline',
    poll_requested_at = :now
WHERE state IN ('pending', 'unverified', 'submitted') AND cancel_reason IS NULL
    AND id IN (SELECT i.batch_id FROM items i INDEXED BY items_fallback
               WHERE i.fallback_at <= :now AND i.fallback_at IS NOT NULL
                   AND i.state IN ('queued', 'batched', 'submitted', 'realtime') AND i.state IN ('batched', 'submitted'))
RETURNING id;

-- name: next_fallback_at
SELECT MIN(fallback_at) AS at FROM items INDEXED BY items_fallback
WHERE fallback_at > ? AND fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime')
    AND state <> 'realtime';

-- name: hand_over
UPDATE items SET state = 'realtime' WHERE batch_id = ? AND state = 'submitted' AND deadline IS NOT NULL;

-- name: realtime_items
-- INDEXED BY: the partial index (016) has no equality to seek, and the planner would rather walk
-- every item of this node's files; through it, the waiting items come in deadline order, unsorted.
SELECT i.id, i.file_id, i.line, i.custom_id, i.profile, i.endpoint, i.model, b.body, i.tokens, i.deadline, i.batch_id
FROM items i INDEXED BY items_realtime JOIN files f ON f.id = i.file_id JOIN item_bodies b ON b.item_id = i.id
WHERE i.state = 'realtime' AND f.node = :node AND i.id NOT IN (SELECT value FROM json_each(:exclude))
ORDER BY i.deadline, i.id LIMIT :limit;

-- name: realtime_among
-- The CAS of record_realtime: which of these items still wait for the fallback's answer.
SELECT id FROM items WHERE state = 'realtime' AND id IN (SELECT value FROM json_each(?));

-- name: insert_realtime_result
INSERT INTO results (file_id, line, item_id, status, profile, model, batch_id, input_tokens, output_tokens,
    cached_input_tokens, cache_creation_input_tokens, cost_batch, cost_realtime, payload, created_at, via,
    cost_paid, deadline)
SELECT i.file_id, i.line, i.id, :status, i.profile, i.model, NULL, :input_tokens, :output_tokens,
    :cached_input_tokens, :cache_creation_input_tokens, :cost_batch, :cost_realtime, :payload, :now, :via,
    :cost_paid, i.deadline
FROM items i WHERE i.id = :item_id
ON CONFLICT (file_id, line) DO NOTHING;

-- Named queries of the PostgreSQL engine (store/postgres.py), asyncpg placeholders ($1, $2, ...).
-- Live batch states are spelled out as ('pending', 'unverified', 'submitted') = contract.LIVE_BATCH_STATES.

-- == lifecycle ==================================================================================

-- name: create_schema_statement
-- The CREATE SCHEMA statement for a name, quoted by the server (identifiers cannot be parameters).
SELECT format('CREATE SCHEMA IF NOT EXISTS %I', $1::text)

-- name: migrate_lock
-- Session lock per schema: two daemons (or a daemon and `batchd migrate`) never migrate at once.
SELECT pg_advisory_lock(hashtext('batchd.migrate:' || COALESCE($1::text, current_schema(), '')))

-- name: migrate_unlock
SELECT pg_advisory_unlock(hashtext('batchd.migrate:' || COALESCE($1::text, current_schema(), '')))

-- name: has_schema_version
-- False when the schema has no batchd tables at all (version 0).
SELECT to_regclass('schema_version') IS NOT NULL

-- name: schema_version_max
SELECT COALESCE(MAX(version), 0) FROM schema_version

-- name: schema_version_insert
INSERT INTO schema_version (version, applied_at, node) VALUES ($1, $2, $3)

-- name: instance_init
INSERT INTO meta (key, value) VALUES ('instance', $1) ON CONFLICT (key) DO NOTHING

-- name: instance
SELECT value FROM meta WHERE key = 'instance'

-- name: node_register
INSERT INTO nodes (id, host, pid, started_at, lease_until) VALUES ($1, $2, $3, $4, 0)
ON CONFLICT (id) DO UPDATE SET host = excluded.host, pid = excluded.pid, started_at = excluded.started_at,
    stopped_at = NULL

-- name: node_heartbeat
UPDATE nodes SET lease_until = $2 WHERE id = $1

-- name: node_stopped
UPDATE nodes SET lease_until = 0, stopped_at = $2 WHERE id = $1

-- == intake =====================================================================================

-- name: find_file
SELECT * FROM files WHERE node = $1 AND name = $2 AND sha256 = $3 AND ino = $4 AND moved_at IS NULL
ORDER BY id DESC LIMIT 1

-- name: out_name_holder
SELECT id, state FROM files WHERE node = $1 AND out_name = $2

-- name: out_name_give_up
UPDATE files SET out_name = out_name || '~' || id WHERE id = $1

-- name: file_insert
INSERT INTO files (node, name, sha256, size, dev, ino, out_name, ingested_at, options, deadline)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *

-- name: seen_custom_ids
SELECT custom_id FROM items WHERE file_id = $1 AND custom_id = ANY($2::text[])

-- name: chunk_advance
-- The compare-and-set that makes add_chunk idempotent: only the chunk right after the committed lines.
UPDATE files SET lines_committed = $3, offset_committed = $4
WHERE id = $1 AND lines_committed = $2 AND state = 'ingesting'
RETURNING id

-- name: items_insert
-- Items and their bodies in one statement; ids follow line order.
WITH new AS (
    SELECT * FROM unnest($2::integer[], $3::text[], $4::text[], $5::text[], $6::text[], $7::integer[],
                         $8::bigint[], $9::bytea[], $11::double precision[], $12::double precision[], $13::integer[])
        AS n (line, custom_id, profile, endpoint, model, size, tokens, body, deadline, fallback_at, inputs)
), inserted AS (
    INSERT INTO items (file_id, line, custom_id, profile, endpoint, model, size, tokens, deadline, fallback_at,
                       inputs, queued_at)
    SELECT $1, line, custom_id, profile, endpoint, model, size, tokens, deadline, fallback_at, inputs, $10
    FROM new ORDER BY line
    RETURNING id, line
)
INSERT INTO item_bodies (item_id, body) SELECT inserted.id, new.body FROM inserted JOIN new USING (line)

-- name: results_lock
-- Taken by every transaction that inserts results, just before the insert, and held to its end: no
-- result id can commit after a higher one, so a cursor "id > last" never skips a row.
SELECT pg_advisory_xact_lock(hashtext('batchd.results:' || COALESCE(current_schema(), '')))

-- name: results_insert_new
INSERT INTO results (file_id, line, status, payload, created_at)
SELECT $1, line, status, payload, $5
FROM unnest($2::integer[], $3::text[], $4::bytea[]) AS r (line, status, payload)
ORDER BY line

-- name: finish_file
UPDATE files SET state = 'open', lines = $2, lines_committed = GREATEST(lines_committed, $2), finished_at = $3
WHERE id = $1 AND state = 'ingesting'

-- name: file_moved
UPDATE files SET moved_at = COALESCE(moved_at, $2) WHERE id = $1

-- name: files_moved
UPDATE files SET moved_at = COALESCE(moved_at, $2) WHERE id = ANY($1::bigint[])

-- == queue ======================================================================================

-- name: queued_groups
-- O(groups), not O(queue) (migration 007_scale): each group's count and bytes from queued_counts plus
-- the deltas not folded yet, less the items held back (items_held) and those whose fallback is due
-- (items_fallback: they belong to the real-time fallback, never counted into a batch), both few; its
-- oldest due item is one step of items_oldest (the items it steps over are the same few). Partial
-- indexes' conditions are repeated so that the planner may use them. One statement: one snapshot.
WITH counted AS (
    SELECT profile, endpoint, model, n, bytes FROM queued_counts
    UNION ALL
    SELECT profile, endpoint, model, n, bytes FROM queue_deltas
    UNION ALL
    SELECT profile, endpoint, model, -COUNT(*), -SUM(size) FROM items
    WHERE state = 'queued' AND not_before > 0 AND not_before > $1
    GROUP BY profile, endpoint, model
    UNION ALL
    SELECT profile, endpoint, model, -COUNT(*), -SUM(size) FROM items
    WHERE fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime')
        AND fallback_at <= $1 AND state = 'queued' AND not_before <= $1
    GROUP BY profile, endpoint, model
), groups AS (
    SELECT profile, endpoint, model, SUM(n)::bigint AS n, SUM(bytes)::bigint AS bytes FROM counted
    GROUP BY profile, endpoint, model HAVING SUM(n) > 0
)
SELECT g.profile, g.endpoint, g.model, g.n, g.bytes, (
    SELECT i.queued_at FROM items i
    WHERE i.state = 'queued' AND i.profile = g.profile AND i.endpoint = g.endpoint AND i.model = g.model
        AND i.not_before <= $1 AND (i.fallback_at IS NULL OR i.fallback_at > $1)
    ORDER BY i.queued_at LIMIT 1
) AS oldest
FROM groups g ORDER BY g.profile, g.endpoint, g.model

-- name: fold_queue_deltas
-- Committed deltas into the counts (migration 007_scale). Rows another fold is moving are skipped,
-- so two folds never count a delta twice nor wait on each other's rows.
WITH moved AS (
    DELETE FROM queue_deltas WHERE id IN (SELECT id FROM queue_deltas ORDER BY id FOR UPDATE SKIP LOCKED)
    RETURNING profile, endpoint, model, n, bytes
)
INSERT INTO queued_counts AS c (profile, endpoint, model, n, bytes)
SELECT profile, endpoint, model, SUM(n), SUM(bytes) FROM moved
GROUP BY profile, endpoint, model ORDER BY profile, endpoint, model
ON CONFLICT (profile, endpoint, model) DO UPDATE SET n = c.n + excluded.n, bytes = c.bytes + excluded.bytes

-- name: earliest_deadline
-- Through the partial index items_fallback in fallback_at order to the group's first item (its
-- condition is repeated so that the planner may use it): never a scan of the group's queue.
SELECT deadline, fallback_at FROM items
WHERE fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime')
    AND fallback_at > $4 AND state = 'queued' AND profile = $1 AND endpoint = $2 AND model = $3
ORDER BY fallback_at LIMIT 1

-- name: next_not_before
-- One step of items_held (its condition repeated so that the planner may use it; now > 0).
SELECT MIN(not_before) FROM items WHERE state = 'queued' AND not_before > 0 AND not_before > $1

-- name: claim_candidates
-- The group's oldest due items within both limits, locked; rows another claim holds are skipped, so
-- two concurrent claims never share an item. FOR UPDATE cannot sit beside a window function, hence
-- the CTE.
-- Within the byte limit, the token budget $7 and the embedding-inputs budget $8 (running sums: a
-- prefix); with $9, a first item that alone exceeds a budget is taken alone (capacity.split).
-- Items whose fallback is due are the real-time fallback's.
WITH candidates AS (
    SELECT id, size, tokens, inputs FROM items
    WHERE state = 'queued' AND profile = $1 AND endpoint = $2 AND model = $3 AND not_before <= $4
        AND (fallback_at IS NULL OR fallback_at > $4)
    ORDER BY id LIMIT $5
    FOR UPDATE SKIP LOCKED
), running AS (
    SELECT id, size, tokens, inputs, SUM(size) OVER w AS bytes_sum, SUM(tokens) OVER w AS tokens_sum,
        SUM(inputs) OVER w AS inputs_sum, ROW_NUMBER() OVER w AS n
    FROM candidates WINDOW w AS (ORDER BY id)
)
SELECT id, size, tokens, inputs FROM running
WHERE bytes_sum <= $6 AND ((tokens_sum <= $7 AND inputs_sum <= $8) OR (n = 1 AND $9::boolean))
ORDER BY id

-- name: batch_insert
INSERT INTO batches (profile, kind, endpoint, model, created_at, owner, lease_until, requests, bytes, tokens, inputs)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING *

-- name: claim_items
UPDATE items SET state = 'batched', batch_id = $1 WHERE id = ANY($2::bigint[]) AND state = 'queued'

-- name: batch_bodies
SELECT i.id, i.endpoint, b.body FROM items i JOIN item_bodies b ON b.item_id = i.id
WHERE i.batch_id = $1 AND i.id > $2 ORDER BY i.id LIMIT $3

-- name: batch_input_size
SELECT COUNT(*) AS n, COALESCE(SUM(octet_length(b.body)), 0)::bigint AS body_bytes,
    COALESCE(SUM(length(to_hex(i.id))), 0)::bigint AS id_hex_digits
FROM items i JOIN item_bodies b ON b.item_id = i.id WHERE i.batch_id = $1

-- name: usage
-- Live batches (intents included: they are about to be created) of a profile, and optionally a model;
-- created = batches created at the provider in the last hour.
SELECT COUNT(*) FILTER (WHERE state IN ('pending', 'unverified', 'submitted')) AS in_flight,
       COALESCE(SUM(tokens) FILTER (WHERE state IN ('pending', 'unverified', 'submitted')), 0)::bigint AS tokens,
       COALESCE(SUM(requests) FILTER (WHERE state IN ('pending', 'unverified', 'submitted')), 0)::bigint AS requests,
       COUNT(*) FILTER (WHERE submitted_at >= $3::double precision - 3600) AS created
FROM batches
WHERE profile = $1 AND ($2::text IS NULL OR model = $2)
  AND (state IN ('pending', 'unverified', 'submitted') OR submitted_at >= $3::double precision - 3600)

-- name: creations
-- Created at the provider since $2, and live intents about to be (pending: not created yet).
SELECT COALESCE(submitted_at, created_at) AS t FROM batches
WHERE profile = $1 AND (submitted_at >= $2 OR (state = 'pending' AND submitted_at IS NULL))
ORDER BY t

-- name: learned_limits
SELECT profile, model, tokens FROM learned_limits

-- name: lower_learned_limit
-- Only ever lowers; RETURNING gives nothing when the stored limit was already lower.
INSERT INTO learned_limits (profile, model, tokens, learned_at) VALUES ($1, $2, $3, $4)
ON CONFLICT (profile, model) DO UPDATE SET tokens = EXCLUDED.tokens, learned_at = EXCLUDED.learned_at
WHERE EXCLUDED.tokens < learned_limits.tokens

-- name: learned_limit
SELECT tokens FROM learned_limits WHERE profile = $1 AND model = $2

-- name: request_flush
INSERT INTO flush_requests (route, requested_at) VALUES ($1, $2)
ON CONFLICT (route) DO UPDATE SET requested_at = EXCLUDED.requested_at

-- name: flush_requests
SELECT route, requested_at FROM flush_requests

-- name: clear_flush_request
DELETE FROM flush_requests WHERE route = $1 AND requested_at = $2

-- name: active_holds
SELECT profile, model, until FROM holds WHERE until > $1

-- name: hold
INSERT INTO holds (profile, model, until, failures, reason) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (profile, model) DO UPDATE SET until = excluded.until, failures = excluded.failures,
    reason = excluded.reason

-- name: hold_failures
SELECT failures FROM holds WHERE profile = $1 AND model = $2

-- name: release_hold
DELETE FROM holds WHERE profile = $1 AND model = $2

-- == batches ====================================================================================

-- name: batch
SELECT * FROM batches WHERE id = $1

-- name: batches_in_state
SELECT * FROM batches WHERE state = ANY($1::text[]) ORDER BY id

-- name: owned_batches
SELECT * FROM batches WHERE owner = $1 AND state = ANY($2::text[]) ORDER BY id

-- name: take_over
-- Live batches whose lease ran out (their node died or let go) become this node's. Rows another
-- node is taking over right now are skipped, not waited for.
WITH expired AS (
    SELECT id FROM batches
    WHERE state IN ('pending', 'unverified', 'submitted') AND (owner IS NULL OR lease_until < $2)
    ORDER BY id
    FOR UPDATE SKIP LOCKED
)
UPDATE batches b SET owner = $1, lease_until = $3 FROM expired WHERE b.id = expired.id
RETURNING b.*

-- name: renew_leases
UPDATE batches SET lease_until = $2 WHERE owner = $1 AND state IN ('pending', 'unverified', 'submitted')

-- name: release_leases
UPDATE batches SET owner = NULL, lease_until = 0 WHERE owner = $1 AND state IN ('pending', 'unverified', 'submitted')

-- name: release_sink_leases
DELETE FROM sink_leases WHERE owner = $1

-- name: remote_ids
SELECT remote_id FROM batches WHERE profile = $1 AND remote_id IS NOT NULL

-- name: remote_owner
SELECT id FROM batches WHERE remote_id = $1

-- name: set_input_file
UPDATE batches SET input_file_id = $2 WHERE id = $1

-- name: note_submit_failure
UPDATE batches SET submit_attempts = submit_attempts + 1, last_error = $2, not_before = $3 WHERE id = $1

-- name: mark_submitted
UPDATE batches SET state = 'submitted', remote_id = $2, remote_status = $3, submitted_at = $4,
    remote_created_at = $5, last_error = NULL
WHERE id = $1

-- name: items_submitted
-- The batch's items are at the provider now: one attempt each.
UPDATE items SET state = 'submitted', attempts = attempts + 1 WHERE batch_id = $1 AND state = 'batched'

-- name: mark_unverified
UPDATE batches SET state = 'unverified', remote_id = $2, remote_status = $3, submitted_at = $4,
    remote_created_at = $5, last_error = $6
WHERE id = $1 AND state = 'pending'

-- name: confirm_ownership
UPDATE batches SET state = 'submitted', last_error = NULL WHERE id = $1 AND state = 'unverified'

-- name: reject_remote
INSERT INTO batch_rejects (batch_id, remote_id, rejected_at, reason) VALUES ($1, $2, $3, $4)
ON CONFLICT (batch_id, remote_id) DO NOTHING

-- name: unadopt
-- submit_attempts > 0 makes the batcher reconcile again before it ever creates.
UPDATE batches SET state = 'pending', remote_id = NULL, remote_status = NULL, counts = NULL,
    submitted_at = NULL, remote_created_at = NULL, ended_at = NULL, output_file_id = NULL,
    error_file_id = NULL, submit_attempts = submit_attempts + 1, not_before = 0, last_error = $3
WHERE id = $1 AND state = 'unverified' AND remote_id = $2

-- name: rejected_remotes
SELECT remote_id FROM batch_rejects WHERE batch_id = $1

-- name: note_cancel_requested
UPDATE batches SET cancel_requested_at = COALESCE(cancel_requested_at, $2), last_error = $3 WHERE id = $1

-- name: record_poll
UPDATE batches SET remote_status = $2, counts = $3, output_file_id = $4, error_file_id = $5,
    last_polled_at = $6, ended_at = CASE WHEN $7::boolean THEN COALESCE(ended_at, $6) ELSE ended_at END
WHERE id = $1

-- name: note_batch_error
UPDATE batches SET last_error = $2 WHERE id = $1

-- name: finish_batch
UPDATE batches SET state = 'done', collected_at = $2, ended_at = COALESCE(ended_at, $2),
    fate = COALESCE($3, fate), last_error = COALESCE($4, last_error)
WHERE id = $1

-- == outcomes ===================================================================================

-- name: submitted_items
-- Waiting: SUBMITTED, or REALTIME (handed to the fallback; the first final answer wins).
SELECT id, file_id, line, custom_id, attempts, state, deadline FROM items
WHERE batch_id = $1 AND state IN ('submitted', 'realtime') AND ($2::bigint[] IS NULL OR id = ANY($2::bigint[]))
ORDER BY id

-- name: fallback_answered
SELECT i.id, i.file_id, i.line, i.custom_id, i.attempts, i.state, i.deadline
FROM items i JOIN results r ON r.file_id = i.file_id AND r.line = i.line
WHERE i.batch_id = $1 AND i.state IN ('succeeded', 'errored', 'expired', 'canceled') AND r.via = 'realtime'
ORDER BY i.id

-- name: custom_plans
-- For the rest of this transaction: plan each statement for its actual arrays.
SET LOCAL plan_cache_mode = force_custom_plan

-- name: record_finals
-- Items still waiting in this batch (SUBMITTED, or REALTIME: the first final answer wins) take
-- their final state and result; their bodies go. The caller holds results_lock.
WITH f AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::bytea[], $5::bigint[], $6::bigint[], $7::bigint[],
                         $8::bigint[], $9::double precision[], $10::double precision[], $11::text[],
                         $12::double precision[])
        AS f (item_id, status, payload, input_tokens, output_tokens, cached_input_tokens,
              cache_creation_input_tokens, cost_batch, cost_realtime, via, cost_paid)
), done AS (
    -- An item's own result can only be a provider outcome; anything else leaves it errored.
    UPDATE items i SET state = CASE WHEN f.status IN ('succeeded', 'errored', 'expired', 'canceled')
                                    THEN f.status ELSE 'errored' END
    FROM f
    WHERE i.id = f.item_id AND i.batch_id = $1 AND i.state IN ('submitted', 'realtime')
    RETURNING i.id, i.file_id, i.line, i.deadline
), bodies AS (
    DELETE FROM item_bodies WHERE item_id IN (SELECT id FROM done)
), inserted AS (
    INSERT INTO results (file_id, line, item_id, status, profile, model, batch_id, input_tokens, output_tokens,
                         cached_input_tokens, cache_creation_input_tokens, cost_batch, cost_realtime, payload,
                         created_at, via, cost_paid, deadline)
    SELECT done.file_id, done.line, done.id, f.status, b.profile, b.model, b.id, f.input_tokens, f.output_tokens,
           f.cached_input_tokens, f.cache_creation_input_tokens, f.cost_batch, f.cost_realtime, f.payload, $13,
           f.via, f.cost_paid, done.deadline
    FROM done JOIN f ON f.item_id = done.id JOIN batches b ON b.id = $1
    ORDER BY done.id
    ON CONFLICT (file_id, line) DO NOTHING
)
SELECT COUNT(*) FROM done

-- name: record_duplicates
-- Billed answers for items whose result was served the other way: costs, not results (once per
-- item, via and batch). Run after the finals of the same transaction: an answer just recorded as
-- the result has the result's own via and is no duplicate.
INSERT INTO duplicate_costs (item_id, file_id, line, profile, model, batch_id, via, input_tokens, output_tokens,
                             cost, created_at)
SELECT i.id, i.file_id, i.line, i.profile, i.model, $1, d.via, d.input_tokens, d.output_tokens, d.cost, $7
FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::bigint[], $6::double precision[])
    AS d (item_id, via, input_tokens, output_tokens, cost)
JOIN items i ON i.id = d.item_id
JOIN results r ON r.file_id = i.file_id AND r.line = i.line
WHERE r.via <> d.via
ON CONFLICT DO NOTHING

-- name: record_handovers
-- To the real-time fallback: the body stays, and so does the batch (its late answer may still win).
UPDATE items SET state = 'realtime' WHERE batch_id = $1 AND state = 'submitted' AND id = ANY($2::bigint[])

-- name: record_retries
-- A retry's age counts from when it becomes due; a refunded one (a bystander of a deadline cancel)
-- gets its attempt back.
UPDATE items i SET state = 'queued', batch_id = NULL, not_before = r.not_before,
    queued_at = GREATEST($2::double precision, r.not_before), last_error = r.error,
    attempts = CASE WHEN r.refund THEN GREATEST(i.attempts - 1, 0) ELSE i.attempts END
FROM unnest($3::bigint[], $4::double precision[], $5::text[], $6::boolean[]) AS r (item_id, not_before, error, refund)
WHERE i.id = r.item_id AND i.batch_id = $1 AND i.state = 'submitted'

-- name: refund_batch
-- One statement, so that a repeat cannot give an attempt back twice.
UPDATE items SET state = 'queued', batch_id = NULL, attempts = GREATEST(attempts - 1, 0), not_before = $2,
    queued_at = GREATEST($3::double precision, $2::double precision), last_error = $4
WHERE batch_id = $1 AND state = 'submitted'

-- name: batch_item_ids
SELECT id FROM items WHERE batch_id = $1 ORDER BY id

-- == delivery ===================================================================================

-- name: sink_cursor
SELECT last_result_id FROM sink_cursors WHERE sink = $1

-- name: results_after
SELECT r.id, r.file_id, f.out_name, r.payload, r.created_at FROM results r JOIN files f ON f.id = r.file_id
WHERE r.id > $1 AND ($3::text IS NULL OR f.node = $3) ORDER BY r.id LIMIT $2

-- name: advance_cursor
INSERT INTO sink_cursors (sink, last_result_id) VALUES ($1, $2)
ON CONFLICT (sink) DO UPDATE SET last_result_id = GREATEST(sink_cursors.last_result_id, excluded.last_result_id)

-- name: set_cursor
INSERT INTO sink_cursors (sink, last_result_id) VALUES ($1, $2)
ON CONFLICT (sink) DO UPDATE SET last_result_id = excluded.last_result_id

-- name: park
INSERT INTO parked (sink, result_id, parked_at, error)
SELECT $1, result_id, $3, $4 FROM unnest($2::bigint[]) AS p (result_id)
ON CONFLICT (sink, result_id) DO UPDATE SET redeliver = false, error = excluded.error

-- name: to_redeliver
SELECT r.id, r.file_id, f.out_name, r.payload, r.created_at FROM results r JOIN files f ON f.id = r.file_id
WHERE r.id IN (SELECT result_id FROM parked WHERE sink = $1 AND redeliver) ORDER BY r.id LIMIT $2

-- name: unpark
DELETE FROM parked WHERE sink = $1 AND result_id = ANY($2::bigint[])

-- name: request_redelivery
UPDATE parked SET redeliver = true WHERE NOT redeliver AND ($1::text IS NULL OR sink = $1)

-- name: take_sink_lease
-- Taken when free or expired, renewed when ours; a live lease of another node is left alone.
INSERT INTO sink_leases (sink, owner, lease_until) VALUES ($1, $2, $4)
ON CONFLICT (sink) DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until
WHERE sink_leases.owner = excluded.owner OR sink_leases.lease_until < $3
RETURNING owner

-- name: files_delivered
UPDATE files f SET delivered = f.delivered + d.added, out_bytes = d.out_bytes
FROM unnest($1::bigint[], $2::integer[], $3::bigint[]) AS d (id, added, out_bytes)
WHERE f.id = d.id

-- name: open_files
SELECT * FROM files WHERE node = $1 AND state <> 'complete' ORDER BY id

-- name: file
SELECT * FROM files WHERE id = $1

-- name: files_by_id
SELECT * FROM files WHERE id = ANY($1::bigint[])

-- name: delivered_payloads
-- Results of the file its node's outbox has delivered (ids up to that outbox's cursor).
SELECT r.id, r.payload FROM results r
WHERE r.file_id = $1 AND r.id > $2
  AND r.id <= COALESCE((SELECT c.last_result_id FROM sink_cursors c JOIN files f ON c.sink = 'outbox:' || f.node
                        WHERE f.id = $1), 0)
ORDER BY r.id LIMIT $3

-- name: complete_file
-- Only an OPEN file: one whose ingest is unfinished is never completed.
UPDATE files SET state = 'complete', completed_at = $2 WHERE id = $1 AND state = 'open'

-- == reporting ==================================================================================

-- name: add_error
INSERT INTO errors (at, node, event, message) VALUES ($1, $2, $3, $4)

-- name: trim_errors
DELETE FROM errors WHERE id <= (SELECT MAX(id) FROM errors) - $1

-- name: report
-- Stored results since $1 and the totals of those retention pruned (by the hour they were made),
-- plus the duplicate costs (second answers, paid for, not results), stored and pruned, per $2.
SELECT key, SUM(requests)::bigint AS requests, SUM(succeeded)::bigint AS succeeded,
       SUM(input_tokens)::bigint AS input_tokens, SUM(cached_input_tokens)::bigint AS cached_input_tokens,
       SUM(output_tokens)::bigint AS output_tokens, SUM(cost_batch) AS cost_batch,
       SUM(cost_realtime) AS cost_realtime, SUM(unpriced)::bigint AS unpriced, SUM(cost_paid) AS cost_paid,
       SUM(fallback_requests)::bigint AS fallback_requests, SUM(fallback_cost) AS fallback_cost,
       SUM(deadlines_met)::bigint AS deadlines_met, SUM(deadlines_missed)::bigint AS deadlines_missed,
       SUM(duplicate_requests)::bigint AS duplicate_requests, SUM(duplicate_cost) AS duplicate_cost
FROM (
    SELECT CASE $2::text
               WHEN 'model' THEN COALESCE(r.model, '(invalid)')
               WHEN 'provider' THEN COALESCE(r.profile, '(invalid)')
               WHEN 'day' THEN to_char(to_timestamp(r.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')
               ELSE f.name
           END AS key,
           COUNT(*) AS requests,
           COUNT(*) FILTER (WHERE r.status = 'succeeded') AS succeeded,
           COALESCE(SUM(r.input_tokens), 0)::bigint AS input_tokens,
           COALESCE(SUM(r.cached_input_tokens), 0)::bigint AS cached_input_tokens,
           COALESCE(SUM(r.output_tokens), 0)::bigint AS output_tokens,
           SUM(r.cost_batch) AS cost_batch,
           SUM(r.cost_realtime) AS cost_realtime,
           COUNT(*) FILTER (WHERE r.cost_batch IS NULL AND r.input_tokens IS NOT NULL) AS unpriced,
           SUM(r.cost_paid) AS cost_paid,
           COUNT(*) FILTER (WHERE r.via = 'realtime') AS fallback_requests,
           SUM(r.cost_paid) FILTER (WHERE r.via = 'realtime') AS fallback_cost,
           COUNT(*) FILTER (WHERE r.created_at <= r.deadline) AS deadlines_met,
           COUNT(*) FILTER (WHERE r.created_at > r.deadline) AS deadlines_missed,
           0::bigint AS duplicate_requests,
           NULL::double precision AS duplicate_cost
    FROM results r JOIN files f ON f.id = r.file_id
    WHERE r.created_at >= $1
    GROUP BY 1
    UNION ALL
    SELECT CASE $2::text
               WHEN 'model' THEN COALESCE(t.model, '(invalid)')
               WHEN 'provider' THEN COALESCE(t.profile, '(invalid)')
               WHEN 'day' THEN to_char(to_timestamp(t.hour) AT TIME ZONE 'UTC', 'YYYY-MM-DD')
               ELSE t.file_name
           END,
           SUM(t.requests), COALESCE(SUM(t.requests) FILTER (WHERE t.status = 'succeeded'), 0), SUM(t.input_tokens),
           SUM(t.cached_input_tokens), SUM(t.output_tokens), SUM(t.cost_batch), SUM(t.cost_realtime),
           SUM(t.unpriced), SUM(t.cost_paid), SUM(t.fallback_requests), SUM(t.fallback_cost), SUM(t.deadlines_met),
           SUM(t.deadlines_missed), 0, NULL
    FROM result_totals t
    WHERE t.hour >= $1
    GROUP BY 1
    UNION ALL
    SELECT CASE $2::text
               WHEN 'model' THEN COALESCE(d.model, '(invalid)')
               WHEN 'provider' THEN COALESCE(d.profile, '(invalid)')
               WHEN 'day' THEN to_char(to_timestamp(d.created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')
               ELSE f.name
           END,
           0, 0, 0, 0, 0, NULL, NULL, 0, NULL, 0, NULL, 0, 0, COUNT(*), SUM(d.cost)
    FROM duplicate_costs d JOIN files f ON f.id = d.file_id
    WHERE d.created_at >= $1
    GROUP BY 1
    UNION ALL
    SELECT CASE $2::text
               WHEN 'model' THEN COALESCE(u.model, '(invalid)')
               WHEN 'provider' THEN COALESCE(u.profile, '(invalid)')
               WHEN 'day' THEN to_char(to_timestamp(u.hour) AT TIME ZONE 'UTC', 'YYYY-MM-DD')
               ELSE u.file_name
           END,
           0, 0, 0, 0, 0, NULL, NULL, 0, NULL, 0, NULL, 0, 0, SUM(u.requests), SUM(u.cost)
    FROM duplicate_totals u
    WHERE u.hour >= $1
    GROUP BY 1
) u
GROUP BY key ORDER BY key

-- name: query_results
SELECT f.name AS file, r.line, r.status, r.payload FROM results r JOIN files f ON f.id = r.file_id
WHERE ($1::text IS NULL OR f.name = $1)
  AND ($2::text IS NULL OR convert_from(r.payload, 'UTF8')::json ->> 'custom_id' = $2)
  AND ($3::text IS NULL OR r.status = $3)
ORDER BY r.id LIMIT $4

-- name: status_queue
-- Queued: the counts (migration 007_scale); batched and submitted: the items of live batches. Flat
-- however long the queue.
SELECT profile, endpoint, model, 'queued' AS state, SUM(n)::bigint AS n FROM (
    SELECT profile, endpoint, model, n FROM queued_counts
    UNION ALL
    SELECT profile, endpoint, model, n FROM queue_deltas
) AS counted GROUP BY profile, endpoint, model HAVING SUM(n) > 0
UNION ALL
-- A batch's items are its route's: counted per live batch and state through items_batch_state (007_scale).
SELECT profile, endpoint, model, state, SUM(n)::bigint AS n FROM (
    SELECT b.profile, b.endpoint, b.model, s.state,
        (SELECT COUNT(*) FROM items i WHERE i.batch_id = b.id AND i.state = s.state) AS n
    FROM batches b CROSS JOIN (VALUES ('batched'), ('submitted')) AS s (state)
    WHERE b.state IN ('pending', 'unverified', 'submitted')
) AS live GROUP BY profile, endpoint, model, state HAVING SUM(n) > 0

-- name: status_ended_batches
SELECT id, profile, model, remote_id, remote_status, fate, last_error, collected_at FROM batches
WHERE state = 'done' AND fate IS NOT NULL ORDER BY id DESC LIMIT 10

-- name: status_results
-- Every result ever made, pruned ones too (as the savings beside it count them).
SELECT status, SUM(n)::bigint AS n FROM (
    SELECT status, COUNT(*) AS n FROM results GROUP BY status
    UNION ALL
    SELECT status, SUM(requests) FROM result_totals GROUP BY status
) AS counted GROUP BY status

-- name: status_files
SELECT name, out_name, lines, delivered, state, node FROM files ORDER BY id DESC LIMIT 20

-- name: status_errors
SELECT at, event, message FROM errors ORDER BY id DESC LIMIT $1

-- name: status_holds
SELECT profile, model, until, reason FROM holds WHERE until > $1

-- name: status_sinks
-- An outbox cursor ('outbox:NODE') counts only its node's results.
SELECT c.sink,
       (SELECT COUNT(*) FROM results r JOIN files f ON f.id = r.file_id
        WHERE r.id > c.last_result_id AND (c.sink NOT LIKE 'outbox:%' OR f.node = substr(c.sink, 8))) AS pending,
       (SELECT COUNT(*) FROM parked p WHERE p.sink = c.sink) AS parked
FROM sink_cursors c ORDER BY c.sink

-- name: status_nodes
SELECT id, host, pid, started_at, lease_until, stopped_at FROM nodes ORDER BY id

-- Read models for /metrics (batchd/metrics.py): database-wide, cheap aggregates.

-- name: metrics_queue
-- Every queued item, held back or not: the counts (migration 007_scale), each group's oldest in one step.
WITH groups AS (
    SELECT profile, endpoint, model, SUM(n)::bigint AS n FROM (
        SELECT profile, endpoint, model, n FROM queued_counts
        UNION ALL
        SELECT profile, endpoint, model, n FROM queue_deltas
    ) AS counted GROUP BY profile, endpoint, model HAVING SUM(n) > 0
)
SELECT g.profile, g.endpoint, g.model, g.n AS queued, (
    SELECT MIN(i.queued_at) FROM items i
    WHERE i.state = 'queued' AND i.profile = g.profile AND i.endpoint = g.endpoint AND i.model = g.model
) AS oldest
FROM groups g

-- name: metrics_batches
-- Pruned batches (migration 008) still count: batchd_batches_finished_total is a counter.
SELECT profile, state, status, SUM(n)::bigint AS n FROM (
    SELECT profile, state, COALESCE(remote_status, state) AS status, COUNT(*) AS n FROM batches
    GROUP BY profile, state, COALESCE(remote_status, state)
    UNION ALL
    SELECT profile, 'done', label, value::bigint FROM metric_totals WHERE family = 'batches_finished'
) AS counted GROUP BY profile, state, status

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
) AS r GROUP BY COALESCE(profile, ''), COALESCE(model, ''), status

-- name: metrics_retries
-- Only retried items, through their partial index (migration 008), and what pruning folded.
SELECT profile, model, SUM(retries)::bigint AS retries FROM (
    SELECT profile, model, SUM(attempts - 1) AS retries FROM items WHERE attempts > 1 GROUP BY profile, model
    UNION ALL
    SELECT profile, model, value::bigint FROM metric_totals WHERE family = 'retries'
) AS counted GROUP BY profile, model

-- name: metrics_capacity
SELECT profile, model, COUNT(*) AS batches, COALESCE(SUM(tokens), 0) AS tokens,
    COALESCE(SUM(requests), 0) AS requests
FROM batches WHERE state IN ('pending', 'unverified', 'submitted') GROUP BY profile, model

-- name: metrics_turnaround
SELECT profile, model, collected_at - submitted_at AS seconds FROM batches
WHERE state = 'done' AND collected_at IS NOT NULL AND submitted_at IS NOT NULL

-- name: metrics_turnaround_pruned
-- Pruned batches' turnarounds: a count per (profile, bucket index, -1 for +Inf) and a sum per profile.
SELECT profile, family, NULLIF(label, '')::int AS bucket, value FROM metric_totals
WHERE family IN ('turnaround', 'turnaround_sum')

-- name: metrics_ingested
SELECT (SELECT COUNT(*) FROM files)
        + COALESCE((SELECT value FROM metric_totals WHERE family = 'ingested_files'), 0)::bigint AS files,
    (SELECT COALESCE(SUM(lines_committed), 0) FROM files)
        + COALESCE((SELECT value FROM metric_totals WHERE family = 'ingested_lines'), 0)::bigint AS lines

-- name: request_poll
UPDATE batches SET poll_requested_at = $2 WHERE id = $1 AND state IN ('unverified', 'submitted')

-- Issue 12: operator pauses, the batch listing, retention.

-- name: pause
INSERT INTO pauses (profile, model, paused_at, reason) VALUES ($1, $2, $3, $4)
ON CONFLICT (profile, model) DO UPDATE SET reason = COALESCE(EXCLUDED.reason, pauses.reason)

-- name: resume_route
DELETE FROM pauses WHERE profile = $1 AND model = $2

-- name: resume_all
DELETE FROM pauses

-- name: pauses
SELECT profile, model, paused_at, reason FROM pauses ORDER BY profile, model

-- name: recent_batches
SELECT * FROM batches ORDER BY id DESC LIMIT $1

-- name: prunable_files
SELECT f.id FROM files f
WHERE f.state = 'complete' AND f.completed_at < $1
    AND NOT EXISTS (SELECT 1 FROM items i WHERE i.file_id = f.id
                    AND i.state IN ('queued', 'batched', 'submitted', 'realtime'))
    AND NOT EXISTS (SELECT 1 FROM results r JOIN parked p ON p.result_id = r.id WHERE r.file_id = f.id)
    -- $3: the lowest cursor of the webhook sinks (NULL: none configured).
    AND ($3::bigint IS NULL OR NOT EXISTS (SELECT 1 FROM results r WHERE r.file_id = f.id AND r.id > $3))
    -- The rows holding the largest ids stay until newer ones exist: one contract with SQLite, which
    -- would hand such an id out again (sequences never do, but retention keeps to one rule).
    AND f.id <> (SELECT MAX(id) FROM files)
    AND NOT EXISTS (SELECT 1 FROM items i WHERE i.id = (SELECT MAX(id) FROM items) AND i.file_id = f.id)
    AND NOT EXISTS (SELECT 1 FROM results r WHERE r.id = (SELECT MAX(id) FROM results) AND r.file_id = f.id)
ORDER BY f.id LIMIT $2
FOR UPDATE OF f SKIP LOCKED

-- name: fold_totals
INSERT INTO result_totals (hour, profile, model, file_name, status, requests, input_tokens, cached_input_tokens,
    output_tokens, cost_batch, cost_realtime, unpriced, cost_paid, fallback_requests, fallback_cost, deadlines_met,
    deadlines_missed)
SELECT floor(r.created_at / 3600) * 3600, r.profile, r.model, f.name, r.status, COUNT(*),
    COALESCE(SUM(r.input_tokens), 0), COALESCE(SUM(r.cached_input_tokens), 0), COALESCE(SUM(r.output_tokens), 0),
    SUM(r.cost_batch), SUM(r.cost_realtime),
    COUNT(*) FILTER (WHERE r.cost_batch IS NULL AND r.input_tokens IS NOT NULL),
    SUM(r.cost_paid), COUNT(*) FILTER (WHERE r.via = 'realtime'), SUM(r.cost_paid) FILTER (WHERE r.via = 'realtime'),
    COUNT(*) FILTER (WHERE r.created_at <= r.deadline), COUNT(*) FILTER (WHERE r.created_at > r.deadline)
FROM results r JOIN files f ON f.id = r.file_id
WHERE r.file_id = ANY($1::bigint[])
GROUP BY 1, r.profile, r.model, f.name, r.status

-- name: fold_duplicates
INSERT INTO duplicate_totals (hour, profile, model, file_name, requests, input_tokens, output_tokens, cost)
SELECT floor(d.created_at / 3600) * 3600, d.profile, d.model, f.name, COUNT(*),
    COALESCE(SUM(d.input_tokens), 0), COALESCE(SUM(d.output_tokens), 0), SUM(d.cost)
FROM duplicate_costs d JOIN files f ON f.id = d.file_id
WHERE d.file_id = ANY($1::bigint[])
GROUP BY 1, d.profile, d.model, f.name

-- name: prune_duplicates
DELETE FROM duplicate_costs WHERE file_id = ANY($1::bigint[])

-- name: prune_results
DELETE FROM results WHERE file_id = ANY($1::bigint[])

-- name: fold_metric_files
-- What pruning these files takes from /metrics' counters (ingested files and lines, retries), kept.
INSERT INTO metric_totals (family, profile, model, label, value)
SELECT 'ingested_files', '', '', '', COUNT(*) FROM files WHERE id = ANY($1::bigint[])
UNION ALL
SELECT 'ingested_lines', '', '', '', COALESCE(SUM(lines_committed), 0) FROM files WHERE id = ANY($1::bigint[])
UNION ALL
SELECT 'retries', profile, model, '', SUM(attempts - 1) FROM items
WHERE file_id = ANY($1::bigint[]) AND attempts > 1 GROUP BY profile, model
ON CONFLICT (family, profile, model, label) DO UPDATE SET value = metric_totals.value + excluded.value

-- name: fold_metric_batches
-- What pruning these batches takes from /metrics: finished counts by status, turnaround buckets
-- ($2: the upper bounds; the index of the first bound >= seconds, -1 past the last).
INSERT INTO metric_totals (family, profile, model, label, value)
SELECT 'batches_finished', profile, '', COALESCE(remote_status, state), COUNT(*) FROM batches
WHERE id = ANY($1::bigint[]) GROUP BY profile, COALESCE(remote_status, state)
UNION ALL
SELECT 'turnaround', profile, '', bucket::text, COUNT(*) FROM (
    SELECT profile, COALESCE(
        (SELECT MIN(u.i) - 1 FROM unnest($2::float8[]) WITH ORDINALITY AS u(b, i)
         WHERE u.b >= GREATEST(collected_at - submitted_at, 0)), -1
    ) AS bucket
    FROM batches WHERE id = ANY($1::bigint[]) AND collected_at IS NOT NULL AND submitted_at IS NOT NULL
) AS timed GROUP BY profile, bucket
UNION ALL
SELECT 'turnaround_sum', profile, '', '', SUM(GREATEST(collected_at - submitted_at, 0)) FROM batches
WHERE id = ANY($1::bigint[]) AND collected_at IS NOT NULL AND submitted_at IS NOT NULL GROUP BY profile
ON CONFLICT (family, profile, model, label) DO UPDATE SET value = metric_totals.value + excluded.value

-- name: prune_items
DELETE FROM items WHERE file_id = ANY($1::bigint[])

-- name: prune_files
DELETE FROM files WHERE id = ANY($1::bigint[])

-- name: prunable_batches
SELECT b.id FROM batches b
WHERE b.state = 'done' AND COALESCE(b.collected_at, b.ended_at, b.created_at) < $1
    AND NOT EXISTS (SELECT 1 FROM items i WHERE i.batch_id = b.id)
    AND b.id <> (SELECT MAX(id) FROM batches)  -- as prunable_files
ORDER BY b.id LIMIT $2
FOR UPDATE OF b SKIP LOCKED

-- name: prune_batch_rejects
DELETE FROM batch_rejects WHERE batch_id = ANY($1::bigint[])

-- name: prune_batches
DELETE FROM batches WHERE id = ANY($1::bigint[])

-- Issue 12: `batchd cancel`: intents written by the command, carried out by the batch's lease holder.

-- name: note_cancel_reason
UPDATE batches SET cancel_reason = COALESCE(cancel_reason, $2) WHERE id = $1

-- name: request_cancel
-- OPERATOR (every request ends canceled) outranks FILE (only a cancelled file's requests do).
-- poll_requested_at wakes the lease holder's poller at its next lease renewal.
UPDATE batches SET cancel_wanted_at = COALESCE(cancel_wanted_at, $3),
    cancel_reason = CASE WHEN cancel_reason = 'operator' THEN 'operator' ELSE $2 END,
    poll_requested_at = $3
WHERE id = $1 AND state IN ('pending', 'unverified', 'submitted')

-- name: canceled_files
SELECT DISTINCT i.file_id FROM items i JOIN files f ON f.id = i.file_id
WHERE i.batch_id = $1 AND f.canceled_at IS NOT NULL

-- name: batched_items
SELECT id, file_id, line, custom_id, attempts, state, deadline FROM items
WHERE batch_id = $1 AND state = 'batched' ORDER BY id

-- name: lock_pending_batch
-- The CAS of drop_pending: the batch, locked, while it is still pending.
SELECT id FROM batches WHERE id = $1 AND state = 'pending' FOR UPDATE

-- name: unclaim_batched
UPDATE items SET state = 'queued', batch_id = NULL WHERE batch_id = $1 AND state = 'batched'

-- name: canceled_with_queued
-- Few files are ever cancelled: their rows first, then one probe of each one's items.
SELECT f.id FROM files f
WHERE f.canceled_at IS NOT NULL AND f.state <> 'complete'
    AND EXISTS (SELECT 1 FROM items i WHERE i.file_id = f.id AND i.state IN ('queued', 'realtime'))
ORDER BY f.id

-- name: files_named
SELECT * FROM files WHERE name = $1 ORDER BY id

-- name: queued_items
-- Not in a batch: queued, or waiting for the real-time fallback.
SELECT id, file_id, line, custom_id, attempts FROM items WHERE file_id = $1 AND state IN ('queued', 'realtime')
ORDER BY id

-- name: mark_file_canceled
UPDATE files SET canceled_at = COALESCE(canceled_at, $2) WHERE id = $1

-- name: finish_unsent
-- Items among these that were never sent and are still in one of the states $1 (queued or waiting
-- for the real-time fallback: a cancelled file's, $7; batched: an intent cancelled before its create,
-- $6) take their result; their bodies go. The caller holds results_lock.
WITH f AS (
    SELECT * FROM unnest($2::bigint[], $3::text[], $4::bytea[]) AS f (item_id, status, payload)
), done AS (
    UPDATE items i SET state = CASE WHEN f.status IN ('succeeded', 'errored', 'expired', 'canceled')
                                    THEN f.status ELSE 'errored' END
    FROM f
    WHERE i.id = f.item_id AND i.state = ANY($1::text[])
        AND ($6::bigint IS NULL OR i.batch_id = $6) AND ($7::bigint IS NULL OR i.file_id = $7)
    RETURNING i.id, i.file_id, i.line, i.profile, i.model
), bodies AS (
    DELETE FROM item_bodies WHERE item_id IN (SELECT id FROM done)
), inserted AS (
    INSERT INTO results (file_id, line, item_id, status, profile, model, batch_id, payload, created_at)
    SELECT done.file_id, done.line, done.id, f.status, done.profile, done.model, NULL, f.payload, $5
    FROM done JOIN f ON f.item_id = done.id
    ORDER BY done.id
    ON CONFLICT (file_id, line) DO NOTHING
)
SELECT COUNT(*) FROM done

-- name: file_live_batches
SELECT DISTINCT batch_id FROM items
WHERE file_id = $1 AND state IN ('batched', 'submitted') AND batch_id IS NOT NULL ORDER BY batch_id

-- name: file_items
SELECT id, line, custom_id, state, profile, endpoint, model, deadline, fallback_at, tokens, inputs FROM items
WHERE file_id = $1 ORDER BY line

-- Issue 11: the real-time fallback. Due items are found through the partial index items_fallback
-- (each WHERE implies its predicate), never by a scan of the queue.

-- name: fallback_take_queued
-- This node's queued requests whose deadline (less its lead) has come go to the fallback.
UPDATE items SET state = 'realtime'
WHERE fallback_at <= $1 AND state = 'queued' AND file_id IN (SELECT id FROM files WHERE node = $2)

-- name: fallback_cancel_batches
-- Live batches holding a due request, not cancelled for any reason yet: cancel them for the fallback.
UPDATE batches SET cancel_wanted_at = COALESCE(cancel_wanted_at, $1), cancel_reason = 'deadline',
    poll_requested_at = $1
WHERE state IN ('pending', 'unverified', 'submitted') AND cancel_reason IS NULL
    AND id IN (SELECT i.batch_id FROM items i WHERE i.fallback_at <= $1 AND i.state IN ('batched', 'submitted'))
RETURNING id

-- name: next_fallback_at
SELECT MIN(fallback_at) FROM items WHERE fallback_at > $1 AND state IN ('queued', 'batched', 'submitted')

-- name: hand_over
UPDATE items SET state = 'realtime' WHERE batch_id = $1 AND state = 'submitted' AND deadline IS NOT NULL

-- name: realtime_items
SELECT i.id, i.file_id, i.line, i.custom_id, i.profile, i.endpoint, i.model, b.body, i.tokens, i.deadline, i.batch_id
FROM items i JOIN files f ON f.id = i.file_id JOIN item_bodies b ON b.item_id = i.id
WHERE i.state = 'realtime' AND f.node = $1 AND NOT (i.id = ANY($2::bigint[]))
ORDER BY i.deadline, i.id LIMIT $3

-- name: record_realtime
-- The fallback's answers for items still REALTIME: final state, result (no batch), bodies gone. The
-- caller holds results_lock.
WITH f AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::bytea[], $4::bigint[], $5::bigint[], $6::bigint[],
                         $7::bigint[], $8::double precision[], $9::double precision[], $10::text[],
                         $11::double precision[])
        AS f (item_id, status, payload, input_tokens, output_tokens, cached_input_tokens,
              cache_creation_input_tokens, cost_batch, cost_realtime, via, cost_paid)
), done AS (
    UPDATE items i SET state = CASE WHEN f.status IN ('succeeded', 'errored', 'expired', 'canceled')
                                    THEN f.status ELSE 'errored' END
    FROM f
    WHERE i.id = f.item_id AND i.state = 'realtime'
    RETURNING i.id, i.file_id, i.line, i.deadline, i.profile, i.model
), bodies AS (
    DELETE FROM item_bodies WHERE item_id IN (SELECT id FROM done)
), inserted AS (
    INSERT INTO results (file_id, line, item_id, status, profile, model, batch_id, input_tokens, output_tokens,
                         cached_input_tokens, cache_creation_input_tokens, cost_batch, cost_realtime, payload,
                         created_at, via, cost_paid, deadline)
    SELECT done.file_id, done.line, done.id, f.status, done.profile, done.model, NULL, f.input_tokens,
           f.output_tokens, f.cached_input_tokens, f.cache_creation_input_tokens, f.cost_batch, f.cost_realtime,
           f.payload, $12, f.via, f.cost_paid, done.deadline
    FROM done JOIN f ON f.item_id = done.id
    ORDER BY done.id
    ON CONFLICT (file_id, line) DO NOTHING
)
SELECT COUNT(*) FROM done

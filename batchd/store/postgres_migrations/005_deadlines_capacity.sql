-- Issue 11 (SQLite: 012): deadlines with a real-time fallback, capacity gating, forced flushes.
--
-- items.deadline: when the request's result must exist (unix time; NULL: none). fallback_at is
-- the deadline less the route's deadline_lead, fixed at ingest: from then on a request with no
-- result leaves its batch (cancelled at the provider) or the queue for the real-time API.
-- items.inputs: the inputs an embeddings request carries (OpenAI allows 50,000 per batch).
-- State 'realtime': handed to the real-time fallback, no final result yet.
ALTER TABLE items ADD COLUMN deadline double precision;
ALTER TABLE items ADD COLUMN fallback_at double precision;
ALTER TABLE items ADD COLUMN inputs integer NOT NULL DEFAULT 1;
CREATE INDEX items_fallback ON items (fallback_at) WHERE fallback_at IS NOT NULL AND state IN ('queued', 'batched', 'submitted', 'realtime');
ALTER TABLE batches ADD COLUMN inputs bigint NOT NULL DEFAULT 0;

-- A file's per-file options from its NAME.meta.json sidecar (JSON), and the deadline it gave.
ALTER TABLE files ADD COLUMN options text;
ALTER TABLE files ADD COLUMN deadline double precision;

-- How a result was served ('batch' or 'realtime'), what was actually paid for it, and the
-- deadline it had (for deadlines met / missed in the report, which survive the items' pruning).
ALTER TABLE results ADD COLUMN via text NOT NULL DEFAULT 'batch';
ALTER TABLE results ADD COLUMN cost_paid double precision;
ALTER TABLE results ADD COLUMN deadline double precision;
UPDATE results SET cost_paid = cost_batch;

-- The report's totals of pruned results keep the fallback and deadline figures too.
ALTER TABLE result_totals ADD COLUMN fallback_requests bigint NOT NULL DEFAULT 0;
ALTER TABLE result_totals ADD COLUMN cost_paid double precision;
ALTER TABLE result_totals ADD COLUMN deadlines_met bigint NOT NULL DEFAULT 0;
ALTER TABLE result_totals ADD COLUMN deadlines_missed bigint NOT NULL DEFAULT 0;
UPDATE result_totals SET cost_paid = cost_batch;

-- A second final answer for a request that already had one (a cancelled batch's late result
-- after the real-time fallback, or the other way round): not a result line, but paid for.
CREATE TABLE duplicate_costs (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    item_id bigint NOT NULL,
    file_id bigint NOT NULL,
    line bigint NOT NULL,
    profile text,
    model text,
    batch_id bigint,
    via text NOT NULL,
    input_tokens bigint,
    output_tokens bigint,
    cost double precision,
    created_at double precision NOT NULL
);
CREATE INDEX duplicate_costs_created ON duplicate_costs (created_at);

-- Enqueued-token limits learned from token_limit_exceeded, per (profile, model): only ever lower
-- than the declared limit (capacity.lowered_limit).
CREATE TABLE learned_limits (
    profile text NOT NULL,
    model text NOT NULL,
    tokens bigint NOT NULL,
    learned_at double precision NOT NULL,
    PRIMARY KEY (profile, model)
);

-- `batchd flush [ROUTE]`: an intent the batcher carries out at its next pass ('*': every route).
CREATE TABLE flush_requests (
    route text PRIMARY KEY,
    requested_at double precision NOT NULL
);

-- cancel_reason 'deadline' meant "still running past its window + grace" until now: that is 'expiry';
-- 'deadline' now means cancelled for the real-time fallback.
UPDATE batches SET cancel_reason = 'expiry' WHERE cancel_reason = 'deadline';

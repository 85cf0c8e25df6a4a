-- The whole batchd schema at the level of store/contract.py, for PostgreSQL.
-- Applied by PostgresStore.migrate() in one transaction under pg_advisory_lock, recorded in
-- schema_version. Times are epoch seconds (double precision) like the SQLite engine's, taken from
-- the callers' clocks; leases compare with the `now` a caller passes.
-- States are text rather than enum types: a new enum value cannot be used in the migration that adds it.

CREATE TABLE schema_version (
    version integer PRIMARY KEY,
    applied_at double precision NOT NULL,
    node text
);

-- 'instance': one id per database, shared by every node; provider custom_ids carry it.
CREATE TABLE meta (
    key text PRIMARY KEY,
    value text NOT NULL
);

-- Daemons sharing this database; lease_until is their heartbeat (renew_leases).
CREATE TABLE nodes (
    id text PRIMARY KEY,
    host text NOT NULL,
    pid integer NOT NULL,
    started_at double precision NOT NULL,
    lease_until double precision NOT NULL DEFAULT 0,
    stopped_at double precision
);

-- Spool files, owned by the node that ingested them. Chunked ingest: lines 1..lines_committed
-- are in the store; the outbox never completes a file still INGESTING.
CREATE TABLE files (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    node text NOT NULL,
    name text NOT NULL,
    sha256 text NOT NULL,
    size bigint NOT NULL,
    dev bigint,
    ino bigint,
    out_name text NOT NULL,
    state text NOT NULL DEFAULT 'ingesting' CHECK (state IN ('ingesting', 'open', 'complete')),
    lines_committed integer NOT NULL DEFAULT 0,
    offset_committed bigint NOT NULL DEFAULT 0,
    lines integer NOT NULL DEFAULT 0,
    delivered integer NOT NULL DEFAULT 0,       -- result lines durably in the outbox
    out_bytes bigint NOT NULL DEFAULT 0,        -- durable length of the outbox .part
    ingested_at double precision NOT NULL,
    finished_at double precision,
    moved_at double precision,
    completed_at double precision,
    UNIQUE (node, out_name)
);
CREATE INDEX files_identity ON files (node, name, sha256, ino) WHERE moved_at IS NULL;
CREATE INDEX files_unfinished ON files (node, id) WHERE state <> 'complete';

-- Provider batches. `state` is ours, `remote_status` the provider's. owner/lease_until: the node
-- that polls and collects it; an expired lease may be taken by any node (take_over).
CREATE TABLE batches (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    profile text NOT NULL,
    kind text NOT NULL,
    endpoint text NOT NULL,
    model text NOT NULL,
    state text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'unverified', 'submitted', 'done')),
    fate text,
    owner text,
    lease_until double precision NOT NULL DEFAULT 0,
    remote_id text UNIQUE,
    remote_status text,
    input_file_id text,
    output_file_id text,
    error_file_id text,
    requests integer NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    tokens bigint NOT NULL DEFAULT 0,           -- estimated enqueued tokens of its requests
    counts text,                                -- the provider's request counts, JSON
    created_at double precision NOT NULL,
    submitted_at double precision,
    remote_created_at double precision,
    cancel_requested_at double precision,
    ended_at double precision,
    collected_at double precision,
    last_polled_at double precision,
    submit_attempts integer NOT NULL DEFAULT 0,
    not_before double precision NOT NULL DEFAULT 0,
    last_error text
);
CREATE INDEX batches_live ON batches (id) WHERE state IN ('pending', 'unverified', 'submitted');
CREATE INDEX batches_owner ON batches (owner) WHERE state IN ('pending', 'unverified', 'submitted');
CREATE INDEX batches_profile_created ON batches (profile, created_at);

-- Remote batches proven not to belong to a local intent; reconciliation never offers them again.
CREATE TABLE batch_rejects (
    batch_id bigint NOT NULL REFERENCES batches (id),
    remote_id text NOT NULL,
    rejected_at double precision NOT NULL,
    reason text NOT NULL,
    PRIMARY KEY (batch_id, remote_id)
);

-- One row per valid request line.
CREATE TABLE items (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file_id bigint NOT NULL REFERENCES files (id),
    line integer NOT NULL,
    custom_id text NOT NULL,
    profile text NOT NULL,
    endpoint text NOT NULL,
    model text NOT NULL,
    size integer NOT NULL,
    tokens bigint NOT NULL DEFAULT 0,
    state text NOT NULL DEFAULT 'queued',
    attempts integer NOT NULL DEFAULT 0,
    batch_id bigint REFERENCES batches (id),
    queued_at double precision NOT NULL,
    not_before double precision NOT NULL DEFAULT 0,
    last_error text,
    UNIQUE (file_id, line),
    UNIQUE (file_id, custom_id)
);
CREATE INDEX items_queue ON items (profile, endpoint, model, id) WHERE state = 'queued';
CREATE INDEX items_batch ON items (batch_id, id) WHERE batch_id IS NOT NULL;

-- Request bodies apart from the item rows, so state changes rewrite small rows; dropped once final.
CREATE TABLE item_bodies (
    item_id bigint PRIMARY KEY REFERENCES items (id) ON DELETE CASCADE,
    body bytea NOT NULL
);

-- One row per line of an accepted file. Every transaction that inserts here first takes
-- pg_advisory_xact_lock(results key), so ids become visible in commit order (cursors never skip).
CREATE TABLE results (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    file_id bigint NOT NULL REFERENCES files (id),
    line integer NOT NULL,
    item_id bigint,
    status text NOT NULL,
    profile text,
    model text,
    batch_id bigint,
    input_tokens bigint,
    output_tokens bigint,
    cached_input_tokens bigint,
    cache_creation_input_tokens bigint,
    cost_batch double precision,
    cost_realtime double precision,
    payload bytea NOT NULL,
    created_at double precision NOT NULL,
    UNIQUE (file_id, line)
);
CREATE INDEX results_file ON results (file_id, id);
CREATE INDEX results_created ON results (created_at);

-- How far each sink has delivered, by result id ('outbox:NODE' per node; webhook sinks by name).
CREATE TABLE sink_cursors (
    sink text PRIMARY KEY,
    last_result_id bigint NOT NULL
);

-- Which node delivers a shared (webhook) sink, until when.
CREATE TABLE sink_leases (
    sink text PRIMARY KEY,
    owner text NOT NULL,
    lease_until double precision NOT NULL
);

-- Results a sink gave up on; `batchd redeliver` sets redeliver.
CREATE TABLE parked (
    sink text NOT NULL,
    result_id bigint NOT NULL REFERENCES results (id),
    parked_at double precision NOT NULL,
    error text NOT NULL,
    redeliver boolean NOT NULL DEFAULT false,
    PRIMARY KEY (sink, result_id)
);

-- Submissions held back for a (profile, model), shared by every node.
CREATE TABLE holds (
    profile text NOT NULL,
    model text NOT NULL,
    until double precision NOT NULL,
    failures integer NOT NULL DEFAULT 1,
    reason text,
    PRIMARY KEY (profile, model)
);

-- Recent errors for `batchd status`; the engine keeps the newest 200.
CREATE TABLE errors (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at double precision NOT NULL,
    node text,
    event text NOT NULL,
    message text NOT NULL
);

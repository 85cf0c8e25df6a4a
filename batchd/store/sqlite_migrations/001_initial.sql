-- Files taken from spool/new/, one row per (name, content).
CREATE TABLE files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    out_name TEXT NOT NULL,
    lines INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,      -- result lines durably in the outbox
    out_bytes INTEGER NOT NULL DEFAULT 0,      -- durable length of the outbox .part file
    state TEXT NOT NULL DEFAULT 'open',        -- open | complete
    ingested_at REAL NOT NULL,
    completed_at REAL,
    UNIQUE (name, sha256)
);

-- One row per valid request line.
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id),
    line INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    profile TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    body BLOB NOT NULL,
    size INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',      -- queued | batched | submitted | succeeded | errored | expired | canceled
    attempts INTEGER NOT NULL DEFAULT 0,
    batch_id INTEGER REFERENCES batches(id),
    queued_at REAL NOT NULL,
    not_before REAL NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE INDEX items_queue ON items (state, profile, endpoint, model, id);
CREATE INDEX items_batch ON items (batch_id);
CREATE INDEX items_file_custom_id ON items (file_id, custom_id);

-- Provider batches. `state` is ours; `remote_status` is the provider's, kept apart.
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    profile TEXT NOT NULL,
    kind TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',     -- pending | submitted | done
    remote_id TEXT UNIQUE,
    remote_status TEXT,
    input_file_id TEXT,
    output_file_id TEXT,
    error_file_id TEXT,
    requests INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    counts TEXT,
    created_at REAL NOT NULL,
    submitted_at REAL,
    ended_at REAL,
    collected_at REAL,
    submit_attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    last_polled_at REAL,
    last_error TEXT
);
CREATE INDEX batches_state ON batches (state);

-- One row per line of an accepted file, in delivery order.
CREATE TABLE results (
    id INTEGER PRIMARY KEY,
    file_id INTEGER NOT NULL REFERENCES files(id),
    line INTEGER NOT NULL,
    item_id INTEGER,
    status TEXT NOT NULL,
    profile TEXT,
    model TEXT,
    batch_id INTEGER,
    input_tokens INTEGER,
    output_tokens INTEGER,
    cached_input_tokens INTEGER,
    payload BLOB NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (file_id, line)
);

-- How far each sink has delivered, by result id.
CREATE TABLE sink_cursors (
    sink TEXT PRIMARY KEY,
    last_result_id INTEGER NOT NULL
);

-- Submissions held back for a (profile, model), e.g. after token_limit_exceeded.
CREATE TABLE holds (
    profile TEXT NOT NULL,
    model TEXT NOT NULL,
    until REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 1,
    reason TEXT,
    PRIMARY KEY (profile, model)
);

-- Recent errors, for `batchd status`.
CREATE TABLE errors (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    event TEXT NOT NULL,
    message TEXT NOT NULL
);

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

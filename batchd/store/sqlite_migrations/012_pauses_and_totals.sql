-- Issue 12: operator pauses and the report totals of pruned rows.
--
-- `batchd pause [ROUTE]`: submission of queued work matching (profile, model) waits until
-- `batchd resume`; '*' matches any profile or model. Kept apart from holds, which are the daemon's
-- own (token-limit backoff) and which a successful batch releases.
CREATE TABLE pauses (
    profile TEXT NOT NULL,
    model TEXT NOT NULL,
    paused_at REAL NOT NULL,
    reason TEXT,
    PRIMARY KEY (profile, model)
);
-- What retention pruned, folded per (UTC hour, profile, model, file, status) in the transaction
-- that deleted the rows, so `batchd report` counts them still. Several rows may share a key.
CREATE TABLE result_totals (
    hour REAL NOT NULL,
    profile TEXT,
    model TEXT,
    file_name TEXT NOT NULL,
    status TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost_batch REAL,
    cost_realtime REAL,
    unpriced INTEGER NOT NULL
);
CREATE INDEX result_totals_hour ON result_totals (hour);
CREATE INDEX files_completed ON files (state, completed_at);

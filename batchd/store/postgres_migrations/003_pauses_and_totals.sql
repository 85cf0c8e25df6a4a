-- Issue 12 (SQLite: 012): operator pauses and the report totals of pruned rows.
--
-- `batchd pause [ROUTE]`: submission of queued work matching (profile, model) waits until
-- `batchd resume`; '*' matches any profile or model. Kept apart from holds, which are the daemon's
-- own (token-limit backoff) and which a successful batch releases.
CREATE TABLE pauses (
    profile text NOT NULL,
    model text NOT NULL,
    paused_at double precision NOT NULL,
    reason text,
    PRIMARY KEY (profile, model)
);
-- What retention pruned, folded per (UTC hour, profile, model, file, status) in the transaction
-- that deleted the rows, so `batchd report` counts them still. Several rows may share a key.
CREATE TABLE result_totals (
    hour double precision NOT NULL,
    profile text,
    model text,
    file_name text NOT NULL,
    status text NOT NULL,
    requests bigint NOT NULL,
    input_tokens bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    cost_batch double precision,
    cost_realtime double precision,
    unpriced bigint NOT NULL
);
CREATE INDEX result_totals_hour ON result_totals (hour);
CREATE INDEX files_completed ON files (state, completed_at);

-- Issue 11, the real-time fallback (helper tag "fallback"; the lead renumbers at merge).
--
-- A duplicate cost is recorded once per (item, how it was served, batch): a batch collected again
-- after a crash, or a realtime answer recorded twice, never counts its cost twice.
CREATE UNIQUE INDEX duplicate_costs_once ON duplicate_costs (item_id, via, COALESCE(batch_id, 0));

-- What retention pruned of duplicate_costs, folded per (UTC hour, profile, model, file) in the
-- transaction that deleted the rows, so `batchd report` counts them still. Several rows may share a key.
CREATE TABLE duplicate_totals (
    hour REAL NOT NULL,
    profile TEXT,
    model TEXT,
    file_name TEXT NOT NULL,
    requests INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cost REAL
);
CREATE INDEX duplicate_totals_hour ON duplicate_totals (hour);
CREATE INDEX duplicate_costs_file ON duplicate_costs (file_id);

-- What the fallback paid for the pruned results (result_totals.cost_paid is every result's).
ALTER TABLE result_totals ADD COLUMN fallback_cost REAL;

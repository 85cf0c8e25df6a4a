-- Issue 12: /metrics counters never go down when retention prunes the rows they are counted from.
--
-- What a prune deletes is folded here first, in the same transaction, per family and label:
-- ingested_files / ingested_lines (files), retries per (profile, model) (items), batches_finished
-- per (profile, final status) and turnaround per (profile, bucket index, -1 for +Inf) with
-- turnaround_sum per profile (batches). /metrics adds these to what is still in the tables.
CREATE TABLE metric_totals (
    family TEXT NOT NULL,
    profile TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    label TEXT NOT NULL DEFAULT '',
    value REAL NOT NULL,
    PRIMARY KEY (family, profile, model, label)
);

-- batchd_retries_total reads only the retried items, not the whole queue (a 10M-item scan).
CREATE INDEX items_retried ON items (profile, model, attempts) WHERE attempts > 1;

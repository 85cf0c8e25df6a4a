-- Issue 12: /metrics counters never go down when retention prunes the rows they are counted from
-- (SQLite: 015). What a prune deletes is folded here first, in the same transaction: ingested_files /
-- ingested_lines, retries per (profile, model), batches_finished per (profile, final status),
-- turnaround per (profile, bucket index, -1 for +Inf) and turnaround_sum per profile.
CREATE TABLE metric_totals (
    family text NOT NULL,
    profile text NOT NULL DEFAULT '',
    model text NOT NULL DEFAULT '',
    label text NOT NULL DEFAULT '',
    value double precision NOT NULL,
    PRIMARY KEY (family, profile, model, label)
);

-- batchd_retries_total reads only the retried items, not the whole queue.
CREATE INDEX items_retried ON items (profile, model, attempts) WHERE attempts > 1;

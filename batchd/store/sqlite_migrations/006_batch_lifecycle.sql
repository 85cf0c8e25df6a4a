-- Batch life cycle (issue 9). batches.state is now one of:
--   pending     an intent: no remote batch known (created, or to be reconciled)
--   unverified  an Anthropic batch adopted by reconciliation, not yet proven ours: its results are
--               checked (every custom_id carries our instance and an item of this batch) before
--               any is applied; a stranger's batch goes back to pending
--   submitted   a remote batch that is ours (created by us, or adopted with proof)
--   done        collected, or ended in a defined way (fate says how)
ALTER TABLE batches ADD COLUMN remote_created_at REAL;
ALTER TABLE batches ADD COLUMN cancel_requested_at REAL;
-- How a batch ended when it did not end normally: vanished | output_unavailable | overdue_cancelled | ...
ALTER TABLE batches ADD COLUMN fate TEXT;
-- Remote batches proven not to belong to a local intent; reconciliation never offers them again.
CREATE TABLE batch_rejects (
    batch_id INTEGER NOT NULL REFERENCES batches(id),
    remote_id TEXT NOT NULL,
    rejected_at REAL NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (batch_id, remote_id)
);

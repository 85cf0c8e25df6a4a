-- Issue 12: `batchd cancel BATCH|--file NAME`, an intent the daemon carries out.
--
-- The command records what the operator wants (cancel_wanted_at, and a file's canceled_at); the
-- node holding the batch's lease (it alone has the API keys) cancels it at the provider and then
-- sets cancel_requested_at, as it does for a batch overdue past its window. cancel_reason says
-- why a batch was cancelled: operator (`cancel BATCH`: all its requests end canceled), file
-- (`cancel --file`: only the cancelled files' requests end canceled, the rest are requeued) or
-- deadline (still running past its window + grace: unfinished requests are requeued).
ALTER TABLE batches ADD COLUMN cancel_reason TEXT;
ALTER TABLE batches ADD COLUMN cancel_wanted_at REAL;
ALTER TABLE files ADD COLUMN canceled_at REAL;
UPDATE batches SET cancel_reason = 'deadline' WHERE cancel_requested_at IS NOT NULL;

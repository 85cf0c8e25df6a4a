-- A webhook received by a node that does not hold the batch's lease asks the lease holder to poll it now.
ALTER TABLE batches ADD COLUMN poll_requested_at REAL;

-- Issue 10: one store contract, several nodes (daemons) per store, chunked ingest, batch leases.
--
-- Files: ingest commits in chunks. state is now ingesting | open | complete; lines_committed and
-- offset_committed say how far the chunks got, so a restart resumes after the last committed line.
-- Every file belongs to the node that ingested it (its spool, its out/, its outbox cursor).
-- Rows from before this migration were wholly ingested: lines_committed = lines, the whole file is
-- committed, and node = '' until the first node that opens the database claims them (open()).
ALTER TABLE files ADD COLUMN node TEXT NOT NULL DEFAULT '';
ALTER TABLE files ADD COLUMN lines_committed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE files ADD COLUMN offset_committed INTEGER NOT NULL DEFAULT 0;
UPDATE files SET lines_committed = lines, offset_committed = size;
-- Results names and file identity are per node: nightly.jsonl in two spools never collide.
DROP INDEX files_out_name;
CREATE UNIQUE INDEX files_out_name ON files (node, out_name);
DROP INDEX files_identity;
CREATE INDEX files_identity ON files (node, name, sha256);
-- A custom_id is queued once per file: chunks dedupe against each other, this is the backstop.
DROP INDEX items_file_custom_id;
CREATE UNIQUE INDEX items_file_custom_id ON items (file_id, custom_id);
-- Estimated enqueued tokens per request, summed per batch for the organisation limits.
ALTER TABLE items ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE batches ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
-- Each live batch is polled by one node at a time, under a lease that expires. Batches from before
-- this migration have no owner: an expired lease, taken by the first node that looks (take_over).
ALTER TABLE batches ADD COLUMN owner TEXT;
ALTER TABLE batches ADD COLUMN lease_until REAL NOT NULL DEFAULT 0;
CREATE INDEX batches_owner ON batches (owner, state);
-- The daemons sharing this store, with their last heartbeat (renew_leases).
CREATE TABLE nodes (
    node TEXT PRIMARY KEY,
    heartbeat_at REAL NOT NULL,
    started_at REAL NOT NULL,
    pid INTEGER,
    host TEXT
);
-- Webhook sinks are delivered by whichever node holds their lease.
CREATE TABLE sink_leases (
    sink TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    until REAL NOT NULL
);
-- results_after per node joins files; the outbox rebuild reads one file's results in id order.
CREATE INDEX results_file_id ON results (file_id, id)

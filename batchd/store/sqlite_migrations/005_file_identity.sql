-- File identity: a spool file is known by (name, sha256, inode, moved out of new/), not by
-- (name, sha256) alone, so the same name and content dropped again later is new work with its own
-- results, while re-reading the same inode after a crash (row present, not yet moved) stays
-- idempotent. out_name is unique: two files never share a results file.
-- SQLite cannot drop a table constraint, so the table is rebuilt (the runner turns foreign keys
-- off around migrations and checks them before committing).
CREATE TABLE files_new (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    out_name TEXT NOT NULL,
    lines INTEGER NOT NULL DEFAULT 0,
    delivered INTEGER NOT NULL DEFAULT 0,
    out_bytes INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'open',
    ingested_at REAL NOT NULL,
    completed_at REAL,
    dev INTEGER,
    ino INTEGER,
    moved_at REAL
);
-- Rows from before this migration have no inode: they count as moved out of new/ (a re-drop of
-- such a file is new work rather than silently matched).
INSERT INTO files_new (
    id, name, sha256, size, out_name, lines, delivered, out_bytes, state, ingested_at, completed_at, moved_at
) SELECT id, name, sha256, size, out_name, lines, delivered, out_bytes, state, ingested_at, completed_at, ingested_at
FROM files;
DROP TABLE files;
ALTER TABLE files_new RENAME TO files;
-- The old fallback name could repeat another file's results name: later holders get their own.
UPDATE files SET out_name = substr(out_name, 1, length(out_name) - length('.results.jsonl'))
    || '.migrated-' || id || '.results.jsonl'
WHERE id NOT IN (SELECT MIN(id) FROM files GROUP BY out_name);
CREATE UNIQUE INDEX files_out_name ON files (out_name);
CREATE INDEX files_identity ON files (name, sha256)

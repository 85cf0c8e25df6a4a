-- Request bodies in their own table: state changes then rewrite small item rows, not the
-- request bytes (a batch's bodies went through the WAL twice more, on claim and on submit).
CREATE TABLE item_bodies (
    item_id INTEGER PRIMARY KEY,
    body BLOB NOT NULL
);
INSERT INTO item_bodies (item_id, body) SELECT id, body FROM items WHERE length(body) > 0;
ALTER TABLE items DROP COLUMN body;

-- Items per route and state, kept by triggers, so that `batchd status` reads a few rows instead of
-- counting the queue: a COUNT over the queue index grows with the queue (about 2 s at 10M items).
-- A migration that rebuilds `items` must create these triggers again.
-- (The migration runner splits scripts at a semicolon that ends a line: inside a trigger body, a
-- statement's semicolon is followed by the next statement or END on the same line.)
CREATE TABLE item_counts (
    profile TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    n INTEGER NOT NULL,
    PRIMARY KEY (profile, endpoint, model, state)
) WITHOUT ROWID;

INSERT INTO item_counts (profile, endpoint, model, state, n)
SELECT profile, endpoint, model, state, COUNT(*) FROM items GROUP BY profile, endpoint, model, state;

CREATE TRIGGER item_counts_insert AFTER INSERT ON items
BEGIN
    INSERT INTO item_counts (profile, endpoint, model, state, n)
    VALUES (new.profile, new.endpoint, new.model, new.state, 1)
    ON CONFLICT (profile, endpoint, model, state) DO UPDATE SET n = n + 1; END;

CREATE TRIGGER item_counts_update AFTER UPDATE OF state, profile, endpoint, model ON items
WHEN old.state IS NOT new.state OR old.profile IS NOT new.profile OR old.endpoint IS NOT new.endpoint
    OR old.model IS NOT new.model
BEGIN
    UPDATE item_counts SET n = n - 1
    WHERE profile = old.profile AND endpoint = old.endpoint AND model = old.model AND state = old.state; INSERT
    INTO item_counts (profile, endpoint, model, state, n)
    VALUES (new.profile, new.endpoint, new.model, new.state, 1)
    ON CONFLICT (profile, endpoint, model, state) DO UPDATE SET n = n + 1; END;

CREATE TRIGGER item_counts_delete AFTER DELETE ON items
BEGIN
    UPDATE item_counts SET n = n - 1
    WHERE profile = old.profile AND endpoint = old.endpoint AND model = old.model AND state = old.state; END;

-- Issue 13 (SQLite 016): a claim and a mark_submitted move only the
-- index entries a reader needs.
--
-- items_queue (001) kept an entry for every item in every state, keyed by state first, so each item
-- moved through it at every change of state: queued -> batched (a delete and an insert),
-- batched -> submitted (both again), submitted -> final (both again). Only two states are ever
-- looked up through it: 'queued' (a group's oldest items, by id, for a claim) and 'realtime' (the
-- fallback's work, in deadline order). Two partial indexes serve exactly those: a claim deletes one
-- entry per item and inserts none, and mark_submitted touches neither (of a 50,000-item
-- mark_submitted, the items_queue moves were about half the UPDATE's time).
DROP INDEX items_queue;
CREATE INDEX items_queue ON items (profile, endpoint, model, id) WHERE state = 'queued';
CREATE INDEX items_realtime ON items (deadline, id) WHERE state = 'realtime';

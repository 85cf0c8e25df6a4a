-- Cost accounting: USD per result at batch and at real-time price (NULL when the model is unpriced).
ALTER TABLE results ADD COLUMN cache_creation_input_tokens INTEGER;
ALTER TABLE results ADD COLUMN cost_batch REAL;
ALTER TABLE results ADD COLUMN cost_realtime REAL;
CREATE INDEX results_created ON results (created_at);

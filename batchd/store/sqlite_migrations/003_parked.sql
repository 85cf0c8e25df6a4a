-- Results a sink gave up on after sink.max_age; `batchd redeliver` sets redeliver = 1.
CREATE TABLE parked (
    sink TEXT NOT NULL,
    result_id INTEGER NOT NULL REFERENCES results(id),
    parked_at REAL NOT NULL,
    error TEXT NOT NULL,
    redeliver INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (sink, result_id)
);

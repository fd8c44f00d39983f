-- Source tables of the shop. Ids are TEXT so a shop may use integers or strings; they come back
-- unchanged in every output. Columns are nullable on purpose: this is a raw event log, and the
-- extract stage validates it, counting and reporting bad rows instead of losing a whole load.
CREATE TABLE IF NOT EXISTS products (
    product_id  TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    category    TEXT,
    active      BOOLEAN NOT NULL DEFAULT TRUE
);

CREATE TABLE IF NOT EXISTS interactions (
    interaction_id  BIGSERIAL PRIMARY KEY,
    user_id         TEXT,
    product_id      TEXT,
    event_type      TEXT,            -- purchase | add_to_cart | view | rating | ...
    value           DOUBLE PRECISION, -- quantity or rating; NULL means 1
    occurred_at     TIMESTAMPTZ NOT NULL
);

-- The extract reads one time window [start, end): a range scan on occurred_at.
CREATE INDEX IF NOT EXISTS interactions_occurred_at_idx ON interactions (occurred_at);
-- The serving API folds one user's recent interactions in after each event.
CREATE INDEX IF NOT EXISTS interactions_user_occurred_at_idx ON interactions (user_id, occurred_at);

-- Events posted through the HTTP API may carry the client's event_id: a retried POST is stored
-- once. NULL for rows from anywhere else, so the unique index covers only the ids given.
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS event_id TEXT;
CREATE UNIQUE INDEX IF NOT EXISTS interactions_event_id_key ON interactions (event_id) WHERE event_id IS NOT NULL;

-- Users whose event was stored while Redis was unreachable: the API refreshes their live list
-- once Redis is back (the event itself is already in interactions).
CREATE TABLE IF NOT EXISTS pending_list_refreshes (
    user_id       TEXT PRIMARY KEY,
    requested_at  TIMESTAMPTZ NOT NULL
);

-- Quality history: one row per evaluated run (the evaluate stage inserts it; publish updates its
-- status). Operators and the look-up page read it; `recsys history` prints it.
CREATE TABLE IF NOT EXISTS recsys_runs (
    run_key            TEXT NOT NULL,             -- runs/<window end>/<params fingerprint>
    dag_run_id         TEXT,
    window_start       TIMESTAMPTZ NOT NULL,
    window_end         TIMESTAMPTZ NOT NULL,
    params             JSONB NOT NULL,
    metrics            JSONB NOT NULL,            -- {"model": {...}, "popularity": {...}}
    gate_passed        BOOLEAN NOT NULL,
    gate_reason        TEXT NOT NULL,
    published_version  TEXT,
    status             TEXT NOT NULL CHECK (status IN ('evaluated', 'refused', 'published', 'skipped_stale', 'failed')),
    extract_counts     JSONB,                     -- rows read / kept / dropped by reason
    train_seconds      DOUBLE PRECISION,
    interactions       BIGINT,
    users              BIGINT,
    items              BIGINT,
    recorded_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (run_key, recorded_at)
);
CREATE INDEX IF NOT EXISTS recsys_runs_recorded_at_idx ON recsys_runs (recorded_at);

-- Negative feedback older than the window is read every run (sql/extract_older_negatives.sql): a
-- small index over the default negative event types instead of a scan of the whole history. A shop
-- that configures other negative_event_types adds an index like it for its own.
CREATE INDEX IF NOT EXISTS interactions_negative_feedback_idx ON interactions (occurred_at)
    WHERE event_type IN ('dislike', 'return', 'not_interested');

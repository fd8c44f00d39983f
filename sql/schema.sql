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

-- Product attributes a rule can exclude by (e.g. {"in_stock": false, "age_restricted": true}).
ALTER TABLE products ADD COLUMN IF NOT EXISTS attributes JSONB NOT NULL DEFAULT '{}'::jsonb;

-- Users' segments (e.g. vip, minors): a rule with a segment applies to its members only.
CREATE TABLE IF NOT EXISTS user_segments (
    user_id  TEXT NOT NULL,
    segment  TEXT NOT NULL,
    PRIMARY KEY (segment, user_id)
);

-- Merchandising rules on top of the model (`recsys rules add|list|remove`, docs/rules.md).
-- A rule targets one product, one category or one product attribute; publish applies the rules
-- in force, and the API re-applies them within RECSYS_RULES_REFRESH_SECONDS of any change.
CREATE TABLE IF NOT EXISTS recommendation_rules (
    rule_id          BIGSERIAL PRIMARY KEY,
    kind             TEXT NOT NULL CHECK (kind IN ('pin', 'boost', 'bury', 'exclude')),
    product_id       TEXT,              -- target: one product
    category         TEXT,              -- target: every product of a category
    attribute        TEXT,              -- target: products whose attributes hold attribute_value
    attribute_value  JSONB,
    scope_category   TEXT,              -- pin only: the category's lists (?category=) instead of the main list
    segment          TEXT,              -- only users in this segment (user_segments)
    rank             INTEGER CHECK (rank BETWEEN 1 AND 100),
    factor           DOUBLE PRECISION CHECK (factor >= 0.001 AND factor <= 1000),
    valid_from       TIMESTAMPTZ,
    valid_until      TIMESTAMPTZ,
    note             TEXT,
    created_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (num_nonnulls(product_id, category, attribute) = 1),
    CHECK ((attribute IS NULL) = (attribute_value IS NULL)),
    CHECK ((kind = 'pin') = (rank IS NOT NULL)),
    CHECK ((kind IN ('boost', 'bury')) = (factor IS NOT NULL)),
    CHECK (kind = 'pin' OR scope_category IS NULL),
    CHECK (valid_from IS NULL OR valid_until IS NULL OR valid_until > valid_from)
);

-- Negative feedback older than the window is read every run (sql/extract_older_negatives.sql): a
-- small index over the default negative event types instead of a scan of the whole history. A shop
-- that configures other negative_event_types adds an index like it for its own.
CREATE INDEX IF NOT EXISTS interactions_negative_feedback_idx ON interactions (occurred_at)
    WHERE event_type IN ('dislike', 'return', 'not_interested');

-- A/B tests of recommendation variants (`recsys experiments start|list|stop|report`,
-- docs/experiments.md). A user's variant is a salted hash of (experiment, user id): nothing per
-- user is stored. The first variant (position 0) is the control; users outside the variants'
-- shares get the control and are not part of the experiment.
CREATE TABLE IF NOT EXISTS experiments (
    name            TEXT PRIMARY KEY,
    salt            TEXT NOT NULL,
    primary_metric  TEXT NOT NULL CHECK (primary_metric IN ('click_through', 'conversion')),
    guardrails      JSONB NOT NULL,            -- [{"metric": "conversion", "max_drop": 0.05}, ...]
    starts_at       TIMESTAMPTZ NOT NULL,
    ends_at         TIMESTAMPTZ,
    stopped_at      TIMESTAMPTZ,               -- `recsys experiments stop`: everyone gets the control
    stop_reason     TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK (ends_at IS NULL OR ends_at > starts_at)
);

CREATE TABLE IF NOT EXISTS experiment_variants (
    experiment   TEXT NOT NULL REFERENCES experiments (name),
    position     INTEGER NOT NULL CHECK (position >= 0),
    name         TEXT NOT NULL,
    share        DOUBLE PRECISION NOT NULL CHECK (share > 0 AND share <= 1),
    params       JSONB NOT NULL,               -- overrides of PipelineParams
    stopped_at   TIMESTAMPTZ,                  -- a guardrail stopped it: its users get the control
    stop_reason  TEXT,
    PRIMARY KEY (experiment, name),
    UNIQUE (experiment, position),
    CHECK (position > 0 OR stopped_at IS NULL)
);

-- Every guardrail decision that stopped a variant, with the numbers it was taken on.
CREATE TABLE IF NOT EXISTS experiment_decisions (
    decision_id  BIGSERIAL PRIMARY KEY,
    experiment   TEXT NOT NULL REFERENCES experiments (name),
    variant      TEXT NOT NULL,
    metric       TEXT NOT NULL,
    lift         DOUBLE PRECISION NOT NULL,
    lift_low     DOUBLE PRECISION NOT NULL,
    lift_high    DOUBLE PRECISION NOT NULL,
    max_drop     DOUBLE PRECISION NOT NULL,
    reason       TEXT NOT NULL,
    decided_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What was served, one row per recommendation answer: the analysis counts these as exposures.
-- experiment and variant are NULL for users outside every running experiment.
CREATE TABLE IF NOT EXISTS recommendation_exposures (
    recommendation_id  TEXT PRIMARY KEY,
    experiment         TEXT,
    variant            TEXT,
    user_id            TEXT NOT NULL,
    served_at          TIMESTAMPTZ NOT NULL,
    product_ids        TEXT[] NOT NULL,
    CHECK ((experiment IS NULL) = (variant IS NULL))
);
CREATE INDEX IF NOT EXISTS recommendation_exposures_experiment_idx
    ON recommendation_exposures (experiment, served_at) WHERE experiment IS NOT NULL;

-- Outcomes are events (interactions) that carry the recommendation_id of the answer they followed.
ALTER TABLE interactions ADD COLUMN IF NOT EXISTS recommendation_id TEXT;
CREATE INDEX IF NOT EXISTS interactions_recommendation_id_idx
    ON interactions (recommendation_id) WHERE recommendation_id IS NOT NULL;

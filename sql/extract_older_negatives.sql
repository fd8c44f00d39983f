-- Negative feedback from before the window [start, end): the (user, product) pairs a user said no
-- to (dislike, return, ... as %(event_types)s, a text array). They are never recommended again, so
-- a dislike is not forgotten when it leaves the window; the window's own are in the interactions
-- extract. Such events are rare; on a large shop a partial index on (occurred_at) WHERE event_type
-- is one of them keeps this from scanning the whole history (sql/schema.sql has one for the defaults).
COPY (
    SELECT DISTINCT user_id::text, product_id::text
    FROM interactions
    WHERE event_type = ANY(%(event_types)s)
      AND occurred_at < %(start)s
      AND user_id IS NOT NULL
      AND product_id IS NOT NULL
) TO STDOUT WITH (FORMAT csv)

-- An event posted through the HTTP API. A retry of an already stored event_id inserts nothing
-- (and returns no row); rows without an event_id never conflict.
INSERT INTO interactions (user_id, product_id, event_type, value, occurred_at, event_id, recommendation_id)
VALUES (%(user_id)s, %(product_id)s, %(event_type)s, %(value)s, %(occurred_at)s, %(event_id)s, %(recommendation_id)s)
ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO NOTHING
RETURNING interaction_id

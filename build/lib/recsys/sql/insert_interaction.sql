INSERT INTO interactions (user_id, product_id, event_type, value, occurred_at)
VALUES (%(user_id)s, %(product_id)s, %(event_type)s, %(value)s, %(occurred_at)s)

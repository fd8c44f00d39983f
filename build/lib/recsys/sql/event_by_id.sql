-- The stored event a client's event_id names, to tell a retry from a reused id.
SELECT user_id, product_id, event_type, value
FROM interactions
WHERE event_id = %(event_id)s

COPY interactions (user_id, product_id, event_type, value, occurred_at, recommendation_id) FROM STDIN

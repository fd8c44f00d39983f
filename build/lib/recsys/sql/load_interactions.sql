COPY interactions (user_id, product_id, event_type, value, occurred_at) FROM STDIN WITH (FORMAT csv)

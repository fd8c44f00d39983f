COPY recommendation_exposures (recommendation_id, experiment, variant, user_id, served_at, product_ids) FROM STDIN

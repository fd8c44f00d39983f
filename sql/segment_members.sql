SELECT segment, user_id FROM user_segments WHERE segment = ANY(%(segments)s) ORDER BY segment, user_id

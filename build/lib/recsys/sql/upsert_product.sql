INSERT INTO products (product_id, name, category, active)
VALUES (%(product_id)s, %(name)s, %(category)s, %(active)s)
ON CONFLICT (product_id) DO UPDATE
SET name = EXCLUDED.name, category = EXCLUDED.category, active = EXCLUDED.active

SELECT 1 FROM products WHERE category = %(category)s LIMIT 1

-- Products whose attributes hold %(attribute)s = %(value)s (a JSON value): an exclude rule's targets.
SELECT product_id FROM products WHERE attributes -> %(attribute)s = %(value)s::jsonb ORDER BY product_id

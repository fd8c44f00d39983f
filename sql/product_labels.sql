-- Names and categories of the products a look-up page shows (ids as the shop stores them).
SELECT product_id, name, category FROM products WHERE product_id = ANY(%(product_ids)s)

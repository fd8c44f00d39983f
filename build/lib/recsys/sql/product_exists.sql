-- Is the product in the shop's catalogue? An event on an unknown product is refused.
SELECT 1 FROM products WHERE product_id = %(product_id)s

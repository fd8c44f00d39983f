-- The product's category, if the product is in the catalogue (a rule on an unknown product is refused).
SELECT category FROM products WHERE product_id = %(product_id)s

-- Products the shop has made inactive: kept out of every list at once, before the next run.
SELECT product_id FROM products WHERE NOT active ORDER BY product_id

-- Catalogue product ids, and how many of them are canonical integers (id type inference).
SELECT count(*) AS ids,
       count(*) FILTER (WHERE product_id ~ '^(0|-?[1-9][0-9]{0,15})$') AS integer_ids
FROM products

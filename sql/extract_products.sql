COPY (
    SELECT product_id::text, name, category, active, attributes::text
    FROM products
    ORDER BY product_id
) TO STDOUT WITH (FORMAT csv)

COPY (
    SELECT product_id::text, name, category, active
    FROM products
    ORDER BY product_id
) TO STDOUT WITH (FORMAT csv)

COPY (
    SELECT product_id::text, name, category, active
    FROM products
) TO STDOUT WITH (FORMAT csv)

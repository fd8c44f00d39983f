COPY products (product_id, name, category, active) FROM STDIN WITH (FORMAT csv)

TRUNCATE interactions, products RESTART IDENTITY

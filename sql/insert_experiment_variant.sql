INSERT INTO experiment_variants (experiment, position, name, share, params)
VALUES (%(experiment)s, %(position)s, %(name)s, %(share)s, %(params)s)

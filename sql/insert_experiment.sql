INSERT INTO experiments (name, salt, primary_metric, guardrails, starts_at, ends_at)
VALUES (%(name)s, %(salt)s, %(primary_metric)s, %(guardrails)s, %(starts_at)s, %(ends_at)s)
RETURNING created_at

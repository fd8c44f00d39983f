SELECT name, salt, primary_metric, guardrails, starts_at, ends_at, stopped_at, stop_reason, created_at
FROM experiments
WHERE name = %(name)s

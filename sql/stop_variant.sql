-- A guardrail stops a variant once; never the control (position 0).
UPDATE experiment_variants SET stopped_at = %(stopped_at)s, stop_reason = %(reason)s
WHERE experiment = %(experiment)s AND name = %(variant)s AND position > 0 AND stopped_at IS NULL
RETURNING name

SELECT variant, metric, lift, lift_low, lift_high, max_drop, reason, decided_at
FROM experiment_decisions
WHERE experiment = %(experiment)s
ORDER BY decided_at, decision_id

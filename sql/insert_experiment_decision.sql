INSERT INTO experiment_decisions (experiment, variant, metric, lift, lift_low, lift_high, max_drop, reason, decided_at)
VALUES (%(experiment)s, %(variant)s, %(metric)s, %(lift)s, %(lift_low)s, %(lift_high)s, %(max_drop)s, %(reason)s,
        %(decided_at)s)

INSERT INTO recsys_runs (
    run_key, dag_run_id, window_start, window_end, params, metrics, gate_passed, gate_reason, status,
    extract_counts, train_seconds, interactions, users, items
) VALUES (
    %(run_key)s, %(dag_run_id)s, %(window_start)s, %(window_end)s, %(params)s, %(metrics)s, %(gate_passed)s,
    %(gate_reason)s, %(status)s, %(extract_counts)s, %(train_seconds)s, %(interactions)s, %(users)s, %(items)s
)
RETURNING recorded_at

SELECT run_key, dag_run_id, window_start, window_end, params, metrics, gate_passed, gate_reason,
       published_version, status, extract_counts, train_seconds, interactions, users, items, recorded_at
FROM recsys_runs
ORDER BY recorded_at DESC
LIMIT %(limit)s

-- The latest pipeline runs for the look-up page's quality history, newest first, each row as one
-- JSON object (columns added to recsys_runs later come along). The pipeline writes the table.
SELECT to_jsonb(runs) FROM recsys_runs AS runs ORDER BY recorded_at DESC LIMIT %(limit)s

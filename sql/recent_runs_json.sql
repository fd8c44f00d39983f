-- The latest pipeline runs (by when they were recorded) for the look-up page's quality history, in
-- date order (window end, then recording: a backfill recorded after later dates still sits at its
-- date), each row as one JSON object (columns added to recsys_runs later come along). The pipeline
-- writes the table.
SELECT to_jsonb(runs)
FROM (SELECT * FROM recsys_runs ORDER BY recorded_at DESC LIMIT %(limit)s) AS runs
ORDER BY runs.window_end, runs.recorded_at

-- Does the run history table exist in the schema on the search_path? (created by `recsys init-db`)
SELECT to_regclass('recsys_runs') IS NOT NULL

-- The oldest pending list refreshes first.
SELECT user_id, requested_at
FROM pending_list_refreshes
ORDER BY requested_at
LIMIT %(limit)s

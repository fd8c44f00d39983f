-- The user's live list could not be refreshed after their event was stored (Redis unreachable).
INSERT INTO pending_list_refreshes (user_id, requested_at)
VALUES (%(user_id)s, %(requested_at)s)
ON CONFLICT (user_id) DO UPDATE SET requested_at = EXCLUDED.requested_at

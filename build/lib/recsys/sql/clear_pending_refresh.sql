-- Done with a user's refresh; a newer request made meanwhile (later requested_at) stays.
DELETE FROM pending_list_refreshes
WHERE user_id = %(user_id)s AND requested_at <= %(requested_at)s

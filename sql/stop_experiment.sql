UPDATE experiments SET stopped_at = %(stopped_at)s, stop_reason = %(reason)s
WHERE name = %(name)s AND stopped_at IS NULL

-- Distinct user ids of a window, and how many of them are canonical integers (id type inference).
SELECT count(DISTINCT user_id) AS ids,
       count(DISTINCT user_id) FILTER (WHERE user_id ~ '^(0|-?[1-9][0-9]{0,15})$') AS integer_ids
FROM interactions
WHERE occurred_at >= %(start)s AND occurred_at < %(end)s AND user_id <> ''

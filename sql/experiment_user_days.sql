-- Per variant, user and UTC day of serving: the lists served, those clicked and those converted.
-- An outcome is an event carrying the list's recommendation_id, by the same user, on a product of
-- the list, within the attribution window after serving; a list counts once however many events
-- it drew. A click is an event of any of click_types, a conversion one of conversion_types.
-- The outcomes are looked up per list (LATERAL, on the recommendation_id index): the plan stays
-- right even before the tables' statistics know of freshly loaded rows.
SELECT s.variant,
       s.user_id,
       (s.served_at AT TIME ZONE 'UTC')::date AS day,
       count(*) AS lists,
       count(*) FILTER (WHERE o.clicked) AS clicked,
       count(*) FILTER (WHERE o.converted) AS converted,
       min(s.served_at) AS first_served_at
FROM recommendation_exposures AS s
LEFT JOIN LATERAL (
    SELECT bool_or(i.event_type = ANY(%(click_types)s)) AS clicked,
           bool_or(i.event_type = ANY(%(conversion_types)s)) AS converted
    FROM interactions AS i
    WHERE i.recommendation_id = s.recommendation_id
      AND i.user_id = s.user_id
      AND i.product_id = ANY(s.product_ids)
      AND i.occurred_at >= s.served_at
      AND i.occurred_at < s.served_at + %(window)s
) AS o ON TRUE
WHERE s.experiment = %(experiment)s AND s.served_at >= %(start)s AND s.served_at < %(end)s
GROUP BY s.variant, s.user_id, day
ORDER BY s.variant, day, s.user_id

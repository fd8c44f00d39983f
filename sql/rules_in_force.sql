-- The rules in force at %(at)s: a window is [valid_from, valid_until).
SELECT rule_id, kind, product_id, category, attribute, attribute_value, scope_category, segment, rank, factor,
       valid_from, valid_until, note, created_at
FROM recommendation_rules
WHERE (valid_from IS NULL OR valid_from <= %(at)s)
  AND (valid_until IS NULL OR valid_until > %(at)s)
ORDER BY rule_id

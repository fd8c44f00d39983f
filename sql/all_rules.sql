SELECT rule_id, kind, product_id, category, attribute, attribute_value, scope_category, segment, rank, factor,
       valid_from, valid_until, note, created_at
FROM recommendation_rules
ORDER BY rule_id

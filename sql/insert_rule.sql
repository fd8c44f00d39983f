INSERT INTO recommendation_rules (
    kind, product_id, category, attribute, attribute_value, scope_category, segment, rank, factor,
    valid_from, valid_until, note
)
VALUES (
    %(kind)s, %(product_id)s, %(category)s, %(attribute)s, %(attribute_value)s, %(scope_category)s, %(segment)s,
    %(rank)s, %(factor)s, %(valid_from)s, %(valid_until)s, %(note)s
)
RETURNING rule_id, created_at

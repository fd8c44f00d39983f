DELETE FROM recommendation_rules WHERE rule_id = %(rule_id)s RETURNING rule_id

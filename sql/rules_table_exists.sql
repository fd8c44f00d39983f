SELECT to_regclass('recommendation_rules') IS NOT NULL

-- Lists the API logged for an experiment (recsys bench abtest waits for its flushes)
SELECT count(*) FROM recommendation_exposures WHERE experiment = %(experiment)s

"""Models and how they are judged: ALS fitting, interaction weighting, ranking, metrics,
model-agnostic evaluation and the hyperparameter search. Imports only ``recsys.core``."""

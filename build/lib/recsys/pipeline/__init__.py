"""The batch pipeline: one module per stage (extract, matrix, train, evaluate, tune, publish) and
the run that strings them together (``stages``). Imports ``recsys.core`` and ``recsys.ml``,
never ``recsys.serving``."""

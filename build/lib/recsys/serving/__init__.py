"""Serving the live version: the HTTP API, its keys, and the look-up page. Imports
``recsys.core`` and ``recsys.ml``, never ``recsys.pipeline``."""

"""Publish: staging a version into Redis (``stage``) and switching it live, keeping and rolling
back versions (``versions``, with its Lua scripts under ``lua/``)."""

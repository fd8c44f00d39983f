"""Shared core: settings, errors, params, time windows and version names, id types, the run-folder
layout, the artifact store, the database and the Redis key layout. Imports nothing else of ours."""

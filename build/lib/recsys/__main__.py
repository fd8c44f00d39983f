"""``python -m recsys``: the ``recsys`` command."""

from recsys.cli import main

main()

"""``python -m nextbest``: the command line."""

from nextbest.cli import main

main()

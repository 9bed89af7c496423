"""``python -m jsarag`` = the ``jsarag`` command."""
from jsarag.cli import main

main()

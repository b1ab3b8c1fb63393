"""``python -m deep3m.client.cli`` runs the command line (as the ``deep3m`` script)."""

from deep3m.client.cli import main

main()

"""The ``deep3m`` command line: run roles, submit and follow jobs, work on volumes.

Every command that talks to a scheduler takes ``--scheduler HOST:PORT`` (or
``DEEP3M_SCHEDULER_ADDRESS``), or ``--namespace``/``--kube-context`` to reach an
in-cluster scheduler through a Kubernetes port-forward. Volume commands
(``describe``, ``label``, ``evaluate``, ``pyramid``, ``export``, ``models``) run
in this process on the store given by ``--store`` (default ``DEEP3M_STORE_URL``);
a volume argument is a path in that store or ``STORE_URL//PATH``. ``--output
json`` prints machine-readable results (JSON lines while a job is followed).
Failures exit non-zero.

Modules: ``app`` (the Typer app and global options), ``options`` (options several
commands share, declared once), ``jobs`` (submit, follow, list, cancel), ``roles``
(serve, up, demo, doctor), ``volumes`` (commands on the store), ``output``
(rendering every result as text or JSON).
"""

from __future__ import annotations

# The command modules register their commands on ``app`` when imported.
from deep3m.client.cli import jobs, roles, volumes
from deep3m.client.cli.app import app, main

__all__ = ["app", "jobs", "main", "roles", "volumes"]

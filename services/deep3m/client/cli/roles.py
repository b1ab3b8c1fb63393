"""Commands that run deep3m itself: serve one role, run every role locally, the demo, doctor."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from deep3m.client.cli.app import app, console, error, errors_exit, fail, out, settings, state
from deep3m.client.cli.output import say
from deep3m.core.errors import Deep3mError
from deep3m.launcher.local import DEFAULT_STORE, LocalCluster, LocalClusterSpec
from deep3m.launcher.state import (
    RunningUp,
    clear_running,
    record_running,
    state_dir,
    up_credentials,
)
from deep3m.runtime.healthcheck import check_health, store_round_trip
from deep3m.runtime.server import serve as run_role
from deep3m.runtime.settings import ROLES


@app.command()
def serve(role: str = typer.Argument(..., help=f"One of: {', '.join(ROLES)}")) -> None:
    """Start one role's gRPC server (and its worker loop) until SIGTERM."""
    if role not in ROLES:
        raise fail(f"unknown role {role!r}; choose one of {', '.join(ROLES)}", 2)
    # A role that cannot start, or ends itself (a scheduler fenced off), exits non-zero.
    with errors_exit():
        run_role(role, settings())


def _ports(values: list[str], roles: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for value in values:
        role, _, number = value.partition("=")
        if role not in roles or not number.isdigit() or int(number) > 65535:
            raise fail(
                f"--port must be ROLE=N with ROLE one of {', '.join(roles)} and N in "
                f"0..65535 (0: any free port), got {value!r}",
                2,
                field="port",
            )
        ports[role] = int(number)
    return ports


@app.command()
def up(
    store: str = typer.Option(DEFAULT_STORE, help="Store URL or folder."),
    log_dir: Path = typer.Option(Path(DEFAULT_STORE) / "logs", help="Role logs go here."),
    metrics: bool = typer.Option(False, help="Expose Prometheus endpoints on free ports."),
    roles: str = typer.Option(",".join(ROLES), help="Comma-separated roles to run."),
    port: list[str] = typer.Option(
        [], "--port", help="ROLE=N: listen on port N (0: any free port); repeatable."
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="No tokens, no TLS: anyone on this machine may call the roles and lease tasks.",
    ),
) -> None:
    """Run the scheduler and one worker per role on localhost until Ctrl-C.

    Every role checks bearer tokens and speaks mutual TLS with credentials made on
    first use (a CA, a certificate, a token per worker role, a client token) and
    kept, private, in the state folder (DEEP3M_STATE_DIR, else
    ~/.local/state/deep3m); the CLI on this machine picks them up for the roles'
    addresses. A role that exits is restarted on its port after a backoff (0.5 s,
    doubling up to 30 s); every role stops when this command ends, however it ends.
    """
    chosen = tuple(r for r in roles.split(",") if r)
    unknown = [r for r in chosen if r not in ROLES]
    if unknown or not chosen:
        raise fail(f"--roles: unknown role(s) {unknown}; choose from {', '.join(ROLES)}", 2)
    ports = _ports(port, chosen)
    folder = state_dir(settings())
    with errors_exit():
        creds = None if insecure else up_credentials(folder)
    spec = LocalClusterSpec(
        store_url=store,
        roles=chosen,
        base_ports=ports,
        log_dir=log_dir,
        metrics=metrics,
        credentials=creds,
    )
    cluster = LocalCluster(spec)
    # SIGTERM ends `up` like Ctrl-C: the roles are stopped in order on the way out.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            cluster.start()
        except Deep3mError as exc:
            raise error(exc) from exc
        addresses = {r: cluster.address(r) for r in cluster.processes}
        with errors_exit():
            record_running(
                folder, RunningUp(os.getpid(), addresses, str(creds.folder) if creds else "")
            )
        security = (
            {"tokens": True, "tls": "mutual", "credentials": str(creds.folder)} if creds else None
        )
        if state.json:
            summary = {
                "store": cluster.store_url,
                "logs": str(log_dir),
                "security": security,
                "roles": {
                    r: {"address": cluster.address(r), "pid": p.pid}
                    for r, p in cluster.processes.items()
                },
            }
            # One line, flushed: scripts read it while `up` keeps running.
            sys.stdout.write(json.dumps(summary) + "\n")
            sys.stdout.flush()
        else:
            table = Table(title="deep3m is up", show_header=True)
            for column in ("role", "address", "pid"):
                table.add_column(column)
            for r, p in cluster.processes.items():
                table.add_row(r, cluster.address(r), str(p.pid))
            out.print(table)
            out.print(
                f"store: {cluster.store_url}\nlogs: {log_dir}\n"
                + (
                    f"security: bearer tokens and mutual TLS; credentials in {creds.folder} "
                    "(the CLI on this machine uses them)\n"
                    if creds
                    else "security: off (--insecure): anyone on this machine may call the roles\n"
                )
                + "Ctrl-C stops every role.",
                soft_wrap=True,
                highlight=False,
            )
        try:
            cluster.supervise(threading.Event(), _report)
        except Deep3mError as exc:
            raise error(exc) from exc
    except KeyboardInterrupt:
        pass
    finally:
        clear_running(folder, os.getpid())
        cluster.stop()


def _report(message: str) -> None:
    console.print(f"[yellow]{escape(message)}[/yellow]", soft_wrap=True, highlight=False)


@app.command()
def demo(
    store: str = typer.Option("./deep3m-data/demo", help="Where the demo writes its results."),
    minutes: float = typer.Option(0.0, help="Training budget override (0: the recipe's)."),
) -> None:
    """Train a small ensemble on the CDeep3M mitochondria sample, predict, and score it."""
    # Loaded here, not at the top: the demo's scoring pulls scipy and its recipe the
    # training package, a quarter of the CLI's start-up time for one rarely used command.
    from deep3m.client.demo import run_demo

    try:
        report = run_demo(store, console=console, budget_minutes=minutes or None)
    except Deep3mError as exc:
        raise error(exc) from exc
    if state.json:
        out.print_json(json.dumps(report))


@app.command()
def doctor(
    address: list[str] | None = typer.Option(
        None, "--address", help="host:port of a deep3m server (repeatable; default --scheduler)."
    ),
    store: bool = typer.Option(
        False, "--store", help="Also write, read back and delete a probe in DEEP3M_STORE_URL."
    ),
    service: str = typer.Option("", "--service", help="gRPC service name to ask about."),
) -> None:
    """Check that servers answer gRPC health checks and that the store works."""
    targets = list(address or []) or ([] if store else [state.scheduler])
    checks: list[dict[str, Any]] = []
    for target in targets:
        try:
            health = check_health(
                target, service=service, timeout_s=state.timeout_s, security=state.security(target)
            )
            checks.append(
                {"check": "health", "target": target, "ok": health == "SERVING", "status": health}
            )
        except Deep3mError as exc:
            checks.append({"check": "health", "target": target, "ok": False, "error": exc.message})
    if store:
        with errors_exit():
            s = settings()
        try:
            seconds = store_round_trip(s)
            checks.append({"check": "store", "target": s.store_url, "ok": True, "seconds": seconds})
        except (Deep3mError, OSError) as exc:
            checks.append({"check": "store", "target": s.store_url, "ok": False, "error": str(exc)})
    ok = all(c["ok"] for c in checks)
    if state.json:
        out.print_json(json.dumps({"ok": ok, "checks": checks}))
    else:
        for c in checks:
            mark = "ok  " if c["ok"] else "FAIL"
            if c["check"] == "store" and c["ok"]:
                detail = f"round trip in {c['seconds']:.3f} s"
            else:
                detail = c.get("status") or c.get("error", "")
            say(f"{mark} {c['check']:<6} {c['target']} {detail}")
    if not ok:
        raise typer.Exit(1)

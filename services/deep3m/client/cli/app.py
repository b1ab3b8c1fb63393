"""The Typer app, its global options, and the helpers every command shares.

Global options land in ``state``; commands reach the scheduler through
``client()``, read ``DEEP3M_*`` settings through ``settings()`` and leave
through ``fail()``/``error()``, which print the message (text or JSON) and
return the ``typer.Exit`` to raise.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from enum import StrEnum
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from deep3m.client.client import Deep3mClient
from deep3m.client.portforward import scheduler_tunnel
from deep3m.core.errors import Deep3mError
from deep3m.launcher.state import local_security
from deep3m.runtime.channel import ChannelSecurity
from deep3m.runtime.settings import Settings

app = typer.Typer(
    help="deep3m: deep-learning segmentation of large microscopy volumes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Messages, progress and errors go to stderr; results to stdout.
console = Console(stderr=True)
out = Console()


class OutputFormat(StrEnum):
    text = "text"
    json = "json"


class State:
    """The global options of this invocation."""

    # Empty: DEEP3M_SCHEDULER_ADDRESS, else the Settings default.
    scheduler_option: str = ""
    namespace: str | None = None
    kube_context: str | None = None
    release: str | None = None
    output: OutputFormat = OutputFormat.text
    timeout_s: float = 30.0
    # Channel security given on the command line; unset parts come from DEEP3M_* settings.
    token: str = ""
    token_file: str = ""
    tls: bool | None = None
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def security(self, local: str = "") -> ChannelSecurity:
        """TLS files and token: the command line's, else the settings', else — for
        ``local``, an address on this machine — those of the ``deep3m up`` serving it."""
        chosen = settings()
        base = ChannelSecurity.from_settings(chosen)
        if local and self.tls is not False and not (base.token or base.tls):
            try:
                base = local_security(local, chosen) or base
            except Deep3mError as exc:
                raise error(exc) from exc
        token = self.token
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise fail(f"cannot read --token-file {self.token_file}: {exc}", 2) from exc
        return replace(
            base,
            token=token or base.token,
            tls=base.tls if self.tls is None else self.tls,
            ca_file=self.ca_file or base.ca_file,
            cert_file=self.cert_file or base.cert_file,
            key_file=self.key_file or base.key_file,
            server_name=self.server_name or base.server_name,
        )

    @property
    def scheduler(self) -> str:
        return self.scheduler_option or settings().scheduler_address

    @property
    def json(self) -> bool:
        return self.output is OutputFormat.json


state = State()


@app.callback()
def _global(
    scheduler: str = typer.Option(
        "",
        "--scheduler",
        "-s",
        show_default=False,
        help="Scheduler address host:port (default: DEEP3M_SCHEDULER_ADDRESS, else "
        f"{Settings.model_fields['scheduler_address'].default}).",
    ),
    namespace: str | None = typer.Option(
        None,
        "--namespace",
        "-n",
        help="Reach an in-cluster scheduler in this namespace through a Kubernetes port-forward.",
    ),
    kube_context: str | None = typer.Option(
        None, "--kube-context", help="kubeconfig context for --namespace."
    ),
    release: str | None = typer.Option(
        None, "--release", help="Helm release name, when several share a namespace."
    ),
    output: OutputFormat = typer.Option(OutputFormat.text, "--output", "-o", help="text or json."),
    timeout_s: float = typer.Option(30.0, "--timeout", help="Deadline of each call, seconds."),
    token: str = typer.Option(
        "", "--token", help="Bearer token (default: DEEP3M_AUTH_TOKEN / DEEP3M_AUTH_TOKEN_FILE)."
    ),
    token_file: str = typer.Option("", "--token-file", help="File holding the bearer token."),
    tls: bool | None = typer.Option(
        None, "--tls/--no-tls", help="TLS to the scheduler (default: DEEP3M_TLS_ENABLED)."
    ),
    ca_file: str = typer.Option("", "--ca", help="CA certificate (PEM) to verify the server."),
    cert_file: str = typer.Option("", "--cert", help="Client certificate (PEM), mutual TLS."),
    key_file: str = typer.Option("", "--key", help="Client key (PEM), mutual TLS."),
    server_name: str = typer.Option(
        "", "--server-name", help="Name expected in the server certificate."
    ),
) -> None:
    state.scheduler_option = scheduler
    state.namespace = namespace
    state.kube_context = kube_context
    state.release = release
    state.output = output
    state.timeout_s = timeout_s
    state.token, state.token_file, state.tls = token, token_file, tls
    state.ca_file, state.cert_file, state.key_file = ca_file, cert_file, key_file
    state.server_name = server_name


def fail(message: str, code: int = 1, *, field: str = "") -> typer.Exit:
    """Print ``message`` as the command's error; returns the exit to raise."""
    if state.json:
        body = {"error": message, **({"field": field} if field else {})}
        out.print_json(json.dumps(body))
    else:
        # Messages hold paths and values verbatim: no markup, no wrapping inside them.
        console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def error(exc: Deep3mError) -> typer.Exit:
    """Exit non-zero with a domain error's message and the field it names."""
    return fail(exc.message + (f" (field: {exc.field})" if exc.field else ""), field=exc.field)


def settings() -> Settings:
    """The ``DEEP3M_*`` settings; a value that does not parse exits with its name."""
    try:
        return Settings()
    except Deep3mError as exc:
        raise fail(f"invalid DEEP3M_* settings: {exc.message}", 2, field=exc.field) from exc


@contextlib.contextmanager
def client() -> Iterator[Deep3mClient]:
    """A client of the scheduler named by the global options."""
    # Errors while connecting (port-forward, channel) exit as cleanly as errors of calls.
    try:
        with contextlib.ExitStack() as stack:
            address = local = state.scheduler
            if state.namespace or state.kube_context:
                local = ""  # a port-forward: the cluster's credentials, never a local up's
                address = stack.enter_context(
                    scheduler_tunnel(
                        state.namespace or "deep3m",
                        context=state.kube_context,
                        release=state.release,
                    )
                )
            yield stack.enter_context(
                Deep3mClient(address, timeout_s=state.timeout_s, security=state.security(local))
            )
    except Deep3mError as exc:
        raise error(exc) from exc


@contextlib.contextmanager
def errors_exit() -> Iterator[None]:
    """Domain and file-system errors exit non-zero with their message."""
    try:
        yield
    except Deep3mError as exc:
        raise error(exc) from exc
    except OSError as exc:
        raise fail(str(exc), field=str(exc.filename or "")) from exc


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

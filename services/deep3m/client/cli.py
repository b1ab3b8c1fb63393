"""The ``deep3m`` command line."""

from __future__ import annotations

import typer

from deep3m.runtime.settings import ROLES

app = typer.Typer(help="deep3m: deep-learning segmentation of large microscopy volumes.",
                  no_args_is_help=True, pretty_exceptions_enable=False)


@app.command()
def serve(role: str = typer.Argument(..., help=f"One of: {', '.join(ROLES)}")) -> None:
    """Start one role's gRPC server (and its worker loop) until SIGTERM."""
    from deep3m.runtime.server import serve as run
    from deep3m.runtime.settings import Settings

    if role not in ROLES:
        typer.echo(f"error: unknown role {role!r}; choose one of {', '.join(ROLES)}", err=True)
        raise typer.Exit(2)
    run(role, Settings())


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""`rft serve`: the deployments of `deployments/prefect.yaml` served from this process, on their schedules."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rft.errors import fail


def serve_cmd(
    deployment: Annotated[
        list[str] | None,
        typer.Option("--deployment", "-d", help="Serve only this deployment (repeatable; default: all)."),
    ] = None,
    prefect_file: Annotated[
        Path, typer.Option("--prefect-file", help="The deployments file (relative to the project root).")
    ] = Path("deployments/prefect.yaml"),
    port: Annotated[
        int,
        typer.Option(help="Port of the local Prefect server used or started when PREFECT_API_URL is unset."),
    ] = 4200,
    limit: Annotated[
        int | None, typer.Option(help="Most flow runs at the same time (default: no limit).")
    ] = None,
) -> None:
    """Serve the deployments of deployments/prefect.yaml from this process, on their schedules.

    Run it from the project root. Trigger runs as with a worker, e.g.
    `prefect deployment run rft-pipeline/rft-pipeline`.
    """
    from flows.serve import ServeError, serve_deployments  # imports Prefect only when the command runs

    console = Console(highlight=False, soft_wrap=True)  # lines whole, to read and grep
    try:
        serve_deployments(prefect_file, deployment, port=port, limit=limit, say=lambda line: console.print(line, markup=False))
    except ServeError as exc:
        raise fail(str(exc)) from None
